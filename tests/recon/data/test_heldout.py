"""The held-out set: real brain images from another source and a loop-array coil model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.sets import raw_file
from recon.data import heldout
from recon.data.demo import make_demo
from recon.data.simulate import MEAN_RECEIVE, birdcage_maps, loop_array_maps
from recon.io.mrd import read_raw


def test_the_loop_array_has_the_head_arrays_mean_receive_and_a_weak_centre() -> None:
    maps = loop_array_maps(8, (64, 128), np.random.default_rng(1), extent=(1.0, 2.0))
    assert maps.shape == (8, 64, 128) and maps.dtype == np.complex64
    rss = np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))[:, 32:96]  # the object's field of view
    assert rss.mean() == pytest.approx(MEAN_RECEIVE, rel=0.02)
    # the rows of loops sit in front of and behind the object: its centre is the weakest part
    assert rss[32, 32] < 0.6 * rss[0].max() and rss[32, 32] < 0.6 * rss[-1].max()
    birdcage = np.sqrt(np.sum(np.abs(birdcage_maps(8, (64, 128), np.random.default_rng(1), radius=1.3, extent=(1.0, 2.0))) ** 2, axis=0))
    assert birdcage[:, 32:96].mean() == pytest.approx(MEAN_RECEIVE, abs=0.05)  # the constant is the head array's


def test_held_out_images_fill_any_matrix_in_the_unit_range() -> None:
    assert heldout.count() == 11
    for index, shape in ((0, (128, 128)), (10, (96, 128)), (12, (64, 48))):
        image = heldout.magnitude(index, shape, np.random.default_rng(index))
        assert image.shape == shape and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() == pytest.approx(1.0)
        assert (image > 0.1).mean() > 0.3  # a head that fills the field of view, not a dot
    assert np.array_equal(heldout.magnitude(3, (64, 64)), heldout.magnitude(3 + heldout.count(), (64, 64)))


def test_a_held_out_raw_file_reads_as_a_scan_of_the_demo_protocol(tmp_path: Path) -> None:
    raw, reference = raw_file("held-out", tmp_path / "held", seed=5, slices=2)
    scan = read_raw(raw)
    assert len(scan.slices) == 2 and reference.is_file()
    demo = read_raw(make_demo(tmp_path / "demo", seed=5, slices=(72, 77))[0])
    assert [s.kspace.shape for s in scan.slices] == [s.kspace.shape for s in demo.slices]
    with pytest.raises(ValueError, match="coil_model must be one of"):
        make_demo(tmp_path / "bad", coil_model="helmet")
    with pytest.raises(ValueError, match="set must be one of"):
        raw_file("mine", tmp_path / "bad", seed=1, slices=1)
