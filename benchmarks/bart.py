"""Calling Debian's ``bart`` on our arrays: CFL files in a temporary folder, ``bart pics``."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np


def write_cfl(stem: Path, array: np.ndarray) -> None:
    """Write ``stem.hdr`` / ``stem.cfl`` (BART dims in Fortran order, complex64)."""
    dims = list(array.shape) + [1] * (16 - array.ndim)
    stem.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    np.asfortranarray(array, dtype=np.complex64).ravel(order="F").tofile(stem.with_suffix(".cfl"))


def read_cfl(stem: Path) -> np.ndarray:
    """Read a CFL pair written by BART."""
    dims = [int(d) for d in stem.with_suffix(".hdr").read_text().splitlines()[1].split()]
    data = np.fromfile(stem.with_suffix(".cfl"), dtype=np.complex64)
    return data.reshape(dims, order="F")


def bart_binary() -> str:
    """Path of the ``bart`` binary, or an error saying how to install it."""
    path = shutil.which("bart")
    if path is None:
        raise FileNotFoundError("bart not found: apt-get install bart")
    return path


def pics_l1_wavelet(kspace: np.ndarray, maps: np.ndarray, lam: float, iterations: int = 50) -> np.ndarray:
    """``bart pics -S -R W:3:0:lam`` (l1-wavelet, FISTA) on one slice.

    Args:
        kspace: ``(C, ky, kx)`` with zeros on unsampled lines.
        maps: ``(C, y, x)`` coil sensitivities (the same the other methods use).
        lam: l1-wavelet weight.
        iterations: FISTA iterations.

    Returns:
        ``(y, x)`` complex64 image.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # BART dims: 0 readout (x), 1 phase (y), 3 coils
        write_cfl(folder / "ksp", np.transpose(kspace, (2, 1, 0))[:, :, None, :])
        write_cfl(folder / "sens", np.transpose(maps, (2, 1, 0))[:, :, None, :])
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        subprocess.run(
            [bart_binary(), "pics", "-S", "-i", str(iterations), "-R", f"W:3:0:{lam}", str(folder / "ksp"), str(folder / "sens"), str(folder / "out")],
            check=True,
            capture_output=True,
            env=env,
        )
        out = read_cfl(folder / "out")
    return np.ascontiguousarray(out.reshape(out.shape[0], out.shape[1]).T).astype(np.complex64)
