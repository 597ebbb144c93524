"""``cycguard serve``: a Gadgetron-protocol server running CycGuard pipelines.

Per connection (its own thread; connections share nothing): CONFIG_FILE (resolved only
among the installed pipelines, by name) or CONFIG_SCRIPT (checked as ``cycguard check``
does, CycGuard gadgets only: no module named by a client is imported), then HEADER, then
acquisitions and waveforms until CLOSE. The pipeline runs through the same runner as
``cycguard replay`` while data still arrive, and each image goes back as soon as it leaves
the chain. QUERY is answered for versions only. Errors go back as TEXT
(``[cycguard] ERROR: ...``) followed by CLOSE, as Gadgetron reports them; the server keeps
serving other clients. SIGTERM stops accepting and lets the connections in flight finish.
Binds loopback unless told otherwise: the protocol has no authentication. Optional TLS
(``--tls-cert``/``--tls-key``) encrypts the connection; clients then need ``--tls-ca``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import ismrmrd
from gadgetron.types.image_array import ImageArray
from gadgetron.types.recon_data import ReconData

from gadgets.cores import share
from gadgets.runner import protocol as p
from gadgets.runner.chain import run_pipeline
from gadgets.runner.config import (
    Pipeline,
    PipelineError,
    check_pipeline,
    installed_pipelines,
    parse_pipeline,
    stage_names,
)
from gadgets.runner.frontend import check_header
from gadgets.stages import SafeSocket
from recon.io.mrd import parse_header

log = logging.getLogger("cycguard.serve")


def _version() -> str:
    try:
        return version("cycguard")
    except PackageNotFoundError:
        return "unknown"


QUERIES = {"cycguard::version": _version, "gadgetron::version": _version, "ismrmrd::version": lambda: version("ismrmrd")}


def resolve_config_file(name: str) -> Pipeline:
    """An installed pipeline by name (``defended`` or ``defended.xml``); nothing else is reachable."""
    stem = name[:-4] if name.endswith(".xml") else name
    shipped = installed_pipelines()
    if not stem or any(c in stem for c in "/\\\x00") or stem.startswith(".") or stem not in shipped:
        raise PipelineError(f"no installed pipeline {name!r} (available: {', '.join(sorted(shipped))})")
    path = shipped[stem]
    return parse_pipeline(path.read_bytes(), path.name)


class ClientError(Exception):
    """Something to report to the client as TEXT before CLOSE."""


class Session:
    """One client connection."""

    def __init__(self, sock: socket.socket, peer: Any, server: CycGuardServer) -> None:
        sock.settimeout(server.idle_timeout)  # a silent client cannot hold a session (or shutdown) forever
        self.sock = sock
        self.wire: SafeSocket = SafeSocket(sock)  # replaced by a TlsWire once the handshake is done
        self.peer = peer
        self.server = server
        self.send_lock = threading.Lock()
        self.images = 0
        self.started = False  # the pipeline runs (before that, a shutdown ends the session at once)

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.wire.write(data)

    def run(self) -> None:
        self.server.register(self)
        try:
            self._serve()
        finally:
            self.server.unregister(self)

    def _serve(self) -> None:
        """Configuration and header under a short deadline, before a slot is taken; then wait
        for a slot (the client is told it is queued), then the pipeline."""
        self.sock.settimeout(self.server.hello_timeout)  # an idle client holds nothing for long
        if isinstance(self.sock, ssl.SSLSocket):
            try:
                self.sock.do_handshake()
            except (ssl.SSLError, OSError) as err:
                log.warning("%s: TLS handshake failed: %s", self.peer, err)
                return
            self.wire = p.wire_for(self.sock)  # the pipeline's output is sent while items are read
        try:
            try:
                pipeline = self._configure()
                header = self._header() if pipeline is not None else None
            except TimeoutError:
                raise ClientError(f"no configuration and header within {self.server.hello_timeout:.0f} s: connection closed") from None
            if pipeline is None or header is None:  # the client closed first: answered with CLOSE, as Gadgetron does
                self._close()
                return
            for warning in check_pipeline(pipeline, allow_foreign=False):
                log.info("%s: %s", self.peer, warning)
            if not self.server.allow_redteam and any("attack" in stage_names(n) for n in pipeline.externals):
                raise ClientError("pipelines with the red-team attack stage are disabled on this server (cycguard serve --allow-redteam)")
        except (ClientError, PipelineError, p.ProtocolError, ValueError, OSError) as err:
            log.error("%s: %s", self.peer, err)
            self._text(f"[cycguard] ERROR: {err}")
            self._close()
            return
        except Exception as err:  # anything else too: the client must never wait on silence
            log.exception("%s: unexpected failure before the data", self.peer)
            self._text(f"[cycguard] ERROR: internal error: {err}")
            self._close()
            return
        self.sock.settimeout(self.server.idle_timeout)
        if not self._wait_for_slot():
            self._close()
            return
        self.started = True
        try:
            self._run(pipeline, header)
        finally:
            self.server.slots.release()

    def _wait_for_slot(self) -> bool:
        """Take a session slot; while all are busy, tell the client once and wait, giving up
        when it leaves, the server stops, or ``queue_timeout`` passes."""
        if self.server.slots.acquire(blocking=False):
            return True
        busy = self.server.max_sessions
        log.info("%s: queued (%d sessions in flight)", self.peer, busy)
        self._text(f"[cycguard] queued: {busy} session(s) in flight; this one starts when a slot frees (at most {self.server.queue_timeout:.0f} s)")
        deadline = time.monotonic() + self.server.queue_timeout
        while time.monotonic() < deadline:
            if self.server.stopping.is_set():
                self._text("[cycguard] ERROR: the server is shutting down; retry later")
                return False
            if self.server.slots.acquire(timeout=0.5):
                if self._gone():
                    self.server.slots.release()
                    log.info("%s: left while queued: nothing was run for it", self.peer)
                    return False
                return True
            if self._gone():
                log.info("%s: left while queued: nothing was run for it", self.peer)
                return False
        log.warning("%s: refused, %d sessions busy for %.0f s", self.peer, busy, self.server.queue_timeout)
        self._text(f"[cycguard] ERROR: server busy ({busy} sessions in flight for {self.server.queue_timeout:.0f} s); retry later")
        return False

    def _gone(self) -> bool:
        """Whether the client closed its connection (plain TCP; a TLS client is found out when read)."""
        if isinstance(self.sock, ssl.SSLSocket):
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def abort(self, reason: str) -> None:
        """End this session now (server shutdown): ERROR text and CLOSE if the line is free,
        then the socket, which ends its pipeline."""
        if self.send_lock.acquire(timeout=2):
            try:
                self.wire.write(p.string_message(p.TEXT, f"[cycguard] ERROR: {reason}") + struct.pack("<H", p.CLOSE))
            except OSError:
                pass
            finally:
                self.send_lock.release()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _close(self) -> None:
        try:
            self.send(struct.pack("<H", p.CLOSE))
        except OSError:
            pass

    def _run(self, pipeline: Pipeline, header: str) -> None:
        try:
            threads = self.server.threads or self.server.thread_budget(len(pipeline.externals))
            with closing(run_pipeline(pipeline, header, self._items(), threads=threads, echo_stderr=True)) as stream:
                for item in stream:
                    if isinstance(item, ismrmrd.Image):
                        self.send(p.item_message(item))
                        self.images += 1
                    elif isinstance(item, (ReconData, ImageArray)):
                        raise ClientError(f"a {type(item).__name__} left the chain: the pipeline must end with gadgets.export")
            log.info("%s: %d image(s) sent", self.peer, self.images)
        except (ClientError, PipelineError, p.ProtocolError, ValueError, RuntimeError, OSError) as err:
            log.error("%s: %s", self.peer, err)
            self._text(f"[cycguard] ERROR: {err}")
        except Exception as err:  # report anything else too: the client must never wait on silence
            log.exception("%s: unexpected failure", self.peer)
            self._text(f"[cycguard] ERROR: internal error: {err}")
        finally:
            self._close()

    def _text(self, message: str) -> None:
        try:
            self.send(p.string_message(p.TEXT, message))
        except OSError:
            log.warning("%s: could not send the error to the client", self.peer)

    def _answer(self) -> None:
        correlation, query = p.read_query(self.wire)
        answer = QUERIES[query]() if query in QUERIES else f"unknown query {query!r} (answered: {', '.join(QUERIES)})"
        self.send(p.response_message(correlation, answer))

    def _next(self) -> int:
        """The next message id that is not QUERY (answered) or TEXT (logged)."""
        while True:
            mid = p.read_id(self.wire)
            if mid == p.QUERY:
                self._answer()
            elif mid == p.TEXT:
                log.info("%s says: %s", self.peer, p.read_string(self.wire, "TEXT", cap=1 << 20))
            else:
                return mid

    def _configure(self) -> Pipeline | None:
        mid = self._next()
        if mid == p.CLOSE:
            return None
        if mid == p.CONFIG_FILE:
            name = p.read_config_file(self.wire)
            log.info("%s: pipeline %r", self.peer, name)
            return resolve_config_file(name)
        if mid == p.CONFIG_SCRIPT:
            pipeline = parse_pipeline(p.read_string(self.wire, "CONFIG_SCRIPT", cap=1 << 20), "client configuration")
            check_pipeline(pipeline, allow_foreign=False)
            return pipeline
        raise ClientError(f"message id {mid} before the configuration (expected CONFIG_FILE or CONFIG_SCRIPT)")

    def _header(self) -> str | None:
        mid = self._next()
        if mid == p.CLOSE:
            return None
        if mid == p.HEADER:
            xml = p.read_string(self.wire, "HEADER")
            parse_header(xml, "client header")
            check_header(xml, "client header")
            return xml
        raise ClientError(f"message id {mid} before HEADER (data must follow the ISMRMRD header)")

    def _items(self) -> Iterator[Any]:
        while True:
            mid = p.read_id(self.wire)
            if mid == p.CLOSE:
                return
            if mid in (p.ACQUISITION, p.WAVEFORM):
                yield p.read_item(mid, self.wire)
            elif mid == p.TEXT:
                log.info("%s says: %s", self.peer, p.read_string(self.wire, "TEXT", cap=1 << 20))
            elif mid in (p.CONFIG_FILE, p.CONFIG_SCRIPT, p.HEADER):
                raise ClientError(f"message id {mid} after the header (configuration and header come once, first)")
            else:
                raise ClientError(f"message id {mid} is not accepted in the data stream (acquisitions 1008, waveforms 1026)")


class CycGuardServer(socketserver.ThreadingTCPServer):
    """Threaded TCP server; ``server_close`` waits for the sessions in flight."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], threads: int | None = None, allow_redteam: bool = False, max_sessions: int = 4,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls
        self.threads = threads
        self.allow_redteam = allow_redteam
        self.idle_timeout = 300.0
        self.hello_timeout = 10.0  # configuration and header must come within this, before a slot is taken
        self.grace = 60.0  # on SIGTERM, sessions in flight get this long to finish (systemd stops after 90 s)
        self.stopping = threading.Event()
        self._sessions: set[Session] = set()
        self.max_sessions = max_sessions  # each session runs its own gadget processes (~0.3 GB each)
        self.slots = threading.BoundedSemaphore(max_sessions)
        self.queue_timeout = 600.0  # a connection waits this long for a free slot
        self._lock = threading.Lock()
        if address[0] not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: anyone who can reach this port can send data and read images (no authentication)", address[0])
        super().__init__(address, _Handler)


    def register(self, session: Session) -> None:
        with self._lock:
            self._sessions.add(session)

    def unregister(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)

    def sessions_where(self, started: bool | None = None) -> list[Session]:
        """The sessions open now (those whose pipeline runs, or not, when ``started`` is given)."""
        with self._lock:
            return [s for s in self._sessions if started is None or s.started == started]

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; with TLS, wrap without the handshake (done in the session's thread, so a
        slow or hostile client cannot stall the accept loop)."""
        sock, address = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def thread_budget(self, gadgets: int) -> int:
        """Torch threads per gadget process so that the sessions in flight share the cores."""
        sessions = max(1, len(self.sessions_where(started=True)))
        return share(gadgets * sessions)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        log.info("connection from %s", self.client_address)
        Session(self.request, self.client_address, self.server).run()  # type: ignore[arg-type]


def abort_in_background(sessions: list[Session], reason: str) -> None:
    """End sessions from a thread (a signal handler must not wait on a session's send lock)."""
    def run() -> None:
        for session in sessions:
            session.abort(reason)

    threading.Thread(target=run, daemon=True).start()


def serve(
    bind: str = "127.0.0.1", port: int = 9002, threads: int | None = None, allow_redteam: bool = False, max_sessions: int = 4,
    tls_cert: str | None = None, tls_key: str | None = None, grace: float = 60.0, hello_timeout: float = 10.0,
) -> int:
    """Run until SIGTERM/SIGINT. The first signal stops accepting, ends the sessions whose
    pipeline has not started, and gives those in flight ``grace`` seconds to finish before
    they are ended with an ERROR; a second signal ends everything at once. At most
    ``max_sessions`` run at once; more wait for a slot, told that they are queued."""
    import signal

    tls = None
    if tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(tls_cert, tls_key)
    server = CycGuardServer((bind, port), threads, allow_redteam, max_sessions, tls)
    server.grace, server.hello_timeout = grace, hello_timeout

    def end_after_grace() -> None:
        deadline = time.monotonic() + server.grace
        while server.sessions_where() and time.monotonic() < deadline:
            time.sleep(0.2)
        late = server.sessions_where()
        for session in late:
            session.abort(f"the server is shutting down: session ended after the {server.grace:.0f} s grace")
        if late:
            log.warning("grace of %.0f s over: %d session(s) ended with an error", server.grace, len(late))

    def stop(signum: int, _: Any) -> None:
        if server.stopping.is_set():
            log.warning("signal %d again: stopping now", signum)
            abort_in_background(server.sessions_where(), "the server was stopped")
            threading.Timer(3.0, os._exit, args=(1,)).start()  # the sessions' gadget processes get 3 s to end
            return
        server.stopping.set()
        log.info("signal %d: no new connections; %.0f s for the sessions in flight (a second signal stops at once)", signum, server.grace)
        abort_in_background(server.sessions_where(started=False), "the server is shutting down; retry later")
        threading.Thread(target=server.shutdown, daemon=True).start()
        threading.Thread(target=end_after_grace, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("listening on %s:%d%s (pipelines: %s)", bind, server.server_address[1], " with TLS" if tls else "", ", ".join(sorted(installed_pipelines())))
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    log.info("stopped")
    return 0
