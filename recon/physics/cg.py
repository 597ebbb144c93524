"""Batched conjugate gradient for Hermitian positive-definite linear operators."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-batch-item inner product <a, b> = sum(conj(a) * b), shape (batch, 1, ..., 1)."""
    reduce = tuple(range(1, a.ndim))
    return torch.sum(a.conj() * b, dim=reduce, keepdim=True)


def conjugate_gradient(
    normal: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x0: Tensor | None = None,
    iterations: int = 10,
    tol: float = 0.0,
) -> Tensor:
    """Solve ``normal(x) = rhs`` for every batch item by conjugate gradient.

    Differentiable (plain torch ops), so gradients flow through a fixed number of
    iterations, as unrolled networks need.

    Args:
        normal: Hermitian positive-definite operator acting on tensors shaped like ``rhs``.
        rhs: right-hand side, ``(batch, ...)`` complex.
        x0: starting point (zeros when ``None``).
        iterations: number of CG steps.
        tol: stop early once every item's residual norm falls below ``tol * ||rhs||``
            (0 runs all iterations, which keeps the graph shape fixed).

    Returns:
        The approximate solution, shaped like ``rhs``.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    x = torch.zeros_like(rhs) if x0 is None else x0
    r = rhs - normal(x) if x0 is not None else rhs.clone()
    p = r
    rs = _dot(r, r).real
    rhs_norm2 = _dot(rhs, rhs).real
    eps = torch.finfo(rhs.real.dtype).tiny
    for _ in range(iterations):
        if tol > 0 and bool(torch.all(rs <= (tol**2) * rhs_norm2)):
            break
        ap = normal(p)
        alpha = rs / torch.clamp(_dot(p, ap).real, min=eps)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r).real
        p = r + (rs_new / torch.clamp(rs, min=eps)) * p
        rs = rs_new
    return x
