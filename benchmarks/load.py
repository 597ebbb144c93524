"""Load: N concurrent `cycguard send` clients against one `cycguard serve`, memory watched.

    python -m benchmarks.load [--clients 8] [--pipeline recon]

Clients alternate between two raw files (20 and 4 held-out slices, demo protocol) so that a
mix-up of images between connections would show in the counts. Every client must exit 0
with exactly its own file's slices. Resident memory of the server and all its descendants
(gadget processes) is sampled every 0.2 s from /proc. Results: benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.online import start_server
from recon.data import mni
from recon.data.demo import DEMO_RAW, make_demo
from recon.io.mrd_write import read_images

RESULTS = Path(__file__).resolve().parent / "results"


def _tree_rss_mb(root: int) -> tuple[float, float]:
    """(RSS of ``root`` and all its descendants, RSS of ``root``) in MB, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    members, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in members]
        members.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in members) / 2**20, rss.get(root, 0) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pipeline", default="recon")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        big, _ = make_demo(folder, seed=13, slices=mni.heldout_axial(20))
        files = [(big, 20), (DEMO_RAW, 4)]
        server, port = start_server()
        peak = {"total": 0.0, "server": 0.0}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                total, own = _tree_rss_mb(server.pid)
                peak["total"], peak["server"] = max(peak["total"], total), max(peak["server"], own)
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            idle_total, idle_server = _tree_rss_mb(server.pid)
            started = time.perf_counter()
            clients = []
            for i in range(args.clients):
                raw, _ = files[i % 2]
                out = folder / f"client-{i}.h5"
                command = [sys.executable, "-m", "gadgets.cli", "send", str(raw), "-c", args.pipeline, "--port", str(port), "-o", str(out), "-G", "g"]
                clients.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            codes = [c.wait() for c in clients]
            wall = time.perf_counter() - started
        finally:
            done.set()
            watcher.join()
            server.terminate()
            server.wait(timeout=300)
            if server.stderr is not None:
                server.stderr.close()
        counts = [len(read_images(folder / f"client-{i}.h5", group="g")) for i in range(args.clients)]
        expected = [files[i % 2][1] for i in range(args.clients)]
        slices = sum(expected)
        row = {
            "pipeline": args.pipeline, "clients": args.clients, "exit_codes": codes, "images": counts, "expected": expected,
            "all_complete_and_own": codes == [0] * args.clients and counts == expected,
            "slices": slices, "seconds": wall, "slices_per_s": slices / wall,
            "idle_rss_mb": idle_total, "peak_rss_mb_server_and_gadgets": peak["total"], "peak_rss_mb_server": peak["server"],
        }
    print(json.dumps(row, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"load_{args.pipeline}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
