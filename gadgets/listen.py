"""Passive mode: a CycGuard gadget that listens for Gadgetron (``<connect port= address=/>``).

``python -m gadgets.listen --port 18000 gadgets.composed composed`` serves one connection and
exits, for running a gadget under a debugger or in another container. Unlike
``gadgetron.external.listen`` (which binds every interface), it binds loopback unless
``--bind`` says otherwise: the protocol has no authentication.

With ``--forever`` it is a warm gadget server: it imports the gadget and loads the shipped
network once, then serves every connection in a child process forked from that state (at most
``--max-sessions`` at once), so a connection starts in milliseconds instead of the seconds
a fresh Python, torch and network take. That is what a ``<distributed>`` worker stream needs,
where every slice is its own connection (``docs/DISTRIBUTED.md``). On a machine with CUDA the
network is not preloaded (CUDA does not survive a fork): each session loads its own.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gadgetron.external.connection import Connection

from gadgets.cores import share
from gadgets.stages import SafeSocket

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
    parser.add_argument("--max-sessions", type=int, default=4, help="with --forever: connections served at once (default 4)")
    parser.add_argument("--threads", type=int, default=0, help="with --forever: torch threads per connection (default: cores / max-sessions)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.module.startswith("gadgets."):
        parser.error("only CycGuard gadgets (gadgets.*) are served")
    if args.max_sessions < 1:
        parser.error("--max-sessions must be at least 1")
    target = getattr(importlib.import_module(args.module), args.target)
    if args.bind not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this port can send data to the gadget", args.bind)
    with socket.create_server((args.bind, args.port)) as server:
        if args.forever:
            threads = args.threads or share(args.max_sessions)
            return serve_forever(server, target, args.max_sessions, threads)
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
    from gadgets.stages import loaded_model

    loaded_model("", "auto")  # without CUDA the same copy serves "cpu"


def serve_forever(server: socket.socket, target: Callable[[Any], None], max_sessions: int, threads: int) -> int:
    """Accept connections until SIGTERM or SIGINT; each is served by a forked child."""
    warm_up()
    children: set[int] = set()
    stopping = {"now": False}

    def stop(signum: int, _: Any) -> None:
        stopping["now"] = True
        server.close()  # unblocks accept

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.getsockname()[:2]
    log.info("warm: serving every connection on %s:%d, at most %d at once, %d torch thread(s) each", host, port, max_sessions, threads)
    while not stopping["now"]:
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
