"""Gadgetron's side of an ``<external>`` node, over the real wire protocol.

Active mode (``<execute>``): as Gadgetron does, listen on an ephemeral loopback port and
launch ``python -m gadgetron <port> <module> <target>``; passive mode (``<connect>``):
connect to a gadget that listens. Then send CONFIG (the node's ``<configuration>``), HEADER,
the items, CLOSE, while reading the items the gadget sends back until its CLOSE. ERROR (8)
is honoured: its message fails the run. A gadget that dies, closes without CLOSE, exits
non-zero, sends an id Gadgetron would not accept, or writes to stdout (Gadgetron's data
pipe) also fails the run, with the tail of its stderr.

Serialisation is gadgetron-python's own readers and writers; every read is capped.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import ismrmrd
from gadgetron.external import readers, writers
from gadgetron.types.image_array import ImageArray, read_image_array, write_image_array
from gadgetron.types.recon_data import ReconData, read_recon_data, write_recon_data

from gadgets.runner.config import ExternalNode
from gadgets.stages import MESSAGE_CLOSE, MESSAGE_ERROR, SafeSocket

log = logging.getLogger("cycguard.runner")

MESSAGE_CONFIG, MESSAGE_HEADER = 2, 3
MAX_TEXT_BYTES = 1 << 20
READERS = {
    1008: readers.read_acquisition,
    1026: readers.read_waveform,
    1022: readers.read_image,
    1024: read_image_array,
    1023: read_recon_data,
}


class GadgetError(RuntimeError):
    """A gadget failed; the message names it and says what it reported."""


def write_item(wire: Any, item: Any) -> None:
    """Serialise one item as Gadgetron would."""
    if isinstance(item, ismrmrd.Acquisition):
        writers.write_acquisition(wire, item)
    elif isinstance(item, ismrmrd.Waveform):
        writers.write_waveform(wire, item)
    elif isinstance(item, ismrmrd.Image):
        writers.write_image(wire, item)
    elif isinstance(item, ImageArray):
        write_image_array(wire, item)
    elif isinstance(item, ReconData):
        write_recon_data(wire, item)
    else:
        raise TypeError(f"no Gadgetron message for {type(item).__name__}")


def _string_message(mid: int, text: bytes) -> bytes:
    return struct.pack("<H", mid) + struct.pack("<I", len(text)) + text


class _Drain(threading.Thread):
    """Reads a child's pipe, keeping the tail (stderr is echoed to ours)."""

    def __init__(self, pipe: Any, echo: bool) -> None:
        super().__init__(daemon=True)
        self.pipe, self.echo = pipe, echo
        self.tail: deque[str] = deque(maxlen=30)
        self.bytes = 0

    def run(self) -> None:
        for line in iter(self.pipe.readline, b""):
            self.bytes += len(line)
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            if self.echo:
                sys.stderr.write(text + "\n")


