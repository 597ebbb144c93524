"""Passive mode: a CycGuard gadget that listens for Gadgetron (``<connect port= address=/>``).

``python -m gadgets.listen --port 18000 gadgets.composed composed`` serves one connection and
exits, for running a gadget under a debugger or in another container. Unlike
``gadgetron.external.listen`` (which binds every interface), it binds loopback unless
``--bind`` says otherwise: the protocol has no authentication.

With ``--forever`` it is a warm gadget server: it imports the gadget and loads the shipped
network once, then serves every connection in a child process forked from that state, so a
connection starts in milliseconds instead of the seconds a fresh Python, torch and network
take. That is what a ``<distributed>`` worker stream needs, where every slice is its own
connection (``docs/DISTRIBUTED.md``). Gadgetron keeps each slice's connection open until the
whole scan ends, so connections (``--max-sessions``, default 64) and compute are bounded apart:
at most ``--max-busy`` sessions (default: the cores) compute at once, each with
cores / max-busy torch threads; a session holds a slot from its slice's last line through that
slice's stages (collecting lines takes none). On a machine with CUDA the
network is not preloaded (CUDA does not survive a fork): each session loads its own.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from gadgetron.external.connection import Connection

from gadgets.cores import available_cores, share
from gadgets.stages import COMPUTE_GATE, SafeSocket

log = logging.getLogger("cycguard.listen")


class SafeConnection(Connection):
    """gadgetron-python's Connection reading CONFIG and HEADER through :class:`SafeSocket`: its own
    socket wrapper spins forever when the peer dies mid-message (1.4.1)."""

    def __init__(self, sock: socket.socket) -> None:  # noqa: D107 - mirrors Connection.__init__
        self.socket = SafeSocket(sock)
        self.readers = Connection._default_readers()
        self.writers = Connection._default_writers()
        self.raw_bytes = Connection.Struct(config=None, header=None)
        self.config, self.raw_bytes.config = self._read_config()
        self.header, self.raw_bytes.header = self._read_header()
        self.filters: list[object] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Serve one Gadgetron connection with the named gadget target (``--forever``: every one)."""
    parser = argparse.ArgumentParser(prog="python -m gadgets.listen", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("module", help="gadget module, e.g. gadgets.composed")
    parser.add_argument("target", help="gadget target, e.g. composed")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for Gadgetron (one connection)")
    parser.add_argument("--forever", action="store_true", help="serve every connection, each in a process forked from a warm start")
    parser.add_argument("--max-sessions", type=int, default=64,
                        help="with --forever: connections open at once (default 64; a distributed scan holds one per slice until it ends; "
                             "with CUDA each loads its own network: size it to the GPU's memory)")
    parser.add_argument("--max-busy", type=int, default=0, help="with --forever: sessions computing at once (default: the cores)")
    parser.add_argument("--threads", type=int, default=0, help="with --forever: torch threads per session (default: cores / max-busy)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.module.startswith("gadgets."):
        parser.error("only CycGuard gadgets (gadgets.*) are served")
    if args.max_sessions < 1:
        parser.error("--max-sessions must be at least 1")
    if args.max_busy < 0 or args.threads < 0:
        parser.error("--max-busy and --threads must not be negative")
    target = getattr(importlib.import_module(args.module), args.target)
    if args.bind not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this port can send data to the gadget", args.bind)
    with socket.create_server((args.bind, args.port)) as server:
        if args.forever:
            busy = args.max_busy or available_cores()
            return serve_forever(server, target, args.max_sessions, busy, args.threads or share(busy))
        server.settimeout(args.timeout)
        log.info("waiting for Gadgetron on %s:%d", args.bind, args.port)
        sock, peer = _accept(server)
    log.info("connection from %s", peer)
    with SafeConnection(sock) as connection:
        target(connection)
    return 0


def _accept(server: socket.socket) -> tuple[socket.socket, Any]:
    """The next connection that sends something. A peer that closes before sending CONFIG (a
    port probe) would make gadgetron-python's reader spin forever on EOF: skipped."""
    while True:
        sock, peer = server.accept()
        sock.settimeout(60.0)
        try:
            if sock.recv(2, socket.MSG_PEEK):
                sock.settimeout(None)
                return sock, peer
        except OSError:
            pass
        log.warning("connection from %s closed before sending anything: ignored", peer)
        sock.close()


def warm_up() -> None:
    """Import torch and load the shipped network into this process, once, with one torch
    thread (a thread pool made before a fork would hang the children)."""
    import torch

    torch.set_num_threads(1)
    if torch.cuda.is_available():
        log.info("CUDA present: the network is loaded per session (CUDA does not survive a fork)")
        return
    from gadgets.stages import STAGE_CLASSES, loaded_model

    loaded_model("", "auto")  # without CUDA the same copy serves "cpu"
    for spec in STAGE_CLASSES.values():  # the stage modules too, not once per session
        module = spec.split(":")[0]
        if module != "gadgets.redteam":  # evaluation only: imported by a session that asks for it
            importlib.import_module(module)


class ComputeSlots:
    """At most ``count`` forked sessions compute at once. A slot is an exclusive ``flock`` on one
    of ``count`` unlinked files the server holds open; a session takes one by opening the file
    afresh through ``/proc/self/fd`` (a lock belongs to an open file, which forked children would
    otherwise share), so the kernel frees the slot of a session that dies holding it, and no
    file on disk can be cleaned away under a server that runs for weeks. Linux only."""

    def __init__(self, count: int) -> None:
        self.files = [tempfile.TemporaryFile() for _ in range(count)]  # noqa: SIM115 - open for the server's life
        self.held: int | None = None

    def __enter__(self) -> ComputeSlots:
        for slot in self.files:  # a free slot, if there is one
            fd = os.open(f"/proc/self/fd/{slot.fileno()}", os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.held = fd
            return self
        # else sleep in the kernel on one of them (by process id, so waiters spread over the
        # slots), not poll: waiting sessions take no CPU from the ones computing
        fd = os.open(f"/proc/self/fd/{self.files[os.getpid() % len(self.files)].fileno()}", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.held = fd
        return self

    def __exit__(self, *_: object) -> None:
        if self.held is not None:
            os.close(self.held)  # closing the only descriptor of that open file releases its lock
            self.held = None

    def remove(self) -> None:
        for slot in self.files:
            slot.close()


def serve_forever(server: socket.socket, target: Callable[[Any], None], max_sessions: int, max_busy: int, threads: int) -> int:
    """Accept connections until SIGTERM or SIGINT; each is served by a forked child, at most
    ``max_sessions`` open and ``max_busy`` computing at once."""
    warm_up()
    slots = ComputeSlots(max_busy)
    children: set[int] = set()
    stopping = {"now": False}

    def stop(signum: int, _: Any) -> None:
        stopping["now"] = True
        server.close()  # unblocks accept

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.getsockname()[:2]
    log.info("warm: serving every connection on %s:%d, at most %d open and %d computing at once, %d torch thread(s) each",
             host, port, max_sessions, max_busy, threads)
    while not stopping["now"]:
        if len(children) >= max_sessions:
            log.warning("%d sessions open (--max-sessions): the next connection waits for one to end, which in a distributed "
                        "scan is the scan's end", len(children))
        _reap(children, block=len(children) >= max_sessions)
        try:
            sock, peer = _accept(server)
        except OSError:
            break  # closed by a signal
        pid = os.fork()
        if pid == 0:  # the child: one connection
            server.close()
            code = 1
            try:
                import torch

                torch.set_num_threads(threads)
                COMPUTE_GATE[:] = [slots]
                log.info("connection from %s", peer)
                with SafeConnection(sock) as connection:
                    target(connection)
                code = 0
            except SystemExit as err:
                code = err.code if isinstance(err.code, int) else 1
            except Exception:
                log.exception("session from %s failed", peer)
            finally:
                logging.shutdown()
                os._exit(code)
        children.add(pid)
        sock.close()
    log.info("stopping: waiting for %d session(s) in flight", len(children))
    while children:
        _reap(children, block=True)
    slots.remove()
    return 0


def _reap(children: set[int], block: bool) -> None:
    """Collect ended children (wait for one when ``block``)."""
    while children:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        children.discard(pid)
        block = False


if __name__ == "__main__":
    sys.exit(main())
