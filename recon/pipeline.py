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
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from recon.detect.calibration import Calibration
from recon.detect.cyclic import (
    COMBINED_STATISTICS,
    DATA_ONLY_STATISTICS,
    CyclicDetector,
    DetectionScores,
    noise_norm,
)
from recon.detect.defense import Defense
from recon.models.modl import MoDL
from recon.physics.coils import estimate_coil_maps
from recon.physics.sense import SenseOp
from recon.types import SliceKSpace
from recon.verdict import (
    CALIBRATION_KEY,
    NOISE_SIGMA_KEY,
    P_VALUE_KEY,
    SCORE_KEY,
    SIGNAL_LEVEL_KEY,
    STATISTIC_KEY,
    THRESHOLD_KEY,
)

if TYPE_CHECKING:
    from recon.mitigate.spikes import SpikeRepair


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

    def image_tensor(self, image: np.ndarray) -> Tensor:
        """An image ``(y, x)`` of this slice (e.g. from the wire) as a ``(1, y, x)`` complex64
        tensor on the slice's device (a copy: wire arrays are read-only)."""
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.complex64))[None].to(self.y.device)


@dataclass(frozen=True, eq=False)
class SliceResult:
    """A reconstructed slice and how long each stage took (seconds)."""

    image: np.ndarray
    prepared: PreparedSlice
    timings: tuple[tuple[str, float], ...]


def clock(tensor: Tensor) -> float:
    """``time.perf_counter()`` once the work queued on ``tensor``'s device is done: CUDA runs
    asynchronously, so a stage's seconds read without it would be the launch time only."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


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
    t1 = clock(prepared.y)
    image = model(prepared.x_zf, prepared.op)[0]
    t2 = clock(image)
    return SliceResult(
        image=image.cpu().numpy().astype(np.complex64),
        prepared=prepared,
        timings=(("prepare", t1 - t0), ("network", t2 - t1)),
    )


# ---------------------------------------------------------------- the defended pipeline



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


def _dc_norm(op: SenseOp, y: Tensor, x: Tensor) -> float:
    return float(torch.linalg.vector_norm(y - op.forward(x)))


@dataclass(frozen=True, eq=False)
class CheckResult:
    """The cyclic consistency check of one reconstruction (the detection stage).

    ``scores`` holds every statistic; it is ``None`` when the result was read back from
    image meta (the mitigation gadget), which carries only the calibrated one.
    """

    verdict: str
    score: float
    threshold: float
    p_value: float
    scores: DetectionScores | None
    reason: str
    seconds: float


def prepare_with_maps(data: SliceKSpace, maps: np.ndarray, device: torch.device | str = "cpu") -> PreparedSlice:
    """Like :func:`prepare`, with coil maps computed upstream (``(C, y, x)`` complex64)."""
    kspace = torch.from_numpy(np.array(data.kspace)).to(device)
    maps_t = torch.from_numpy(np.array(maps, dtype=np.complex64)).to(device)  # a writable copy (wire arrays are read-only)
    if maps_t.shape != kspace.shape:
        raise ValueError(f"coil maps {tuple(maps_t.shape)} do not match k-space {tuple(kspace.shape)}")
    mask = torch.from_numpy(np.array(data.mask))[None].to(device)
    op = SenseOp(maps_t[None], mask)
    y = op.project(kspace[None])
    return PreparedSlice(op=op, y=y, x_zf=op.adjoint(y))


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
    doubt = defense.noise_doubt or (None if calibration.covers(scores.signal_level) else coverage_doubt(scores.signal_level, calibration))
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


@dataclass(frozen=True, eq=False)
class MitigationOutcome:
    """What the mitigation stage did to a flagged image."""

    image: np.ndarray
    verdict: str
    mitigated_score: float | None
    reason: str
    seconds: float
    network_passes: int


def safeguard_statistic(statistic: str) -> str:
    """The statistic that judges a rewrite: the calibrated one, unless it ignores the image or
    is a combination (scaled components, not one statistic of an image)."""
    return "cyclic_noise" if statistic in DATA_ONLY_STATISTICS or statistic in COMBINED_STATISTICS else statistic


def prior_gate(calibration: Calibration) -> float | None:
    """The clean threshold of ``prior_shift`` at the calibration's rate, as its statistic, a
    gate (where its scale is a backstop) or a component's scale (``None``: it has none)."""
    if calibration.detector.statistic == "prior_shift":
        return calibration.threshold
    return dict(calibration.gates).get("prior_shift", dict(calibration.scales).get("prior_shift"))


