"""Training of the default MoDL network on simulated MNI152 acquisitions (``cycguard train``).

Recipe (the model card records the values used):

1. A pool of ``pool`` training samples is simulated once (augmented MNI152 slice, smooth
   phase, birdcage coils, correlated noise, coil maps estimated from the ACS block), in
   ``workers`` processes, each with its own seed derived from ``seed``.
2. Every step draws ``batch`` samples from the pool and a fresh mask from the family for
   each, so the network sees all members of the family with every image.
3. Loss: normalised L2 plus normalised L1 of the complex error against the fully sampled
   reference. Adam with cosine learning-rate decay and gradient clipping.
4. Every ``val_every`` steps the network is scored on ``val_slices`` held-out slices
   (fixed seed); the best checkpoint is kept. A checkpoint is written every
   ``val_every`` steps so that an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from recon.data import mni
from recon.data.samples import Sample, batch_inputs, make_sample, simulated_slices
from recon.metrics import quality
from recon.models.modl import MoDL, MoDLConfig
from recon.models.weights import sha256_file
from recon.physics.masks import MaskFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run."""

    steps: int = 2800
    batch: int = 4
    pool: int = 1200
    lr: float = 1e-3
    seed: int = 1234
    matrix: int = 128
    coils: int = 8
    mask_kind: str = "equispaced"
    acceleration: int = 4
    acs_lines: int = 16
    val_slices: int = 20
    val_every: int = 200
    workers: int = 2
    threads: int = 2
    model: MoDLConfig = field(default_factory=MoDLConfig)

    @property
    def family(self) -> MaskFamily:
        """The sampling mask family trained on."""
        return MaskFamily(self.mask_kind, self.acceleration, self.acs_lines)


def _simulate_chunk(args: tuple[str, int, int, int, int, MaskFamily]) -> list[Sample]:
    split, count, seed, matrix, coils, family = args
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    images = mni.stream(split, matrix, rng)
    return [make_sample(next(images), family, coils, rng) for _ in range(count)]


def simulate_pool(split: str, count: int, seed: int, config: TrainConfig) -> list[Sample]:
    """Simulate ``count`` samples of ``split`` in ``config.workers`` processes."""
    workers = max(1, config.workers)
    sizes = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
    jobs = [(split, n, seed * 1000 + i, config.matrix, config.coils, config.family) for i, n in enumerate(sizes) if n]
    if workers == 1:
        return _simulate_chunk(jobs[0])
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [s for chunk in pool.map(_simulate_chunk, jobs) for s in chunk]


def heldout_samples(count: int, config: TrainConfig, seed: int = 7) -> list[Sample]:
    """Deterministic held-out slab samples (T1 contrast, no geometric augmentation)."""
    return simulated_slices("heldout", count, config.family, config.coils, seed, augment=False, matrix=config.matrix)


