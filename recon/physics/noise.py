"""Receiver noise: covariance from noise scans, prewhitening, readout oversampling removal."""

from __future__ import annotations

import numpy as np
import torch

from recon.physics.fft import fftc, ifftc


def noise_covariance(samples: np.ndarray) -> np.ndarray:
    """Channel noise covariance ``(C, C)`` from noise-scan samples ``(C, N)`` (complex)."""
    if samples.ndim != 2 or samples.shape[1] < samples.shape[0]:
        raise ValueError(
            f"noise samples must be (coils, n) with n >= coils, got shape {samples.shape}"
        )
    centred = samples - samples.mean(axis=1, keepdims=True)
    return (centred @ centred.conj().T) / (samples.shape[1] - 1)


def whitening_matrix(covariance: np.ndarray) -> np.ndarray:
    """``W`` with ``W Psi W^H = I``: the inverse Cholesky factor of the noise covariance.

    Applied to data as ``W @ data`` over the coil axis, it makes the channels' noise
    independent with unit variance (so k-space is in units of the noise level).
    """
    try:
        lower = np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError as err:
        raise ValueError("noise covariance is not positive definite (dead or duplicated channel?)") from err
    return np.linalg.inv(lower).astype(np.complex64)


def remove_readout_oversampling(data: np.ndarray, recon_samples: int) -> np.ndarray:
    """Crop the readout field of view to its central ``recon_samples`` (last axis).

    Inverse FFT along the readout, keep the centre of the image, FFT back, as
    Gadgetron's RemoveROOversamplingGadget does.
    """
    samples = data.shape[-1]
    if recon_samples > samples:
        raise ValueError(f"cannot crop {samples} readout samples to {recon_samples}")
    if recon_samples == samples:
        return data
    line = ifftc(np.ascontiguousarray(data, dtype=np.complex64), dim=-1)
    start = samples // 2 - recon_samples // 2
    cropped = line[..., start : start + recon_samples]
    # orthonormal transforms keep white noise at its per-sample variance, so whitened
    # data stay in units of the noise level after the crop
    return np.asarray(fftc(cropped, dim=-1), dtype=np.complex64)


def complex_randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """Circular complex Gaussian noise, unit variance per entry, from an explicit generator."""
    real = torch.randn(shape, generator=generator)
    imag = torch.randn(shape, generator=generator)
    return (torch.complex(real, imag) / 2**0.5).to(device)


def estimate_noise_sigma(kspace: np.ndarray, mask: np.ndarray, edge: int = 8) -> float:
    """Noise standard deviation per complex sample from the k-space periphery.

    Uses the ``edge`` outermost readout samples on each side of every acquired line, where
    an imaged object has almost no signal: for circular complex Gaussian noise with
    ``E|n|^2 = sigma^2`` the median of ``|n|`` is ``sigma sqrt(ln 2)``. Prewhitened data give
    about 1.
    """
    lines = kspace[:, np.asarray(mask, dtype=bool)]
    periphery = np.concatenate([lines[..., :edge], lines[..., -edge:]], axis=-1)
    return float(np.median(np.abs(periphery)) / np.sqrt(np.log(2)))