def null_gate(calibration: Calibration) -> float | None:
    """The clean threshold of ``null_shift`` at the calibration's rate (a component's scale;
    ``None``: it has none), the data correction's second gate."""
    return dict(calibration.scales).get("null_shift")


def mitigate_flagged(prepared: PreparedSlice, image: np.ndarray, checked: CheckResult, defense: Defense) -> MitigationOutcome:
    """Rewrite a flagged image by the configured mitigation, behind its safeguard.

    With ``rewrite_beyond_clean`` (the default) only an image whose score exceeds every
    clean calibration score goes to the method; one flagged inside the clean range ships
    unchanged, ``flagged``.

    ``correct`` (default, :func:`recon.mitigate.prior.mitigate_correct`) and ``prior``
    (:func:`recon.mitigate.prior.mitigate_prior`) rewrite only when the received image's
    ``prior_shift`` (or, for ``correct``, ``null_shift``) exceeds its calibrated clean threshold. With a
    calibration that holds no such threshold the original ships, ``flagged``, and the reason
    says why. ``cyclic``: the rewrite ships only when its statistic against the received data is lower than the
    original's and it stays within ``max_dc_increase`` noise norms of the original's data
    residual; otherwise the original image ships with verdict ``flagged``. Images that
    passed the check are returned untouched. The statistic is the calibrated one when it
    judges the image; the ``holdout_*`` statistics judge the received data only (the same for any
    image), so the safeguard then compares ``cyclic_noise`` (:func:`safeguard_statistic`).
    """
    if checked.verdict != "flagged":
        return MitigationOutcome(image, checked.verdict, None, checked.reason, 0.0, 0)
    settings = defense.mitigation
    if not settings.enabled:
        return MitigationOutcome(image, "flagged", None, checked.reason + "; mitigation off", 0.0, 0)
    if settings.rewrite_beyond_clean and not defense.calibration.beyond_clean(checked.score):
        reason = (
            f"{checked.reason}; not rewritten: the score is within the clean calibration range (largest {defense.calibration.clean_max:.4g} "
            f"of {len(defense.calibration.clean_scores)} clean slices): the original image ships"
        )
        return MitigationOutcome(image, "flagged", None, reason, 0.0, 0)
    if settings.method in ("correct", "prior"):
        return _mitigate_gated(prepared, image, checked, defense)
    from recon.mitigate.cyclic import mitigate_kspace

    x1 = prepared.image_tensor(image)
    t0 = clock(x1)
    with torch.no_grad():
        cycle = defense.detector.cycle(prepared.op, prepared.y, x1)
    with torch.enable_grad():  # callers may run under no_grad; the mitigation needs gradients
        result = mitigate_kspace(
            defense.model, prepared.op, prepared.y, cycle, defense.noise_sigma,
            settings.fidelity, settings.radius, settings.iterations, settings.lr, settings.patience,
            deadline=time.monotonic() + settings.time_budget - (time.perf_counter() - t0),
        )
    if result.timed_out:
        seconds = time.perf_counter() - t0
        reason = f"{checked.reason}; mitigation stopped at its time budget ({settings.time_budget:g} s): the original image ships"
        return MitigationOutcome(image, "flagged", None, reason, seconds, result.network_passes + defense.detector.alternatives)
    judge = safeguard_statistic(defense.statistic)
    if judge == defense.statistic:
        before: float | None = checked.score
    elif checked.scores is not None:
        before = checked.scores.get(judge)
    else:  # read back from image meta: the safeguard scores the received image too
        before = None
    verdict = safeguard(defense.detector, prepared.op, prepared.y, x1, result.image, judge, defense.noise_sigma, settings.max_dc_increase, before)
    seconds = clock(x1) - t0
    passes = result.network_passes + verdict.network_passes
    if verdict.accepted:
        reason = f"mitigated: {judge} {verdict.before:.4g} -> {verdict.after:.4g} ({checked.reason})"
        rewritten = result.image[0].cpu().numpy().astype(np.complex64)
        return MitigationOutcome(rewritten, "mitigated", verdict.after, reason, seconds, passes)
    reason = (
        f"{checked.reason}; rewrite refused by the safeguard ({judge} {verdict.before:.4g} -> {verdict.after:.4g}, "
        f"data residual +{verdict.dc_increase:.2f} noise norms)"
    )
    return MitigationOutcome(image, "flagged", verdict.after, reason, seconds, passes)


