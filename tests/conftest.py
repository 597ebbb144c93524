"""Shared fixtures: tiny synthetic data made here, real binaries found or (under CI) required."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

# no background calibrations from the gadgets of tests that do not ask for one (their
# processes would outlive the test); the test of the feature turns it on
os.environ.setdefault("CYCGUARD_AUTO_CALIBRATE", "off")

from recon.data.simulate import birdcage_maps, noise_cholesky, simulate_kspace, smooth_phase
from recon.io.mrd_write import ScanDescription, write_raw
from recon.physics.masks import MaskFamily
from recon.types import SliceGeometry


def require_binary(name: str) -> str:
    """Path of a Debian tool; skip when absent locally, fail under CI where .ci/run installs it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (apt-get install it; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def passive_listener(folder: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    """``python -m gadgets.listen gadgets.composed composed`` on a free port, listening, and the
    ``defended_connect`` pipeline pointed at it (in ``folder``), and its port."""
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    pipeline = folder / "connect.xml"
    shipped = Path(__file__).resolve().parents[1] / "pipelines" / "defended_connect.xml"
    pipeline.write_text(shipped.read_text().replace('port="18000"', f'port="{port}"'))
    listener = subprocess.Popen(
        [sys.executable, "-m", "gadgets.listen", "gadgets.composed", "composed", "--port", str(port), "--timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert listener.stderr is not None
    while b"waiting for Gadgetron" not in listener.stderr.readline():  # it imports torch first
        assert listener.poll() is None, "the listener exited before listening"
    return listener, pipeline, port


def demo_with_header(path: Path, old: str, new: str) -> Path:
    """A copy of the demo raw file at ``path`` whose XML header has ``old`` replaced by ``new``."""
    import h5py
    import ismrmrd

    from recon.data.demo import DEMO_RAW

    shutil.copyfile(DEMO_RAW, path)
    with h5py.File(path, "r+") as handle:
        xml = handle["dataset/xml"][()]
        xml = (xml[0] if getattr(xml, "shape", ()) else xml).decode()
        del handle["dataset/xml"]
    assert old in xml, f"{old!r} not in the demo header"
    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    dataset.write_xml_header(xml.replace(old, new))
    dataset.close()
    return path


def disc_phantom(shape: tuple[int, int]) -> np.ndarray:
    """A smooth-edged ellipse with two inserts, values in [0, 1]."""
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    image = ((x / 0.7) ** 2 + (y / 0.85) ** 2 < 1).astype(np.float32) * 0.6
    image += ((x - 0.2) ** 2 + (y + 0.2) ** 2 < 0.05).astype(np.float32) * 0.4
    image -= ((x + 0.25) ** 2 + (y - 0.3) ** 2 < 0.02).astype(np.float32) * 0.3
    return np.clip(image, 0, 1)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own calibration cache (``CYCGUARD_CALIBRATIONS``), never the user's."""
    folder = tmp_path_factory.mktemp("calibrations")
    monkeypatch.setenv("CYCGUARD_CALIBRATIONS", str(folder))
    return folder


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def small_raw(tmp_path: Path) -> tuple[Path, ScanDescription, np.ndarray]:
    """A real ISMRMRD raw file: 2 slices, 4 coils, 32x32, 2x readout oversampling, noise scans."""
    return write_small_raw(tmp_path / "small.h5")


def write_small_raw(path: Path, matrix: tuple[int, int] = (32, 32), seed: int = 11) -> tuple[Path, ScanDescription, np.ndarray]:
    """:func:`small_raw`'s file at ``path``, of another matrix or seed when asked."""
    rng = np.random.default_rng(seed)
    desc = ScanDescription(matrix=matrix, coils=4, acceleration=2)
    ny, nx = desc.matrix
    maps = birdcage_maps(4, (ny, 2 * nx), rng, radius=1.3, extent=(1.0, 2.0))
    chol = noise_cholesky(4, rng)
    family = MaskFamily("equispaced", 2, 8)
    kspaces, masks, geometries = [], [], []
    for n in range(2):
        obj = np.zeros((ny, 2 * nx), np.complex64)
        obj[:, nx // 2 : nx // 2 + nx] = disc_phantom((ny, nx)) * np.exp(1j * smooth_phase((ny, nx), rng, 1.0))
        kspaces.append(simulate_kspace(obj, maps, 0.01, chol, rng))
        masks.append(family.equispaced(ny, n))
        geometries.append(SliceGeometry(position=(0.0, 0.0, 5.0 * n)))
    noise = 0.01 * np.einsum("ij,jn->in", chol, (rng.standard_normal((4, 512)) + 1j * rng.standard_normal((4, 512))) / np.sqrt(2))
    path = write_raw(path, desc, kspaces, masks, family.acs_mask(ny), geometries, noise.astype(np.complex64))
    return path, desc, chol


@pytest.fixture
def shepp_logan(tmp_path: Path) -> Path:
    """ismrmrd-tools' Shepp-Logan raw file: 128 matrix, 8 coils, R = 4, 16 calibration lines."""
    tool = require_binary("ismrmrd_generate_cartesian_shepp_logan")
    out = tmp_path / "shepp_logan.h5"
    subprocess.run([tool, "-m", "128", "-c", "8", "-a", "4", "-w", "16", "-n", "0.05", "-C", "-o", str(out)], check=True, capture_output=True)
    return out


class OrthancServer:
    """Debian's Orthanc on loopback with a temporary configuration and storage."""

    def __init__(self, folder: Path, binary: str) -> None:
        import socket

        self.folder, self.binary = folder, binary
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        self.http_port, self.dicom_port = ports
        self.aet = "ORTHANC"
        storage = folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "CYCGUARD_TEST", "StorageDirectory": str(storage), "IndexDirectory": str(storage), "Plugins": [],
            "HttpServerEnabled": True, "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": self.aet, "DicomPort": self.dicom_port, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "HttpThreadsCount": 4, "ConcurrentJobs": 1,
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def start(self) -> None:
        import socket
        import time
        import urllib.error

        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([self.binary, str(self.config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.rest("/system")
                socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2).close()  # its DICOM listener starts after HTTP
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {(self.folder / 'orthanc.log').read_text()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def rest(self, path: str) -> object:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as response:
            return json.loads(response.read())


@pytest.fixture
def orthanc(tmp_path: Path) -> object:
    """A running Orthanc (skips without the binary outside CI; .ci/run installs it)."""
    server = OrthancServer(tmp_path / "orthanc", require_binary("Orthanc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a write past it fails with ENOSPC, as on a full disk. Mounting needs
    root (as .ci/run runs); elsewhere the test skips, under CI it fails."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs to fill ({mounted.stderr.strip()}); run as root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder: Path, leave: int) -> Path:
    """Fill ``folder``'s file system until at most ``leave`` bytes are free; the filler's path."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with filler.open("wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))
    return filler


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throw-away self-signed certificate for 127.0.0.1/localhost: ``(cert, key)``."""
    openssl = require_binary("openssl")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="session")
def gadgetron(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real Gadgetron 4.7.2 server with our pipelines in its config folder (tests/gadgetron_host.py);
    skips where it is not unpacked, fails under CI."""
    from tests import gadgetron_host

    reason = gadgetron_host.unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"real Gadgetron unavailable under CI: {reason}")
        pytest.skip(reason)
    gadgetron_host.install_pipelines()
    server = gadgetron_host.Gadgetron(tmp_path_factory.mktemp("gadgetron"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def setup() -> tuple[object, object, object, object]:
    """A tiny untrained network and one small slice: ``(model, op, y, x_zf)`` (tests.recon.tiny)."""
    from tests.recon.tiny import tiny_setup

    return tiny_setup()
