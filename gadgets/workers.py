"""Worker discovery for Gadgetron's distributed mode: the workers that answer, as Gadgetron reads them.

The main Gadgetron node runs ``$GADGETRON_REMOTE_WORKER_COMMAND`` each time a
``<distributed>`` block starts and reads a JSON list of ``"host:port"`` strings from its
standard output. Gadgetron 4.7.2 does not survive a listed worker that refuses the
connection: it retries for about 18 s and then aborts the whole server, every scan on it
included. ``cycguard workers`` is a discovery command that lists only the workers that
accept a TCP connection now; when none does it prints nothing and exits 1, and Gadgetron then
runs the block on the main node itself (its own fallback). A worker that dies after the check
is the distributed stream's failure: the ``gadgets.order`` stage reports its slices.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("cycguard.workers")

WORKERS_ENV = "CYCGUARD_WORKERS"


@dataclass(frozen=True)
class Worker:
    """One Gadgetron worker's address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_workers(texts: Iterable[str]) -> list[Worker]:
    """``host:port`` (or ``[ipv6]:port``) items, separated by commas or white space."""
    out: list[Worker] = []
    for text in texts:
        for item in re.split(r"[\s,]+", text.strip()):
            if not item:
                continue
            match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.\-]+):(\d{1,5})", item)
            if match is None:
                raise ValueError(f"worker {item!r}: expected host:port (or [ipv6]:port)")
            host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
            if not 0 < int(port) < 65536:
                raise ValueError(f"worker {item!r}: port out of range")
            out.append(Worker(host, int(port)))
    return out


def answering(workers: Iterable[Worker], timeout: float = 1.0) -> list[Worker]:
    """The workers that accept a TCP connection within ``timeout`` seconds, in the given order."""
    alive = []
    for worker in workers:
        try:
            with socket.create_connection((worker.host, worker.port), timeout=timeout):
                alive.append(worker)
        except OSError as err:
            log.warning("worker %s does not answer (%s): left out", worker, err)
    return alive


def discovery_output(workers: list[Worker]) -> str:
    """The list as Gadgetron's discovery parser reads it."""
    return json.dumps([str(worker) for worker in workers])


def configured(arguments: list[str]) -> list[Worker]:
    """The workers named on the command line, else in ``$CYCGUARD_WORKERS``."""
    return parse_workers(arguments or [os.environ.get(WORKERS_ENV, "")])
