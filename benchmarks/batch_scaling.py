"""Offline replay of an archive on a local Dask cluster: throughput with 1 and 2 workers.

    python -m benchmarks.batch_scaling [--files 6] [--pipelines recon defended]

Copies of the demo raw file (4 slices each) are replayed with ``cycguard replay FOLDER``'s
function (:func:`gadgets.runner.batch.replay_many`, stages in each worker's process), once per
worker count, into a fresh folder. Reported: wall seconds, slices per second and the
efficiency against linear scaling from one worker. On this machine's 2 cores, 2 workers is
the most that can scale.

Results: ``benchmarks/results/batch_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
        for pipeline in args.pipelines:
            base = None
            for workers in args.workers:
                summary = replay_many([str(archive)], pipeline, Path(tmp) / f"{pipeline}-{workers}", workers=workers, progress=False)
                assert summary.ok, [f.failures for f in summary.files if f.failures]
                rate = args.files * SLICES_PER_FILE / summary.seconds
                base = base or rate
                row = {
                    "pipeline": pipeline, "workers": workers, "files": args.files, "seconds": summary.seconds, "slices_per_s": rate,
                    "speed_up": rate / base, "efficiency": rate / (base * workers), "verdicts": summary.verdicts(),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_scaling.json").write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
