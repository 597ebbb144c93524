"""The held-out set: an anatomy source and a coil model that nothing is trained, tuned or
calibrated on, for measuring how the product's figures generalise.

* **Anatomy**: dipy's bundled real brain images, the ten axial slices of its ``S0_10slices``
  volume (a b = 0 diffusion acquisition, 128x128, other subject, scanner and contrast than
  the MNI152 template) and its 256x256 ``t1_coronal_slice`` (another orientation). They ship
  with the ``dipy`` package; nothing is downloaded.
* **Coil model**: :func:`recon.data.simulate.loop_array_maps`, flat arrays of loops in front
  of and behind the object, against the training data's loops on an ellipse around it
  (:func:`recon.data.simulate.birdcage_maps`).

The network (``recon.train``), the shipped calibration and ``cycguard calibrate --like``
draw from the MNI152 template and the birdcage model only; an import-linter contract
(``setup.cfg``) keeps this module out of them. Only benchmarks read it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

ANATOMY = "dipy real brains (S0_10slices axial b=0, t1_coronal_slice)"
COIL_MODEL = "loop array (anterior and posterior rows of surface loops)"


def _files() -> str:
    import dipy.data

    return os.path.join(os.path.dirname(dipy.data.__file__), "files")


@lru_cache(maxsize=1)
def _planes() -> tuple[np.ndarray, ...]:
    """Every held-out image, native grid, float32, each scaled to peak at 1."""
    import nibabel as nib

    image: Any = nib.load(os.path.join(_files(), "S0_10slices.nii.gz"))
    volume = np.asarray(image.get_fdata(), np.float32)[..., 0]
    planes = [np.rot90(volume[:, :, z]) for z in range(volume.shape[2])]
    planes.append(np.load(os.path.join(_files(), "t1_coronal_slice.npy")).astype(np.float32))
    return tuple(_head_in_view(_scaled(p)) for p in planes)


def _scaled(plane: np.ndarray) -> np.ndarray:
    """Scaled so that the head's 99th percentile is 1, the brightest 1 % clipped: a b = 0
    image scaled to its peak is dominated by CSF and eyes, and its brain would reach the
    product at a fraction of the training images' signal level (a different SNR, which the
    coverage benchmark measures, not a different anatomy)."""
    plane = plane / max(float(plane.max()), 1e-6)
    head = plane[plane > 0.1]
    return np.clip(plane / float(np.quantile(head, 0.99)), 0.0, 1.0).astype(np.float32)


def _head_in_view(plane: np.ndarray, margin: float = 0.12) -> np.ndarray:
    """The square around the head (pixels above a tenth of the peak) with ``margin`` of its
    size on each side: a head prescribed to fill the field of view, as a head scan is."""
    rows, cols = np.nonzero(plane > 0.1)
    centre = ((rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2)
    half = int(max(rows.max() - rows.min(), cols.max() - cols.min()) * (0.5 + margin))
    padded = np.pad(plane, half)
    y, x = centre[0] + half, centre[1] + half
    return padded[y - half : y + half, x - half : x + half].astype(np.float32)


def count() -> int:
    """How many distinct held-out images there are."""
    return len(_planes())


def magnitude(index: int, shape: tuple[int, int], rng: np.random.Generator | None = None) -> np.ndarray:
    """Held-out image ``index`` (modulo :func:`count`) as a ``shape`` magnitude in [0, 1]
    filling the field of view as a head does; with ``rng`` a random flip and a rotation of up
    to 10 degrees (a different pose, not a different anatomy)."""
    image = _planes()[index % count()]
    if rng is not None:
        if rng.random() < 0.5:
            image = image[:, ::-1]
        image = ndimage.rotate(image, rng.uniform(-10, 10), reshape=False, order=1, mode="constant")
    ny, nx = shape
    side = max(image.shape)
    canvas = np.zeros((side, side), np.float32)
    y0, x0 = (side - image.shape[0]) // 2, (side - image.shape[1]) // 2
    canvas[y0 : y0 + image.shape[0], x0 : x0 + image.shape[1]] = image
    smooth = ndimage.gaussian_filter(canvas, sigma=0.5 * side / min(ny, nx))
    out = ndimage.zoom(smooth, (ny / side, nx / side), order=1)[:ny, :nx]
    out = np.clip(out, 0.0, None)
    return (out / max(float(out.max()), 1e-6)).astype(np.float32)
