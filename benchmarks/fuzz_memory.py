"""Malformed input against a running server: every case ends, memory stays bounded.

    python -m benchmarks.fuzz_memory [--cases 200] [--seed 0]

One `cycguard serve` process takes ``--cases`` connections in a row, each a malformed stream
of one of four kinds (in turn): random bytes before the header, a HEADER with an absurd
length, random bytes after a random number of good acquisitions (the gadget processes are
already running then), and one good slice with one acquisition's header overwritten. Every
case must end with CLOSE within 60 s; images must carry a CycGuard verdict and TEXT must be
an error. Resident memory of the server (and of the server with its gadget processes) is
sampled after every case, with the gadget processes still alive then (there should be none). Results: benchmarks/results/fuzz_memory.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import threading
from collections import Counter
from pathlib import Path

import ismrmrd
import numpy as np
from tqdm import tqdm

from benchmarks.load import _tree_rss_mb
from benchmarks.online import start_server
from gadgets.convert import meta_of, meta_value
from gadgets.runner import protocol as p
from gadgets.runner.client import query
from gadgets.runner.replay import read_header, stream_raw
from gadgets.stages import SafeSocket
from recon.data.demo import DEMO_RAW
from recon.verdict import VERDICT_KEY, VERDICTS

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("garbage before the header", "absurd HEADER length", "garbage in the data phase", "mutated acquisition header")


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (gadget processes a finished session left behind)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = []
        for task in Path(f"/proc/{parent}/task").glob("*"):  # each thread's children (sessions are threads)
            try:
                children += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        found += children
        frontier += children
    return found


def _cases(rng: np.random.Generator, count: int) -> list[tuple[str, bytes]]:
    prefix = p.config_file_message("recon") + p.string_message(p.HEADER, read_header(DEMO_RAW))
    messages = []
    for item in stream_raw(DEMO_RAW):
        if isinstance(item, ismrmrd.Acquisition) and item.idx.slice > 0:
            break
        messages.append(p.item_message(item))
    cases = []
    for n in range(count):
        kind = KINDS[n % len(KINDS)]
        junk = rng.bytes(int(rng.integers(1, 65)))
        if kind == KINDS[0]:
            data = junk
        elif kind == KINDS[1]:
            data = p.config_file_message("recon") + struct.pack("<HI", p.HEADER, int(rng.integers(0, 2**32))) + junk
        elif kind == KINDS[2]:
            data = prefix + b"".join(messages[: int(rng.integers(0, len(messages)))]) + junk
        else:
            index = int(rng.integers(0, len(messages)))
            message = bytearray(messages[index])
            at = 2 + int(rng.integers(0, 338))
            message[at : at + 8] = rng.bytes(8)
            data = prefix + b"".join(messages[:index] + [bytes(message)] + messages[index + 1 :]) + struct.pack("<H", p.CLOSE)
        cases.append((kind, data))
    return cases


def _run(port: int, data: bytes, wait: float = 60.0) -> str:
    """Send one case; the outcome: 'error', 'images', 'close only', or what went wrong."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:

        def feed() -> None:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        wire, outcome = SafeSocket(sock), "close only"
        try:
            while True:
                mid = p.read_id(wire)
                if mid == p.CLOSE:
                    return outcome
                if mid == p.TEXT:
                    text = p.read_string(wire, "TEXT")
                    if not text.startswith("[cycguard] ERROR"):
                        return f"TEXT that is not an error: {text[:80]}"
                    outcome = "error"
                elif mid == p.IMAGE:
                    if meta_value(meta_of(p.read_item(mid, wire)), VERDICT_KEY) not in VERDICTS:
                        return "image without a verdict"
                    outcome = "error" if outcome == "error" else "images"
                elif mid == p.RESPONSE:
                    p.read_response(wire)
                else:
                    return f"unexpected message id {mid}"
        except TimeoutError:
            return "hang (no CLOSE within 60 s)"
        except ConnectionError as err:
            return f"connection lost without CLOSE: {err}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cases = _cases(np.random.default_rng(args.seed), args.cases)
    server, port = start_server()
    outcomes: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    server_mb, tree_mb, leftover = [], [], []
    try:
        for kind, data in tqdm(cases, desc="fuzz cases", unit="case"):
            outcomes[kind][_run(port, data)] += 1
            tree, own = _tree_rss_mb(server.pid)
            server_mb.append(own)
            tree_mb.append(tree)
            leftover.append(len(_descendants(server.pid)))
        alive = query("127.0.0.1", port, "cycguard::version").strip() != ""
    finally:
        server.terminate()
        server.wait(timeout=120)
    warm = min(20, len(server_mb) - 1)
    result = {
        "command": f"python -m benchmarks.fuzz_memory --cases {args.cases} --seed {args.seed}",
        "cases": args.cases,
        "outcomes": {kind: dict(counts) for kind, counts in outcomes.items()},
        "bad": sum(n for counts in outcomes.values() for what, n in counts.items() if what not in ("error", "images", "close only")),
        "server_rss_mb": {"after_first": server_mb[0], "after_warm_up": server_mb[warm], "last": server_mb[-1], "max": max(server_mb)},
        "server_and_leftover_gadgets_rss_mb_max": max(tree_mb),
        "gadget_processes_left_after_a_case_max": max(leftover),
        "growth_after_warm_up_mb": server_mb[-1] - server_mb[warm],
        "still_serving": alive,
        "server_exit": server.returncode,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
