"""One slice made ready for the network: its SENSE operator, measured lines and zero-filled image.

Every stage (recon, detect, mitigate) and every path (gadgets, in process, benchmarks)
starts from the same :class:`PreparedSlice`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

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

    def image_tensor(self, image: np.ndarray) -> Tensor:
        """An image ``(y, x)`` of this slice (e.g. from the wire) as a ``(1, y, x)`` complex64
        tensor on the slice's device (a copy: wire arrays are read-only)."""
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.complex64))[None].to(self.y.device)

    def with_data(self, y: Tensor) -> PreparedSlice:
        """The same slice with other measured lines ``y`` (e.g. repaired ones)."""
        return PreparedSlice(self.op, y, self.op.adjoint(y))


def clock(tensor: Tensor) -> float:
    """``time.perf_counter()`` once the work queued on ``tensor``'s device is done: CUDA runs
    asynchronously, so a stage's seconds read without it would be the launch time only."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


def prepare(data: SliceKSpace, device: torch.device | str = "cpu") -> PreparedSlice:
    """Estimate coil maps from the ACS lines and build the operator, ``y`` and ``x_zf``."""
    kspace = torch.from_numpy(np.array(data.kspace)).to(device)
    return _prepared(kspace, estimate_coil_maps(kspace, data.acs), data)


def prepare_with_maps(data: SliceKSpace, maps: np.ndarray, device: torch.device | str = "cpu") -> PreparedSlice:
    """Like :func:`prepare`, with coil maps computed upstream (``(C, y, x)`` complex64)."""
    kspace = torch.from_numpy(np.array(data.kspace)).to(device)
    maps_t = torch.from_numpy(np.array(maps, dtype=np.complex64)).to(device)  # a writable copy (wire arrays are read-only)
    if maps_t.shape != kspace.shape:
        raise ValueError(f"coil maps {tuple(maps_t.shape)} do not match k-space {tuple(kspace.shape)}")
    return _prepared(kspace, maps_t, data)


def _prepared(kspace: Tensor, maps: Tensor, data: SliceKSpace) -> PreparedSlice:
    mask = torch.from_numpy(np.array(data.mask))[None].to(kspace.device)
    op = SenseOp(maps[None], mask)
    y = op.project(kspace[None])
    return PreparedSlice(op=op, y=y, x_zf=op.adjoint(y))
