"""Baseline mitigations: range projection and randomized smoothing (CG-SENSE fallback is
:func:`recon.baselines.cg_sense`)."""

from __future__ import annotations

import torch
from torch import Tensor

from recon.mitigate.cyclic import k_from_image
from recon.models.modl import MoDL
from recon.physics.noise import complex_randn
from recon.physics.sense import SenseOp


@torch.no_grad()
def range_projection(model: MoDL, op: SenseOp, x_received: Tensor, cg_iterations: int = 10) -> Tensor:
    """``f(E^H y(x); Omega)`` with ``y(x)`` the CG pseudo-inverse: removes the part of an
    image-domain input outside range(E^H). A k-space input is already in the range, so
    this changes nothing for the primary threat."""
    return model(op.adjoint(k_from_image(op, x_received, cg_iterations)), op)


@torch.no_grad()
def randomized_smoothing(
    model: MoDL, op: SenseOp, y_received: Tensor, sigma: float, draws: int, generator: torch.Generator
) -> Tensor:
    """Mean of ``f(E^H (y + n_i); Omega)`` over ``draws`` k-space noise draws of standard
    deviation ``sigma`` on the sampled lines (randomized smoothing at inference, batched)."""
    ops = SenseOp(op.maps.expand(draws, -1, -1, -1), op.mask.expand(draws, -1))
    batch = y_received.expand(draws, -1, -1, -1)
    noisy = batch + sigma * ops.project(complex_randn(tuple(batch.shape), generator, y_received.device))
    return model(ops.adjoint(noisy), ops).mean(dim=0, keepdim=True)