def loss_fn(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Normalised L2 + normalised L1 of the complex error, averaged over the batch."""
    diff = output - reference
    dims = (1, 2)
    l2 = torch.linalg.vector_norm(diff, dim=dims) / torch.linalg.vector_norm(reference, dim=dims)
    l1 = diff.abs().sum(dim=dims) / reference.abs().sum(dim=dims)
    return (l2 + l1).mean()


@torch.no_grad()
def evaluate(model: MoDL, samples: list[Sample]) -> float:
    """Mean PSNR (dB) of the network on ``samples``."""
    model.eval()
    scores = []
    for start in range(0, len(samples), 4):
        chunk = samples[start : start + 4]
        x_zf, op, _, reference = batch_inputs(chunk)
        out = model(x_zf, op)
        scores += [quality(out[i].numpy(), reference[i].numpy()).psnr for i in range(len(chunk))]
    model.train()
    return float(np.mean(scores))


def train(config: TrainConfig, out_dir: Path, name: str = "modl_default", progress: bool = True) -> Path:
    """Train and write ``out_dir/NAME.pt`` with its manifest ``NAME.json``; returns the weights path."""
    torch.set_num_threads(config.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"{name}.ckpt"
    torch.manual_seed(config.seed)
    model = MoDL(config.model)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))
    )
    start, best, history = 0, -math.inf, []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        start, best = int(state["step"]), float(state["best"])
        history = json.loads(str(state["history"]))
        log.info("resuming from step %d (best validation PSNR %.2f dB)", start, best)
    t0 = time.time()
    pool = simulate_pool("train", config.pool, config.seed, config)
    validation = heldout_samples(config.val_slices, config)
    log.info("simulated %d training and %d validation samples in %.0f s", len(pool), len(validation), time.time() - t0)
    rng = np.random.default_rng(config.seed + start)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress, desc="train")
    for step in bar:
        picks = rng.choice(len(pool), size=config.batch, replace=False)
        batch = [pool[i] for i in picks]
        masks = [torch.from_numpy(config.family.sample(config.matrix, rng)) for _ in batch]
        batch = [Sample(s.kspace_full, s.maps, m, s.reference, s.truth, s.noise_std) for s, m in zip(batch, masks, strict=True)]
        x_zf, op, _, reference = batch_inputs(batch)
        loss = loss_fn(model(x_zf, op), reference)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", mu=f"{model.mu.item():.4f}")
        done = step + 1
        if done % config.val_every == 0 or done == config.steps:
            psnr = evaluate(model, validation)
            history.append({"step": done, "loss": float(loss.item()), "val_psnr": psnr, "mu": float(model.mu.item())})
            log.info("step %d: loss %.4f, validation PSNR %.2f dB, mu %.4f", done, loss.item(), psnr, model.mu.item())
            if psnr > best:
                best = psnr
                torch.save(model.state_dict(), out_dir / f"{name}.pt")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": done,
                    "best": best,
                    "history": json.dumps(history),
                },
                checkpoint,
            )
    weights = out_dir / f"{name}.pt"
    best_model = MoDL(config.model)
    best_model.load_state_dict(torch.load(weights, weights_only=True))
    manifest = {
        "name": name,
        "sha256": sha256_file(weights),
        "config": config.model.to_dict(),
        "mask": {"kind": config.mask_kind, "acceleration": config.acceleration, "acs_lines": config.acs_lines},
        "matrix": [config.matrix, config.matrix],
        "coils": config.coils,
        "parameters": sum(p.numel() for p in best_model.parameters()),
        "learned_mu": float(best_model.mu.item()),
        "validation_psnr_db": best,
        "training": {k: v for k, v in asdict(config).items() if k != "model"},
        "history": history,
        "seconds": time.time() - t0,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_model_card(manifest, out_dir / "MODEL_CARD.md")
    return weights


def write_model_card(manifest: dict[str, Any], path: Path) -> Path:
    """The model card's training section, from a manifest (benchmarks are added beside it)."""
    cfg = manifest["config"]
    mask = manifest["mask"]
    training = manifest["training"]
    history = manifest.get("history", [])
    assert isinstance(cfg, dict) and isinstance(mask, dict) and isinstance(training, dict) and isinstance(history, list)
    curve = "\n".join(f"| {h['step']} | {h['loss']:.4f} | {h['val_psnr']:.2f} | {h['mu']:.4f} |" for h in history)
    text = f"""# Model card: {manifest['name']}

**SHA-256** `{manifest['sha256']}` (checked before every load; `torch.load(weights_only=True)`).

## Architecture
MoDL-style unrolled network (`recon/models/modl.py`): residual CNN denoiser on (Re, Im) with
{cfg['layers']} 3x3 convolutions of {cfg['channels']} channels (ReLU), shared over {cfg['unrolls']} unrolls, each
followed by CG data consistency ({cfg['cg_iterations']} iterations) with learned weight mu;
{manifest['parameters']} parameters. Learned **mu = {manifest['learned_mu']:.4f}**: the DC step amplifies input
components outside range(E^H) by about 1/mu = {1 / float(manifest['learned_mu']):.1f}. Input normalised by max|x_zf|
per slice (scale-equivariant).

## Data
Simulated acquisitions of nilearn's bundled MNI152 2009 templates (1 mm T1, GM/WM maps),
{training['matrix']}x{training['matrix']} in a 240 mm FOV, {training['coils']} simulated birdcage-like coils
(random radius, rotation, ellipticity; softened 1/r fall-off), random smooth phase,
correlated receiver noise (sigma 0.005 to 0.04 per sample, log-uniform), augmentations:
random synthetic contrast from tissue maps (65 %), flips, rotation +-20 deg, elastic warp.
Coil maps estimated from the ACS block of the noisy data (as at inference); target: the
fully sampled data combined with those maps. Training: {training['pool']} simulated samples from every
coronal and sagittal slice and the axial slices outside z = 66..93; held out: axial z = 70..89
(20 slices; coronal/sagittal training slices cross this slab along one line each).

## Masks
Family `{mask['kind']}`, R = {mask['acceleration']}, {mask['acs_lines']} ACS lines; a fresh mask of the family for
every sample at every step, so every member of the family (the cycle's alternative masks
included) is in distribution.

## Training
`cycguard train` (seed {training['seed']}): {training['steps']} Adam steps, batch {training['batch']}, lr {training['lr']} with cosine decay,
gradient clipping 1.0, loss = normalised L2 + normalised L1 of the complex error; best of
the validation checks kept. CPU, {training['threads']} threads, {float(manifest['seconds']) / 60:.0f} min.
Best validation PSNR (20 held-out slices, T1 contrast): **{float(manifest['validation_psnr_db']):.2f} dB**.

| step | train loss | validation PSNR dB | mu |
|---|---|---|---|
{curve}
"""
    path.write_text(text)
    return path
