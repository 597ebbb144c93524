"""Gadgets that misbehave, for the runner's failure tests (run as `python -m gadgetron ... tests.faulty_gadgets X`)."""

from __future__ import annotations

import sys
from typing import Any

from gadgetron.types.recon_data import ReconData

from gadgets.stages import SafeSocket, send_error


def explode_on_second_buffer(connection: Any) -> None:
    """Passes the first k-space buffer on, then reports ERROR as our gadgets do and exits 1."""
    connection.socket = SafeSocket(connection.socket.socket)
    seen = 0
    for item in connection:
        if isinstance(item, ReconData):
            seen += 1
            if seen == 2:
                send_error(connection, "tests.faulty_gadgets: slice 2 exploded")
                raise SystemExit(1)
        connection.send(item)


def raise_like_gadgetron_python(connection: Any) -> None:
    """Raises on the first item: gadgetron-python then sends only CLOSE and exits 1."""
    for _ in connection:
        raise RuntimeError("plain exception without ERROR")


def print_to_stdout(connection: Any) -> None:
    """Writes to stdout, Gadgetron's data pipe."""
    sys.stdout.write("hello from a gadget\n")
    sys.stdout.flush()
    for item in connection:
        connection.send(item)
