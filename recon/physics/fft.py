"""The project's one Fourier convention: centred, orthonormal (``norm="ortho"``).

``fft2c`` maps an image ``(..., y, x)`` to k-space ``(..., ky, kx)`` with the DC sample at
index ``n // 2`` of each axis, for odd and even sizes alike (ifftshift before, fftshift
after). Orthonormal scaling makes ``ifft2c`` the exact adjoint and inverse of ``fft2c``.

The 1-D transforms also take numpy arrays (through ``scipy.fft``, same convention): the
streaming front end transforms one readout line at a time, where torch's per-call overhead
would dominate.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import scipy.fft
import torch
from torch import Tensor

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)

_DIMS_2D = (-2, -1)


def fft2c(image: Tensor) -> Tensor:
    """Centred orthonormal 2-D FFT over the last two axes (image -> k-space)."""
    shifted = torch.fft.ifftshift(image, dim=_DIMS_2D)
    return torch.fft.fftshift(torch.fft.fft2(shifted, dim=_DIMS_2D, norm="ortho"), dim=_DIMS_2D)


def ifft2c(kspace: Tensor) -> Tensor:
    """Centred orthonormal 2-D inverse FFT over the last two axes (k-space -> image)."""
    shifted = torch.fft.ifftshift(kspace, dim=_DIMS_2D)
    return torch.fft.fftshift(torch.fft.ifft2(shifted, dim=_DIMS_2D, norm="ortho"), dim=_DIMS_2D)


def fftc(x: ArrayT, dim: int = -1) -> ArrayT:
    """Centred orthonormal 1-D FFT along ``dim`` (torch tensor or numpy array)."""
    if isinstance(x, np.ndarray):
        return np.fft.fftshift(scipy.fft.fft(np.fft.ifftshift(x, axes=dim), axis=dim, norm="ortho"), axes=dim)
    shifted = torch.fft.ifftshift(x, dim=dim)
    return torch.fft.fftshift(torch.fft.fft(shifted, dim=dim, norm="ortho"), dim=dim)


def ifftc(x: ArrayT, dim: int = -1) -> ArrayT:
    """Centred orthonormal 1-D inverse FFT along ``dim`` (torch tensor or numpy array)."""
    if isinstance(x, np.ndarray):
        return np.fft.fftshift(scipy.fft.ifft(np.fft.ifftshift(x, axes=dim), axis=dim, norm="ortho"), axes=dim)
    shifted = torch.fft.ifftshift(x, dim=dim)
    return torch.fft.fftshift(torch.fft.ifft(shifted, dim=dim, norm="ortho"), dim=dim)
