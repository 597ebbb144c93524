"""Offline replay of an archive on a local Dask cluster: throughput with 1 and 2 workers.

    python -m benchmarks.batch_scaling [--files 6] [--pipelines recon defended]

Copies of the demo raw file (4 slices each) are replayed with ``cycguard replay FOLDER``'s
function (:func:`gadgets.runner.batch.replay_many`, stages in each worker's process), into a
fresh folder each time: 1 worker with 1 torch thread (one core), 1 worker with every core's
thread, and N workers of 1 thread each. Reported: wall seconds (cluster start-up and the
per-file reports included), slices per second, the efficiency against linear scaling in cores
(N workers of one core each against one worker on one core) and the speed-up over one worker
that has every core. On this machine's 2 cores, 2 workers is the most that can scale.

Results: ``benchmarks/results/batch_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from gadgets.runner.batch import replay_many
from recon.data.demo import DEMO_RAW

RESULTS = Path(__file__).resolve().parent / "results"
SLICES_PER_FILE = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--pipelines", nargs="+", default=["recon", "defended"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        archive.mkdir()
        for n in range(args.files):
            shutil.copyfile(DEMO_RAW, archive / f"scan{n:03d}.h5")
        cores = os.cpu_count() or 1
        for pipeline in args.pipelines:
            rates: dict[tuple[int, int], float] = {}
            for workers, threads in [(1, 1), (1, cores), *[(w, 1) for w in args.workers if w > 1]]:
                folder = Path(tmp) / f"{pipeline}-{workers}x{threads}"
                summary = replay_many([str(archive)], pipeline, folder, workers=workers, threads=threads, progress=False)
                assert summary.ok, [f.failures for f in summary.files if f.failures]
                rate = args.files * SLICES_PER_FILE / summary.seconds
                rates[(workers, threads)] = rate
                row = {
                    "pipeline": pipeline, "workers": workers, "threads": threads, "files": args.files, "seconds": summary.seconds,
                    "slices_per_s": rate, "file_seconds_median": statistics.median(f.seconds for f in summary.files),
                    "efficiency_vs_one_core": rate / (rates[(1, 1)] * workers * threads),
                    "speed_up_vs_one_worker_all_cores": rate / rates[(1, cores)] if (1, cores) in rates else None,
                    "verdicts": summary.verdicts(),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_scaling.json").write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
