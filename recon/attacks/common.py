"""Pieces shared by the attacks: the unsupervised damage objective and complex randomness."""

from __future__ import annotations

import torch
from torch import Tensor

from recon.models.modl import MoDL
from recon.physics.noise import complex_randn
from recon.physics.sense import SenseOp

__all__ = ["box", "complex_randn", "complex_uniform", "damage"]


def damage(model: MoDL, op: SenseOp, x: Tensor, target: Tensor) -> Tensor:
    """The paper's unsupervised objective ``||f(x) - target|| / ||target||`` (no ground truth)."""
    return torch.linalg.vector_norm(model(x, op) - target) / torch.linalg.vector_norm(target)


def complex_uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """Independent uniform Re and Im in ``[-bound, bound]``."""
    real = (2 * torch.rand(shape, generator=generator) - 1) * bound
    imag = (2 * torch.rand(shape, generator=generator) - 1) * bound
    return torch.complex(real, imag).to(device)


def box(x: Tensor, bound: float) -> Tensor:
    """Clamp Re and Im separately to ``[-bound, bound]`` (the paper's l-inf ball on complex data)."""
    return torch.complex(x.real.clamp(-bound, bound), x.imag.clamp(-bound, bound))
