"""Clean false-positive rate of the shipped calibration on the product's own path.

    python -m benchmarks.product_fpr [--seeds 15] [--slices 20] [--set training-like|held-out] [--out DIR]

The shipped calibration was made from simulated slices scored as the detection benchmarks
score them (coil maps from the ACS block, the simulated noise level, no raw file). Here clean
slices go the way a user's data go: raw files in the demo protocol (8 coils, R = 4 + 16 ACS,
2x readout oversampling, noise scans: `recon.data.demo.make_demo` with a new seed each, so
new coil maps, phase and noise; the slices of one set of ``benchmarks.sets``: by default
``training-like``, the MNI152 held-out axial slab, or ``held-out``), read by ``read_raw`` (noise
prewhitening, oversampling removed), the shipped weights and calibration,
``recon.pipeline.defend`` per slice. Reports the flagged share against the calibration's
target rate, the largest scores, and each component's quantiles beside its scale.
Results go to ``benchmarks/results/product_fpr.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.sets import SETS, raw_file
from recon.detect.defense import ScanDefenses
from recon.io.mrd import read_raw
from recon.models.weights import load_model
from recon.pipeline import defend

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=15, help="raw files, each with its own coil maps, phase and noise")
    parser.add_argument("--slices", type=int, default=20, help="held-out axial slices per file (at most 20)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--calibration", type=Path, default=None, help="calibration JSON (default: the one shipped with the weights)")
    parser.add_argument("--set", dest="data_set", choices=SETS, default="training-like", help="the data set (benchmarks.sets)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, manifest = load_model()
    rows: list[dict[str, Any]] = []
    defense = None
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=args.seeds * args.slices, desc="clean slices", unit="slice") as bar:
        for seed in range(1000, 1000 + args.seeds):
            raw, _ = raw_file(args.data_set, Path(tmp) / str(seed), seed, args.slices)
            defenses = ScanDefenses(model, manifest, read_raw(raw), args.calibration)
            for data in defenses.scan.slices:
                defense = defenses.for_slice(data)
                if defense is None:
                    raise RuntimeError("the shipped calibration does not fit the demo protocol")
                result = defend(data, defense)
                components = {name: result.scores.get(name) for name, _ in defense.calibration.scales}
                rows.append({"seed": seed, "slice": data.key.slice, "verdict": result.verdict, "score": result.score, "components": components})
                bar.update()
    assert defense is not None
    cal = defense.calibration
    scores = np.array([r["score"] for r in rows])
    flagged = int(sum(r["verdict"] != "clean" for r in rows))
    summary: dict[str, Any] = {
        "set": args.data_set,
        "slices": len(rows),
        "flagged": flagged,
        "fpr": flagged / len(rows),
        "target_fpr": cal.target_fpr,
        "threshold": cal.threshold,
        "clean_max_calibration": cal.clean_max,
        "score_quantiles": {q: float(np.quantile(scores, q)) for q in (0.5, 0.9, 0.99)},
        "score_max": float(scores.max()),
        "components": {
            name: {"scale": scale, "median": float(np.median(v)), "p99": float(np.quantile(v, 0.99)), "max": float(np.max(v))}
            for name, scale in cal.scales
            for v in [np.array([r["components"][name] for r in rows])]
        },
        "verdicts": {v: sum(r["verdict"] == v for r in rows) for v in sorted({r["verdict"] for r in rows})},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "product_fpr.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    lines = [
        f"Command: `python -m benchmarks.product_fpr --seeds {args.seeds} --slices {args.slices}"
        + (f" --calibration {args.calibration}" if args.calibration else "")
        + (f" --set {args.data_set} --out {args.out}" if args.calibration or args.data_set != "training-like" or args.out != RESULTS else "") + "`",
        "",
        f"{len(rows)} clean slices ({args.seeds} raw files x {args.slices}), statistic `{defense.statistic}`, threshold {cal.threshold:.4g} "
        f"(target FPR {cal.target_fpr:g}): **flagged {flagged} ({flagged / len(rows):.3f})**; verdicts "
        + ", ".join(f"{k} {v}" for k, v in summary["verdicts"].items())
        + f"; score median {summary['score_quantiles'][0.5]:.3f}, 99th percentile {summary['score_quantiles'][0.99]:.3f}, largest {summary['score_max']:.3f}.",
        "",
        "| component | scale | median | 99th percentile | largest |",
        "|---|---|---|---|---|",
        *(f"| {name} | {c['scale']:.4g} | {c['median']:.4g} | {c['p99']:.4g} | {c['max']:.4g} |" for name, c in summary["components"].items()),
    ]
    (args.out / "product_fpr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
