"""What Gadgetron 4.7 does at its edges, checked without it (tests/gadgets/test_gadgetron.py runs the real one)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from gadgets.runner.frontend import NoiseAdjust, check_header
from recon.io.mrd import MRDError, read_raw
from recon.io.mrd_write import ScanDescription, build_header, write_raw
from recon.physics.masks import MaskFamily
from recon.physics.noise import noise_covariance, prewhitening_scale, whitened_sigma, whitening_matrix
from recon.types import SliceGeometry


def test_prewhitening_scale_is_gadgetrons() -> None:
    assert prewhitening_scale(5.0, 5.0, 0.793) == pytest.approx(np.sqrt(2 * 0.793))
    assert prewhitening_scale(2.5, 5.0, 0.85) == pytest.approx(np.sqrt(2 * 0.5 * 0.85))
    assert prewhitening_scale(0.0, 5.0, 0.793) == 1.0 and prewhitening_scale(5.0, 0.0, 0.793) == 1.0
    assert whitened_sigma(5.0, 0.793) == pytest.approx(1.2594, abs=1e-4) and whitened_sigma(0.0, 0.793) == 1.0


def test_noise_covariance_keeps_the_mean_as_gadgetron_does() -> None:
    samples = np.ones((2, 11), np.complex64) * (1 + 1j)
    np.testing.assert_allclose(noise_covariance(samples), np.full((2, 2), 2 * 11 / 10))


def test_whitened_noise_sigma_follows_the_header() -> None:
    rng = np.random.default_rng(3)
    noise = (rng.standard_normal((4, 20000)) + 1j * rng.standard_normal((4, 20000))) / np.sqrt(2)
    mix = np.array([[1, 0, 0, 0], [0.5, 1, 0, 0], [0, 0.3, 2, 0], [0.1, 0, 0, 0.7]], np.complex64)
    coloured = mix @ noise
    w = whitening_matrix(noise_covariance(coloured), prewhitening_scale(5.0, 5.0, 0.85))
    sigma = np.sqrt(np.mean(np.abs(w @ coloured) ** 2))
    assert sigma == pytest.approx(np.sqrt(2 * 0.85), rel=0.01)


def _header(**changes: object) -> str:
    return build_header(ScanDescription(**changes), 1)  # type: ignore[arg-type]


def test_header_versions_gadgetron_rejects_are_refused() -> None:
    check_header(_header())  # our writer: no version
    check_header(_header().replace("<ismrmrdHeader xmlns=\"http://www.ismrm.org/ISMRMRD\">", "<ismrmrdHeader xmlns=\"http://www.ismrm.org/ISMRMRD\"><version>14</version>"))
    with pytest.raises(MRDError, match="header version 8"):
        check_header(_header().replace("<ismrmrdHeader xmlns=\"http://www.ismrm.org/ISMRMRD\">", "<ismrmrdHeader xmlns=\"http://www.ismrm.org/ISMRMRD\"><version>8</version>"))
    assert "<version>" not in _header() and "<measurementID>" in _header()


def test_noise_adjust_without_measurement_id_fails_like_gadgetron() -> None:
    header = _header().replace("<measurementID>CYCGUARD_SIM_00001</measurementID>", "")
    stage = NoiseAdjust(header, {})
    acq = ismrmrd.Acquisition.from_array(np.zeros((2, 16), np.complex64))
    acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    with pytest.raises(ValueError, match="measurementID"):
        list(stage.process(acq))


@pytest.mark.parametrize("bandwidth", [0.793, 0.6])
def test_the_offline_reader_puts_k_space_in_noise_units(bandwidth: float, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    desc = ScanDescription(matrix=(32, 32), coils=4, acceleration=2, receiver_bandwidth=bandwidth)
    mix = np.array([[1, 0, 0, 0], [0.5, 1, 0, 0], [0, 0.3, 2, 0], [0.1, 0, 0, 0.7]], np.complex64) * 0.01

    def noise(*shape: int) -> np.ndarray:
        white = (rng.standard_normal((4, *shape)) + 1j * rng.standard_normal((4, *shape))) / np.sqrt(2)
        return np.einsum("ij,j...->i...", mix, white).astype(np.complex64)

    family = MaskFamily("equispaced", 2, 8)
    path = write_raw(tmp_path / "noise.h5", desc, [noise(32, 64)], [family.equispaced(32, 0)], family.acs_mask(32),
                     [SliceGeometry(position=(0.0, 0.0, 0.0))], noise(4096).reshape(4, -1))
    data = read_raw(path).slices[0]
    assert np.sqrt(np.mean(np.abs(data.kspace[:, data.mask]) ** 2)) == pytest.approx(1.0, rel=0.03)


def test_gadgetron_python_stops_at_a_closed_socket() -> None:
    """gadgetron-python alone spins for ever when Gadgetron closes before the configuration;
    with CycGuard's start-up hook (cycguard-gadgetron.pth) the child exits at once."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), "gadgets.recon", "recon"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        server.settimeout(60)
        conn, _ = server.accept()
        conn.close()
        start = time.monotonic()
        try:
            child.wait(timeout=30)
        finally:
            child.kill()
    _, err = child.communicate()
    assert child.returncode != 0 and time.monotonic() - start < 30
    assert b"closed the connection" in err
