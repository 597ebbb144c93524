"""Clean slices whose k-space periphery carries signal: are they checked, or left ``unverified``?

    python -m benchmarks.periphery_signal [--out benchmarks/results]

Brain slices have almost no signal at the edges of k-space; body images (an object filling the
field of view, sharp texture) do. Prewhitened data have noise sigma 1 by construction; the
product doubts it when the k-space periphery disagrees (a guard against data not whitened as
the header says). This benchmark writes raw files of the shipped protocol (128 matrix, 8
coils, R = 4, 16 ACS lines, 2x readout oversampling, noise scans) as the demo is written, from
objects that fill the field of view: the photographs and textures scikit-image ships
(``camera``, ``gravel``, ``brick``, ``grass``, ``coins``, ``moon``) and, as a control, the demo's
four MNI brain slices; and it runs each through the product's offline path (``read_raw``, the
shipped calibration, ``defend``). Per slice: the noise sigma the raw periphery gives, the
network's residual there (``noise_excess``), the verdict and its reason.

Results: ``benchmarks/results/periphery_signal.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from skimage import data as skdata
from skimage.transform import resize
from tqdm import tqdm

from benchmarks.snr_coverage import product_verdicts
from recon.data.demo import DEMO_RAW, make_demo
from recon.io.mrd import read_raw
from recon.physics.noise import estimate_noise_sigma

RESULTS = Path(__file__).resolve().parent / "results"
OBJECTS = ("camera", "gravel", "brick", "grass", "coins", "moon")


def object_image(name: str, matrix: int = 128) -> np.ndarray:
    """A scikit-image picture as a ``(matrix, matrix)`` magnitude in [0, 1], filling the field of view."""
    picture = np.asarray(getattr(skdata, name)(), dtype=np.float64)
    if picture.ndim == 3:
        picture = picture.mean(axis=-1)
    side = min(picture.shape)
    square = picture[:side, :side]
    image = resize(square, (matrix, matrix), anti_aliasing=True)
    return ((image - image.min()) / max(float(np.ptp(image)), 1e-12)).astype(np.float32)


def run(raw: Path, source: str) -> list[dict[str, Any]]:
    """Each slice of ``raw`` through the offline product path, with the noise sigma its raw periphery gives."""
    scan = read_raw(raw)
    peripheries = [estimate_noise_sigma(np.asarray(data.kspace), np.asarray(data.mask)) for data in scan.slices]
    return [{"source": source, "periphery_sigma": sigma, **row} for sigma, row in zip(peripheries, product_verdicts(raw), strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = run(DEMO_RAW, "mni (demo)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(OBJECTS, desc="objects"):
            raw, _ = make_demo(Path(tmp) / name, seed=2026, magnitudes=[object_image(name)])
            rows += run(raw, name)
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        kind = "mni" if row["source"].startswith("mni") else "filling the FOV"
        counts.setdefault(kind, {}).setdefault(row["verdict"], 0)
        counts[kind][row["verdict"]] += 1
    periphery_doubts = sum("periphery" in row["reason"] and row["verdict"] == "unverified" for row in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "periphery_signal.json").write_text(json.dumps({"counts": counts, "unverified_by_periphery": periphery_doubts, "slices": rows}, indent=1))
    for row in rows:
        excess = row.get("noise_excess")
        print(f"{row['source']:12s} slice {row['slice']}  periphery sigma {row['periphery_sigma']:.3f}  "
              f"noise_excess {'-' if excess is None else f'{excess:.3f}'}  {row['verdict']:10s} {row['reason'][:110]}")
    print(f"verdicts: {counts}; unverified because of the periphery: {periphery_doubts}")


if __name__ == "__main__":
    main()
