"""Gadgets that misbehave, for the runner's failure tests (run as `python -m gadgetron ... tests.faulty_gadgets X`)."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import ismrmrd
from gadgetron.types.recon_data import ReconData

from gadgets.convert import is_maps
from gadgets.stages import SafeSocket, send_error, serve


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


def error_without_close(connection: Any) -> None:
    """Sends ERROR and drops the connection without CLOSE (Gadgetron then reports only an illegal message id)."""
    for _ in connection:
        message = b"tests.faulty_gadgets: no close"
        connection.socket.socket.sendall((8).to_bytes(2, "little") + len(message).to_bytes(8, "little") + message)
        os._exit(1)


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


# Faults injected into the real stages: the gadget runs `gadgets.stages.serve` with the real
# stage classes and configuration; only the stage's `process` (or the socket) misbehaves at
# the second image-bearing item (its second slice).
STAGES = {
    "recon": ("gadgets.recon", "ReconStage", ReconData),
    "detect": ("gadgets.detect", "DetectStage", ismrmrd.Image),
    "mitigate": ("gadgets.mitigate", "MitigateStage", ismrmrd.Image),
    "export": ("gadgets.export", "ExportStage", ismrmrd.Image),
}


def _second_slice(kind: type) -> Callable[[Any], bool]:
    seen = {"n": 0}

    def hit(item: Any) -> bool:
        if isinstance(item, kind) and not is_maps(item):
            seen["n"] += 1
        return seen["n"] == 2

    return hit


def _inject(connection: Any, stage: str, fault: str) -> None:
    module_name, class_name, kind = STAGES[stage]
    cls = getattr(importlib.import_module(module_name), class_name)
    original, hit = cls.process, _second_slice(kind)

    def process(self: Any, item: Any) -> Any:
        if hit(item):
            if fault == "raise":
                raise RuntimeError(f"injected fault: the {stage} stage raised on slice 2")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)  # the process and its socket vanish mid-stream
        return original(self, item)

    if fault == "network":  # the socket dies as the second image is sent: no ERROR can follow
        send, image_sent = type(connection).send, _second_slice(ismrmrd.Image)

        def broken(self: Any, item: Any) -> None:
            if image_sent(item):
                self.socket.socket.shutdown(socket.SHUT_RDWR)
                raise BrokenPipeError(32, "injected fault: connection to the next gadget broke")
            send(self, item)

        type(connection).send = broken
    else:
        cls.process = process
    serve(connection, module_name, stage)


def recon_raises(connection: Any) -> None:
    _inject(connection, "recon", "raise")


def detect_raises(connection: Any) -> None:
    _inject(connection, "detect", "raise")


def detect_killed(connection: Any) -> None:
    _inject(connection, "detect", "kill")


def mitigate_raises(connection: Any) -> None:
    _inject(connection, "mitigate", "raise")


def mitigate_network_breaks(connection: Any) -> None:
    _inject(connection, "mitigate", "network")


def export_raises(connection: Any) -> None:
    _inject(connection, "export", "raise")
