"""The ``cycguard`` command line, end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recon.io.mrd_write import read_images

pytestmark = pytest.mark.e2e


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gadgets.cli", *args], capture_output=True, text=True, timeout=600)


def test_demo_reconstructs_the_bundled_file(tmp_path: Path) -> None:
    result = _run("demo", "--out", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "report:" in result.stdout and "unverified" in result.stdout
    images = read_images(tmp_path / "demo_images.h5")
    assert len(images) == 4
    assert all(meta["CycGuard.Verdict"] == "unverified" for _, meta in images)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["slices"]) == 4
    for row in report["slices"]:
        assert row["quality"]["psnr"] > row["quality_zero_filled"]["psnr"] + 3  # the network helps
        assert (tmp_path / "report" / row["picture"]).stat().st_size > 1000
    assert "<table>" in (tmp_path / "report" / "report.html").read_text()


def test_recon_of_an_ismrmrd_tools_file(shepp_logan: Path, tmp_path: Path) -> None:
    out = tmp_path / "sl_images.h5"
    result = _run("recon", str(shepp_logan), "-o", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert len(read_images(out)) == 4  # one image per repetition
    assert (tmp_path / "sl_images_report" / "report.html").exists()


def test_bad_input_fails_with_its_reason(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 64)
    result = _run("recon", str(junk), "-o", str(tmp_path / "out.h5"))
    assert result.returncode == 2
    assert "not a readable HDF5 file" in result.stderr
    assert not (tmp_path / "out.h5").exists()
    result = _run("demo", "--device", "cuda:7") if not _cuda() else _run("demo", "--device", "tpu")
    assert result.returncode == 2
    assert "device" in result.stderr


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
