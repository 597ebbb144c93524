"""The pure reconstruction pipeline: one slice of k-space in, one image out, with timings.

Gadgets, the replay runner, benchmarks and tests all call this same core. Per slice:
coil maps from the ACS block, the SENSE operator for the slice's mask, the zero-filled
image ``x_zf = E^H y``, and the network ``f(x_zf; E)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recon.models.modl import MoDL
from recon.physics.coils import estimate_coil_maps
from recon.physics.sense import SenseOp
from recon.types import SliceKSpace


@dataclass(frozen=True, eq=False)
class PreparedSlice:
    """What every stage reuses for one slice (torch tensors with a batch axis of 1).

    Attributes:
        op: SENSE operator with the slice's estimated coil maps and its mask.
        y: ``(1, C, ky, kx)`` measured k-space on the sampled lines.
        x_zf: ``(1, y, x)`` zero-filled image ``E^H y``.
    """

    op: SenseOp
    y: Tensor
    x_zf: Tensor


@dataclass(frozen=True, eq=False)
class SliceResult:
    """A reconstructed slice and how long each stage took (seconds)."""

    image: np.ndarray
    prepared: PreparedSlice
    timings: tuple[tuple[str, float], ...]


def prepare(data: SliceKSpace, device: torch.device | str = "cpu") -> PreparedSlice:
    """Estimate coil maps from the ACS lines and build the operator, ``y`` and ``x_zf``."""
    kspace = torch.from_numpy(np.array(data.kspace)).to(device)
    maps = estimate_coil_maps(kspace, data.acs)
    mask = torch.from_numpy(np.array(data.mask))[None].to(device)
    op = SenseOp(maps[None], mask)
    y = op.project(kspace[None])
    return PreparedSlice(op=op, y=y, x_zf=op.adjoint(y))


@torch.no_grad()
def reconstruct(data: SliceKSpace, model: MoDL, device: torch.device | str = "cpu") -> SliceResult:
    """Reconstruct one slice with the network.

    Returns:
        The ``(y, x)`` complex64 image, the prepared operator and data, and timings of the
        ``prepare`` and ``network`` stages.
    """
    t0 = time.perf_counter()
    prepared = prepare(data, device)
    t1 = time.perf_counter()
    image = model(prepared.x_zf, prepared.op)[0]
    t2 = time.perf_counter()
    return SliceResult(
        image=image.cpu().numpy().astype(np.complex64),
        prepared=prepared,
        timings=(("prepare", t1 - t0), ("network", t2 - t1)),
    )