def spike_gate(calibration: Calibration) -> float | None:
    """``dc_spike``'s scale in the calibration (the largest ratio of any clean calibration
    slice's sample, where it is a backstop), the spike repair's limit; ``None``: it has none."""
    return dict(calibration.scales).get("dc_spike")


def _spike_repair(prepared: PreparedSlice, x1: Tensor, defense: Defense) -> tuple[SpikeRepair | None, PreparedSlice, Tensor]:
    """The spike repair in front of the gated methods: ``(repair or None, prepared, x1)``,
    the last two the repaired data and image when it found and repaired spikes."""
    from recon.mitigate.spikes import repair_spikes

    limit = spike_gate(defense.calibration)
    if not defense.mitigation.despike or limit is None:
        return None, prepared, x1
    repair = repair_spikes(defense.model, prepared.op, prepared.y, x1, defense.noise_sigma, limit, defense.mitigation.despike_samples)
    if repair.y is None or repair.image is None:
        return repair, prepared, x1
    return repair, PreparedSlice(prepared.op, repair.y, prepared.op.adjoint(repair.y)), repair.image


def _mitigate_gated(prepared: PreparedSlice, image: np.ndarray, checked: CheckResult, defense: Defense) -> MitigationOutcome:
    """The methods behind the prior gate (``correct``, ``prior``), after the spike repair.

    When a sample's data residual exceeds every clean calibration slice's (``dc_spike``
    over its scale), the spikes are re-estimated first (:func:`recon.mitigate.spikes.repair_spikes`;
    a repair that cannot bring them under the limit ships the original, ``flagged``), and
    the gated method then judges the repaired data with fresh evidence: the repaired image
    ships when the gates say it does not move like an attacked one, the method's rewrite of
    the repaired data when they fire and it succeeds, the original otherwise.
    """
    from recon.mitigate.prior import NullGate, mitigate_correct, mitigate_prior

    settings = defense.mitigation
    x1 = prepared.image_tensor(image)
    t0 = clock(x1)
    spikes, prepared, x1 = _spike_repair(prepared, x1, defense)
    repaired = spikes is not None and spikes.image is not None
    spent = 0 if spikes is None else spikes.network_passes
    if spikes is not None and spikes.found and not repaired:
        why = f"dc_spike {spikes.ratio:.4g} > clean limit {spikes.limit:.4g}: {spikes.refused}"
        return MitigationOutcome(image, "flagged", None, f"{checked.reason}; spike repair refused ({why}): the original image ships", clock(x1) - t0, spent)
    repair_note = (
        f"{spikes.samples} samples over the clean spike limit re-estimated (dc_spike {spikes.ratio:.4g} -> {spikes.ratio_after:.4g}, "
        f"limit {spikes.limit:.4g})" if repaired and spikes is not None else ""
    )
    gate = prior_gate(defense.calibration)
    if gate is None:
        if repaired:
            return _shipped(x1, f"mitigated: {repair_note} ({checked.reason})", t0, spent, settings.time_budget, image, checked)
        reason = (
            f"{checked.reason}; {settings.method} mitigation needs a calibration with prior_shift "
            f"(this one is {defense.calibration.detector.statistic}; cycguard calibrate --statistic null_first_union): "
            "the original image ships"
        )
        return MitigationOutcome(image, "flagged", None, reason, 0.0, 0)
    # the detector's evidence is the received data's; repaired data need their own
    known = checked.scores.prior_shift if checked.scores is not None and not repaired else None
    known_null = checked.scores.null_shift if checked.scores is not None and not repaired else None
    null_threshold = null_gate(defense.calibration)
    null = None
    if settings.method == "correct" and settings.correct_null and null_threshold is not None:
        null = NullGate(null_threshold, defense.detector.acs(prepared.op))
    if settings.method == "correct":
        result = mitigate_correct(
            defense.model, prepared.op, prepared.y, x1, defense.noise_sigma, gate, defense.detector.prior_gain,
            settings.correct_stop * gate, settings.correct_radius, settings.correct_steps, known, null, known_null,
        )
    else:
        result = mitigate_prior(
            defense.model, prepared.op, prepared.y, x1, defense.noise_sigma, gate, defense.detector.prior_gain, settings.prior_gain, known,
        )
    passes = spent + result.network_passes
    seconds = clock(x1) - t0
    budget = settings.time_budget
    late = _past_budget(seconds, budget, passes, image, checked)
    if late is not None:  # a latency bound: a late rewrite is not shipped either
        return late
    evidence = f"prior_shift {result.shift:.4g} {'>' if result.shift > gate else '<='} clean threshold {gate:.4g} noise norms"
    suspect = result.shift > gate
    after = f"prior_shift -> {result.shift_after:.4g}"
    if null is not None:
        suspect = suspect or result.null_shift > null.gate
        evidence += f", null_shift {result.null_shift:.4g} {'>' if result.null_shift > null.gate else '<='} clean threshold {null.gate:.4g}"
        after += f", null_shift -> {result.null_after:.4g}"
    if repaired:
        evidence = f"{repair_note}; then {evidence}"
    if result.image is None:
        if not suspect:
            if repaired:  # the spikes were the attack: the repaired image ships
                return _shipped(x1, f"mitigated: {evidence} ({checked.reason})", t0, passes, budget, image, checked)
            why = "the image does not move like an attacked one"
        elif result.shift_after >= gate or (null is not None and not result.null_after < null.gate):
            why = f"a data correction of {result.correction:.3g} noise norms left {after.replace(' -> ', ' at ')}"
        else:
            why = "rewrite not finite"
        reason = f"{checked.reason}; rewrite refused ({evidence}: {why}): the original image ships"
        return MitigationOutcome(image, "flagged", None, reason, seconds, passes)
    if settings.method == "correct":
        how = f"data corrected by {result.correction:.3g} noise norms ({after}), re-reconstructed with {result.gain:g}x prior weight"
    else:
        how = f"re-reconstructed with {result.gain:g}x prior weight"
    reason = (
        f"mitigated: {evidence}; {how} "
        f"(data residual {result.residual_before:.3g} -> {result.residual_after:.3g} noise norms) ({checked.reason})"
    )
    rewritten = result.image[0].cpu().numpy().astype(np.complex64)
    return MitigationOutcome(rewritten, "mitigated", None, reason, seconds, passes)


