"""ISMRMRD raw I/O: round trips, ismrmrd-tools files, coil maps, and every malformed case."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest
import torch

from recon.io.mrd import MRDError, read_raw
from recon.io.mrd_write import ScanDescription, read_images, write_images
from recon.physics.coils import estimate_coil_maps, map_similarity
from recon.physics.masks import MaskFamily
from recon.types import ReconImage, SliceGeometry, SliceKey


def test_raw_round_trip(small_raw: tuple[Path, ScanDescription, np.ndarray]) -> None:
    path, desc, _ = small_raw
    scan = read_raw(path, prewhiten=False)
    assert scan.protocol.encoded == (32, 64) and scan.protocol.recon == (32, 32)
    assert scan.protocol.coils == 4 and scan.protocol.acceleration == 2
    assert len(scan.slices) == 2
    family = MaskFamily("equispaced", 2, 8)
    for n, data in enumerate(scan.slices):
        assert data.kspace.shape == (4, 32, 32)  # readout oversampling removed
        np.testing.assert_array_equal(data.mask, family.equispaced(32, n))
        np.testing.assert_array_equal(data.acs, family.acs_mask(32))
        assert not data.kspace[:, ~data.mask].any()  # only acquired lines carry data
        assert data.key == SliceKey(slice=n)
        assert data.geometry.position == (0.0, 0.0, 5.0 * n)
    assert scan.noise_covariance is not None


def test_a_slice_with_other_measured_lines_keeps_everything_else(small_raw: tuple[Path, ScanDescription, np.ndarray]) -> None:
    data = read_raw(small_raw[0]).slices[0]
    lines = np.full(data.kspace.shape, 7 + 1j, np.complex64)
    moved = data.with_measured(lines)
    np.testing.assert_array_equal(moved.kspace[:, data.mask], lines[:, data.mask])
    np.testing.assert_array_equal(moved.kspace[:, ~data.mask], data.kspace[:, ~data.mask])  # ACS outside the mask, zeros
    assert (moved.mask is data.mask or np.array_equal(moved.mask, data.mask)) and moved.key == data.key
    assert not np.array_equal(data.kspace[:, data.mask], lines[:, data.mask])  # the original is untouched


def test_prewhitening_from_noise_scans(small_raw: tuple[Path, ScanDescription, np.ndarray]) -> None:
    path, _, chol = small_raw
    raw = read_raw(path, prewhiten=False)
    white = read_raw(path)
    cov = raw.noise_covariance
    assert cov is not None and not raw.whitened and white.whitened
    # the estimate recovers the simulated covariance (0.01^2 * L L^H) within sampling error
    np.testing.assert_allclose(cov, 1e-4 * chol @ chol.conj().T, atol=2.5e-5)
    w = np.linalg.inv(np.linalg.cholesky(cov))
    np.testing.assert_allclose(white.slices[0].kspace, np.einsum("ij,jyx->iyx", w, raw.slices[0].kspace), rtol=1e-3, atol=1e-3)


def test_reads_ismrmrd_tools_file_and_maps_match_truth(shepp_logan: Path) -> None:
    scan = read_raw(shepp_logan, prewhiten=False)
    # -a 4 writes 4 complementary repetitions; each is one undersampled dataset
    assert [s.key.repetition for s in scan.slices] == [0, 1, 2, 3]
    first = scan.slices[0]
    assert first.kspace.shape == (8, 128, 128)
    assert first.acs.sum() == 16 and first.mask[first.acs].all()
    assert first.acceleration == pytest.approx(128 / 44)
    with h5py.File(shepp_logan, "r") as handle:
        csm = handle["dataset/csm"][()][0]
        phantom = handle["dataset/phantom"][()][0]
    truth = torch.from_numpy((csm["real"] + 1j * csm["imag"]).astype(np.complex64))
    region = torch.from_numpy(np.abs(phantom["real"] + 1j * phantom["imag"]) > 0.05)
    estimate = estimate_coil_maps(torch.from_numpy(np.array(first.kspace)), first.acs)
    assert map_similarity(estimate, truth, region) > 0.99
    norms = torch.linalg.vector_norm(estimate, dim=0)[region]
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-4, atol=1e-4)


def test_image_round_trip(tmp_path: Path) -> None:
    image = (np.arange(12).reshape(3, 4) * (1 + 0.5j)).astype(np.complex64)
    item = ReconImage(image, SliceKey(slice=2), SliceGeometry(position=(1.0, 2.0, 3.0)), (("CycGuard.Verdict", "unverified"),))
    path = write_images(tmp_path / "img.h5", [item, item], magnitude=False)
    back = read_images(path)
    assert len(back) == 2
    np.testing.assert_array_equal(back[0][0], image)
    assert back[0][1]["CycGuard.Verdict"] == "unverified"
    magnitude = read_images(write_images(tmp_path / "mag.h5", [item]))
    np.testing.assert_allclose(magnitude[0][0], np.abs(image), rtol=1e-6)
    ds = ismrmrd.Dataset(str(path), "images", create_if_needed=False)
    header = ds.read_image("image_1", 0)
    assert header.slice == 2 and tuple(header.position) == pytest.approx((1.0, 2.0, 3.0))
    ds.close()


# ---------------------------------------------------------------- malformed files


def _copy(small_raw: tuple[Path, ScanDescription, np.ndarray], tmp_path: Path) -> Path:
    out = tmp_path / "broken.h5"
    shutil.copy(small_raw[0], out)
    return out


def _edit_xml(path: Path, old: str, new: str) -> None:
    with h5py.File(path, "r+") as handle:
        xml = handle["dataset/xml"][()]
        xml = (xml[0] if isinstance(xml, np.ndarray) else xml).decode()
        assert old in xml
        del handle["dataset/xml"]
        handle["dataset/xml"] = np.array([xml.replace(old, new).encode()], dtype=h5py.string_dtype())


def test_missing_file_and_not_hdf5(tmp_path: Path) -> None:
    with pytest.raises(MRDError, match="no such file"):
        read_raw(tmp_path / "absent.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(MRDError, match="not a readable HDF5 file"):
        read_raw(junk)


def test_truncated_file(small_raw: tuple[Path, ScanDescription, np.ndarray], tmp_path: Path) -> None:
    out = tmp_path / "cut.h5"
    data = small_raw[0].read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(MRDError, match="truncated or corrupt"):
        read_raw(out)


def test_missing_header(small_raw: tuple[Path, ScanDescription, np.ndarray], tmp_path: Path) -> None:
    out = _copy(small_raw, tmp_path)
    with h5py.File(out, "r+") as handle:
        del handle["dataset/xml"]
    with pytest.raises(MRDError, match="no ISMRMRD XML header"):
        read_raw(out)


def test_missing_group(small_raw: tuple[Path, ScanDescription, np.ndarray]) -> None:
    with pytest.raises(MRDError, match="no group '/other'"):
        read_raw(small_raw[0], dataset="other")


def test_garbage_header(small_raw: tuple[Path, ScanDescription, np.ndarray], tmp_path: Path) -> None:
    out = _copy(small_raw, tmp_path)
    _edit_xml(out, "<encoding>", "<encoding><unclosed>")
    with pytest.raises(MRDError, match="malformed ISMRMRD XML header"):
        read_raw(out)


def test_non_cartesian(small_raw: tuple[Path, ScanDescription, np.ndarray], tmp_path: Path) -> None:
    out = _copy(small_raw, tmp_path)
    _edit_xml(out, "<trajectory>cartesian</trajectory>", "<trajectory>radial</trajectory>")
    with pytest.raises(MRDError, match="trajectory 'radial' is not supported"):
        read_raw(out)


def test_inconsistent_sizes(small_raw: tuple[Path, ScanDescription, np.ndarray], tmp_path: Path) -> None:
    out = _copy(small_raw, tmp_path)
    _edit_xml(out, "<x>64</x>", "<x>96</x>")
    with pytest.raises(MRDError, match="has 64 readout samples, the header's encoded x is 96"):
        read_raw(out)
    out2 = tmp_path / "coils.h5"
    shutil.copy(small_raw[0], out2)
    _edit_xml(out2, "<receiverChannels>4</receiverChannels>", "<receiverChannels>6</receiverChannels>")
    with pytest.raises(MRDError, match="has 4 channels, the header says 6"):
        read_raw(out2)
    out3 = tmp_path / "lines.h5"
    shutil.copy(small_raw[0], out3)
    _edit_xml(out3, "<center>16</center>", "<center>2</center>")
    with pytest.raises(MRDError, match="outside the 32-line grid"):
        read_raw(out3)


def _rewrite_without_last_line(source: Path, target: Path) -> None:
    """Copy a raw file, dropping the final acquisition (the one flagged LAST_IN_SLICE)."""
    src = ismrmrd.Dataset(str(source), "dataset", create_if_needed=False)
    dst = ismrmrd.Dataset(str(target), "dataset", create_if_needed=True)
    dst.write_xml_header(src.read_xml_header())
    for i in range(src.number_of_acquisitions() - 1):
        dst.append_acquisition(src.read_acquisition(i))
    src.close()
    dst.close()


def test_truncated_acquisitions(small_raw: tuple[Path, ScanDescription, np.ndarray], tmp_path: Path) -> None:
    out = tmp_path / "short.h5"
    _rewrite_without_last_line(small_raw[0], out)
    with pytest.raises(MRDError, match="slice 1 .* no ACQ_LAST_IN_SLICE acquisition: the data are truncated"):
        read_raw(out)
    partial = read_raw(out, strict=False)  # what was already good is kept
    assert [s.key.slice for s in partial.slices] == [0]
    assert len(partial.problems) == 1 and "truncated" in partial.problems[0]


def test_coverage_accepts_every_pattern_we_read_and_refuses_a_cut_off_one() -> None:
    from recon.io.mrd import coverage_problem
    from recon.physics.masks import MaskFamily

    rng = np.random.default_rng(4)
    for kind in ("equispaced", "random", "variable_density"):
        for acceleration in (2, 3, 4, 6):
            for ny in (96, 128, 256):
                family = MaskFamily(kind, acceleration, 16)
                for _ in range(50):
                    assert coverage_problem(family.sample(ny, rng), (0, ny - 1), acceleration) is None
                cut = family.sample(ny, rng)
                cut[int(ny * 0.55):] = False
                assert coverage_problem(cut, (0, ny - 1), acceleration) is not None
    equispaced = MaskFamily("equispaced", 4, 16).equispaced(128, 2)
    equispaced[120:] = False  # one spacing short is enough for an equispaced pattern
    assert "equispaced pattern of spacing 4" in str(coverage_problem(equispaced, (0, 127), 4))
