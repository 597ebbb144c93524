"""The bundled demo raw file: a few held-out MNI152 slices as a realistic ISMRMRD scan.

``cycguard make-demo`` writes, from nilearn's bundled template:

* ``demo_raw.h5``: 4 axial slices from the held-out slab, 8 coils, 2x readout
  oversampling, correlated receiver noise with 4 noise-scan acquisitions, equispaced
  R = 4 (a different offset per slice) plus a 16-line ACS block flagged
  ``PARALLEL_CALIBRATION_AND_IMAGING``; only acquired lines are stored.
* ``demo_reference.h5``: per slice the fully sampled reference, read through the same
  path (prewhitening, readout-oversampling removal, coil maps from the same ACS lines)
  and combined with those maps, stored as complex ISMRMRD images.

The files are committed; regenerating them with the same seed gives the same data.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from recon.data import mni
from recon.data.simulate import (
    birdcage_maps,
    complex_noise,
    loop_array_maps,
    noise_cholesky,
    simulate_kspace,
    smooth_phase,
)
from recon.io.mrd import read_raw
from recon.io.mrd_write import ScanDescription, write_images, write_raw
from recon.physics.coils import estimate_coil_maps
from recon.physics.masks import MaskFamily
from recon.physics.sense import SenseOp
from recon.types import ReconImage, SliceGeometry

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_RAW = DEMO_DIR / "demo_raw.h5"
DEMO_REFERENCE = DEMO_DIR / "demo_reference.h5"
DEMO_SLICES = (72, 77, 82, 87)  # MNI z indices, inside mni.HELDOUT_AXIAL
NOISE_STD = 0.012
NOISE_SCANS = 4
COIL_MODELS = ("birdcage", "loop-array")


def make_demo(
    out_dir: Path = DEMO_DIR, seed: int = 2026, slices: tuple[int, ...] = DEMO_SLICES, desc: ScanDescription | None = None,
    magnitudes: Sequence[np.ndarray] | None = None, acs_lines: int = 16, coil_model: str = "birdcage",
) -> tuple[Path, Path]:
    """Write the demo raw file and its reference (``slices``: MNI axial z indices; ``desc``: the
    scan's header, the demo's by default; ``magnitudes``: other objects instead of the MNI
    slices, ``(y, x)`` in [0, 1] at the scan's matrix, filling its field of view; ``coil_model``: ``birdcage`` or ``loop-array``,
    :mod:`recon.data.simulate`); returns their paths."""
    if coil_model not in COIL_MODELS:
        raise ValueError(f"coil_model must be one of {sorted(COIL_MODELS)}, got {coil_model!r}")
    rng = np.random.default_rng(seed)
    desc = desc or ScanDescription()
    family = MaskFamily("equispaced", desc.acceleration, acs_lines)
    ny, nx = desc.matrix
    os_factor = desc.readout_oversampling
    coils = desc.coils
    if coil_model == "birdcage":
        maps = birdcage_maps(coils, (ny, nx * os_factor), rng, radius=1.3, extent=(1.0, float(os_factor)))
    else:
        maps = loop_array_maps(coils, (ny, nx * os_factor), rng, extent=(1.0, float(os_factor)))
    chol = noise_cholesky(coils, rng)
    kspaces, masks, geometries = [], [], []
    if magnitudes is not None:
        slices = tuple(DEMO_SLICES[0] + 5 * n for n in range(len(magnitudes)))
    for n, z in enumerate(slices):
        magnitude = mni.magnitude_slice(mni.SliceRef("axial", z), ny) if magnitudes is None else magnitudes[n]
        phase = smooth_phase((ny, nx), rng, max_radians=np.pi / 2)
        obj = np.zeros((ny, nx * os_factor), np.complex64)
        x0 = (nx * os_factor - nx) // 2
        obj[:, x0 : x0 + nx] = magnitude * np.exp(1j * phase)
        kspaces.append(simulate_kspace(obj, maps, NOISE_STD, chol, rng))
        masks.append(family.equispaced(ny, n % desc.acceleration))
        z_mm = (z - 72) * 1.0 + 20.0
        geometries.append(SliceGeometry(position=(0.0, 0.0, z_mm), fov_mm=(*desc.fov_mm, desc.slice_thickness_mm)))
    noise = NOISE_STD * np.einsum("ij,jn->in", chol, complex_noise((coils, NOISE_SCANS * nx * os_factor), rng))
    acs = family.acs_mask(ny)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = write_raw(out_dir / "demo_raw.h5", desc, kspaces, masks, acs, geometries, noise)
    with tempfile.TemporaryDirectory() as tmp:
        full = write_raw(Path(tmp) / "full.h5", desc, kspaces, [np.ones(ny, bool)] * len(kspaces), acs, geometries, noise)
        full_scan = read_raw(full)
    under_scan = read_raw(raw)
    references = []
    for under, complete in zip(under_scan.slices, full_scan.slices, strict=True):
        coil_maps = estimate_coil_maps(torch.from_numpy(np.array(under.kspace)), under.acs)
        op = SenseOp(coil_maps[None], torch.ones((1, ny), dtype=torch.bool))
        image = op.adjoint(torch.from_numpy(np.array(complete.kspace))[None])[0].numpy()
        references.append(ReconImage(image, under.key, under.geometry, (("CycGuard.Role", "reference"),)))
    reference = out_dir / "demo_reference.h5"
    reference.unlink(missing_ok=True)
    write_images(reference, references, xml=under_scan.xml, magnitude=False)
    return raw, reference
