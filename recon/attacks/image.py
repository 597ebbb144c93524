"""Image-domain attacks on the zero-filled input x_zf (the paper's threat model).

An image-domain perturbation need not lie in range(E^H); the data-consistency step with a
small weight mu amplifies such components by about 1/mu. In our product x_zf is computed
from raw k-space, so these attacks are reported separately from the k-space ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recon.attacks.common import box, complex_uniform, damage
from recon.models.modl import MoDL
from recon.physics.sense import SenseOp


def pgd_image_linf(
    model: MoDL,
    op: SenseOp,
    x_zf: Tensor,
    eps: float,
    generator: torch.Generator,
    steps: int = 10,
    step: float | None = None,
) -> Tensor:
    """l-inf PGD on x_zf, as the paper's code: random start, ``steps`` ascent steps of
    ``eps / 5`` along the complex sign of the gradient, Re/Im box of radius ``eps``.

    Args:
        eps: absolute radius (the paper uses 0.01 * max|x_zf|).

    Returns:
        The attacked input ``x_zf + delta``, ``(1, y, x)``.
    """
    step = eps / 5 if step is None else step
    with torch.no_grad():
        target = model(x_zf, op)
    delta = complex_uniform(tuple(x_zf.shape), eps, generator, x_zf.device) / 2**0.5
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        loss = damage(model, op, x_zf + delta, target)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = box(delta.detach() + step * torch.sgn(grad), eps)
    return (x_zf + delta).detach()


def fgsm_image(model: MoDL, op: SenseOp, x_zf: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """One signed step of size ``eps`` from a small random start (FGSM, l-inf on Re/Im)."""
    with torch.no_grad():
        target = model(x_zf, op)
    start = complex_uniform(tuple(x_zf.shape), eps * 1e-3, generator, x_zf.device)
    delta = start.requires_grad_(True)
    (grad,) = torch.autograd.grad(damage(model, op, x_zf + delta, target), delta)
    return (x_zf + box(eps * torch.sgn(grad), eps)).detach()
