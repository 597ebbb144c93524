"""Image quality metrics on magnitude images, against a reference.

Convention (stated once): both images are compared as magnitudes after the
reconstruction is put on the reference's scale by least squares over the magnitude
(``a = <|x|, |ref|> / <|x|, |x|>``) only when ``rescale=True``; PSNR and SSIM use
``data_range = max |ref|``; NMSE is ``||x - ref||^2 / ||ref||^2`` on magnitudes.
SSIM is scikit-image's ``structural_similarity`` with its default 7x7 window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.metrics import structural_similarity


@dataclass(frozen=True)
class Quality:
    """PSNR (dB), SSIM and NMSE of one image."""

    psnr: float
    ssim: float
    nmse: float


def _magnitude(image: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(image)).astype(np.float64)


def quality(image: np.ndarray, reference: np.ndarray, rescale: bool = False) -> Quality:
    """PSNR / SSIM / NMSE of ``image`` against ``reference`` (both ``(y, x)``)."""
    x, ref = _magnitude(image), _magnitude(reference)
    if x.shape != ref.shape:
        raise ValueError(f"image {x.shape} and reference {ref.shape} differ in shape")
    if rescale:
        x = x * float(np.vdot(x, ref) / max(np.vdot(x, x), 1e-30))
    data_range = float(ref.max())
    if data_range <= 0:
        raise ValueError("reference image is empty")
    mse = float(np.mean((x - ref) ** 2))
    psnr = float(10 * np.log10(data_range**2 / max(mse, 1e-30)))
    ssim = float(structural_similarity(x, ref, data_range=data_range))
    nmse = float(np.sum((x - ref) ** 2) / np.sum(ref**2))
    return Quality(psnr=psnr, ssim=ssim, nmse=nmse)
