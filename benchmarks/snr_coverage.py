"""What the calibration's signal-level range covers, and what it refuses.

    python -m benchmarks.snr_coverage [--fresh 300] [--seed 202]

A calibration records the signal levels (RMS of the ACS lines in noise sigmas) of its clean
slices; a slice outside that range cannot be ``clean`` (``unverified``). Measured here:

* fresh clean slices of the shipped protocol (simulated as the calibration's were, another
  seed): the share outside the range (``unverified`` from coverage alone; expected about
  2 / (n + 1) for n calibration slices);
* ISMRMRD's Shepp-Logan generator at the shipped protocol (128 matrix, 8 coils, R = 4,
  16 ACS lines) over its noise levels, through the product's offline path: verdict and level;
* the demo file's slices.

Results: ``benchmarks/results/snr_coverage.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from recon.data.demo import DEMO_RAW
from recon.detect.cyclic import signal_level
from recon.detect.defense import ScanDefenses, default_calibration_path, detector_for
from recon.io.mrd import read_raw
from recon.models.weights import load_model
from recon.physics.masks import MaskFamily
from recon.physics.sense import SenseOp
from recon.pipeline import defend

RESULTS = Path(__file__).resolve().parent / "results"
NOISE_LEVELS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def calibration_range() -> tuple[float, float]:
    _, manifest = load_model()
    raw = json.loads(default_calibration_path(manifest).read_text())
    low, high = raw["signal_range"]
    return float(low), float(high)


def calibration_sha256() -> str:
    _, manifest = load_model()
    return str(json.loads(default_calibration_path(manifest).read_text())["sha256"])[:12]


def fresh_levels(count: int, seed: int) -> list[float]:
    """Signal levels of fresh simulated clean slices of the shipped protocol (no network pass)."""
    from recon.data.samples import simulated_slices

    model, manifest = load_model()
    detector = detector_for(model, manifest)
    family = MaskFamily(manifest.mask_kind, manifest.acceleration, manifest.acs_lines)
    levels = []
    for sample in tqdm(simulated_slices("heldout", count, family, manifest.coils, seed), desc="fresh clean slices"):
        op = SenseOp(sample.maps[None], sample.mask[None])
        y = op.project(sample.kspace_full[None])
        levels.append(float(signal_level(y, detector.acs(op), sample.noise_std)))
    return levels


def product_verdicts(raw: Path) -> list[dict[str, object]]:
    """Each slice of ``raw`` through the offline product path: verdict, level, reason."""
    model, manifest = load_model()
    scan = read_raw(raw)
    defenses = ScanDefenses(model, manifest, scan)
    rows = []
    for data in scan.slices:
        defense = defenses.for_slice(data)
        if defense is None:
            rows.append({"slice": data.key.slice, "verdict": "unverified", "reason": "no calibration fits"})
            continue
        result = defend(data, defense)
        rows.append({
            "slice": data.key.slice, "verdict": result.verdict, "signal_level": result.scores.signal_level, "score": result.score,
            "noise_excess": result.scores.noise_excess, "reason": result.reason,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", type=int, default=300, help="fresh simulated clean slices")
    parser.add_argument("--seed", type=int, default=202)
    args = parser.parse_args()
    torch.set_num_threads(2)
    low, high = calibration_range()
    levels = fresh_levels(args.fresh, args.seed)
    outside = [v for v in levels if not low <= v <= high]
    shepp = {}
    tool = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
    if tool is None:
        raise SystemExit("ismrmrd_generate_cartesian_shepp_logan not found (Debian: apt-get install ismrmrd-tools)")
    with tempfile.TemporaryDirectory() as folder:
        for noise in tqdm(NOISE_LEVELS, desc="Shepp-Logan"):
            raw = Path(folder) / f"sl-{noise}.h5"
            subprocess.run([tool, "-m", "128", "-c", "8", "-a", "4", "-w", "16", "-n", str(noise), "-C", "-o", str(raw)], check=True, capture_output=True)
            shepp[str(noise)] = product_verdicts(raw)
    result = {
        "command": f"python -m benchmarks.snr_coverage --fresh {args.fresh} --seed {args.seed}",
        "calibration": {"signal_range": [low, high], "sha256": calibration_sha256()},
        "fresh_clean": {
            "slices": len(levels),
            "outside": len(outside),
            "share_outside": len(outside) / len(levels),
            "levels_min_median_max": [min(levels), sorted(levels)[len(levels) // 2], max(levels)],
        },
        "shepp_logan_by_noise": shepp,
        "demo": product_verdicts(DEMO_RAW),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "snr_coverage.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "shepp_logan_by_noise"}, indent=2))
    for noise, rows in shepp.items():
        print(f"Shepp-Logan -n {noise}: " + ", ".join(f"{r['verdict']} (level {r.get('signal_level', float('nan')):.3g})" for r in rows))


if __name__ == "__main__":
    main()
