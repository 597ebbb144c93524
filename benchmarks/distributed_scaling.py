"""Online scaling on Gadgetron's distributed mode: a real Gadgetron 4.7.2 main node and 1, 2, 4 workers.

    python -m benchmarks.distributed_scaling [--slices 8] [--repeats 2] [--workers 1,2,4] [--only warm]
    taskset -c 0 python -m benchmarks.distributed_scaling --workers 1 --only warm   # everything on one core

One raw file of the demo protocol (``--slices`` held-out MNI slices) goes through the real
client to a real Gadgetron: the single-node pipelines ``defended`` and ``defended_composed``
on one server, and ``defended_distributed`` (one ``<external>`` per stage on the workers) and
the same with the worker stages in one ``gadgets.composed`` process, and
``defended_distributed_warm`` (the worker streams connect to one warm gadget server,
``gadgets.listen --forever``, which forks a session per slice), on a main node with N worker
servers on this machine (found by ``cycguard workers``). Wall time from the client's
start to its exit; slices/s; speed-up over the single-node ``defended``. Per-slice latency:
for each slice, the time its worker stream took (from the worker's accepting the slice's
connection to its end, read from the worker's log). Every run's verdicts must equal the
single-node run's. Run under ``taskset`` the servers, gadgets and client share the cores it
names (the results' names then end in ``_Ncore``): the single node on one core against workers
with a core each is the distributed mode's scaling in cores, which one 2-core machine can show
where it cannot show a speed-up over a single node that already uses both cores.
Results: ``benchmarks/results/distributed_scaling[_ONLY][_Sslices][_Ncore].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from gadgets.cores import available_cores
from gadgets.runner.client import send
from recon.data.demo import make_demo
from recon.verdict import VERDICT_KEY
from tests import gadgetron_host as host

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SLICE_POOL = (60, 63, 66, 69, 72, 75, 78, 81, 84, 87, 90, 93, 96, 99, 102, 105)  # MNI z, held-out range
STAMP = re.compile(r"^(\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ")


def composed_variant(folder: Path) -> Path:
    """``defended_distributed`` with the three worker stages in one ``gadgets.composed`` process."""
    text = (ROOT / "pipelines" / "defended_distributed.xml").read_text()
    start = text.index('        <external>\n          <execute name="gadgets.recon"')
    end = text.index("      </stream>")
    composed = """        <external>
          <execute name="gadgets.composed" target="composed" type="python"/>
          <configuration>
            <property name="stages" value="recon,detect,mitigate"/>
            <property name="account_slices" value="false"/>
            <property name="noise_level" value="whitened"/>
          </configuration>
        </external>
