"""Data containers shared by every layer, with the one axis order of the project.

Axis order, stated once and never permuted silently:

* k-space of one slice: ``(coil, ky, kx)``: ``ky`` is the phase-encode line
  (ISMRMRD ``kspace_encode_step_1``), ``kx`` the readout sample.
* image of one slice: ``(y, x)``, so that the 2-D centred FFT maps image ``(y, x)``
  to k-space ``(ky, kx)``.
* batched tensors put a leading batch axis in front: ``(batch, coil, ky, kx)`` and
  ``(batch, y, x)``.
* line masks: ``(ky,)`` booleans, ``True`` where a line was acquired.

Containers hold numpy arrays (the I/O boundary speaks numpy); compute modules convert to
torch. Arrays are made read-only on construction so that a container is immutable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


def _freeze(name: str, array: np.ndarray, ndim: int, dtype: type) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    out: np.ndarray = np.ascontiguousarray(array, dtype=dtype)
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class SliceGeometry:
    """Where a slice sits in the scanner (patient coordinate system, millimetres).

    Attributes:
        position: centre of the slice, (x, y, z) mm.
        read_dir: unit vector of the readout (image x) axis.
        phase_dir: unit vector of the phase-encode (image y) axis.
        slice_dir: unit vector normal to the slice.
        fov_mm: reconstructed field of view (x, y, z) in mm; z is the slice thickness.
    """

    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    read_dir: tuple[float, float, float] = (1.0, 0.0, 0.0)
    phase_dir: tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)
    fov_mm: tuple[float, float, float] = (240.0, 240.0, 5.0)


@dataclass(frozen=True, order=True)
class SliceKey:
    """Identifies one 2-D dataset of a scan (ISMRMRD ``idx`` counters)."""

    slice: int = 0
    contrast: int = 0
    repetition: int = 0
    set: int = 0
    phase: int = 0


@dataclass(frozen=True)
class SliceKSpace:
    """Undersampled multi-coil k-space of one slice, ready for reconstruction.

    Attributes:
        kspace: ``(coil, ky, kx)`` complex64 on the full Cartesian grid; lines not
            acquired are zero. Noise-prewhitened and readout oversampling removed when
            read through :mod:`recon.io.mrd`.
        mask: ``(ky,)`` bool, lines used for imaging (the sampling pattern Omega).
        acs: ``(ky,)`` bool, lines usable for coil calibration (a contiguous block).
        key: ISMRMRD counters of this slice.
        geometry: position and orientation.
    """

    kspace: np.ndarray
    mask: np.ndarray
    acs: np.ndarray
    key: SliceKey = field(default_factory=SliceKey)
    geometry: SliceGeometry = field(default_factory=SliceGeometry)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kspace", _freeze("kspace", self.kspace, 3, np.complex64))
        object.__setattr__(self, "mask", _freeze("mask", self.mask, 1, np.bool_))
        object.__setattr__(self, "acs", _freeze("acs", self.acs, 1, np.bool_))
        ny = self.kspace.shape[1]
        if self.mask.shape != (ny,) or self.acs.shape != (ny,):
            raise ValueError(
                f"mask {self.mask.shape} and acs {self.acs.shape} must both be ({ny},) "
                f"to match kspace {self.kspace.shape}"
            )
        if not self.mask.any():
            raise ValueError("mask selects no line")

    @property
    def coils(self) -> int:
        """Number of receive channels."""
        return int(self.kspace.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Image matrix ``(ny, nx)``."""
        return int(self.kspace.shape[1]), int(self.kspace.shape[2])

    @property
    def acceleration(self) -> float:
        """Effective acceleration: lines on the grid over lines acquired for imaging."""
        return float(self.mask.size / self.mask.sum())

    def with_measured(self, lines: np.ndarray) -> SliceKSpace:
        """This slice with the lines of ``mask`` taken from ``lines`` (``(coil, ky, kx)``, e.g. a
        perturbed ``y``); every other line, the ACS block outside the mask included, is kept."""
        kspace = np.array(self.kspace)
        rows = np.flatnonzero(self.mask)
        kspace[:, rows, :] = np.asarray(lines)[:, rows, :]
        return replace(self, kspace=kspace)


@dataclass(frozen=True)
class ReconImage:
    """A reconstructed complex image of one slice.

    Attributes:
        image: ``(y, x)`` complex64.
        key: counters of the slice it came from.
        geometry: position and orientation.
        meta: string-valued annotations (ISMRMRD image meta / DICOM provenance); a tuple of
            strings is a multi-valued entry.
    """

    image: np.ndarray
    key: SliceKey = field(default_factory=SliceKey)
    geometry: SliceGeometry = field(default_factory=SliceGeometry)
    meta: tuple[tuple[str, str | tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", _freeze("image", self.image, 2, np.complex64))
