"""Coil sensitivity estimation from the auto-calibration (ACS) block.

Method: Walsh's adaptive combination (Walsh, Gmitro, Marcellin, MRM 2000), computed on
low-resolution coil images made from the ACS lines alone. At each pixel the coil
covariance, averaged over a small neighbourhood, is eigen-decomposed and its dominant
eigenvector is the sensitivity vector (unit norm over coils). This is the one-eigenvector
special case of ESPIRiT's image-space eigen-problem, without the k-space kernel
calibration: for smooth receive fields and a fully sampled central block it gives the
same subspace at a fraction of the cost and with no free parameter beyond the smoothing
window. Phase is aligned to the dominant global coil combination (a virtual body coil),
so it has no singularity where one particular coil is weak; pixels whose dominant
eigenvalue is below ``threshold`` of the maximum (background) get zero sensitivity.

The result is normalised as SENSE recon expects, ``sum_c |S_c|^2 = 1`` inside the object.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from recon.physics.fft import ifft2c


def _hann(n: int) -> Tensor:
    return torch.hann_window(n + 2, periodic=False, dtype=torch.float32)[1:-1]


def _acs_rows(acs: np.ndarray | Tensor) -> np.ndarray:
    rows = np.flatnonzero(np.asarray(acs, dtype=bool))
    if rows.size == 0:
        raise ValueError("no ACS line: coil maps cannot be estimated")
    if np.any(np.diff(rows) != 1):
        raise ValueError(f"ACS lines must form one contiguous block, got lines {rows.tolist()}")
    return rows


def low_resolution_images(kspace: Tensor, acs: np.ndarray | Tensor, calib_width_x: int | None = None) -> Tensor:
    """Coil images from the Hann-windowed ACS block (``(C, ky, kx)`` -> ``(C, y, x)``)."""
    rows = _acs_rows(acs)
    _, ny, nx = kspace.shape
    width_x = min(nx, calib_width_x if calib_width_x is not None else max(2 * rows.size, 24))
    window = torch.zeros((ny, nx), dtype=torch.float32, device=kspace.device)
    x0 = nx // 2 - width_x // 2
    window[rows[0] : rows[-1] + 1, x0 : x0 + width_x] = torch.outer(_hann(rows.size), _hann(width_x)).to(kspace.device)
    return ifft2c(kspace * window)


def estimate_coil_maps(
    kspace: Tensor,
    acs: np.ndarray | Tensor,
    kernel: int = 5,
    threshold: float = 0.02,
    calib_width_x: int | None = None,
) -> Tensor:
    """Estimate coil sensitivity maps from the ACS lines of one slice.

    Args:
        kspace: ``(C, ky, kx)`` complex k-space (unsampled lines zero; only ACS lines used).
        acs: ``(ky,)`` bool, one contiguous block of calibration lines.
        kernel: side of the square neighbourhood (pixels) averaging the coil covariance.
        threshold: pixels whose dominant eigenvalue is below ``threshold * max`` are
            background and get zero sensitivity.
        calib_width_x: readout width of the calibration window (default ``2 * n_acs``,
            at least 24).

    Returns:
        ``(C, y, x)`` complex64 maps with ``sum_c |S_c|^2 = 1`` on the object, 0 outside.
    """
    if kspace.ndim != 3 or not kspace.is_complex():
        raise ValueError(f"kspace must be complex (C, ky, kx), got {tuple(kspace.shape)} {kspace.dtype}")
    coils, ny, nx = kspace.shape
    low = low_resolution_images(kspace.to(torch.complex64), acs, calib_width_x)
    outer = low[:, None] * low[None, :].conj()  # (C, C, y, x)
    flat = torch.view_as_real(outer).permute(0, 1, 4, 2, 3).reshape(coils * coils * 2, 1, ny, nx)
    smooth = F.avg_pool2d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    smooth = smooth.reshape(coils, coils, 2, ny, nx).permute(3, 4, 0, 1, 2).contiguous()
    cov = torch.view_as_complex(smooth)  # (y, x, C, C), Hermitian
    eigvals, eigvecs = torch.linalg.eigh(cov)
    lead = eigvecs[..., -1]  # (y, x, C), unit norm
    power = eigvals[..., -1].clamp(min=0)
    total = cov.sum(dim=(0, 1))
    reference = torch.linalg.eigh(total)[1][:, -1]  # virtual body coil
    phase = torch.sum(reference.conj() * lead, dim=-1)
    lead = lead * torch.exp(-1j * torch.angle(phase))[..., None]
    support = power > threshold * power.max()
    maps = (lead * support[..., None]).permute(2, 0, 1)
    return maps.to(torch.complex64).contiguous()


def map_similarity(estimate: Tensor, truth: Tensor, region: Tensor) -> float:
    """Mean per-pixel subspace agreement ``|<s_est, s_true>| / (|s_est| |s_true|)`` in ``region``.

    1 means the estimate spans the true sensitivity direction at every pixel (the only
    thing SENSE depends on, since a per-pixel complex scale moves into the image).
    """
    inner = torch.abs(torch.sum(estimate.conj() * truth, dim=0))
    norms = torch.linalg.vector_norm(estimate, dim=0) * torch.linalg.vector_norm(truth, dim=0)
    ratio = inner / torch.clamp(norms, min=1e-12)
    return float(ratio[region].mean())
