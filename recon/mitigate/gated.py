"""The gated methods, ``correct`` (the default) and ``prior``: rewrite a flagged image only
when the received reconstruction moves like an attacked one under a heavier prior.

Each has one entry point, ``(prepared, image, checked, defense) -> MitigationOutcome``
(:data:`recon.mitigate.policy.METHODS`). Both first re-estimate samples whose data
residual exceeds every clean calibration slice's (:func:`recon.mitigate.spikes.repair_spikes`),
then judge the (repaired) data by their calibrated gates: ``prior_shift`` and, for
``correct``, ``null_shift`` over their clean thresholds. The math of each rewrite is in
:mod:`recon.mitigate.prior`.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from recon.detect.calibration import Calibration
from recon.detect.defense import Defense
from recon.mitigate.outcome import MitigationOutcome, past_budget, shipped, unchanged
from recon.mitigate.prior import NullGate, PriorRewrite, mitigate_correct, mitigate_prior
from recon.mitigate.spikes import SpikeRepair, repair_spikes
from recon.physics.prepared import PreparedSlice, clock
from recon.verdict import CheckResult


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


def spike_gate(calibration: Calibration) -> float | None:
    """``dc_spike``'s scale in the calibration (the largest ratio of any clean calibration
    slice's sample, where it is a backstop), the spike repair's limit; ``None``: it has none."""
    return dict(calibration.scales).get("dc_spike")


def rewrite_correct(prepared: PreparedSlice, image: np.ndarray, checked: CheckResult, defense: Defense) -> MitigationOutcome:
    """``correct``: correct the measured lines until the image stops moving under a heavier
    prior (:func:`recon.mitigate.prior.mitigate_correct`), behind the gates."""
    return _rewrite_gated("correct", prepared, image, checked, defense)


def rewrite_prior(prepared: PreparedSlice, image: np.ndarray, checked: CheckResult, defense: Defense) -> MitigationOutcome:
    """``prior``: re-reconstruct with a heavier prior (:func:`recon.mitigate.prior.mitigate_prior`),
    behind the gate."""
    return _rewrite_gated("prior", prepared, image, checked, defense)


def _spike_repair(prepared: PreparedSlice, x1: Tensor, defense: Defense) -> tuple[SpikeRepair | None, PreparedSlice, Tensor]:
    """The spike repair in front of the gated methods: ``(repair or None, prepared, x1)``,
    the last two the repaired data and image when it found and repaired spikes."""
    limit = spike_gate(defense.calibration)
    if not defense.mitigation.despike or limit is None:
        return None, prepared, x1
    repair = repair_spikes(defense.model, prepared.op, prepared.y, x1, defense.noise_sigma, limit, defense.mitigation.despike_samples)
    if repair.y is None or repair.image is None:
        return repair, prepared, x1
    return repair, prepared.with_data(repair.y), repair.image


def _rewrite_gated(method: str, prepared: PreparedSlice, image: np.ndarray, checked: CheckResult, defense: Defense) -> MitigationOutcome:
    """``method`` (``correct`` or ``prior``) after the spike repair.

    When a sample's data residual exceeds every clean calibration slice's (``dc_spike``
    over its scale), the spikes are re-estimated first (a repair that cannot bring them
    under the limit ships the original, ``flagged``), and the gated method then judges the
    repaired data with fresh evidence: the repaired image ships when the gates say it does
    not move like an attacked one, the method's rewrite of the repaired data when they fire
    and it succeeds, the original otherwise.
    """
    settings = defense.mitigation
    x1 = prepared.image_tensor(image)
    t0 = clock(x1)
    spikes, prepared, x1 = _spike_repair(prepared, x1, defense)
    repaired = spikes is not None and spikes.image is not None
    spent = 0 if spikes is None else spikes.network_passes
    if spikes is not None and spikes.found and not repaired:
        why = f"dc_spike {spikes.ratio:.4g} > clean limit {spikes.limit:.4g}: {spikes.refused}"
        return unchanged(image, checked, f"spike repair refused ({why}): the original image ships", clock(x1) - t0, spent)
    repair_note = (
        f"{spikes.samples} samples over the clean spike limit re-estimated (dc_spike {spikes.ratio:.4g} -> {spikes.ratio_after:.4g}, "
        f"limit {spikes.limit:.4g})" if repaired and spikes is not None else ""
    )
    gate = prior_gate(defense.calibration)
    if gate is None:
        if repaired:
            return shipped(x1, f"mitigated: {repair_note} ({checked.reason})", t0, spent, settings.time_budget, image, checked)
        why = (
            f"{method} mitigation needs a calibration with prior_shift "
            f"(this one is {defense.calibration.detector.statistic}; cycguard calibrate --statistic null_first_union): "
            "the original image ships"
        )
        return unchanged(image, checked, why)
    # the detector's evidence is the received data's; repaired data need their own
    known = checked.scores.prior_shift if checked.scores is not None and not repaired else None
    known_null = checked.scores.null_shift if checked.scores is not None and not repaired else None
    null_threshold = null_gate(defense.calibration)
    null = None
    if method == "correct" and settings.correct_null and null_threshold is not None:
        null = NullGate(null_threshold, defense.detector.acs(prepared.op))
    if method == "correct":
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
    late = past_budget(seconds, settings.time_budget, passes, image, checked)
    if late is not None:  # a latency bound: a late rewrite is not shipped either
        return late
    return _judged(method, result, gate, null, repair_note, x1, t0, passes, image, checked, defense)


def _judged(
    method: str, result: PriorRewrite, gate: float, null: NullGate | None, repair_note: str, x1: Tensor, t0: float, passes: int,
    image: np.ndarray, checked: CheckResult, defense: Defense,
) -> MitigationOutcome:
    """What the gates make of a gated method's result: the rewrite, the repaired image, or the original."""
    evidence = f"prior_shift {result.shift:.4g} {'>' if result.shift > gate else '<='} clean threshold {gate:.4g} noise norms"
    suspect = result.shift > gate
    after = f"prior_shift -> {result.shift_after:.4g}"
    if null is not None:
        suspect = suspect or result.null_shift > null.gate
        evidence += f", null_shift {result.null_shift:.4g} {'>' if result.null_shift > null.gate else '<='} clean threshold {null.gate:.4g}"
        after += f", null_shift -> {result.null_after:.4g}"
    if repair_note:
        evidence = f"{repair_note}; then {evidence}"
    seconds = clock(x1) - t0
    if result.image is None:
        if not suspect:
            if repair_note:  # the spikes were the attack: the repaired image ships
                return shipped(x1, f"mitigated: {evidence} ({checked.reason})", t0, passes, defense.mitigation.time_budget, image, checked)
            why = "the image does not move like an attacked one"
        elif result.shift_after >= gate or (null is not None and not result.null_after < null.gate):
            why = f"a data correction of {result.correction:.3g} noise norms left {after.replace(' -> ', ' at ')}"
        else:
            why = "rewrite not finite"
        return unchanged(image, checked, f"rewrite refused ({evidence}: {why}): the original image ships", seconds, passes)
    if method == "correct":
        how = f"data corrected by {result.correction:.3g} noise norms ({after}), re-reconstructed with {result.gain:g}x prior weight"
    else:
        how = f"re-reconstructed with {result.gain:g}x prior weight"
    reason = (
        f"mitigated: {evidence}; {how} "
        f"(data residual {result.residual_before:.3g} -> {result.residual_after:.3g} noise norms) ({checked.reason})"
    )
    rewritten = result.image[0].cpu().numpy().astype(np.complex64)
    return MitigationOutcome(rewritten, "mitigated", None, reason, seconds, passes)
