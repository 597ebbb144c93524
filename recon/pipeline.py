"""The pure pipeline: one slice of k-space in, one image out with its verdict and timings.

Gadgets, the replay runner, benchmarks and tests all call this same core. Per slice:
coil maps from the ACS block, the SENSE operator for the slice's mask, the zero-filled
image ``x_zf = E^H y``, and the network ``f(x_zf; E)`` (:func:`reconstruct`); then the
cyclic consistency check against a calibrated threshold and, for flagged slices only,
the configured mitigation behind its safeguard (:func:`defend`; the policy and methods are in
:mod:`recon.mitigate`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from recon.detect.calibration import Calibration
from recon.detect.cyclic import DetectionScores
from recon.detect.defense import Defense, whitening_doubt
from recon.mitigate.policy import mitigate_flagged
from recon.models.modl import MoDL
from recon.physics.prepared import PreparedSlice, clock, prepare, prepare_with_maps
from recon.types import SliceKSpace
from recon.verdict import (
    CALIBRATION_KEY,
    NOISE_SIGMA_KEY,
    P_VALUE_KEY,
    SCORE_KEY,
    SIGNAL_LEVEL_KEY,
    STATISTIC_KEY,
    THRESHOLD_KEY,
    CheckResult,
)

__all__ = [
    "DefendedResult", "PreparedSlice", "SliceResult", "check", "check_meta", "clock", "coverage_doubt", "defend", "prepare",
    "prepare_with_maps", "reconstruct",
]


@dataclass(frozen=True, eq=False)
class SliceResult:
    """A reconstructed slice and how long each stage took (seconds)."""

    image: np.ndarray
    prepared: PreparedSlice
    timings: tuple[tuple[str, float], ...]


@torch.no_grad()
def reconstruct(data: SliceKSpace, model: MoDL, device: torch.device | str = "cpu") -> SliceResult:
    """Reconstruct one slice with the network.

    Returns:
        The ``(y, x)`` complex64 image, the prepared operator and data, and timings of the
        ``prepare`` and ``network`` stages.
    """
    t0 = time.perf_counter()
    prepared = prepare(data, device)
    t1 = clock(prepared.y)
    image = model(prepared.x_zf, prepared.op)[0]
    t2 = clock(image)
    return SliceResult(
        image=image.cpu().numpy().astype(np.complex64),
        prepared=prepared,
        timings=(("prepare", t1 - t0), ("network", t2 - t1)),
    )


@dataclass(frozen=True, eq=False)
class DefendedResult:
    """A slice through recon -> detect -> (mitigate if flagged), with its verdict.

    Attributes:
        image: ``(y, x)`` complex64, the image to ship.
        verdict: ``clean``, ``flagged`` (failed the check; mitigation off, the score within
            the clean calibration range, or the rewrite refused) or ``mitigated`` (rewritten).
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
        received: the network's reconstruction of the received data, before any rewrite
            (the same array as ``image`` unless the verdict is ``mitigated``).
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
    received: np.ndarray


@torch.no_grad()
def check(prepared: PreparedSlice, image: np.ndarray, defense: Defense) -> CheckResult:
    """Score a reconstruction against the received data and compare with the calibrated threshold."""
    x1 = prepared.image_tensor(image)
    t0 = clock(x1)
    scores = defense.detector.score_for(defense.statistic, prepared.op, prepared.y, x1, defense.noise_sigma)
    seconds = clock(x1) - t0
    calibration = defense.calibration
    score = calibration.score_of(scores)
    if calibration.flags(score):
        verdict, relation = "flagged", ">"
    else:
        verdict, relation = "clean", "<="
    reason = f"{verdict}: {defense.statistic} {score:.4g} {relation} threshold {calibration.threshold:.4g}"
    if calibration.scales:  # which component decided
        reason += " (" + ", ".join(f"{name} {scores.get(name):.4g} / {scale:.4g}" for name, scale in calibration.scales) + ")"
    doubt = whitening_doubt(defense.noise_doubt, scores.noise_excess) or (None if calibration.covers(scores.signal_level) else coverage_doubt(scores.signal_level, calibration))
    if verdict == "clean" and doubt is not None:
        verdict, reason = "unverified", f"unverified: {doubt}; the passing score ({reason}) is not trusted"
    return CheckResult(verdict, score, calibration.threshold, calibration.p_value(score), scores, reason, seconds)


def check_meta(defense: Defense, score: float, threshold: float, p_value: float, scores: DetectionScores | None) -> dict[str, str]:
    """The meta of a check that ran: score, threshold, p-value, what judged it (statistic,
    calibration) and the slice's noise and signal levels."""
    level = None if scores is None else scores.signal_level
    return {
        SCORE_KEY: f"{score:.6g}",
        THRESHOLD_KEY: f"{threshold:.6g}",
        P_VALUE_KEY: f"{p_value:.4g}",
        STATISTIC_KEY: defense.statistic,
        NOISE_SIGMA_KEY: f"{defense.noise_sigma:.6g}",
        SIGNAL_LEVEL_KEY: "unknown" if level is None else f"{level:.4g}",
        CALIBRATION_KEY: defense.calibration.sha256[:12],
    }


def coverage_doubt(level: float | None, calibration: Calibration) -> str:
    """Why a slice's signal level is outside what ``calibration`` covers."""
    if calibration.signal_range is None:
        return "the calibration records no signal range (the SNR its clean slices covered): recalibrate (cycguard calibrate)"
    shown = "unknown" if level is None else f"{level:.3g}"
    low, high = calibration.signal_range
    return f"signal level {shown} noise sigmas (ACS RMS) outside the {low:.3g}-{high:.3g} of the calibration's clean slices"


def defend(data: SliceKSpace, defense: Defense, device: torch.device | str = "cpu") -> DefendedResult:
    """Reconstruct, check and, when flagged, mitigate one slice.

    Unflagged images are the network's reconstruction, bit for bit. A flagged image is
    rewritten only when the safeguard accepts the rewrite (:func:`mitigate_flagged`).
    The gadgets run the same three stages, one per gadget.
    """
    recon = reconstruct(data, defense.model, device)
    checked = check(recon.prepared, recon.image, defense)
    assert checked.scores is not None  # check() computes every statistic
    timings = [*recon.timings, ("detect", checked.seconds)]
    passes = [("recon", 1), ("detect", defense.detector.passes(defense.statistic))]
    outcome = mitigate_flagged(recon.prepared, recon.image, checked, defense)
    if outcome.network_passes:
        timings.append(("mitigate", outcome.seconds))
        passes.append(("mitigate", outcome.network_passes))
    return DefendedResult(
        image=outcome.image,
        verdict=outcome.verdict,
        score=checked.score,
        threshold=checked.threshold,
        p_value=checked.p_value,
        scores=checked.scores,
        mitigated_score=outcome.mitigated_score,
        reason=outcome.reason,
        timings=tuple(timings),
        network_passes=tuple(passes),
        prepared=recon.prepared,
        received=recon.image,
    )
