"""From a magnitude image to a training/evaluation sample, exactly as the scanner path sees it.

The object gets a smooth phase, is observed through simulated coils with correlated noise,
and then goes through the same steps as real data: coil maps estimated from the ACS lines
of the noisy k-space, the reference is the fully sampled data combined with those maps
(the paper's convention), and the network input is the undersampled zero-filled image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recon.data.simulate import birdcage_maps, noise_cholesky, simulate_kspace, smooth_phase
from recon.physics.coils import estimate_coil_maps
from recon.physics.masks import MaskFamily
from recon.physics.sense import SenseOp


@dataclass(frozen=True)
class Sample:
    """One simulated slice (torch tensors, no batch axis).

    Attributes:
        kspace_full: ``(C, ky, kx)`` complex64 fully sampled noisy k-space.
        maps: ``(C, y, x)`` coil maps estimated from the ACS block.
        mask: ``(ky,)`` bool sampling mask drawn from the family.
        reference: ``(y, x)`` complex64, fully sampled data combined with ``maps``.
        truth: ``(y, x)`` complex64 noiseless object (before coil weighting).
        noise_std: noise standard deviation per k-space sample.
    """

    kspace_full: Tensor
    maps: Tensor
    mask: Tensor
    reference: Tensor
    truth: Tensor
    noise_std: float


def make_sample(
    magnitude: np.ndarray,
    family: MaskFamily,
    coils: int,
    rng: np.random.Generator,
    noise_range: tuple[float, float] = (0.005, 0.04),
) -> Sample:
    """Simulate an acquisition of ``magnitude`` (``(y, x)``, values in [0, 1])."""
    shape = (int(magnitude.shape[0]), int(magnitude.shape[1]))
    truth = (magnitude * np.exp(1j * smooth_phase(shape, rng))).astype(np.complex64)
    true_maps = birdcage_maps(coils, shape, rng)
    noise_std = float(np.exp(rng.uniform(np.log(noise_range[0]), np.log(noise_range[1]))))
    kspace = torch.from_numpy(simulate_kspace(truth, true_maps, noise_std, noise_cholesky(coils, rng), rng))
    acs = family.acs_mask(shape[0])
    maps = estimate_coil_maps(kspace, acs)
    mask = torch.from_numpy(family.sample(shape[0], rng))
    full = SenseOp(maps[None], torch.ones((1, shape[0]), dtype=torch.bool))
    reference = full.adjoint(kspace[None])[0]
    return Sample(kspace, maps, mask, reference, torch.from_numpy(truth), noise_std)


def batch_inputs(samples: list[Sample]) -> tuple[Tensor, SenseOp, Tensor, Tensor]:
    """Stack samples into ``(x_zf, op, y, reference)`` for the network."""
    maps = torch.stack([s.maps for s in samples])
    mask = torch.stack([s.mask for s in samples])
    op = SenseOp(maps, mask)
    y = op.project(torch.stack([s.kspace_full for s in samples]))
    reference = torch.stack([s.reference for s in samples])
    return op.adjoint(y), op, y, reference


def simulated_slices(
    split: str,
    count: int,
    family: MaskFamily,
    coils: int,
    seed: int,
    augment: bool = True,
    matrix: int = 128,
) -> list[Sample]:
    """``count`` simulated acquisitions of MNI152 slices from ``split`` (``train``/``heldout``).

    With ``augment`` each draw gets a random contrast, flips, rotation and warp, so a
    20-slice held-out slab yields hundreds of distinct clean slices (coils, phase, noise
    and mask are always drawn anew).
    """
    from recon.data import mni

    rng = np.random.default_rng(seed)
    refs = mni.catalog(split)
    out = []
    for i in range(count):
        ref = refs[i % len(refs)] if not augment else refs[int(rng.integers(len(refs)))]
        image = mni.magnitude_slice(ref, matrix, rng if augment else None)
        out.append(make_sample(image, family, coils, rng))
    return out
