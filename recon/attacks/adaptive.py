"""An adaptive attacker who knows the detector: maximise damage, stay under the threshold."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from recon.attacks.kspace import l2_start, l2_step
from recon.detect.cyclic import CyclicDetector, scaled_maximum, statistic_tensor
from recon.detect.statistics import COMBINATIONS, DATA, RESIDUAL, STATISTICS
from recon.physics.sense import SenseOp


def _statistic(detector: CyclicDetector, op: SenseOp, y: Tensor, x1: Tensor, statistic: str, noise_sigma: float, scales: Mapping[str, float]) -> Tensor:
    """The detector's statistic, differentiable in ``y`` and ``x1``."""
    if statistic in STATISTICS and STATISTICS[statistic].source == RESIDUAL:
        return statistic_tensor(statistic, op, y, x1, None, None, noise_sigma)
    if statistic in COMBINATIONS:  # the largest component over its scale
        values = detector.data_statistics_for(statistic, op, y, x1, noise_sigma)
        parts = []
        for name in COMBINATIONS[statistic].components:
            part = statistic_tensor(name, op, y, x1, None, None, noise_sigma) if STATISTICS[name].source == RESIDUAL else values[name]
            assert part is not None
            parts.append(part / scales[name])
        return torch.stack(parts).max()
    if STATISTICS[statistic].source == DATA:  # the sensitive directions held fixed at this iterate
        value = detector.data_statistics_for(statistic, op, y, x1, noise_sigma)[statistic]
        assert value is not None
        return value
    cycle = detector.cycle(op, y.detach(), x1.detach())
    x2, r = cycle.run(detector.model, x1)
    return statistic_tensor(statistic, op, y, x1, x2, r, noise_sigma)


def _passes(
    detector: CyclicDetector, op: SenseOp, y: Tensor, x1: Tensor, statistic: str, noise_sigma: float, components: list[tuple[str, float]], threshold: float
) -> bool:
    """Whether the detector passes ``y`` (a combined statistic: its ``components`` and scales)."""
    scores = detector.score_for(statistic, op, y, x1, noise_sigma)
    return (scaled_maximum(scores, components) if components else scores.get(statistic)) <= threshold


def adaptive_kspace_l2(
    model: torch.nn.Module,
    op: SenseOp,
    y: Tensor,
    eps: float,
    detector: CyclicDetector,
    statistic: str,
    threshold: float,
    generator: torch.Generator,
    steps: int = 10,
    penalty: float = 10.0,
    margin: float = 0.9,
    noise_sigma: float = 1.0,
    scales: Mapping[str, float] | None = None,
    resample_directions: bool = False,
) -> Tensor:
    """l2 PGD on the sampled k-space that maximises ``damage - penalty * relu(stat - margin * threshold)``.

    The attacker evaluates the detector after every step and returns the most damaging
    iterate that the detector would pass; if none passes, the last iterate. A combined
    statistic needs its calibration's ``scales``. The attacker knows everything but a site's
    ``direction_key``: it scores with the public seed. With ``resample_directions`` (against
    a keyed detector) every step's gradient uses sensitive directions from a fresh random
    start (expectation over the unknown start), and an iterate counts as passing only if it
    passes with the public seed and with one more fresh start.
    """
    if statistic in COMBINATIONS and scales is None:
        raise ValueError(f"statistic {statistic!r} needs the calibration's scales")
    scales = dict(scales or {})
    components = [(name, scales[name]) for name in (COMBINATIONS[statistic].components if statistic in COMBINATIONS else ())]
    with torch.no_grad():
        target = model(op.adjoint(y), op)
    step = 2.5 * eps / steps
    delta = l2_start(op, y, eps, generator)
    best, best_damage = None, -1.0
    public = replace(detector, direction_key=None)

    def fresh() -> CyclicDetector:
        return replace(public, seed=int(torch.randint(0, 2**62, (1,), generator=generator)))

    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        y_adv = y + delta
        x1 = model(op.adjoint(y_adv), op)
        harm = torch.linalg.vector_norm(x1 - target) / torch.linalg.vector_norm(target)
        stat = _statistic(fresh() if resample_directions else public, op, y_adv, x1, statistic, noise_sigma, scales)
        objective = harm - penalty * torch.relu(stat - margin * threshold)
        (grad,) = torch.autograd.grad(objective, delta)
        delta = l2_step(op, delta.detach(), grad, step, eps)
        with torch.no_grad():
            y_try = y + delta
            x_try = model(op.adjoint(y_try), op)
            judges = (public, fresh()) if resample_directions else (public,)  # drawn every step: the same random stream
            passes = all(_passes(judge, op, y_try, x_try, statistic, noise_sigma, components, threshold) for judge in judges)
            harm_try = float(torch.linalg.vector_norm(x_try - target) / torch.linalg.vector_norm(target))
        if passes and harm_try > best_damage:
            best, best_damage = y_try, harm_try
    return (best if best is not None else y + delta).detach()
