"""Brain slices from nilearn's bundled MNI152 2009 templates, with augmentation.

nilearn ships the 1 mm ICBM152 2009 T1 template and its grey/white-matter probability
maps inside its wheel, so they load offline. That is one smooth average brain, so
training adds diversity: random synthetic contrasts from the tissue maps, flips,
rotations, elastic warps and (in :mod:`recon.data.simulate`) random smooth phase, coil
maps and noise.

Split: the axial slab ``HELDOUT_AXIAL`` (MNI voxel z indices, through the ventricles) is
held out for validation and benchmarks; training uses the other axial slices, with a
margin, and every coronal and sagittal slice. Those cross the slab along one line each,
which is the only overlap (stated in the model card).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

HELDOUT_AXIAL = (70, 90)
TRAIN_MARGIN = 4
FOV_MM = 240.0
MIN_BRAIN_FRACTION = 0.05


@dataclass(frozen=True)
class Templates:
    """The MNI152 2009 volumes, ``(x, y, z)`` at 1 mm, values in [0, 1]."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray


@lru_cache(maxsize=1)
def load_templates() -> Templates:
    """Load the bundled templates (needs the ``data`` extra: ``pip install cycguard[data]``)."""
    try:
        from nilearn import datasets
    except ImportError as err:
        raise ImportError("training data need nilearn: pip install 'cycguard[data]'") from err
    t1 = datasets.load_mni152_template(resolution=1).get_fdata().astype(np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata().astype(np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata().astype(np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata().astype(np.float32)
    return Templates(t1=t1, gm=gm, wm=wm, brain=brain)


@dataclass(frozen=True, order=True)
class SliceRef:
    """One template slice: orientation (``axial``, ``coronal``, ``sagittal``) and index."""

    orientation: str
    index: int


_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def _take(volume: np.ndarray, ref: SliceRef) -> np.ndarray:
    plane = np.take(volume, ref.index, axis=_AXIS[ref.orientation])
    return np.flipud(plane.T)  # rows = second in-plane axis, anterior/superior up


def catalog(split: str) -> list[SliceRef]:
    """Slices with more than 5 % brain in ``split`` (``train`` or ``heldout``)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    brain = load_templates().brain > 0.5
    refs = []
    for orientation, axis in _AXIS.items():
        other = tuple(a for a in range(3) if a != axis)
        fraction = brain.mean(axis=other)
        for index in np.flatnonzero(fraction > MIN_BRAIN_FRACTION):
            ref = SliceRef(orientation, int(index))
            lo, hi = HELDOUT_AXIAL
            in_slab = orientation == "axial" and lo <= index < hi
            near_slab = orientation == "axial" and lo - TRAIN_MARGIN <= index < hi + TRAIN_MARGIN
            if split == "heldout" and in_slab:
                refs.append(ref)
            elif split == "train" and not near_slab:
                refs.append(ref)
    return refs


def heldout_axial(count: int) -> tuple[int, ...]:
    """The first ``count`` axial slices of the held-out slab (MNI z indices)."""
    lo, hi = HELDOUT_AXIAL
    if not 1 <= count <= hi - lo:
        raise ValueError(f"the held-out slab has {hi - lo} axial slices, asked for {count}")
    return tuple(range(lo, lo + count))


def _to_matrix(plane: np.ndarray, matrix: int) -> np.ndarray:
    """Centre in a ``FOV_MM`` square (1 mm voxels) and resample to ``matrix`` pixels."""
    side = int(FOV_MM)
    canvas = np.zeros((side, side), dtype=np.float32)
    h, w = min(plane.shape[0], side), min(plane.shape[1], side)
    py, px = (plane.shape[0] - h) // 2, (plane.shape[1] - w) // 2
    cy, cx = (side - h) // 2, (side - w) // 2
    canvas[cy : cy + h, cx : cx + w] = plane[py : py + h, px : px + w]
    smooth = ndimage.gaussian_filter(canvas, sigma=0.5 * side / matrix)
    return ndimage.zoom(smooth, matrix / side, order=1).astype(np.float32)


def contrast_image(ref: SliceRef, rng: np.random.Generator | None) -> np.ndarray:
    """The slice's T1 image, or (with ``rng``) a random synthetic tissue contrast, native grid."""
    t = load_templates()
    t1, gm, wm, brain = (_take(v, ref) for v in (t.t1, t.gm, t.wm, t.brain))
    if rng is None or rng.random() < 0.35:
        return t1 * (brain > 0.5)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    weights = rng.uniform(0.05, 1.0, size=3)
    image = weights[0] * gm + weights[1] * wm + weights[2] * csf + rng.uniform(0.0, 0.5) * t1
    return (image * (brain > 0.5)).astype(np.float32)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips, rotation (+-20 degrees) and a smooth elastic warp."""
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.2:
        image = image[::-1, :]
    image = ndimage.rotate(image, rng.uniform(-20, 20), reshape=False, order=1, mode="constant")
    shape = image.shape
    sigma, amplitude = shape[0] / 12, rng.uniform(0.0, 4.0)
    dy = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    dx = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    norm = max(np.abs(dy).max(), np.abs(dx).max(), 1e-12)
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    coords = [yy + amplitude * dy / norm, xx + amplitude * dx / norm]
    return ndimage.map_coordinates(image, coords, order=1, mode="constant").astype(np.float32)


def magnitude_slice(ref: SliceRef, matrix: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A ``(matrix, matrix)`` magnitude image in [0, 1]; augmented when ``rng`` is given."""
    image = contrast_image(ref, rng)
    if rng is not None:
        image = augment(image, rng)
    image = np.clip(_to_matrix(image, matrix), 0.0, None)
    return image / max(float(image.max()), 1e-6)


def shifted_slices(ref: SliceRef, offsets: Sequence[int], matrix: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The slice ``ref`` moved ``offsets`` voxels (1 mm each) along its own axis, one draw for all.

    Every image gets the contrast and augmentation that ``magnitude_slice(ref, matrix, rng)``
    draws, and ``rng`` advances as that call advances it, so offset 0 is exactly that call's
    image. All are scaled by offset 0's maximum: the same head, moved through the slice
    plane, as a patient who shifts between two scans is.

    Returns:
        one ``(matrix, matrix)`` float32 image per offset (offset 0 peaks at 1).
    """
    if 0 not in offsets:
        raise ValueError(f"offsets must include 0 (the slice itself), got {list(offsets)}")
    state = rng.bit_generator.state
    images = []
    for offset in offsets:
        rng.bit_generator.state = state
        image = augment(contrast_image(SliceRef(ref.orientation, ref.index + offset), rng), rng)
        images.append(np.clip(_to_matrix(image, matrix), 0.0, None))
    scale = max(float(images[list(offsets).index(0)].max()), 1e-6)
    return [(image / scale).astype(np.float32) for image in images]


def stream(split: str, matrix: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless augmented magnitude images drawn uniformly from ``split``."""
    refs = catalog(split)
    while True:
        yield magnitude_slice(refs[int(rng.integers(len(refs)))], matrix, rng)
