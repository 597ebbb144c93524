"""Receiver noise: covariance from noise scans, prewhitening, readout oversampling removal."""

from __future__ import annotations

import numpy as np
import torch

from recon.physics.fft import fftc, ifftc

GADGETRON_RECEIVER_BANDWIDTH = 0.793
"""The relative receiver noise bandwidth Gadgetron's NoiseAdjust assumes when the header has none."""


def noise_covariance(samples: np.ndarray) -> np.ndarray:
    """Channel noise covariance ``(C, C)`` from noise-scan samples ``(C, N)`` (complex).

    As Gadgetron's NoiseAdjustGadget estimates it: ``sum(x x^H) / (N - 1)`` over every
    sample, the mean not removed (receiver noise has none; a DC offset counts as noise).
    """
    if samples.ndim != 2 or samples.shape[1] < samples.shape[0]:
        raise ValueError(
            f"noise samples must be (coils, n) with n >= coils, got shape {samples.shape}"
        )
    samples = samples.astype(np.complex128)
    return (samples @ samples.conj().T) / (samples.shape[1] - 1)


def prewhitening_scale(data_dwell_us: float, noise_dwell_us: float, receiver_bandwidth: float) -> float:
    """The factor Gadgetron's NoiseAdjust puts on the prewhitening matrix.

    ``sqrt(2 * data dwell / noise dwell * relative receiver noise bandwidth)``; 1 when either
    dwell time is unknown (zero). Data whitened with it have a noise standard deviation of
    :func:`whitened_sigma` per complex sample, not 1.
    """
    if not data_dwell_us or not noise_dwell_us:
        return 1.0
    return float(np.sqrt(2.0 * data_dwell_us / noise_dwell_us * receiver_bandwidth))


def whitened_sigma(data_dwell_us: float, receiver_bandwidth: float) -> float:
    """Noise standard deviation per complex sample of data prewhitened as Gadgetron does.

    ``sqrt(2 * bandwidth)`` (1.259 for the default 0.793) when the data carry a dwell time,
    1 when they do not (Gadgetron then scales by 1). CycGuard divides whitened k-space by it,
    so its network and detector work in units of the noise level whichever front end ran.
    """
    return float(np.sqrt(2.0 * receiver_bandwidth)) if data_dwell_us else 1.0


def whitening_matrix(covariance: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``W`` with ``W Psi W^H = scale^2 I``: the inverse Cholesky factor of the noise covariance.

    Applied to data as ``W @ data`` over the coil axis, it makes the channels' noise
    independent with variance ``scale^2`` (with the default 1, k-space is in units of the
    noise level; Gadgetron's NoiseAdjust uses :func:`prewhitening_scale`).
    """
    try:
        lower = np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError as err:
        raise ValueError("noise covariance is not positive definite (dead or duplicated channel?)") from err
    return (np.linalg.inv(lower) * scale).astype(np.complex64)


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
