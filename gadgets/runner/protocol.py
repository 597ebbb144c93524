"""Gadgetron's client protocol (port 9002): message ids, framing, capped reads.

Little-endian; every message is a ``uint16`` id and a body. The server side of CycGuard
(:mod:`.server`) and our client (:mod:`.client`) both use these helpers; acquisitions,
waveforms and images are (de)serialised by the ``ismrmrd`` package itself.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import ismrmrd

from gadgets.stages import SafeSocket

T = TypeVar("T")
TLS_CHUNK = 16 << 10  # one TLS record

CONFIG_FILE, CONFIG_SCRIPT, HEADER, CLOSE, TEXT, QUERY, RESPONSE = 1, 2, 3, 4, 5, 6, 7
ACQUISITION, IMAGE, WAVEFORM = 1008, 1022, 1026
CONFIG_FILE_BYTES = 1024
MAX_STRING_BYTES = 16 << 20  # XML headers and scripts; anything longer is refused before reading it


class ProtocolError(ValueError):
    """A peer broke the protocol (wrong order, unknown id, absurd length)."""


class TlsWire(SafeSocket):
    """:class:`SafeSocket` over TLS, for a connection read by one thread and written by another.

    OpenSSL forbids concurrent calls on one connection (two threads in ``SSL_read`` and
    ``SSL_write`` corrupt records now and then: "bad record mac", "EOF in violation of
    protocol"). Here every TLS call holds one lock and none blocks while holding it: the
    socket is non-blocking, and a thread that must wait for the network waits in ``select``
    with the lock released. The socket's timeout (``None``: wait forever) still bounds each
    wait without progress.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        super().__init__(sock)
        self.timeout = sock.gettimeout()
        self.lock = threading.Lock()
        sock.setblocking(False)

    def _call(self, op: Callable[[], T]) -> T:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            with self.lock:
                try:
                    return op()
                except ssl.SSLWantReadError:
                    waiting: tuple[list[socket.socket], list[socket.socket]] = ([self.socket], [])
                except ssl.SSLWantWriteError:
                    waiting = ([], [self.socket])
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no TLS progress for {self.timeout:.0f} s")
            # short waits: the other thread may have consumed what this one waited for
            select.select(*waiting, [], min(left, 0.05))

    def _recv(self, nbytes: int) -> bytes:
        return self._call(partial(self.socket.recv, nbytes))

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            chunk = view[:TLS_CHUNK]  # after a WANT_* OpenSSL needs the same bytes again
            sent = self._call(partial(self.socket.send, chunk))
            view = view[sent:]


def wire_for(sock: socket.socket) -> SafeSocket:
    """The wire for a connected socket: :class:`TlsWire` for TLS, else :class:`SafeSocket`."""
    return TlsWire(sock) if isinstance(sock, ssl.SSLSocket) else SafeSocket(sock)


def read_id(wire: SafeSocket) -> int:
    (mid,) = struct.unpack("<H", wire.read(2))
    return int(mid)


def read_string(wire: SafeSocket, what: str, width: str = "<I", cap: int = MAX_STRING_BYTES) -> str:
    """A length-prefixed string, its length checked against ``cap`` before anything is read."""
    (length,) = struct.unpack(width, wire.read(struct.calcsize(width)))
    if length > cap:
        raise ProtocolError(f"{what} of {length} bytes exceeds the {cap}-byte limit")
    return wire.read(length).decode("utf-8", "replace").rstrip("\x00")


def string_message(mid: int, text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<HI", mid, len(data)) + data


def config_file_message(name: str) -> bytes:
    data = name.encode("utf-8")
    if len(data) >= CONFIG_FILE_BYTES:
        raise ProtocolError(f"configuration name of {len(data)} bytes is too long")
    return struct.pack("<H", CONFIG_FILE) + data.ljust(CONFIG_FILE_BYTES, b"\x00")


def read_config_file(wire: SafeSocket) -> str:
    return wire.read(CONFIG_FILE_BYTES).split(b"\x00", 1)[0].decode("utf-8", "replace")


def query_message(query: str, correlation: int = 0) -> bytes:
    data = query.encode("utf-8")
    return struct.pack("<HQQQ", QUERY, 0, correlation, len(data)) + data


def read_query(wire: SafeSocket) -> tuple[int, str]:
    _, correlation = struct.unpack("<QQ", wire.read(16))
    return int(correlation), read_string(wire, "QUERY", "<Q", 1 << 16)


def response_message(correlation: int, text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<HQQ", RESPONSE, correlation, len(data)) + data


def read_response(wire: SafeSocket) -> tuple[int, str]:
    (correlation,) = struct.unpack("<Q", wire.read(8))
    return int(correlation), read_string(wire, "RESPONSE", "<Q", 1 << 16)


def item_message(item: Any) -> bytes:
    """An acquisition, waveform or image as its message."""
    chunks: list[bytes] = []
    if isinstance(item, ismrmrd.Acquisition):
        chunks.append(struct.pack("<H", ACQUISITION))
    elif isinstance(item, ismrmrd.Waveform):
        chunks.append(struct.pack("<H", WAVEFORM))
    elif isinstance(item, ismrmrd.Image):
        chunks.append(struct.pack("<H", IMAGE))
    else:
        raise TypeError(f"no client-protocol message for {type(item).__name__}")
    item.serialize_into(chunks.append)
    return b"".join(chunks)


def read_item(mid: int, wire: SafeSocket) -> Any:
    """Deserialise an acquisition, waveform or image body."""
    if mid == ACQUISITION:
        return ismrmrd.Acquisition.deserialize_from(wire.read)
    if mid == WAVEFORM:
        return ismrmrd.Waveform.deserialize_from(wire.read)
    if mid == IMAGE:
        return ismrmrd.Image.deserialize_from(wire.read)
    raise ProtocolError(f"message id {mid} carries no item")
