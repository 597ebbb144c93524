"""Classical reconstructions used as baselines and fallbacks: zero-filled and CG-SENSE."""

from __future__ import annotations

from torch import Tensor

from recon.physics.cg import conjugate_gradient
from recon.physics.sense import SenseOp

CG_SENSE_ITERATIONS = 12
CG_SENSE_LAMBDA = 0.01


def zero_filled(op: SenseOp, y: Tensor) -> Tensor:
    """``E^H y``: the coil-combined zero-filled image ``(B, y, x)``."""
    return op.adjoint(y)


def cg_sense(op: SenseOp, y: Tensor, iterations: int = CG_SENSE_ITERATIONS, lam: float = CG_SENSE_LAMBDA) -> Tensor:
    """CG-SENSE (Pruessmann et al., MRM 2001) with Tikhonov weight ``lam``.

    Solves ``(E^H E + lam I) x = E^H y`` from zero by ``iterations`` CG steps. With coil
    maps normalised to ``sum_c |S_c|^2 = 1`` the eigenvalues of ``E^H E`` lie in [0, 1], so
    ``lam`` is dimensionless. The defaults were chosen on training slices (see
    benchmarks/RESULTS.md); early stopping is part of the regularisation.
    """
    rhs = op.adjoint(y)
    return conjugate_gradient(lambda v: op.normal(v) + lam * v, rhs, iterations=iterations)
