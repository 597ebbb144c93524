"""Simulated acquisition: birdcage-like coil maps, smooth phase, correlated receiver noise.

All functions take an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from recon.physics.fft import fft2c

SOFTENING = 0.4  # in units of the object's half field of view


def birdcage_maps(
    coils: int,
    shape: tuple[int, int],
    rng: np.random.Generator,
    radius: float | None = None,
    extent: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Receive fields of ``coils`` loops on an ellipse around the field of view.

    Each coil's sensitivity falls off with distance from its centre and carries a phase
    that winds with the angle around it (as for loops on a birdcage former). Radius,
    rotation and ellipticity are drawn from ``rng`` unless ``radius`` is given.

    ``extent`` is the half-width of the grid along (y, x) in units of the object's half
    field of view (``(1, 2)`` for a readout oversampled twice).

    Returns:
        ``(C, y, x)`` complex64, scaled so that the root-sum-of-squares peaks at 1 within
        the object's field of view.
    """
    ny, nx = shape
    radius = float(rng.uniform(1.2, 1.6)) if radius is None else radius
    rotation = float(rng.uniform(0, 2 * np.pi))
    aspect = float(rng.uniform(0.85, 1.15))
    y, x = np.meshgrid(np.linspace(-extent[0], extent[0], ny), np.linspace(-extent[1], extent[1], nx), indexing="ij")
    maps = np.empty((coils, ny, nx), dtype=np.complex64)
    for c in range(coils):
        angle = rotation + 2 * np.pi * c / coils
        cx, cy = radius * np.cos(angle) * aspect, radius * np.sin(angle) / aspect
        dx, dy = x - cx, y - cy
        # softened 1/r fall-off: a loop's field is finite at its own conductor, and a head
        # array's combined receive field varies by ~1.5x between centre and edge
        distance = np.sqrt(dx**2 + dy**2 + SOFTENING**2)
        phase = np.arctan2(dx, -dy) - angle
        maps[c] = np.exp(1j * phase) / distance
    rss = np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))
    inside = (np.abs(y) <= 1) & (np.abs(x) <= 1)  # the object's field of view
    return (maps / rss[inside].max()).astype(np.complex64)


def smooth_phase(shape: tuple[int, int], rng: np.random.Generator, max_radians: float = np.pi) -> np.ndarray:
    """A random smooth phase map (Gaussian-filtered noise plus a linear ramp), radians."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=min(shape) / 6, mode="wrap")
    field /= np.abs(field).max() + 1e-12
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    ramp = rng.uniform(-0.5, 0.5) * x + rng.uniform(-0.5, 0.5) * y
    return (max_radians * (0.8 * field + ramp)).astype(np.float32)


def noise_cholesky(coils: int, rng: np.random.Generator, correlation: float = 0.2) -> np.ndarray:
    """Cholesky factor of a random receiver noise covariance (unit mean variance).

    Channels get variances in [0.7, 1.3] and pairwise correlations of about ``correlation``.
    """
    mix = np.eye(coils) + correlation * (rng.standard_normal((coils, coils)) + 1j * rng.standard_normal((coils, coils))) / np.sqrt(2 * coils)
    cov = mix @ mix.conj().T
    scale = np.sqrt(rng.uniform(0.7, 1.3, coils))
    cov = cov * np.outer(scale, scale)
    cov *= coils / np.trace(cov).real
    return np.linalg.cholesky(cov).astype(np.complex64)


def complex_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Circular complex Gaussian noise with unit variance per sample."""
    return ((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)).astype(np.complex64)


def simulate_kspace(
    image: np.ndarray,
    maps: np.ndarray,
    noise_std: float,
    chol: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Fully sampled multi-coil k-space ``(C, ky, kx)`` of ``image`` with correlated noise.

    Args:
        image: ``(y, x)`` complex object.
        maps: ``(C, y, x)`` coil sensitivities.
        noise_std: noise standard deviation per k-space sample (before correlation).
        chol: ``(C, C)`` Cholesky factor of the channel noise covariance.
        rng: random generator.
    """
    clean = fft2c(torch.from_numpy((maps * image[None]).astype(np.complex64))).numpy()
    white = complex_noise(clean.shape, rng)
    correlated = np.einsum("ij,jyx->iyx", chol, white)
    return (clean + noise_std * correlated).astype(np.complex64)
