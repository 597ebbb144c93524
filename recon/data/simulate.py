"""Simulated acquisition: coil maps (birdcage-like or a loop array), smooth phase, correlated receiver noise.

All functions take an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from recon.physics.fft import fft2c

SOFTENING = 0.4  # in units of the object's half field of view
MEAN_RECEIVE = 0.8  # root-sum-of-squares of birdcage_maps averaged over the object's field of view


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


def loop_array_maps(
    coils: int,
    shape: tuple[int, int],
    rng: np.random.Generator,
    extent: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Receive fields of a flat loop array: half the loops in a row in front of the object,
    half behind it (as a body array's anterior and posterior elements), each a circular loop
    of radius ``a`` seen in its own plane's normal, whose sensitivity falls as
    ``a^2 / (a^2 + d^2)^(3/2)`` with the distance ``d`` (a loop's on-axis field), with a phase
    that turns with the angle off the loop's axis. Steeper and less even than
    :func:`birdcage_maps`: the object's centre is the array's weakest point.

    ``extent`` as for :func:`birdcage_maps`. Returns ``(C, y, x)`` complex64, scaled so that
    the root-sum-of-squares averages :data:`MEAN_RECEIVE` over the object's field of view, as
    a head array of :func:`birdcage_maps` does: the same receive efficiency, distributed
    differently (peaks near the loops, about 1.6).
    """
    ny, nx = shape
    front = (coils + 1) // 2
    standoff = float(rng.uniform(1.15, 1.4))  # the rows' distance from the centre, half-FOVs
    loop = float(rng.uniform(0.7, 0.9))  # loop radius, half-FOVs
    tilt = float(rng.uniform(-0.15, 0.15))
    y, x = np.meshgrid(np.linspace(-extent[0], extent[0], ny), np.linspace(-extent[1], extent[1], nx), indexing="ij")
    maps = np.empty((coils, ny, nx), dtype=np.complex64)
    for c in range(coils):
        row, count = (0, front) if c < front else (1, coils - front)
        slot = c if row == 0 else c - front
        cx = (slot + 0.5) / count * 2.0 - 1.0 + float(rng.uniform(-0.05, 0.05))
        cy = (-standoff if row == 0 else standoff) + tilt * cx
        depth, lateral = np.abs(y - cy), x - cx
        distance2 = depth**2 + lateral**2
        amplitude = loop**2 / (loop**2 + distance2) ** 1.5
        phase = np.arctan2(lateral, depth) + float(rng.uniform(0, 2 * np.pi))
        maps[c] = amplitude * np.exp(1j * phase)
    rss = np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))
    inside = (np.abs(y) <= 1) & (np.abs(x) <= 1)
    return (maps * (MEAN_RECEIVE / rss[inside].mean())).astype(np.complex64)


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
