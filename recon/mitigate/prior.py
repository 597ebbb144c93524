"""Prior-weighted re-reconstruction: our training-free mitigation for k-space attacks.

The network's data-consistency step solves ``(E^H E + mu I) x = E^H y + mu z``: along a
direction of E with singular value s the data pull the image with gain ``s / (s^2 + mu)``.
An attacker who perturbs the measured lines by a fraction of the noise level does its damage
through that pull (and the denoiser's response to it). Re-running the *same* weights with
``g mu`` (``MoDL(..., prior_gain=g)``) shrinks every such gain; the denoiser's prior decides
more of the image. On clean slices this costs detail (about 6 dB at g = 30 on the benchmark's
slices), on attacked ones it removes about half of the attack's damage (RESULTS section 2).
So the rewrite must not reach clean slices:

* the **gate** (the mitigation's own evidence, calibrated on clean slices): the received
  reconstruction's ``prior_shift`` (how far it moves at the detector's gain, in noise norms)
  must exceed its clean threshold at the calibration's false-positive rate. A clean slice
  flagged by another component (a false positive of the union) is then left as it is; an
  image that an attacker pulled somewhere the prior does not support moves far more than
  any clean one and is rewritten.
* the **rewrite**: ``f(E^H y; g mu)`` with the mitigation's gain ``g`` (default 30).

Two network passes at most (the gate's, which the detector may already have made, and the
rewrite), against 160 for the k-space cyclic mitigation and 800 for the paper's.

**Data correction** (:func:`mitigate_correct`, the default), behind the same
gate: instead of trusting the prior more everywhere, find the small correction ``d`` of the
measured lines after which the image stops moving, i.e. descend ``prior_shift`` of
``y - d`` in ``d`` (normalised steps with backtracking, ``||d||`` within ``radius`` noise
norms) until it falls to ``stop`` (a fraction of the gate: about a typical clean slice's
shift), and ship ``f(E^H (y - d); gate_gain mu)``, the image the last step already made. An
attack does its damage along the directions in which the image moves when the prior weighs
more; the descent undoes the perturbation along those directions and leaves the rest of the
data (and so the detail the 30x rewrite loses) alone. Four passes (two forward, two
backward) per step, at most ``4 (steps + 1) + 1``.

**Where the shift lies** (:class:`NullGate`): with ``null_shift``'s clean
threshold as a second gate, the evidence is either statistic over its own gate, and the
descent goes on until ``prior_shift`` is at ``stop`` and ``null_shift`` under its gate. The
smallest damaging attacks (a third of the noise norm) move the image about as far as a
detailed clean slice does, so ``prior_shift`` alone refuses them; their move lies in the
lines the network fills in, which ``null_shift`` sees (the detector flags them by it). The
two stops differ because the clean distributions do: ``prior_shift``'s has a long tail
(its 1 % threshold is 3x its median on the benchmark's clean slices), so the descent stops
at a fraction of it; ``null_shift``'s is narrow (its threshold is 1.2x its median), so its
threshold is already a typical clean value, and pushing below it would overcorrect. The
same four passes a step: ``null_shift`` is a ratio of parts of the same move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from recon.detect.cyclic import noise_norm, null_share, shift_of, statistic_tensor
from recon.models.modl import MoDL
from recon.physics.sense import SenseOp, l2_project


@dataclass(frozen=True, eq=False)
class PriorRewrite:
    """What :func:`mitigate_prior` did.

    Attributes:
        image: ``(1, y, x)`` the rewrite ``f(E^H y; gain mu)``, or ``None`` when the gate
            refused (nothing to ship but the original).
        shift: the received reconstruction's ``prior_shift`` at ``gate_gain`` (noise norms).
        gate: its clean threshold; the rewrite runs only when ``shift > gate``.
        gain: the rewrite's factor on mu.
        residual_before: data residual of the received reconstruction (noise norms).
        residual_after: data residual of the rewrite (noise norms; ``nan`` when refused).
        network_passes: single-slice network evaluations this call made.
        shift_after: the shipped image's ``prior_shift`` at ``gate_gain``
            (:func:`mitigate_correct`; ``nan`` otherwise).
        correction: norm of the data correction in noise norms (:func:`mitigate_correct`).
        null_shift: the received ``null_shift`` when a :class:`NullGate` took part.
        null_after: the shipped image's ``null_shift`` (with a :class:`NullGate`).
    """

    image: Tensor | None
    shift: float
    gate: float
    gain: float
    residual_before: float
    residual_after: float
    network_passes: int
    shift_after: float = math.nan
    correction: float = 0.0
    null_shift: float = math.nan
    null_after: float = math.nan

    @property
    def accepted(self) -> bool:
        return self.image is not None


@dataclass(frozen=True, eq=False)
class NullGate:
    """``null_shift``'s clean threshold at the detector's gain (a calibration's scale) and
    the ACS lines its denominator leaves out (``(ky,)`` bool)."""

    gate: float
    acs: Tensor

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gate) and self.gate > 0):
            raise ValueError(f"null_shift's gate must be a positive clean threshold, got {self.gate}")


@torch.no_grad()
def _gate(
    model: MoDL, op: SenseOp, y: Tensor, x1: Tensor, noise_sigma: float, gate: float, gate_gain: float, shift: float | None,
    null: NullGate | None = None, null_shift: float | None = None,
) -> tuple[float, float, float, int]:
    """The gate's evidence: ``(received prior_shift, received null_shift (``nan`` without
    ``null``), its data residual in noise norms, network passes spent)``; values the
    detector computed save the pass, and one pass gives both."""
    if not (math.isfinite(gate) and gate > 0):
        raise ValueError(f"the gate must be a positive clean threshold, got {gate}")
    passes = 0
    if shift is None or (null is not None and null_shift is None):
        moved = shift_of(model, op, y, x1, gate_gain)
        shift = float(torch.linalg.vector_norm(moved) / noise_norm(op, y, noise_sigma))
        null_shift = float(null_share(op, moved, null.acs)) if null is not None else None
        passes += 1
    received = null_shift if null is not None and null_shift is not None else math.nan
    return shift, received, float(statistic_tensor("dc_noise", op, y, x1, None, None, noise_sigma)), passes


def _shippable(image: Tensor) -> bool:
    """A rewrite that may ship: finite and not all zero."""
    return bool(torch.isfinite(image).all()) and bool(image.abs().amax() > 0)


@torch.no_grad()
def mitigate_prior(
    model: MoDL,
    op: SenseOp,
    y: Tensor,
    x1: Tensor,
    noise_sigma: float,
    gate: float,
    gate_gain: float,
    gain: float = 30.0,
    shift: float | None = None,
) -> PriorRewrite:
    """Rewrite a flagged slice by the prior-weighted re-reconstruction, behind its gate.

    Args:
        y: ``(1, C, ky, kx)`` the received k-space.
        x1: ``(1, y, x)`` the network's reconstruction of ``y`` (the flagged image).
        noise_sigma: acquisition noise standard deviation per sample.
        gate: the clean threshold of ``prior_shift`` at ``gate_gain`` (a calibration's).
        gate_gain: the detector's ``prior_gain`` that threshold was calibrated with.
        gain: the rewrite's factor on mu (> 1).
        shift: the received ``prior_shift`` when the detector already computed it (saves
            a pass).
    """
    if not gain > 1:
        raise ValueError(f"the rewrite's prior gain must be > 1, got {gain}")
    shift, _, before, passes = _gate(model, op, y, x1, noise_sigma, gate, gate_gain, shift)
    if not shift > gate:  # also refuses a non-finite shift
        return PriorRewrite(None, shift, gate, gain, before, math.nan, passes)
    rewrite = model(op.adjoint(y), op, prior_gain=gain)
    passes += 1
    after = float(statistic_tensor("dc_noise", op, y, rewrite, None, None, noise_sigma))
    if not _shippable(rewrite):
        return PriorRewrite(None, shift, gate, gain, before, after, passes)
    return PriorRewrite(rewrite, shift, gate, gain, before, after, passes)


def mitigate_correct(
    model: MoDL,
    op: SenseOp,
    y: Tensor,
    x1: Tensor,
    noise_sigma: float,
    gate: float,
    gate_gain: float,
    stop: float,
    radius: float = 3.0,
    steps: int = 30,
    shift: float | None = None,
    null: NullGate | None = None,
    null_shift: float | None = None,
) -> PriorRewrite:
    """Rewrite a flagged slice by correcting its data until the prior agrees, behind the gate.

    Args:
        y: ``(1, C, ky, kx)`` the received k-space.
        x1: ``(1, y, x)`` the network's reconstruction of ``y`` (the flagged image).
        noise_sigma: acquisition noise standard deviation per sample.
        gate: the clean threshold of ``prior_shift`` at ``gate_gain``; the correction runs
            only when the received shift exceeds it.
        gate_gain: the detector's ``prior_gain`` (the descent uses the same).
        stop: the descent ends once ``prior_shift`` of the corrected data is at most this
            (noise norms; the pipeline uses a fraction of ``gate``).
        radius: the correction's l2 budget in noise norms.
        steps: at most this many descent steps after the first evaluation.
        shift: the received ``prior_shift`` when the detector already computed it.
        null: ``null_shift``'s gate: the correction also runs when the received
            ``null_shift`` exceeds it, the descent also lowers ``null_shift`` to it, and the
            rewrite ships only with both statistics under their gates.
        null_shift: the received ``null_shift`` when the detector already computed it (with
            ``shift``, saves the gate's pass).

    The rewrite is refused (``image`` None) when the gates refuse, when the descent cannot
    bring the evidence below its gates within the budget (its own evidence would still call
    the image attacked), or when the result is not finite.
    """
    if not (math.isfinite(stop) and 0 <= stop):
        raise ValueError(f"the correction's stop must be a finite shift >= 0, got {stop}")
    if not radius > 0 or steps < 0:
        raise ValueError(f"the correction needs radius > 0 and steps >= 0, got {radius}, {steps}")
    shift, received, before, passes = _gate(model, op, y, x1, noise_sigma, gate, gate_gain, shift, null, null_shift)
    suspect = shift > gate or (null is not None and received > null.gate)  # a non-finite value refuses
    if not suspect:
        return PriorRewrite(None, shift, gate, gate_gain, before, math.nan, passes, null_shift=received)
    result = correct_data(model, op, y, noise_sigma, gate_gain, stop, radius, steps, null)
    passes += result.passes
    with torch.no_grad():
        after = float(statistic_tensor("dc_noise", op, y, result.image, None, None, noise_sigma))
    accepted = result.shift < gate and (null is None or result.null_shift < null.gate) and _shippable(result.image)
    return PriorRewrite(
        result.image if accepted else None, shift, gate, gate_gain, before, after, passes, result.shift, result.size, received, result.null_shift
    )


class Correction(NamedTuple):
    """What :func:`correct_data` found: the correction's size (noise norms), the corrected
    data's ``prior_shift`` (noise norms) and ``null_shift`` (``nan`` without a
    :class:`NullGate`), the image ``f(E^H (y - d); gain mu)`` and the network passes spent."""

    size: float
    shift: float
    image: Tensor
    passes: int
    null_shift: float = math.nan


def correct_data(
    model: MoDL,
    op: SenseOp,
    y: Tensor,
    noise_sigma: float,
    gain: float,
    stop: float,
    radius: float,
    steps: int,
    null: NullGate | None = None,
) -> Correction:
    """The descent of :func:`mitigate_correct` without its gate: the correction ``d`` of the
    sampled lines (``||d|| <= radius`` noise norms) that lowers ``prior_shift`` of ``y - d``
    at ``gain`` to ``stop`` (noise norms) and, with ``null``, ``null_shift`` to its gate
    (the objective is the larger of the two over their targets, lowered to 1), by
    normalised gradient steps (the first a quarter noise norm, lengthened by 1.3 when
    accepted, halved when not).
    """
    unit = noise_norm(op, y, noise_sigma)
    y = y.detach()

    def evaluate(d: Tensor) -> tuple[float, Tensor, Tensor, float, float]:
        d = d.detach().requires_grad_(True)
        x_zf = op.adjoint(y - d)
        shifted = model(x_zf, op, prior_gain=gain)
        moved = shifted - model(x_zf, op)
        shift = torch.linalg.vector_norm(moved) / unit
        null_value = null_share(op, moved, null.acs) if null is not None else None
        value = shift / stop if stop > 0 else shift
        if null_value is not None:
            value = torch.maximum(value, null_value / null.gate)  # type: ignore[union-attr]
        (grad,) = torch.autograd.grad(value, d)
        return float(value.detach()), op.project(grad), shifted.detach(), float(shift.detach()), math.nan if null_value is None else float(null_value.detach())

    target = 1.0 if stop > 0 else 0.0
    with torch.enable_grad():
        d = torch.zeros_like(y)
        value, grad, image, shift, null_value = evaluate(d)
        passes = 4  # two forward, two backward
        step = 0.25 * unit
        for _ in range(steps):
            if value <= target:
                break
            candidate = l2_project(d - step * grad / torch.linalg.vector_norm(grad).clamp(min=1e-30), radius * unit)
            trial = evaluate(candidate)
            passes += 4
            if trial[0] < value:  # accept and lengthen the step; otherwise shorten it
                d, (value, grad, image, shift, null_value) = candidate, trial
                step *= 1.3
            else:
                step *= 0.5
    return Correction(float(torch.linalg.vector_norm(d)) / unit, shift, image, passes, null_value)
