"""Attacks on the measured k-space y (the physically realisable threat: an attacker on the
data path), and benign controls. Every perturbation touches only the sampled lines.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recon.attacks.common import box, complex_randn, damage
from recon.models.modl import MoDL
from recon.physics.sense import SenseOp, l2_project


def l2_start(op: SenseOp, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """A random start on the sampled lines, on the sphere of radius ``eps / 2``."""
    delta = op.project(complex_randn(tuple(y.shape), generator, y.device))
    return delta * (0.5 * eps / torch.linalg.vector_norm(delta))


def l2_step(op: SenseOp, delta: Tensor, grad: Tensor, step: float, eps: float) -> Tensor:
    """One normalised-gradient ascent step on the sampled lines, projected to the ball."""
    grad = op.project(grad)
    return l2_project(delta + step * grad / torch.linalg.vector_norm(grad).clamp(min=1e-30), eps)


def pgd_kspace_l2(
    model: MoDL,
    op: SenseOp,
    y: Tensor,
    eps: float,
    generator: torch.Generator,
    steps: int = 10,
    step: float | None = None,
) -> Tensor:
    """l2 PGD on the sampled k-space: ``||delta||_2 <= eps``, normalised-gradient steps of
    ``2.5 eps / steps``, random start on a sphere of radius ``eps / 2``.

    Returns:
        The attacked k-space ``y + delta`` ``(1, C, ky, kx)`` (zero off the mask).
    """
    step = 2.5 * eps / steps if step is None else step
    with torch.no_grad():
        target = model(op.adjoint(y), op)
    delta = l2_start(op, y, eps, generator)
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        loss = damage(model, op, op.adjoint(y + delta), target)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = l2_step(op, delta.detach(), grad, step, eps)
    return (y + delta).detach()


def pgd_kspace_linf(
    model: MoDL,
    op: SenseOp,
    y: Tensor,
    eps: float,
    generator: torch.Generator,
    steps: int = 10,
    step: float | None = None,
) -> Tensor:
    """l-inf PGD on the sampled k-space (Re/Im box of radius ``eps``), steps of ``eps / 5``."""
    step = eps / 5 if step is None else step
    with torch.no_grad():
        target = model(op.adjoint(y), op)
    delta = op.project(box(complex_randn(tuple(y.shape), generator, y.device) * eps, eps))
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(damage(model, op, op.adjoint(y + delta), target), delta)
        delta = op.project(box(delta.detach() + step * torch.sgn(grad), eps))
    return (y + delta).detach()


def fgsm_kspace(model: MoDL, op: SenseOp, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """One l2-normalised gradient step of norm ``eps`` on the sampled k-space."""
    with torch.no_grad():
        target = model(op.adjoint(y), op)
    delta = op.project(complex_randn(tuple(y.shape), generator, y.device)) * 1e-6
    delta.requires_grad_(True)
    (grad,) = torch.autograd.grad(damage(model, op, op.adjoint(y + delta), target), delta)
    grad = op.project(grad)
    return (y + eps * grad / torch.linalg.vector_norm(grad).clamp(min=1e-30)).detach()


def impulse_spikes(op: SenseOp, y: Tensor, count: int, amplitude: float, generator: torch.Generator) -> Tensor:
    """``count`` corrupted samples on acquired lines, each of modulus ``amplitude`` with a
    random phase, in random coils (spike noise: herringbone artifacts)."""
    _, coils, ny, nx = y.shape
    rows = torch.nonzero(op.mask[0]).flatten().cpu()
    pick = torch.randint(len(rows), (count,), generator=generator)
    cols = torch.randint(nx, (count,), generator=generator)
    chans = torch.randint(coils, (count,), generator=generator)
    phase = torch.rand(count, generator=generator) * 2 * torch.pi
    spikes = torch.zeros_like(y)
    spikes[0, chans.to(y.device), rows[pick].to(y.device), cols.to(y.device)] = (amplitude * torch.exp(1j * phase)).to(y.dtype).to(y.device)
    return y + spikes


def benign_noise(op: SenseOp, y: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Extra circular complex Gaussian noise of standard deviation ``sigma`` per sample on
    the acquired lines (a benign control at the acquisition noise level)."""
    return y + sigma * op.project(complex_randn(tuple(y.shape), generator, y.device))