"""
    path = folder / "defended_distributed_composed.xml"
    path.write_text(text[:start] + composed + text[end:])
    return path


def warm_variant(folder: Path, port: int) -> Path:
    """``defended_distributed_warm`` pointed at ``port``."""
    path = folder / "defended_distributed_warm.xml"
    path.write_text((ROOT / "pipelines" / "defended_distributed_warm.xml").read_text().replace('port="18000"', f'port="{port}"'))
    return path


class WarmServer:
    """``gadgets.listen gadgets.composed composed --forever`` on ``port``, up until stopped."""

    def __init__(self, port: int, busy: int, log: Path) -> None:
        self.log = log
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gadgets.listen", "gadgets.composed", "composed", "--port", str(port), "--forever",
                 "--max-busy", str(busy)], stdout=subprocess.DEVNULL, stderr=sink, env=host.tool_env(),
            )
        deadline = time.monotonic() + 120
        while "warm: serving" not in log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the warm gadget server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.peak_sessions, self.peak_sessions_gib = 0, 0.0  # its sessions at once, and their memory of their own (USS)
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def _sample(self) -> None:
        parent = psutil.Process(self.process.pid)
        while not self.done.wait(0.3):
            try:
                sessions = parent.children()
                gib = sum(s.memory_full_info().uss for s in sessions) / 2**30
            except psutil.Error:  # a session ended while being read
                continue
            self.peak_sessions = max(self.peak_sessions, len(sessions))
            self.peak_sessions_gib = max(self.peak_sessions_gib, gib)

    def stop(self) -> None:
        self.done.set()
        self.sampler.join()
        self.process.terminate()
        self.process.wait(timeout=120)


def worker_stream_seconds(logs: list[str]) -> list[float]:
    """Seconds of each slice's stream on the workers: from a connection's start to its end."""
    out = []
    for text in logs:
        opened: list[datetime] = []
        for line in text.splitlines():
            match = STAMP.match(line)
            if not match:
                continue
            when = datetime.strptime("2026-" + match.group(1), "%Y-%m-%d %H:%M:%S.%f")
            if "Accepted connection" in line:
                opened.append(when)
            elif "Connection state: [FINISHED]" in line and opened:
                out.append((when - opened.pop(0)).total_seconds())
    return out


@dataclass(frozen=True)
class Run:
    """One client run: its wall time, the verdicts and image numbers in slice order, and how
    long each worker stream was open."""

    wall_s: float
    verdicts: list[str | None]
    image_index: list[int]
    stream_s: list[float]
    latency_s: list[float]  # paced runs: each slice's last acquisition sent -> its image back


def run_once(raw: Path, script: Path | None, config: str | None, workers: int | None, work: Path, tr_ms: float = 0.0) -> Run:
    if workers is None:
        server = host.Gadgetron(work / "single")
        servers, main = [server], server
    else:
        cluster = host.Cluster(work / "cluster", workers=workers)
        assert cluster.main is not None
        servers, main = [*cluster.workers, cluster.main], cluster.main
    try:
        start = time.monotonic()
        latency: list[float] = []
        if tr_ms:  # cycguard send, acquisitions released a TR apart, as a scanner sends them
            sent = send(raw, work / "out.h5", config, script, port=main.port, group="g", pace="tr", tr_ms=tr_ms, echo_text=False)
            if not sent.ok:
                raise RuntimeError(f"paced run failed: {sent.errors} {sent.missing} {main.log()[-2000:]}")
            out, latency = sent.output, list(sent.latency.values())
        else:
            run = main.client(raw, work / "out.h5", script=script, config=config, timeout=900)
            if not run.wrote:
                raise RuntimeError(f"no images: {run.output[-2000:]}")
            out = run.out
        wall = time.monotonic() - start
        images = host.read_output(out)
        logs = [s.log() for s in servers if s is not main] if workers else []
    finally:
        for server in servers:
            server.stop()
    return Run(
        wall, [images[key].meta.get(VERDICT_KEY) for key in sorted(images)], [images[key].image_index for key in sorted(images)],
        worker_stream_seconds(logs), latency,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--pace-tr-ms", type=float, default=0.0,
                        help="send with cycguard send, acquisitions a TR apart (as a scanner), instead of the real client at full speed")
    parser.add_argument("--only", default="", help="only the cases whose name holds this (and the single-node reference)")
    args = parser.parse_args()
    reason = host.unavailable()
    if reason:
        raise SystemExit(reason)
    host.install_pipelines()
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw, _ = make_demo(folder / "raw", slices=SLICE_POOL[: args.slices])
        variant = composed_variant(folder)
        port = host.free_port()
        warm = warm_variant(folder, port)
        cases: list[tuple[str, Path | None, str | None, int | None]] = [
            ("defended (single node)", None, "defended.xml", None),
            ("defended_composed (single node)", None, "defended_composed.xml", None),
        ]
        for n in counts:
            cases.append((f"defended_distributed, {n} worker(s)", ROOT / "pipelines" / "defended_distributed.xml", None, n))
            cases.append((f"distributed, composed worker stage, {n} worker(s)", variant, None, n))
            cases.append((f"defended_distributed_warm, {n} worker(s)", warm, None, n))
        if args.only:
            cases = cases[:1] + [case for case in cases[1:] if args.only in case[0]]
        rows: list[dict[str, Any]] = []
        reference: list[str | None] | None = None
        for name, script, config, workers in tqdm(cases, desc="configurations", unit="case"):
            runs = []
            peak: dict[str, float] = {}
            # one warm gadget server for the machine (all workers here share it), computing sessions as the cores
            server = WarmServer(port, available_cores(), folder / f"listen{len(rows)}.log") if script == warm else None
            try:
                for repeat in range(args.repeats):
                    work = folder / f"run{len(rows)}_{repeat}"
                    work.mkdir()
                    runs.append(run_once(raw, script, config, workers, work, args.pace_tr_ms))
            finally:
                if server is not None:
                    server.stop()
                    peak = {"warm_sessions_peak": server.peak_sessions, "warm_sessions_gib_peak": round(server.peak_sessions_gib, 2)}
            reference = reference or runs[0].verdicts
            if any(r.verdicts != reference for r in runs):
                raise RuntimeError(f"{name}: verdicts {[r.verdicts for r in runs]} differ from the single node's {reference}")
            if any(r.image_index != list(range(1, args.slices + 1)) for r in runs):
                raise RuntimeError(f"{name}: image numbers {[r.image_index for r in runs]}")
            wall = statistics.median(r.wall_s for r in runs)
            streams = [s for r in runs for s in r.stream_s]
            latency = [s for r in runs for s in r.latency_s]
            rows.append({
                "case": name, "workers": workers, "wall_s": round(wall, 2), "slices_per_s": round(args.slices / wall, 3),
                "stream_s_median": round(statistics.median(streams), 2) if streams else None,
                "stream_s_max": round(max(streams), 2) if streams else None,
                "runs_wall_s": [round(r.wall_s, 2) for r in runs],
                "latency_s_median": round(statistics.median(latency), 3) if latency else None,
                "latency_s_max": round(max(latency), 3) if latency else None,
                **peak,
            })
    base = rows[0]["slices_per_s"]
    for row in rows:
        row["speed_up"] = round(float(row["slices_per_s"]) / float(base), 2)
    cores, machine_cores = available_cores(), os.cpu_count() or 1
    pinned = f"taskset -c {','.join(map(str, sorted(os.sched_getaffinity(0))))} " if cores < machine_cores else ""
    result = {
        "command": f"{pinned}python -m benchmarks.distributed_scaling --slices {args.slices} --repeats {args.repeats} --workers {args.workers}"
                   + (f" --only {args.only}" if args.only else "") + (f" --pace-tr-ms {args.pace_tr_ms:g}" if args.pace_tr_ms else ""),
        "machine": f"{platform.machine()}, {machine_cores} cores", "cores_used": cores, "slices": args.slices, "verdicts": reference,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "distributed_scaling" + (f"_{args.only}" if args.only else "") + (f"_{args.slices}slices" if args.slices != 8 else "") + (f"_tr{args.pace_tr_ms:g}ms" if args.pace_tr_ms else "") + (f"_{cores}core" if pinned else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"`{result['command']}` on {result['machine']} ({cores} used); verdicts {reference}", "",
             "| case | wall s | slices/s | speed-up | worker stream s median / max | latency s median / max |", "|---|---|---|---|---|---|"]
    for row in rows:
        stream = f"{row['stream_s_median']} / {row['stream_s_max']}" if row["stream_s_median"] is not None else ""
        shown = f"{row['latency_s_median']} / {row['latency_s_max']}" if row["latency_s_median"] is not None else ""
        lines.append(f"| {row['case']} | {row['wall_s']} | {row['slices_per_s']} | {row['speed_up']} | {stream} | {shown} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
