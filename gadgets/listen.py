"""Passive mode: a CycGuard gadget that listens for Gadgetron (``<connect port= address=/>``).

``python -m gadgets.listen --port 18000 gadgets.composed composed`` serves one connection and
exits, for running a gadget under a debugger or in another container. Unlike
``gadgetron.external.listen`` (which binds every interface), it binds loopback unless
``--bind`` says otherwise: the protocol has no authentication.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import socket
import sys
from collections.abc import Sequence

from gadgetron.external.connection import Connection

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
    """Serve one Gadgetron connection with the named gadget target."""
    parser = argparse.ArgumentParser(prog="python -m gadgets.listen", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("module", help="gadget module, e.g. gadgets.composed")
    parser.add_argument("target", help="gadget target, e.g. composed")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for Gadgetron")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.module.startswith("gadgets."):
        parser.error("only CycGuard gadgets (gadgets.*) are served")
    target = getattr(importlib.import_module(args.module), args.target)
    if args.bind not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this port can send data to the gadget", args.bind)
    with socket.create_server((args.bind, args.port)) as server:
        server.settimeout(args.timeout)
        log.info("waiting for Gadgetron on %s:%d", args.bind, args.port)
        while True:
            sock, peer = server.accept()
            sock.settimeout(args.timeout)
            # a peer that closes before sending CONFIG (a port probe) would make gadgetron-python's
            # reader spin forever on EOF: skip it and keep waiting
            if sock.recv(2, socket.MSG_PEEK):
                break
            log.warning("connection from %s closed before sending anything: ignored", peer)
            sock.close()
    log.info("connection from %s", peer)
    sock.settimeout(None)
    with SafeConnection(sock) as connection:
        target(connection)
    return 0


if __name__ == "__main__":
    sys.exit(main())
