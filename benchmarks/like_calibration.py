"""How long a new protocol waits for its calibration by simulation (``cycguard calibrate --like``).

    python -m benchmarks.like_calibration [--slices 20] [--full 300]

For square protocols a site runs (the shipped one's neighbours and larger ones), a two-slice
brain scan of that protocol is written as the demo is (``make_demo`` with its matrix, coils,
acceleration and ACS lines); ``scores_like`` then simulates and scores ``--slices`` clean slices
of it on this machine: seconds a slice, and the wait for the 300 a calibration takes by default.
For the first protocol a whole calibration is made (``--full`` slices) and the scan is run
through the offline path with it: its verdicts, before (no calibration: ``unverified``) and after.

Results: ``benchmarks/results/like_calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from recon.calibrate import build_calibration, scores_like
from recon.data.demo import make_demo
from recon.detect.defense import cached_calibration_path, detector_for
from recon.detect.statistics import DEFAULT_STATISTIC
from recon.io.mrd_write import ScanDescription, read_images
from recon.models.weights import load_model
from recon.offline import reconstruct_file

RESULTS = Path(__file__).resolve().parent / "results"
# (matrix, coils, acceleration, ACS lines)
PROTOCOLS = ((128, 8, 4, 12), (128, 12, 3, 20), (192, 12, 2, 24), (256, 12, 3, 20), (256, 16, 3, 24))
DEFAULT_SLICES = 300


def verdicts(raw: Path, out: Path) -> list[str]:
    reconstruct_file(raw, out, out.with_suffix(""), progress=False)
    return [meta["CycGuard.Verdict"] for _, meta in read_images(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=20, help="simulated slices timed per protocol")
    parser.add_argument("--full", type=int, default=DEFAULT_SLICES, help="slices of the whole calibration made for the first protocol")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, manifest = load_model()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CYCGUARD_CALIBRATIONS"] = str(Path(tmp) / "cache")
        for n, (matrix, coils, acceleration, acs) in enumerate(PROTOCOLS):
            desc = ScanDescription(matrix=(matrix, matrix), coils=coils, acceleration=acceleration)
            raw, _ = make_demo(Path(tmp) / f"p{n}", seed=2026, slices=(72, 82), desc=desc, acs_lines=acs)
            count = args.full if n == 0 else args.slices
            started = time.monotonic()
            scores, protocol, levels = scores_like(raw, count, model, manifest, progress=True, statistic=DEFAULT_STATISTIC)
            seconds = (time.monotonic() - started) / count
            row: dict[str, Any] = {
                "protocol": protocol.describe(), "slices_timed": count, "seconds_per_slice": seconds,
                "wait_minutes_for_300": seconds * DEFAULT_SLICES / 60, "signal_levels": levels,
            }
            if n == 0:
                row["verdicts_before"] = verdicts(raw, Path(tmp) / "before.h5")
                calibration = build_calibration(scores, protocol, manifest, detector_for(model, manifest, protocol))
                cached = cached_calibration_path(manifest, protocol)
                cached.parent.mkdir(parents=True, exist_ok=True)
                calibration.save(cached)
                row["verdicts_after"] = verdicts(raw, Path(tmp) / "after.h5")
                row["threshold"] = calibration.threshold
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "like_calibration.json").write_text(json.dumps({"hardware": "2 CPU cores, torch 2 threads", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
