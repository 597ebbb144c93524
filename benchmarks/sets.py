"""The two data sets every product-path defense figure is measured on, side by side.

* ``training-like``: what the network and the shipped calibration were made from, on slices
  they never saw: the MNI152 template's held-out axial slab (``recon.data.mni``), loops on an
  ellipse around the head (``birdcage_maps``).
* ``held-out``: an anatomy source and a coil model that nothing in the product was trained,
  tuned or calibrated on (``recon.data.heldout``): dipy's real brain images and a flat loop
  array in front of and behind the head (``loop_array_maps``).

Both are written as raw files in the demo protocol by ``recon.data.demo.make_demo`` (8 coils,
R = 4 + 16 ACS, 2x readout oversampling, noise scans; a seed draws the coil maps, phase and
noise) and go through the product's path from there. Nothing is tuned on ``held-out``: its
figures are reported as they come.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recon.data import heldout, mni
from recon.data.demo import make_demo
from recon.io.mrd_write import ScanDescription

SETS = ("training-like", "held-out")


def describe(name: str) -> str:
    """One line: the anatomy source and the coil model of set ``name``."""
    if name == "training-like":
        return "MNI152 held-out axial slab, birdcage-like loops around the head"
    return f"{heldout.ANATOMY}; {heldout.COIL_MODEL}"


def raw_file(
    name: str, folder: Path, seed: int, slices: int, desc: ScanDescription | None = None, acs_lines: int = 16
) -> tuple[Path, Path]:
    """A raw file of ``slices`` slices of set ``name`` and its fully sampled reference, in the
    demo protocol or the one ``desc`` and ``acs_lines`` give (a rectangular matrix takes the
    square anatomy image cropped about its centre)."""
    if name not in SETS:
        raise ValueError(f"set must be one of {SETS}, got {name!r}")
    desc = desc or ScanDescription()
    ny, nx = desc.matrix
    if name == "training-like" and ny == nx:
        return make_demo(folder, seed=seed, slices=mni.heldout_axial(slices), desc=desc, acs_lines=acs_lines)
    rng = np.random.default_rng(seed)
    if name == "training-like":
        side = max(ny, nx)
        rows, cols = slice((side - ny) // 2, (side - ny) // 2 + ny), slice((side - nx) // 2, (side - nx) // 2 + nx)
        images = [mni.magnitude_slice(mni.SliceRef("axial", z), side)[rows, cols] for z in mni.heldout_axial(slices)]
        return make_demo(folder, seed=seed, desc=desc, magnitudes=images, acs_lines=acs_lines)
    images = [heldout.magnitude(seed + n, (ny, nx), rng) for n in range(slices)]
    return make_demo(folder, seed=seed, desc=desc, magnitudes=images, acs_lines=acs_lines, coil_model="loop-array")
