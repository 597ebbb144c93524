"""Replay through every pipeline over the real wire path (each `<external>` node is a
`python -m gadgetron` process), compared with the in-process pure pipeline.

Pipeline cases are declarative, as Gadgetron's integration cases: input, pipeline, expected
verdicts, and image tolerances (relative L2 error and the scale ratio, with the scale check
applied, which Gadgetron's own test runner forgets).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from gadgets.runner.config import PipelineError
from gadgets.runner.replay import replay
from recon.data.demo import DEMO_RAW
from recon.io.mrd import MRDError, read_raw
from recon.io.mrd_write import read_images
from recon.models.weights import DEFAULT_WEIGHTS, load_model
from recon.pipeline import reconstruct
from tests import ROOT
from tests.conftest import passive_listener

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@dataclass(frozen=True)
class Case:
    pipeline: str
    verdicts: tuple[str, ...]
    value_tolerance: float = 1e-4
    scale_tolerance: float = 1e-4
    in_process: bool = False


CASES = [
    Case("recon", ("unverified",) * 4),
    Case("detect", ("clean",) * 4),
    Case("defended", ("clean",) * 4),
    Case("defended_composed", ("clean",) * 4),
    Case("defended", ("clean",) * 4, in_process=True),
]


def compare(out: np.ndarray, ref: np.ndarray, value_tolerance: float, scale_tolerance: float) -> None:
    """Gadgetron's image comparison: relative L2 error and scale ratio (out.out)/(out.ref)."""
    out64, ref64 = out.astype(np.complex128).ravel(), ref.astype(np.complex128).ravel()
    error = np.linalg.norm(out64 - ref64) / np.linalg.norm(ref64)
    scale = np.real(np.vdot(out64, out64) / np.vdot(out64, ref64))
    assert error <= value_tolerance, f"relative L2 error {error:.3g} > {value_tolerance}"
    assert abs(1 - scale) <= scale_tolerance, f"scale ratio {scale:.6f} off by more than {scale_tolerance}"


@pytest.fixture(scope="module")
def in_process_images() -> list[np.ndarray]:
    """The pure pipeline on the demo file, no gadgets."""
    torch.set_num_threads(2)
    model, _ = load_model()
    return [reconstruct(data, model).image for data in read_raw(DEMO_RAW).slices]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.pipeline + ("-in-process" if c.in_process else ""))
def test_replay_matches_the_pure_pipeline(case: Case, in_process_images: list[np.ndarray], tmp_path: Path) -> None:
    result = replay(DEMO_RAW, case.pipeline, tmp_path / "out.h5", tmp_path / "report", group="g", in_process=case.in_process, progress=False)
    assert result.ok, result.failures
    images = read_images(tmp_path / "out.h5", group="g")
    assert tuple(meta["CycGuard.Verdict"] for _, meta in images) == case.verdicts
    for (image, meta), ref in zip(images, in_process_images, strict=True):
        compare(image, ref, case.value_tolerance, case.scale_tolerance)
        assert meta["ImageComment"].startswith(meta["CycGuard.Verdict"])
        if meta["CycGuard.Verdict"] == "clean":
            assert float(meta["CycGuard.Score"]) <= float(meta["CycGuard.Threshold"])
            assert meta["CycGuard.NoiseSigma"] == "1"  # whitened by NoiseAdjust, as the pipelines declare
    assert [row.verdict for row in result.rows] == list(case.verdicts)
    assert result.report_html is not None and result.report_html.is_file()


def test_passive_connect_pipeline(tmp_path: Path, in_process_images: list[np.ndarray]) -> None:
    listener, pipeline, port = passive_listener(tmp_path)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # a port probe must not hang it
        result = replay(DEMO_RAW, str(pipeline), tmp_path / "out.h5", None, group="g", progress=False)
    finally:
        stdout, stderr = listener.communicate(timeout=120)
    assert b"closed before sending anything" in stderr
    assert result.ok, result.failures
    assert listener.returncode == 0 and stdout == b""
    images = read_images(tmp_path / "out.h5", group="g")
    assert [meta["CycGuard.Verdict"] for _, meta in images] == ["clean"] * 4
    for (image, _), ref in zip(images, in_process_images, strict=True):
        compare(image, ref, 1e-4, 1e-4)



