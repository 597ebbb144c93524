"""Offline replay of an archive on a local Dask cluster: throughput with 1, 2 and 4 workers,
and a large file split into slice tasks.

    python -m benchmarks.batch_scaling [--files 6] [--pipelines recon defended] [--workers 1 2 4] [--large 12]

Copies of the demo raw file (4 slices each) are replayed with ``cycguard replay FOLDER``'s
function (:func:`gadgets.runner.batch.replay_many`, stages in each worker's process), into a
fresh folder each time: 1 worker with 1 torch thread (one core), 1 worker with every core's
thread, and N workers of 1 thread each. Reported: wall seconds (cluster start-up and the
per-file reports included), slices per second, a file's and a slice's time in its task
(latency), the efficiency against linear scaling in the cores used (N workers of one core each,
at most the machine's cores, against one worker on one core) and the speed-up over one worker
that has every core. Workers beyond the cores share them: their row shows what oversubscription
costs. Then one file of ``--large`` slices: one task on one worker with every core's thread,
against ``--slices-per-task 4`` on one worker of one thread per core (its parts and the merge).

Results: ``benchmarks/results/batch_scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from gadgets.cores import available_cores
from gadgets.runner.batch import BatchSummary, replay_many
from recon.data.demo import DEMO_RAW, make_demo

RESULTS = Path(__file__).resolve().parent / "results"
SLICES_PER_FILE = 4
LARGE_POOL = (60, 63, 66, 69, 72, 75, 78, 81, 84, 87, 90, 93, 96, 99, 102, 105)  # MNI z, held-out range
PART = 4


def _run(inputs: list[str], pipeline: str, folder: Path, workers: int, threads: int, slices_per_task: int = 0) -> BatchSummary:
    summary = replay_many(inputs, pipeline, folder, workers=workers, threads=threads, progress=False, slices_per_task=slices_per_task)
    if not summary.ok:
        raise RuntimeError([f.failures for f in summary.files if f.failures])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--pipelines", nargs="+", default=["recon", "defended"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--large", type=int, default=12, help="slices of the file split into tasks (0: skip)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cores = available_cores()
    rows: list[dict[str, Any]] = []
    split: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        archive.mkdir()
        for n in range(args.files):
            shutil.copyfile(DEMO_RAW, archive / f"scan{n:03d}.h5")
        large = make_demo(Path(tmp) / "large", slices=LARGE_POOL[: args.large])[0] if args.large else None
        for pipeline in args.pipelines:
            rates: dict[tuple[int, int], float] = {}
            for workers, threads in [(1, 1), (1, cores), *[(w, 1) for w in args.workers if w > 1]]:
                summary = _run([str(archive)], pipeline, Path(tmp) / f"{pipeline}-{workers}x{threads}", workers, threads)
                rate = args.files * SLICES_PER_FILE / summary.seconds
                rates[(workers, threads)] = rate
                used = min(workers * threads, cores)
                file_s = statistics.median(f.seconds for f in summary.files)
                row = {
                    "pipeline": pipeline, "workers": workers, "threads": threads, "cores_used": used, "files": args.files,
                    "seconds": summary.seconds, "slices_per_s": rate, "file_seconds_median": file_s,
                    "slice_seconds_median": file_s / SLICES_PER_FILE,
                    "efficiency_vs_one_core": rate / (rates[(1, 1)] * used),
                    "speed_up_vs_one_worker_all_cores": rate / rates[(1, cores)] if (1, cores) in rates else None,
                    "verdicts": summary.verdicts(),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            if large is not None:
                for label, workers, threads, part in [("one task", 1, cores, 0), (f"tasks of {PART} slices", cores, 1, PART)]:
                    summary = _run([str(large)], pipeline, Path(tmp) / f"{pipeline}-large-{part}", workers, threads, part)
                    entry = {"pipeline": pipeline, "slices": args.large, "how": label, "workers": workers, "threads": threads,
                             "seconds": summary.seconds, "slices_per_s": args.large / summary.seconds, "verdicts": summary.verdicts()}
                    split.append(entry)
                    print(json.dumps(entry), flush=True)
    command = f"python -m benchmarks.batch_scaling --files {args.files} --pipelines {' '.join(args.pipelines)} " \
              f"--workers {' '.join(map(str, args.workers))} --large {args.large}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_scaling.json").write_text(json.dumps(
        {"command": command, "machine": platform.machine(), "cores": cores, "rows": rows, "large_file": split}, indent=1) + "\n")
    lines = [f"`{command}` on {platform.machine()}, {cores} cores", "",
             "| pipeline | workers x threads | wall s | slices/s | a file s / a slice s (median) | efficiency vs one core | over 1 worker on every core |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        over = f"{r['speed_up_vs_one_worker_all_cores']:.2f}" if r["speed_up_vs_one_worker_all_cores"] is not None else ""
        lines.append(f"| `{r['pipeline']}` | {r['workers']} x {r['threads']} | {r['seconds']:.1f} | {r['slices_per_s']:.2f} | "
                     f"{r['file_seconds_median']:.1f} / {r['slice_seconds_median']:.2f} | {r['efficiency_vs_one_core']:.2f} | {over} |")
    if split:
        lines += ["", f"One file of {args.large} slices:", "", "| pipeline | how | workers x threads | wall s | slices/s |", "|---|---|---|---|---|"]
        lines += [f"| `{s['pipeline']}` | {s['how']} | {s['workers']} x {s['threads']} | {s['seconds']:.1f} | {s['slices_per_s']:.2f} |" for s in split]
    (args.out / "batch_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
