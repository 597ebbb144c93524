"""Prior-weighted re-reconstruction: our training-free mitigation for k-space attacks.

The network's data-consistency step solves ``(E^H E + mu I) x = E^H y + mu z``: along a
direction of E with singular value s the data pull the image with gain ``s / (s^2 + mu)``.
An attacker who perturbs the measured lines by a fraction of the noise level does its damage
through that pull (and the denoiser's response to it). Re-running the *same* weights with
``g mu`` (``MoDL(..., prior_gain=g)``) shrinks every such gain; the denoiser's prior decides
more of the image. On clean slices this costs detail (about 6 dB at g = 30 on the benchmark's
slices), on attacked ones it removes about half of the attack's damage (RESULTS section 2,
session 6). So the rewrite must not reach clean slices:

* the **gate** (the mitigation's own evidence, calibrated on clean slices): the received
  reconstruction's ``prior_shift`` (how far it moves at the detector's gain, in noise norms)
  must exceed its clean threshold at the calibration's false-positive rate. A clean slice
  flagged by another component (a false positive of the union) is then left as it is; an
  image that an attacker pulled somewhere the prior does not support moves far more than
  any clean one and is rewritten.
* the **rewrite**: ``f(E^H y; g mu)`` with the mitigation's gain ``g`` (default 30).

Two network passes at most (the gate's, which the detector may already have made, and the
rewrite), against 160 for the k-space cyclic mitigation and 800 for the paper's.

**Data correction** (:func:`mitigate_correct`, the default from session 7), behind the same
gate: instead of trusting the prior more everywhere, find the small correction ``d`` of the
measured lines after which the image stops moving, i.e. descend ``prior_shift`` of
``y - d`` in ``d`` (normalised steps with backtracking, ``||d||`` within ``radius`` noise
norms) until it falls to ``stop`` (a fraction of the gate: about a typical clean slice's
shift), and ship ``f(E^H (y - d); gate_gain mu)``, the image the last step already made. An
attack does its damage along the directions in which the image moves when the prior weighs
more; the descent undoes the perturbation along those directions and leaves the rest of the
data (and so the detail the 30x rewrite loses) alone. Four passes (two forward, two
backward) per step, at most ``4 (steps + 1) + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from recon.detect.cyclic import noise_norm, prior_shift, statistic_tensor
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

    @property
    def accepted(self) -> bool:
        return self.image is not None


@torch.no_grad()
def _gate(
    model: MoDL, op: SenseOp, y: Tensor, x1: Tensor, noise_sigma: float, gate: float, gate_gain: float, shift: float | None
) -> tuple[float, float, int]:
    """The gate's evidence: ``(received prior_shift, its data residual in noise norms,
    network passes spent)``; a ``shift`` the detector computed saves the pass."""
    if not (math.isfinite(gate) and gate > 0):
        raise ValueError(f"the gate must be a positive clean threshold, got {gate}")
    passes = 0
    if shift is None:
        shift = float(prior_shift(model, op, y, x1, gate_gain, noise_sigma))
        passes += 1
    return shift, float(statistic_tensor("dc_noise", op, y, x1, None, None, noise_sigma)), passes


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
    shift, before, passes = _gate(model, op, y, x1, noise_sigma, gate, gate_gain, shift)
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

    The rewrite is refused (``image`` None) when the gate refuses, when the descent cannot
    bring the shift below ``gate`` within the budget (its own evidence would still call the
    image attacked), or when the result is not finite.
    """
    if not (math.isfinite(stop) and 0 <= stop):
        raise ValueError(f"the correction's stop must be a finite shift >= 0, got {stop}")
    if not radius > 0 or steps < 0:
        raise ValueError(f"the correction needs radius > 0 and steps >= 0, got {radius}, {steps}")
    shift, before, passes = _gate(model, op, y, x1, noise_sigma, gate, gate_gain, shift)
    if not shift > gate:
        return PriorRewrite(None, shift, gate, gate_gain, before, math.nan, passes)
    correction, value, image, steps_passes = correct_data(model, op, y, noise_sigma, gate_gain, stop, radius, steps)
    passes += steps_passes
    with torch.no_grad():
        after = float(statistic_tensor("dc_noise", op, y, image, None, None, noise_sigma))
    accepted = value < gate and _shippable(image)
    return PriorRewrite(image if accepted else None, shift, gate, gate_gain, before, after, passes, value, correction)


def correct_data(
    model: MoDL, op: SenseOp, y: Tensor, noise_sigma: float, gain: float, stop: float, radius: float, steps: int
) -> tuple[float, float, Tensor, int]:
    """The descent of :func:`mitigate_correct` without its gate: the correction ``d`` of the
    sampled lines (``||d|| <= radius`` noise norms) that lowers ``prior_shift`` of ``y - d``
    at ``gain`` to ``stop``, by normalised gradient steps (the first a quarter noise norm,
    lengthened by 1.3 when accepted, halved when not).

    Returns:
        ``(||d|| in noise norms, final prior_shift, f(E^H (y - d); gain mu), network passes)``.
    """
    unit = noise_norm(op, y, noise_sigma)
    y = y.detach()

    def evaluate(d: Tensor) -> tuple[float, Tensor, Tensor]:
        d = d.detach().requires_grad_(True)
        x_zf = op.adjoint(y - d)
        shifted = model(x_zf, op, prior_gain=gain)
        value = torch.linalg.vector_norm(shifted - model(x_zf, op)) / unit
        (grad,) = torch.autograd.grad(value, d)
        return float(value.detach()), op.project(grad), shifted.detach()

    with torch.enable_grad():
        d = torch.zeros_like(y)
        value, grad, image = evaluate(d)
        passes = 4  # two forward, two backward
        step = 0.25 * unit
        for _ in range(steps):
            if value <= stop:
                break
            candidate = l2_project(d - step * grad / torch.linalg.vector_norm(grad).clamp(min=1e-30), radius * unit)
            trial = evaluate(candidate)
            passes += 4
            if trial[0] < value:  # accept and lengthen the step; otherwise shorten it
                d, (value, grad, image) = candidate, trial
                step *= 1.3
            else:
                step *= 0.5
    return float(torch.linalg.vector_norm(d)) / unit, value, image, passes