def _past_budget(seconds: float, budget: float, passes: int, original: np.ndarray, checked: CheckResult) -> MitigationOutcome | None:
    """The original, ``flagged``, when a rewrite took ``seconds`` past its time ``budget``; else ``None``."""
    if seconds <= budget:
        return None
    reason = f"{checked.reason}; mitigation took {seconds:.3g} s, past its time budget ({budget:g} s): the original image ships"
    return MitigationOutcome(original, "flagged", None, reason, seconds, passes)


def _shipped(x: Tensor, reason: str, t0: float, passes: int, budget: float, original: np.ndarray, checked: CheckResult) -> MitigationOutcome:
    """A rewrite ``x`` that ships as ``mitigated`` unless it came past the time budget."""
    seconds = clock(x) - t0
    late = _past_budget(seconds, budget, passes, original, checked)
    return late if late is not None else MitigationOutcome(x[0].cpu().numpy().astype(np.complex64), "mitigated", None, reason, seconds, passes)


@dataclass(frozen=True)
class SafeguardVerdict:
    """Whether a rewrite may ship: its statistic before and after, how much further from
    the received data it moved (noise norms), and the network passes the verdict took."""

    accepted: bool
    before: float
    after: float
    dc_increase: float
    network_passes: int


@torch.no_grad()
def safeguard(
    detector: CyclicDetector, op: SenseOp, y: Tensor, x1: Tensor, rewritten: Tensor,
    judge: str, noise_sigma: float, max_dc_increase: float, before: float | None = None,
) -> SafeguardVerdict:
    """The mitigation's safeguard: a rewrite ships only when ``judge`` (an image statistic)
    is lower for it than for the original reconstruction ``x1`` and its data residual grew
    by at most ``max_dc_increase`` noise norms. ``before``: ``judge`` of ``x1`` when known."""
    passes = detector.alternatives
    if before is None:
        before = detector.score(op, y, x1, noise_sigma).get(judge)
        passes += detector.alternatives
    after = detector.score(op, y, rewritten, noise_sigma).get(judge)
    dc_increase = (_dc_norm(op, y, rewritten) - _dc_norm(op, y, x1)) / noise_norm(op, y, noise_sigma)
    return SafeguardVerdict(after < before and dc_increase <= max_dc_increase, before, after, dc_increase, passes)


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