class ExternalRun:
    """One run of an external node over a stream of items."""

    def __init__(self, node: ExternalNode, header_xml: str, threads: int | None = None, start_timeout: float = 120.0, io_timeout: float = 900.0, echo_stderr: bool = False) -> None:
        self.node = node
        self.header_xml = header_xml
        self.threads = threads
        self.start_timeout = start_timeout
        self.io_timeout = io_timeout
        self.echo_stderr = echo_stderr
        self.errors: list[str] = []
        self.upstream_error: BaseException | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.stdout: _Drain | None = None
        self.stderr: _Drain | None = None
        self.sock: socket.socket | None = None
        self.writer: threading.Thread | None = None

    # -------------------------------------------------------------- connection

    def _launch(self) -> socket.socket:
        if self.node.connect is not None:
            address, port = self.node.connect
            try:
                return socket.create_connection((address, port), timeout=self.start_timeout)
            except OSError as err:
                raise GadgetError(f"{self.node.name}: cannot connect to the listening gadget at {address}:{port}: {err}; a <connect> "
                                 f"node needs its gadget started first (python -m gadgets.listen MODULE TARGET --port {port}; "
                                 "add --forever for a warm gadget server, as the _warm pipelines expect)") from err
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        env = dict(os.environ)
        env.setdefault("GADGETRON_EXTERNAL_LOG_LEVEL", "INFO")
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        command = [sys.executable, "-m", "gadgetron", str(port), self.node.module, self.node.target]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.stdout, self.stderr = _Drain(self.process.stdout, False), _Drain(self.process.stderr, self.echo_stderr)
        self.stdout.start()
        self.stderr.start()
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                try:
                    sock, _ = listener.accept()
                    return sock
                except TimeoutError:
                    if self.process.poll() is not None:
                        self._release()
                        raise GadgetError(f"{self.node.name}: exited with status {self.process.returncode} before connecting{self._tail()}") from None
                    if time.monotonic() > deadline:
                        self._release()
                        raise GadgetError(f"{self.node.name}: did not connect within {self.start_timeout:.0f} s{self._tail()}") from None
        finally:
            listener.close()

    def _tail(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.join(timeout=2)
        lines = [line for line in self.stderr.tail if line.strip()][-8:]
        return ("\n  stderr: " + "\n  stderr: ".join(lines)) if lines else ""

    # -------------------------------------------------------------- streaming

    def _write_all(self, wire: SafeSocket, items: Iterable[Any]) -> None:
        """CONFIG, HEADER, the items, CLOSE. A failure of the upstream iterator (a client that
        went away, an earlier gadget's error) still ends this gadget with CLOSE and is
        re-raised after it; a failure to write means the gadget went away (its reader side
        reports why)."""
        try:
            wire.write(_string_message(MESSAGE_CONFIG, self.node.configuration))
            wire.write(_string_message(MESSAGE_HEADER, self.header_xml.encode("utf-8")))
        except OSError as err:
            log.debug("%s: write side closed: %s", self.node.name, err)
            return
        iterator = iter(items)
        try:
            while True:
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                except BaseException as err:  # noqa: BLE001 - handed to the reading side, re-raised there
                    self.upstream_error = err
                    break
                try:
                    write_item(wire, item)
                except OSError as err:
                    log.debug("%s: write side closed: %s", self.node.name, err)
                    return
            try:
                wire.write(struct.pack("<H", MESSAGE_CLOSE))
            except OSError:
                pass
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:  # end what is upstream now, in this thread (not whenever it is collected)
                close()

    def run(self, items: Iterable[Any]) -> Iterator[Any]:
        """Stream ``items`` through the gadget; yields what it sends back."""
        sock = self._launch()
        sock.settimeout(self.io_timeout)
        wire = SafeSocket(sock)
        writer = threading.Thread(target=self._write_all, args=(wire, items), daemon=True, name=f"write {self.node.name}")
        self.sock, self.writer = sock, writer
        writer.start()
        closed = False
        try:
            while True:
                try:
                    (mid,) = struct.unpack("<H", wire.read(2))
                    if mid == MESSAGE_CLOSE:
                        closed = True
                        break
                    if mid == MESSAGE_ERROR:
                        (length,) = struct.unpack("<Q", wire.read(8))
                        if length > MAX_TEXT_BYTES:
                            self.errors.append(f"ERROR message of {length} bytes (cap {MAX_TEXT_BYTES})")
                            break
                        self.errors.append(wire.read(length).decode("utf-8", "replace"))
                        continue
                    reader = READERS.get(mid)
                    if reader is None:
                        self.errors.append(f"illegal message id {mid} from the gadget")
                        break
                    item = reader(wire)
                except (ConnectionError, TimeoutError, OSError) as err:
                    if self.errors:  # Gadgetron reads the id after an ERROR and fails on a closed socket
                        self.errors.append(f"sent ERROR without CLOSE after it (Gadgetron would report only \"Received illegal message id\"; {err})")
                    else:
                        self.errors.append(f"connection lost before CLOSE ({err})")
                    break
                try:
                    yield item
                except GeneratorExit:  # the consumer stopped (it failed): stop the gadget, report nothing more
                    self._release()
                    raise
        except Exception:
            self._release()
            raise
        finally:
            writer.join(timeout=5 if closed else 1)
            try:
                sock.close()
            except OSError:
                pass
        self._finish(closed)

    def cancel(self) -> None:
        """Stop now (another part of the chain failed): wake every thread blocked on this
        gadget's socket and kill its process."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the thread that feeds the gadget (it pulls the items upstream of it)."""
        if self.writer is not None:
            self.writer.join(timeout)
            if self.writer.is_alive():
                log.error("%s: the thread feeding it did not end within %.0f s", self.node.name, timeout)

    def _release(self, wait: float = 0.0) -> int | None:
        """Wait up to ``wait`` seconds for the process, kill it if still running, collect its pipes."""
        if self.process is None:
            return None
        try:
            status = self.process.wait(timeout=wait) if wait else self.process.poll()
        except subprocess.TimeoutExpired:
            status = None
        if status is None:
            self.process.kill()
            self.process.wait()
        for drain in (self.stdout, self.stderr):
            if drain is not None:
                drain.join(timeout=2)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        return status

    def _finish(self, closed: bool) -> None:
        if self.process is not None:
            wait = 30 if closed else 5
            status = self._release(wait=wait)
            if status is None:
                self.errors.append(f"did not exit within {wait} s of {'CLOSE' if closed else 'the connection ending'} (killed)")
            assert self.stdout is not None
            if self.stdout.bytes:
                self.errors.append(f"wrote {self.stdout.bytes} bytes to stdout (Gadgetron's data pipe): {list(self.stdout.tail)[:3]}")
            if status:
                self.errors.append(f"exited with status {status}" + (f" (killed by signal {-status})" if status < 0 else ""))
        if self.upstream_error is not None:  # the cause; what this gadget then said is its consequence
            if self.errors:
                log.warning("%s, after the failure upstream: %s", self.node.name, "; ".join(self.errors))
            raise self.upstream_error
        if self.errors:
            raise GadgetError(f"{self.node.name}: " + "; ".join(self.errors) + self._tail())
