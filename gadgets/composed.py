"""Several CycGuard stages in one process (property ``stages``, e.g. ``recon,detect,mitigate,export``).

Saves serialising the buffer, coil maps and image between processes; behaves exactly as the
same stages run as separate ``<external>`` nodes.
"""

from __future__ import annotations

from typing import Any

from gadgets.stages import gadget_logging, serve


def composed(connection: Any) -> None:
    """Gadget target ``gadgets.composed:composed``."""
    gadget_logging()
    serve(connection, "gadgets.composed", "composed")
