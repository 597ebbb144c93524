"""Multi-coil Cartesian SENSE operator E = P F S on batches.

Shapes (see :mod:`recon.types`): images ``(B, y, x)``, k-space ``(B, C, ky, kx)``, coil maps
``(B, C, y, x)``, line masks ``(B, ky)``. The operator is immutable; a new mask means a new
operator (:meth:`SenseOp.with_mask`), so a network, an attack and a detector handed the same
operator use exactly the same physics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from recon.physics.fft import fft2c, ifft2c


@dataclass(frozen=True, eq=False)
class SenseOp:
    """Forward model ``E_M = P_M F S`` with its adjoint and normal operator.

    Attributes:
        maps: coil sensitivities ``(B, C, y, x)`` complex64.
        mask: acquired phase-encode lines ``(B, ky)`` bool (or 0/1 float).
    """

    maps: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.maps) or not self.maps.is_complex():
            raise TypeError("maps must be a complex torch tensor (B, C, y, x)")
        if self.maps.ndim != 4:
            raise ValueError(f"maps must be (B, C, y, x), got shape {tuple(self.maps.shape)}")
        b, _, ny, _ = self.maps.shape
        if self.mask.ndim != 2 or self.mask.shape[1] != ny or self.mask.shape[0] not in (1, b):
            raise ValueError(
                f"mask must be (B, ky) = ({b}, {ny}) or (1, {ny}), got {tuple(self.mask.shape)}"
            )
        weights = self.mask.to(device=self.maps.device, dtype=self.maps.real.dtype)
        object.__setattr__(self, "_weights", weights[:, None, :, None])

    @property
    def batch(self) -> int:
        """Batch size B."""
        return int(self.maps.shape[0])

    @property
    def coils(self) -> int:
        """Number of coils C."""
        return int(self.maps.shape[1])

    @property
    def image_shape(self) -> tuple[int, int]:
        """Image matrix ``(y, x)``."""
        return int(self.maps.shape[2]), int(self.maps.shape[3])

    def _check_image(self, x: Tensor) -> None:
        if x.ndim != 3 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"image must be (B, {self.image_shape[0]}, {self.image_shape[1]}), "
                f"got {tuple(x.shape)}"
            )

    def _check_kspace(self, k: Tensor) -> None:
        expected = (self.coils, *self.image_shape)
        if k.ndim != 4 or tuple(k.shape[1:]) != expected:
            raise ValueError(f"k-space must be (B, {', '.join(map(str, expected))}), got {tuple(k.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """``E x``: image ``(B, y, x)`` -> masked multi-coil k-space ``(B, C, ky, kx)``."""
        self._check_image(x)
        return fft2c(self.maps * x[:, None]) * self._weights  # type: ignore[attr-defined]

    def adjoint(self, k: Tensor) -> Tensor:
        """``E^H k``: multi-coil k-space ``(B, C, ky, kx)`` -> coil-combined image ``(B, y, x)``."""
        self._check_kspace(k)
        coil_images = ifft2c(k * self._weights)  # type: ignore[attr-defined]
        return torch.sum(self.maps.conj() * coil_images, dim=1)

    def normal(self, x: Tensor) -> Tensor:
        """``E^H E x`` (the mask is a projection, so it is applied once)."""
        self._check_image(x)
        k = fft2c(self.maps * x[:, None]) * self._weights  # type: ignore[attr-defined]
        return torch.sum(self.maps.conj() * ifft2c(k), dim=1)

    def project(self, k: Tensor) -> Tensor:
        """``P k``: zero the lines this operator does not sample."""
        self._check_kspace(k)
        return k * self._weights  # type: ignore[attr-defined]

    def with_mask(self, mask: Tensor) -> SenseOp:
        """The same coil maps with another sampling mask ``(B, ky)``."""
        return SenseOp(self.maps, mask)

    def fully_sampled(self) -> SenseOp:
        """The same coil maps with every line sampled (``F S``)."""
        ones = torch.ones((self.batch, self.image_shape[0]), dtype=torch.bool, device=self.maps.device)
        return SenseOp(self.maps, ones)


def l2_project(delta: Tensor, eps: float) -> Tensor:
    """Scale ``delta`` into the l2 ball of radius ``eps`` (one ball for the whole tensor)."""
    norm = torch.linalg.vector_norm(delta)
    return delta * torch.clamp(eps / norm.clamp(min=1e-30), max=1.0)