def test_a_connect_node_with_nothing_listening_says_what_to_start(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pipeline = tmp_path / "connect.xml"
    pipeline.write_text((ROOT / "pipelines" / "defended_connect.xml").read_text().replace('port="18000"', f'port="{port}"'))
    result = replay(DEMO_RAW, str(pipeline), tmp_path / "out.h5", None, group="g", progress=False)
    assert not result.ok
    failure = next(f for f in result.failures if "cannot connect to the listening gadget" in f)
    assert f"python -m gadgets.listen MODULE TARGET --port {port}" in failure

def _stream_with(node: str) -> str:
    text = (ROOT / "pipelines" / "recon.xml").read_text()
    return text.replace("  </stream>", node + "  </stream>")


def _faulty(tmp_path: Path, target: str) -> Path:
    path = tmp_path / f"{target}.xml"
    path.write_text(_stream_with(f'    <external><execute name="tests.faulty_gadgets" target="{target}" type="python"/><configuration/></external>\n'))
    return path


def test_a_failing_gadget_fails_the_run_with_its_message_and_keeps_what_was_done(tmp_path: Path) -> None:
    # insert the faulty gadget between the front end and recon: slice 1 goes through, slice 2 explodes
    text = (ROOT / "pipelines" / "recon.xml").read_text().replace(
        "    <external>", '    <external><execute name="tests.faulty_gadgets" target="explode_on_second_buffer" type="python"/><configuration/></external>\n    <external>', 1
    )
    path = tmp_path / "explode.xml"
    path.write_text(text)
    result = replay(DEMO_RAW, str(path), tmp_path / "out.h5", None, group="g", progress=False)
    assert not result.ok
    assert any("tests.faulty_gadgets:explode_on_second_buffer: tests.faulty_gadgets: slice 2 exploded" in f for f in result.failures)
    assert any("3 of 4 slices came out without an image" in f for f in result.failures)
    kept = read_images(tmp_path / "out.h5", group="g")
    assert len(kept) == 1 and kept[0][1]["CycGuard.Verdict"] == "unverified"  # written before the failure, not lost


def test_gadgetron_pythons_silent_failure_is_caught(tmp_path: Path) -> None:
    result = replay(DEMO_RAW, str(_faulty(tmp_path, "raise_like_gadgetron_python")), tmp_path / "out.h5", None, group="g", progress=False)
    assert not result.ok
    failure = next(f for f in result.failures if "raise_like_gadgetron_python" in f)
    assert "exited with status 1" in failure and "plain exception without ERROR" in failure
    assert any("slices came out without an image" in f for f in result.failures)


def test_an_error_without_close_is_refused_as_gadgetron_refuses_it(tmp_path: Path) -> None:
    result = replay(DEMO_RAW, str(_faulty(tmp_path, "error_without_close")), tmp_path / "out.h5", None, group="g", progress=False)
    assert not result.ok
    failure = next(f for f in result.failures if "error_without_close" in f)
    assert "no close" in failure and "ERROR without CLOSE" in failure


def test_a_gadget_writing_to_stdout_fails_the_run(tmp_path: Path) -> None:
    result = replay(DEMO_RAW, str(_faulty(tmp_path, "print_to_stdout")), tmp_path / "out.h5", None, group="g", progress=False)
    assert any("bytes to stdout" in f and "hello from a gadget" in f for f in result.failures)


def test_corrupt_weights_fail_inside_the_gadget_with_its_reason(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    data = bytearray(DEFAULT_WEIGHTS.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    (tmp_path / "w.json").write_text(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    path = tmp_path / "p.xml"
    path.write_text((ROOT / "pipelines" / "recon.xml").read_text().replace("<configuration/>", f'<configuration><property name="weights" value="{weights}"/></configuration>'))
    result = replay(DEMO_RAW, str(path), tmp_path / "out.h5", None, group="g", progress=False)
    assert not result.ok
    assert any(f.startswith("gadgets.recon:recon: weights file") and "SHA-256" in f for f in result.failures)
    assert any("4 of 4 slices came out without an image" in f for f in result.failures)


def test_a_wrong_property_fails_before_anything_runs(tmp_path: Path) -> None:
    path = tmp_path / "p.xml"
    path.write_text((ROOT / "pipelines" / "defended.xml").read_text().replace('name="noise_level"', 'name="noise_levle"'))
    started = time.monotonic()
    with pytest.raises(PipelineError, match="unknown property 'noise_levle'"):
        replay(DEMO_RAW, str(path), tmp_path / "out.h5", None, progress=False)
    assert time.monotonic() - started < 5
    cli = subprocess.run([sys.executable, "-m", "gadgets.cli", "replay", str(DEMO_RAW), "-c", str(path), "-o", str(tmp_path / "o.h5")], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "noise_levle" in cli.stderr


@pytest.mark.tools
def test_ismrmrd_18_files_are_refused_by_the_runner_as_gadgetron_refuses_them(shepp_logan: Path, tmp_path: Path) -> None:
    """Debian's ismrmrd-tools 1.8 write header version 8, which Gadgetron 4.7 rejects (the real
    server is checked in tests/gadgets/test_gadgetron.py); the offline reader still takes them (test_mrd)."""
    with pytest.raises(MRDError, match="header version 8"):
        replay(shepp_logan, "recon", tmp_path / "out.h5", tmp_path / "report", group="g", progress=False)
    assert not (tmp_path / "out.h5").exists()


def test_faults_in_each_stage_leave_every_slice_once_with_a_truthful_verdict(tmp_path: Path) -> None:
    """Red-team chain with the mitigation's time budget exhausted: the attacked slices leave
    flagged with the reason, the clean ones clean; nothing is lost or duplicated."""
    path = tmp_path / "budget.xml"
    text = (ROOT / "pipelines" / "redteam.xml").read_text()
    text = text.replace(
        '<execute name="gadgets.mitigate" target="mitigate" type="python"/>\n      <configuration>',
        '<execute name="gadgets.mitigate" target="mitigate" type="python"/>\n      <configuration>\n        <property name="time_budget" value="0.001"/>',
    )
    path.write_text(text)
    result = replay(DEMO_RAW, str(path), tmp_path / "out.h5", tmp_path / "report", group="g", in_process=True, progress=False)
    assert result.ok, result.failures
    images = read_images(tmp_path / "out.h5", group="g")
    assert [meta["CycGuard.Verdict"] for _, meta in images] == ["clean", "flagged", "clean", "flagged"]
    for n in (1, 3):
        assert "time budget (0.001 s): the original image ships" in images[n][1]["ImageComment"]


def test_a_corrupt_calibration_fails_the_detect_gadget_loudly(tmp_path: Path) -> None:
    calibration = tmp_path / "c.json"
    calibration.write_text((ROOT / "recon/models/weights/modl_default.calibration.json").read_text().replace('"threshold": ', '"threshold": 1e-9, "x": '))
    path = tmp_path / "p.xml"
    path.write_text((ROOT / "pipelines" / "detect.xml").read_text().replace(
        '<property name="noise_level" value="whitened"/>', f'<property name="noise_level" value="whitened"/>\n        <property name="calibration" value="{calibration}"/>'
    ))
    result = replay(DEMO_RAW, str(path), tmp_path / "out.h5", None, group="g", progress=False)
    assert not result.ok
    assert any(f.startswith("gadgets.detect:detect: ") for f in result.failures), result.failures
    assert any("4 of 4 slices came out without an image" in f for f in result.failures)  # none leaves looking checked


def _cut_demo(tmp_path: Path, drop: int, slice_flags: bool = True) -> Path:
    import h5py
    import ismrmrd

    raw = tmp_path / "cut.h5"
    raw.write_bytes(DEMO_RAW.read_bytes())
    with h5py.File(raw, "r+") as handle:
        data = handle["dataset/data"]
        data.resize((len(data) - drop,))
        if not slice_flags:
            rows = data[()]
            clear = ~np.uint64((1 << (ismrmrd.ACQ_FIRST_IN_SLICE - 1)) | (1 << (ismrmrd.ACQ_LAST_IN_SLICE - 1)))
            rows["head"]["flags"] &= clear
            data[...] = rows
    return raw


@pytest.mark.parametrize("slice_flags", [True, False], ids=["slice flags", "no slice flags"])
def test_a_cut_off_file_fails_for_its_incomplete_and_missing_slices_and_keeps_the_rest(slice_flags: bool, tmp_path: Path) -> None:
    raw = _cut_demo(tmp_path, 60, slice_flags)
    result = replay(raw, "detect", tmp_path / "out.h5", None, group="g", progress=False, in_process=not slice_flags)
    assert not result.ok
    joined = " | ".join(result.failures)
    reason = "no ACQ_LAST_IN_SLICE acquisition" if slice_flags else "lines 2-69 acquired of the encoding limits 0-127 (an equispaced pattern of spacing 4)"
    assert f"slice 2 (contrast 0, repetition 0): {reason}" in joined, joined
    assert "slice 3: no data arrived, though the header's encoding limits give 4 slices" in joined, joined
    kept = read_images(tmp_path / "out.h5", group="g")
    assert [meta["CycGuard.Verdict"] for _, meta in kept] == ["clean", "clean"]  # what was good is kept
    with pytest.raises(MRDError, match="slice 3 has no acquisitions"):
        read_raw(raw)


def test_the_offline_path_writes_what_the_gadget_chain_writes(tmp_path: Path) -> None:
    """``cycguard recon`` (in process) and the defended chain leave the same meta keys and
    verdicts on every image, complex images both, through a flagged slice's mitigation."""
    from dataclasses import replace

    from recon.detect.calibration import Calibration
    from recon.detect.defense import default_calibration_path
    from recon.models.weights import load_model as load
    from recon.offline import reconstruct_file

    _, manifest = load()
    shipped = Calibration.load(default_calibration_path(manifest), manifest.sha256, *_shipped_keys(manifest))
    strict = replace(shipped, threshold=0.5, clean_scores=tuple(0.01 * s for s in shipped.clean_scores))  # every slice flagged
    calibration = strict.save(tmp_path / "strict.json")
    xml = (ROOT / "pipelines" / "defended.xml").read_text()
    for stage in ("detect", "mitigate"):
        xml = xml.replace(
            f'<execute name="gadgets.{stage}" target="{stage}" type="python"/>\n      <configuration>',
            f'<execute name="gadgets.{stage}" target="{stage}" type="python"/>\n      <configuration>\n'
            f'        <property name="calibration" value="{calibration}"/>',
        )
    (tmp_path / "strict.xml").write_text(xml)
    chained = replay(DEMO_RAW, str(tmp_path / "strict.xml"), tmp_path / "chain.h5", tmp_path / "chain", group="g", progress=False)
    assert chained.ok, chained.failures
    reconstruct_file(DEMO_RAW, tmp_path / "offline.h5", tmp_path / "offline", progress=False, calibration=calibration)
    chain, offline = read_images(tmp_path / "chain.h5", group="g"), read_images(tmp_path / "offline.h5")
    assert len(chain) == len(offline) == 4
    for (image, meta), (other, other_meta) in zip(chain, offline, strict=True):
        assert image.dtype == other.dtype == np.complex64
        assert meta["CycGuard.Verdict"] == other_meta["CycGuard.Verdict"] == "flagged"
        assert set(meta) == set(other_meta) and "CycGuard.Seconds.mitigate" in meta
        same = ("CycGuard.Verdict", "CycGuard.Statistic", "CycGuard.Calibration", "CycGuard.Model", "CycGuard.Protocol", "GADGETRON_ImageComment")
        assert {k: meta[k] for k in same} == {k: other_meta[k] for k in same}


def _shipped_keys(manifest: object) -> tuple[object, object]:
    """The shipped calibration's protocol and detector key."""
    import json

    from recon.detect.calibration import DetectorKey, ProtocolKey
    from recon.detect.defense import default_calibration_path

    raw = json.loads(default_calibration_path(manifest).read_text())  # type: ignore[arg-type]
    protocol = raw["protocol"]
    return ProtocolKey(tuple(protocol["matrix"]), *(protocol[k] for k in ("coils", "mask_kind", "acceleration", "acs_lines"))), DetectorKey(**raw["detector"])
