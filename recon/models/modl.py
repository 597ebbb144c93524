"""MoDL-style unrolled network (Aggarwal, Mani, Jacob, IEEE TMI 2019), in plain torch.

``model(x_zf, op)``: the network is handed the SENSE operator and never builds physics of
its own, so the same weights run with any mask of the family, and attacks, detectors and
mitigators reuse exactly the operator the network used (the deepinv contract).

Each of ``unrolls`` iterations applies a shared residual CNN denoiser ``z = D(x)`` and then
the data-consistency step ``x = argmin ||E x - y||^2 + mu ||x - z||^2``, i.e.
``(E^H E + mu I) x = x_zf + mu z``, solved by ``cg_iterations`` of conjugate gradient.
``mu > 0`` is learned (softplus parameterisation). ``model(x_zf, op, prior_gain=g)`` runs the
same weights with ``g mu``: the denoiser's prior weighs ``g`` times more against the data,
the data's pull on each direction falls from ``s / (s^2 + mu)`` to ``s / (s^2 + g mu)``
(``s`` a singular value of E). No retraining; the defense uses it to ask how much an image
owes to the data (:mod:`recon.detect.cyclic`, ``prior_shift``) and to rewrite a flagged one
(:mod:`recon.mitigate.prior`).

The network is scale-equivariant by construction: it divides the input by
``max |x_zf|`` per slice (the paper's normalisation) and multiplies the output back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recon.physics.cg import conjugate_gradient
from recon.physics.sense import SenseOp


@dataclass(frozen=True)
class MoDLConfig:
    """Architecture of :class:`MoDL` (stored beside the weights).

    Attributes:
        channels: feature channels of the denoiser's hidden layers.
        layers: convolution layers of the denoiser (>= 2).
        unrolls: shared-weight iterations (denoiser + data consistency).
        cg_iterations: CG steps per data-consistency block.
        mu_init: initial data-consistency weight mu.
    """

    channels: int = 48
    layers: int = 5
    unrolls: int = 5
    cg_iterations: int = 8
    mu_init: float = 0.05

    def to_dict(self) -> dict[str, float]:
        """Plain-JSON form."""
        return asdict(self)


class ResidualDenoiser(nn.Module):
    """CNN on (Re, Im) channels with a global skip: ``D(x) = x + CNN(x)``."""

    def __init__(self, channels: int, layers: int) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError(f"the denoiser needs at least 2 layers, got {layers}")
        widths = [2] + [channels] * (layers - 1) + [2]
        self.convs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, padding=1) for i in range(layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Denoise a complex image batch ``(B, y, x)``."""
        h = torch.view_as_real(x).permute(0, 3, 1, 2)
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = F.relu(h)
        residual = torch.view_as_complex(h.permute(0, 2, 3, 1).contiguous())
        return x + residual


class MoDL(nn.Module):
    """Unrolled network ``f(x_zf; op)`` with a shared denoiser and CG data consistency."""

    def __init__(self, config: MoDLConfig | None = None) -> None:
        super().__init__()
        self.config = config or MoDLConfig()
        self.denoiser = ResidualDenoiser(self.config.channels, self.config.layers)
        raw = torch.log(torch.expm1(torch.tensor(float(self.config.mu_init))))
        self.mu_raw = nn.Parameter(raw)

    @property
    def mu(self) -> Tensor:
        """The learned data-consistency weight (positive)."""
        return F.softplus(self.mu_raw)

    def forward(self, x_zf: Tensor, op: SenseOp, prior_gain: float = 1.0) -> Tensor:
        """Reconstruct.

        Args:
            x_zf: zero-filled image ``E^H y``, ``(B, y, x)`` complex64.
            op: the SENSE operator whose adjoint produced ``x_zf``.
            prior_gain: multiplies the learned ``mu`` (1: the trained network; larger
                trusts the denoiser more and the data less).

        Returns:
            ``(B, y, x)`` complex64 reconstruction, in the units of ``x_zf``.
        """
        if x_zf.ndim != 3 or not x_zf.is_complex():
            raise ValueError(f"x_zf must be complex (B, y, x), got {tuple(x_zf.shape)} {x_zf.dtype}")
        scale = torch.amax(torch.abs(x_zf), dim=(1, 2), keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        if not prior_gain > 0:
            raise ValueError(f"prior_gain must be > 0, got {prior_gain}")
        rhs0 = x_zf / scale
        mu = self.mu if prior_gain == 1.0 else self.mu * prior_gain
        x = rhs0
        for _ in range(self.config.unrolls):
            z = self.denoiser(x)
            x = conjugate_gradient(
                lambda v: op.normal(v) + mu * v, rhs0 + mu * z, x0=z, iterations=self.config.cg_iterations
            )
        return x * scale
