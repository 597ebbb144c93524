"""Reconstruction quality and speed: zero-filled, CG-SENSE, BART pics (l1-wavelet), CycGuard's network.

Usage: ``python -m benchmarks.recon_table [--weights W] [--out benchmarks/results]``

Datasets (R = 4 equispaced, 16 ACS lines, 8 coils; coil maps estimated from the ACS block
and shared by every method):

* ``mni-heldout``: the 20 held-out axial MNI152 slices (T1 contrast) plus 20 augmented
  versions of them (random synthetic contrast, flips, rotation, warp), simulated with a
  seed different from the training run's validation set.
* ``dipy-t1``: dipy's real 256x256 T1 coronal slice (out of distribution: real anatomy,
  twice the matrix the network was trained on), 4 simulations with different coils/noise.
* ``shepp-logan``: ``ismrmrd_generate_cartesian_shepp_logan -m 128 -c 8 -a 4 -w 16 -n 0.05 -C``
  read through our MRD reader (prewhitening, readout oversampling removal); repetition 0
  is the undersampled scan and the 4 complementary repetitions together give the fully
  sampled reference.

CG-SENSE's iterations and Tikhonov weight and BART's l1-wavelet weight are tuned on 4
training-split slices (best mean PSNR) before the held-out evaluation. Times are wall
clock per slice on this machine, after coil-map estimation (common to all methods, timed
separately); BART's include its process start and CFL file I/O, as it is used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.bart import pics_l1_wavelet
from recon.baselines import cg_sense
from recon.data import mni
from recon.data.samples import Sample, make_sample
from recon.io.mrd import read_raw
from recon.metrics import Quality, quality
from recon.models.weights import load_model
from recon.physics.masks import MaskFamily
from recon.physics.sense import SenseOp
from recon.pipeline import prepare
from recon.report import montage


@dataclass(frozen=True, eq=False)
class Case:
    """One slice to reconstruct: operator, measured lines, reference."""

    label: str
    op: SenseOp
    y: torch.Tensor
    reference: np.ndarray


def _case(label: str, sample: Sample) -> Case:
    op = SenseOp(sample.maps[None], sample.mask[None])
    return Case(label, op, op.project(sample.kspace_full[None]), sample.reference.numpy())


def mni_cases(family: MaskFamily, seed: int = 4242) -> list[Case]:
    rng = np.random.default_rng(seed)
    refs = mni.catalog("heldout")
    cases = [_case(f"z{r.index}", make_sample(mni.magnitude_slice(r, 128), family, 8, rng)) for r in refs]
    cases += [_case(f"z{r.index}-aug", make_sample(mni.magnitude_slice(r, 128, rng), family, 8, rng)) for r in refs]
    return cases


def train_cases(family: MaskFamily, count: int = 4, seed: int = 77) -> list[Case]:
    rng = np.random.default_rng(seed)
    images = mni.stream("train", 128, rng)
    return [_case(f"train{i}", make_sample(next(images), family, 8, rng)) for i in range(count)]


def dipy_cases(family: MaskFamily, count: int = 4, seed: int = 9) -> list[Case]:
    import dipy.data

    image = np.load(os.path.join(os.path.dirname(dipy.data.__file__), "files", "t1_coronal_slice.npy")).astype(np.float32)
    image = np.clip(image, 0, None) / image.max()
    rng = np.random.default_rng(seed)
    return [_case(f"dipy{i}", make_sample(image, family, 8, rng)) for i in range(count)]


def shepp_logan_cases() -> list[Case]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sl.h5"
        subprocess.run(
            ["ismrmrd_generate_cartesian_shepp_logan", "-m", "128", "-c", "8", "-a", "4", "-w", "16", "-n", "0.05", "-C", "-o", str(path)],
            check=True,
            capture_output=True,
        )
        scan = read_raw(path)
    reps = scan.slices
    total = sum(np.array(s.kspace) for s in reps)
    counts = sum(np.array(s.mask, dtype=np.float32) for s in reps)
    full = total / np.maximum(counts, 1)[None, :, None]
    first = prepare(reps[0])
    reference = first.op.fully_sampled().adjoint(torch.from_numpy(full.astype(np.complex64))[None])[0].numpy()
    return [Case("rep0", first.op, first.y, reference)]


Method = Callable[[Case], np.ndarray]


def _timed(method: Method, case: Case) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    image = method(case)
    return image, time.perf_counter() - t0


def tune_cg(cases: list[Case]) -> tuple[int, float]:
    grid = [(it, lam) for it in (4, 6, 8, 12, 16, 24) for lam in (0.0, 0.01, 0.03, 0.1)]
    scores = {g: np.mean([quality(cg_sense(c.op, c.y, *g)[0].numpy(), c.reference).psnr for c in cases]) for g in grid}
    return max(scores, key=lambda g: scores[g])


def tune_bart(cases: list[Case]) -> float:
    grid = (0.0003, 0.001, 0.003, 0.01, 0.03)
    scores = {lam: np.mean([quality(_bart(c, lam), c.reference).psnr for c in cases]) for lam in grid}
    return max(scores, key=lambda lam: scores[lam])


def _bart(case: Case, lam: float) -> np.ndarray:
    return pics_l1_wavelet(case.y[0].numpy(), case.op.maps[0].numpy(), lam)


def summarise(qs: list[Quality], times: list[float]) -> dict[str, float]:
    return {
        "psnr": float(np.mean([q.psnr for q in qs])),
        "psnr_std": float(np.std([q.psnr for q in qs])),
        "ssim": float(np.mean([q.ssim for q in qs])),
        "nmse": float(np.mean([q.nmse for q in qs])),
        "seconds": float(np.median(times)),
        "slices": len(qs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, manifest = load_model(args.weights)
    family = MaskFamily(manifest.mask_kind, manifest.acceleration, manifest.acs_lines)
    tuning = train_cases(family)
    cg_params = tune_cg(tuning)
    bart_lam = tune_bart(tuning)

    def network(case: Case) -> np.ndarray:
        with torch.no_grad():
            return model(case.op.adjoint(case.y), case.op)[0].numpy()

    methods: dict[str, Method] = {
        "zero-filled": lambda c: c.op.adjoint(c.y)[0].numpy(),
        f"CG-SENSE ({cg_params[0]} it, lambda {cg_params[1]:g})": lambda c: cg_sense(c.op, c.y, *cg_params)[0].numpy(),
        f"BART pics l1-wavelet (lambda {bart_lam:g})": lambda c: _bart(c, bart_lam),
        f"CycGuard MoDL ({manifest.name})": network,
    }
    datasets = {"mni-heldout": mni_cases(family), "dipy-t1": dipy_cases(family), "shepp-logan": shepp_logan_cases()}
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, cases in datasets.items():
        results[name] = {}
        first_images = {}
        for method_name, method in methods.items():
            method(cases[0])  # warm-up (allocations, thread pools)
            qs, times = [], []
            for case in tqdm(cases, desc=f"{name}: {method_name}", leave=False):
                image, seconds = _timed(method, case)
                qs.append(quality(image, case.reference))
                times.append(seconds)
                if case is cases[0]:
                    first_images[method_name.split(" (")[0]] = image
            results[name][method_name] = summarise(qs, times)
        montage(args.out / f"recon_{name}.png", [*first_images.items(), ("reference", cases[0].reference)])
    (args.out / "recon_table.json").write_text(json.dumps({"cg": cg_params, "bart_lambda": bart_lam, "results": results}, indent=2))
    lines = []
    for name, table in results.items():
        n = next(iter(table.values()))["slices"]
        lines += [f"\n**{name}** ({n} slices)\n", "| method | PSNR dB (mean ± sd) | SSIM | NMSE | s / slice (median) |", "|---|---|---|---|---|"]
        for method_name, r in table.items():
            lines.append(f"| {method_name} | {r['psnr']:.2f} ± {r['psnr_std']:.2f} | {r['ssim']:.3f} | {r['nmse']:.4f} | {r['seconds']:.3f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "recon_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
