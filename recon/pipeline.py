"""The pure pipeline: one slice of k-space in, one image out with its verdict and timings.

Gadgets, the replay runner, benchmarks and tests all call this same core. Per slice:
coil maps from the ACS block, the SENSE operator for the slice's mask, the zero-filled
image ``x_zf = E^H y``, and the network ``f(x_zf; E)`` (:func:`reconstruct`); then the
cyclic consistency check against a calibrated threshold and, for flagged slices only,
the k-space cyclic mitigation behind a safeguard (:func:`defend`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recon.detect.calibration import Calibration
from recon.detect.cyclic import CyclicDetector, DetectionScores, noise_norm
from recon.models.modl import MoDL
from recon.physics.coils import estimate_coil_maps
from recon.physics.sense import SenseOp
from recon.types import SliceKSpace


@dataclass(frozen=True, eq=False)
class PreparedSlice:
    """What every stage reuses for one slice (torch tensors with a batch axis of 1).

    Attributes:
        op: SENSE operator with the slice's estimated coil maps and its mask.
        y: ``(1, C, ky, kx)`` measured k-space on the sampled lines.
        x_zf: ``(1, y, x)`` zero-filled image ``E^H y``.
    """

    op: SenseOp
    y: Tensor
    x_zf: Tensor


@dataclass(frozen=True, eq=False)
class SliceResult:
    """A reconstructed slice and how long each stage took (seconds)."""

    image: np.ndarray
    prepared: PreparedSlice
    timings: tuple[tuple[str, float], ...]


def prepare(data: SliceKSpace, device: torch.device | str = "cpu") -> PreparedSlice:
    """Estimate coil maps from the ACS lines and build the operator, ``y`` and ``x_zf``."""
    kspace = torch.from_numpy(np.array(data.kspace)).to(device)
    maps = estimate_coil_maps(kspace, data.acs)
    mask = torch.from_numpy(np.array(data.mask))[None].to(device)
    op = SenseOp(maps[None], mask)
    y = op.project(kspace[None])
    return PreparedSlice(op=op, y=y, x_zf=op.adjoint(y))


@torch.no_grad()
def reconstruct(data: SliceKSpace, model: MoDL, device: torch.device | str = "cpu") -> SliceResult:
    """Reconstruct one slice with the network.

    Returns:
        The ``(y, x)`` complex64 image, the prepared operator and data, and timings of the
        ``prepare`` and ``network`` stages.
    """
    t0 = time.perf_counter()
    prepared = prepare(data, device)
    t1 = time.perf_counter()
    image = model(prepared.x_zf, prepared.op)[0]
    t2 = time.perf_counter()
    return SliceResult(
        image=image.cpu().numpy().astype(np.complex64),
        prepared=prepared,
        timings=(("prepare", t1 - t0), ("network", t2 - t1)),
    )


# ---------------------------------------------------------------- the defended pipeline

VERDICTS = ("clean", "flagged", "mitigated", "unverified")


@dataclass(frozen=True)
class MitigationSettings:
    """How flagged slices are rewritten (see :func:`recon.mitigate.mitigate_kspace`).

    Attributes:
        enabled: rewrite flagged slices at all.
        fidelity: weight of the fidelity-to-received-data term.
        radius: correction budget in acquisition-noise norms.
        iterations: at most this many optimisation steps.
        lr: step size in noise units.
        patience: early stopping.
        max_dc_increase: safeguard: the rewritten image may not move further from the
            received data than this many noise norms beyond the original reconstruction.
    """

    enabled: bool = True
    fidelity: float = 1.0
    radius: float = 1.0
    iterations: int = 20
    lr: float = 0.1
    patience: int = 5
    max_dc_increase: float = 0.25


@dataclass(frozen=True, eq=False)
class Defense:
    """Everything the defended pipeline needs, built once per protocol."""

    model: MoDL
    detector: CyclicDetector
    calibration: Calibration
    statistic: str
    noise_sigma: float = 1.0
    mitigation: MitigationSettings = MitigationSettings()


@dataclass(frozen=True, eq=False)
class DefendedResult:
    """A slice through recon -> detect -> (mitigate if flagged), with its verdict.

    Attributes:
        image: ``(y, x)`` complex64, the image to ship.
        verdict: ``clean``, ``flagged`` (failed the check; mitigation off or refused by the
            safeguard) or ``mitigated`` (rewritten).
        score: the calibrated statistic of the received reconstruction.
        threshold: the calibrated threshold.
        p_value: conformal p-value of ``score`` among the clean calibration scores.
        scores: every statistic of the received reconstruction.
        mitigated_score: the statistic of the rewritten image, when mitigation ran.
        reason: one line for ImageComments (what happened and why).
        timings: seconds per stage.
        network_passes: single-slice network evaluations per stage.
        prepared: the slice's operator, measured lines and zero-filled image (for reuse
            downstream: reports, gadgets).
    """

    image: np.ndarray
    verdict: str
    score: float
    threshold: float
    p_value: float
    scores: DetectionScores
    mitigated_score: float | None
    reason: str
    timings: tuple[tuple[str, float], ...]
    network_passes: tuple[tuple[str, int], ...]
    prepared: PreparedSlice


def _dc_norm(op: SenseOp, y: Tensor, x: Tensor) -> float:
    return float(torch.linalg.vector_norm(y - op.forward(x)))


def defend(data: SliceKSpace, defense: Defense, device: torch.device | str = "cpu") -> DefendedResult:
    """Reconstruct, check and, when flagged, mitigate one slice.

    Unflagged images are the network's reconstruction, bit for bit. A flagged image is
    rewritten only when the safeguard accepts the rewrite: its statistic against the
    received data must be lower than the original's and it must stay within
    ``max_dc_increase`` noise norms of the original's data residual. Otherwise the
    original reconstruction ships with verdict ``flagged``.
    """
    recon = reconstruct(data, defense.model, device)
    prepared = recon.prepared
    x1 = torch.from_numpy(recon.image)[None].to(prepared.y.device)
    t0 = time.perf_counter()
    scores = defense.detector.score(prepared.op, prepared.y, x1, defense.noise_sigma)
    t1 = time.perf_counter()
    k = defense.detector.alternatives
    score = scores.get(defense.statistic)
    calibration = defense.calibration
    timings = [*recon.timings, ("detect", t1 - t0)]
    passes = [("recon", 1), ("detect", k)]
    common = dict(score=score, threshold=calibration.threshold, p_value=calibration.p_value(score), scores=scores, prepared=prepared)
    if not calibration.flags(score):
        reason = f"clean: {defense.statistic} {score:.4g} <= threshold {calibration.threshold:.4g}"
        return DefendedResult(recon.image, "clean", mitigated_score=None, reason=reason, timings=tuple(timings), network_passes=tuple(passes), **common)  # type: ignore[arg-type]
    settings = defense.mitigation
    if not settings.enabled:
        reason = f"flagged: {defense.statistic} {score:.4g} > threshold {calibration.threshold:.4g}; mitigation off"
        return DefendedResult(recon.image, "flagged", mitigated_score=None, reason=reason, timings=tuple(timings), network_passes=tuple(passes), **common)  # type: ignore[arg-type]
    from recon.mitigate.cyclic import mitigate_kspace

    t2 = time.perf_counter()
    cycle = defense.detector.cycle(prepared.op, prepared.y, x1)
    with torch.enable_grad():
        result = mitigate_kspace(
            defense.model, prepared.op, prepared.y, cycle, defense.noise_sigma,
            settings.fidelity, settings.radius, settings.iterations, settings.lr, settings.patience,
        )
    rescored = defense.detector.score(prepared.op, prepared.y, result.image, defense.noise_sigma).get(defense.statistic)
    t3 = time.perf_counter()
    timings.append(("mitigate", t3 - t2))
    passes.append(("mitigate", result.network_passes + k))
    floor = noise_norm(prepared.op, prepared.y, defense.noise_sigma)
    dc_increase = (_dc_norm(prepared.op, prepared.y, result.image) - _dc_norm(prepared.op, prepared.y, x1)) / floor
    if rescored < score and dc_increase <= settings.max_dc_increase:
        reason = f"mitigated: {defense.statistic} {score:.4g} -> {rescored:.4g} (threshold {calibration.threshold:.4g})"
        image = result.image[0].cpu().numpy().astype(np.complex64)
        return DefendedResult(image, "mitigated", mitigated_score=rescored, reason=reason, timings=tuple(timings), network_passes=tuple(passes), **common)  # type: ignore[arg-type]
    reason = (
        f"flagged: {defense.statistic} {score:.4g} > threshold {calibration.threshold:.4g}; rewrite refused by the "
        f"safeguard ({defense.statistic} {rescored:.4g}, data residual +{dc_increase:.2f} noise norms)"
    )
    return DefendedResult(recon.image, "flagged", mitigated_score=rescored, reason=reason, timings=tuple(timings), network_passes=tuple(passes), **common)  # type: ignore[arg-type]
