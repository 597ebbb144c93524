"""The cores this process may run on, as torch counts them.

``os.cpu_count()`` counts the machine's cores; a process pinned to fewer (``taskset``,
``docker run --cpuset-cpus``, a scheduler's CPU set) may use only those, and torch sizes its
thread pool by them. Thread budgets split these, so that stages, sessions and workers that
run side by side do not oversubscribe the cores they actually have.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores in this process's CPU affinity (the machine's count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def share(parts: int) -> int:
    """Torch threads for each of ``parts`` processes that share the available cores (at least 1)."""
    return max(1, available_cores() // max(1, parts))
