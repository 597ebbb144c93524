"""CycGuard inside a real Gadgetron 4.7.2 (server, C++ front-end gadgets and client), against our runner.

Every shipped pipeline runs on three raw files through the real server and through
``cycguard replay``: the same slices, verdicts, scores (1e-3 relative) and images (1e-4
relative L2) must come out. Errors must reach the real client as our message, once, and no
run may hang or leave a Python gadget behind.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import ismrmrd
import pytest

from gadgets.runner.replay import replay
from recon.data.demo import DEMO_RAW
from recon.io.mrd_write import ScanDescription
from tests import ROOT
from tests import gadgetron_host as host
from tests.conftest import demo_with_header, passive_listener
from tests.gadgetron_host import Gadgetron

pytestmark = [pytest.mark.gadgetron, pytest.mark.slow]

PIPELINES = ("recon", "detect", "defended", "defended_composed", "defended_distributed", "redteam")
FILES = ("demo", "shepp_logan_114", "variant")
# every pipeline on the demo; the other files (other header features: ISMRMRD 1.14's writer,
# no readout oversampling, other dwell time and noise bandwidth) through the single-node chain
# that holds every stage, and the one that rewrites slices
PARITY = [(pipeline, "demo") for pipeline in PIPELINES] + [
    ("defended", "shepp_logan_114"), ("defended", "variant"), ("redteam", "variant"),
]
ERROR_DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def raw_files(gadgetron: Gadgetron, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo file; a Shepp-Logan file of ISMRMRD 1.14.1's tool (protocol of the shipped
    calibration); the demo's anatomy with no readout oversampling, another dwell time and
    another receiver noise bandwidth in its header."""
    from recon.data.demo import make_demo

    folder = tmp_path_factory.mktemp("raw")
    variant = ScanDescription(readout_oversampling=1, sample_time_us=2.5, receiver_bandwidth=0.85, measurement_id="CYCGUARD_SIM_00002")
    return {
        "demo": DEMO_RAW,
        "shepp_logan_114": host.shepp_logan_114(folder / "sl114.h5", "-m", "128", "-c", "8", "-a", "4", "-w", "16", "-n", "0.05", "-C", "-r", "1"),
        "variant": make_demo(folder / "variant", desc=variant)[0],
    }


def _real(gadgetron: Gadgetron, raw: Path, out: Path, **pipeline: object) -> dict[tuple[int, ...], host.Image]:
    run = gadgetron.client(raw, out, **pipeline)  # type: ignore[arg-type]
    assert run.wrote, f"the real chain wrote no images ({run.seconds:.0f} s):\n{run.output}\n{gadgetron.log()[-3000:]}"
    assert not gadgetron.python_children(), "Python gadgets left running after the run"
    return host.read_output(out)


def _ours(raw: Path, pipeline: str, out: Path) -> dict[tuple[int, ...], host.Image]:
    result = replay(raw, pipeline, out, None, group="g", progress=False)
    assert result.ok, result.failures
    return host.read_output(out)


@pytest.mark.parametrize(("pipeline", "name"), PARITY)
def test_real_gadgetron_and_replay_agree(gadgetron: Gadgetron, raw_files: dict[str, Path], pipeline: str, name: str, tmp_path: Path) -> None:
    raw = raw_files[name]
    # the demo goes through the config folder (-c, as the README says); the others as scripts (-C)
    chosen = {"config": f"{pipeline}.xml"} if name == "demo" else {"script": ROOT / "pipelines" / f"{pipeline}.xml"}
    real = _real(gadgetron, raw, tmp_path / "real.h5", **chosen)
    ours = _ours(raw, pipeline, tmp_path / "ours.h5")
    assert host.parity_problems(real, ours) == []
    verdicts = {image.meta["CycGuard.Verdict"] for image in real.values()}
    if pipeline == "recon":
        assert verdicts == {"unverified"}
    elif name != "shepp_logan_114":
        assert "unverified" not in verdicts, {k: v.meta.get("ImageComment") for k, v in real.items()}
    if (pipeline, name) == ("redteam", "demo"):  # the README's verdicts, under the real Gadgetron
        assert [real[key].meta["CycGuard.Verdict"] for key in sorted(real)] == ["clean", "mitigated", "clean", "mitigated"]


def test_the_received_images_of_rewritten_slices_come_back_through_real_gadgetron(gadgetron: Gadgetron, tmp_path: Path) -> None:
    """``send_received``: each rewritten slice's image as received comes back after it, in
    series 101 with its role, through Gadgetron's own stream and writer; the DICOM export
    never sees it."""
    import h5py

    text = (ROOT / "pipelines" / "redteam.xml").read_text()
    marker = '<execute name="gadgets.mitigate" target="mitigate" type="python"/>\n      <configuration>'
    assert marker in text
    script = tmp_path / "redteam_received.xml"
    script.write_text(text.replace(marker, marker + '\n        <property name="send_received" value="true"/>').replace(
        "<configuration/>", f'<configuration><property name="dicom_folder" value="{tmp_path / "dicom"}"/></configuration>'
    ))
    run = gadgetron.client(DEMO_RAW, tmp_path / "real.h5", script=script)
    assert run.wrote, run.output
    series: dict[int, list[tuple[int, dict[str, str]]]] = {}
    with h5py.File(tmp_path / "real.h5", "r") as handle:
        for group in handle.values():
            for images in group.values():
                for head, attribute in zip(images["header"][()], images["attributes"][()], strict=True):
                    meta = ismrmrd.Meta.deserialize(attribute.decode() if isinstance(attribute, bytes) else str(attribute))
                    series.setdefault(int(head["image_series_index"]), []).append((int(head["slice"]), {k: str(meta[k]) for k in meta.keys()}))
    assert sorted(series) == [1, 101]
    rewritten = sorted(slice_ for slice_, meta in series[1] if meta["CycGuard.Verdict"] == "mitigated")
    assert rewritten == [1, 3]
    assert sorted(slice_ for slice_, _ in series[101]) == rewritten
    assert all(meta["GADGETRON_DataRole"] == "CycGuard.Received" and meta["CycGuard.Verdict"] == "flagged" for _, meta in series[101])
    assert len(list((tmp_path / "dicom").rglob("*.dcm"))) == 4  # the four slices, not their before images


@pytest.mark.parametrize("name", FILES)
def test_passive_connect_pipeline_under_real_gadgetron(gadgetron: Gadgetron, raw_files: dict[str, Path], name: str, tmp_path: Path) -> None:
    listener, pipeline, _ = passive_listener(tmp_path)
    try:
        real = _real(gadgetron, raw_files[name], tmp_path / "real.h5", script=pipeline)
    finally:
        stdout, _ = listener.communicate(timeout=120)
    assert listener.returncode == 0 and stdout == b""
    ours = _ours(raw_files[name], "defended_composed", tmp_path / "ours.h5")
    assert host.parity_problems(real, ours) == []


# ------------------------------------------------------------------ what Gadgetron rejects, we reject


def test_ismrmrd_18_files_fail_fast_in_gadgetron_and_are_refused_by_the_runner(gadgetron: Gadgetron, tmp_path: Path) -> None:
    from tests.conftest import require_binary

    tool = require_binary("ismrmrd_generate_cartesian_shepp_logan")  # Debian's ismrmrd-tools 1.8: header version 8
    raw = tmp_path / "sl18.h5"
    subprocess.run([tool, "-m", "128", "-c", "8", "-a", "4", "-w", "16", "-n", "0.05", "-C", "-o", str(raw)], check=True, capture_output=True)
    run = gadgetron.client(raw, tmp_path / "real.h5", config="recon.xml", timeout=int(ERROR_DEADLINE_S))
    assert run.seconds < ERROR_DEADLINE_S and not run.wrote
    assert "XML header version does not match" in run.output
    _no_python_left(gadgetron)
    cli = subprocess.run([sys.executable, "-m", "gadgets.cli", "replay", str(raw), "-c", "recon", "-o", str(tmp_path / "o.h5")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2, cli.stderr
    assert "header version 8" in cli.stderr and "Traceback" not in cli.stderr


def _no_python_left(gadgetron: Gadgetron) -> None:
    deadline = time.monotonic() + 10
    while gadgetron.python_children() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not gadgetron.python_children(), "Python gadgets left running"


def _pipeline_with(tmp_path: Path, base: str, old: str, new: str) -> Path:
    text = (ROOT / "pipelines" / f"{base}.xml").read_text()
    assert old in text
    path = tmp_path / f"{base}-changed.xml"
    path.write_text(text.replace(old, new, 1))
    return path


def _faulty_before_recon(tmp_path: Path, target: str) -> Path:
    node = f'<external><execute name="tests.faulty_gadgets" target="{target}" type="python"/><configuration/></external>\n    <external>'
    return _pipeline_with(tmp_path, "detect", "<external>", node)


ERROR_CASES = {
    "wrong property": (
        lambda tmp: _pipeline_with(tmp, "detect", '<property name="noise_level" value="whitened"/>', '<property name="noise_level" value="bogus"/>'),
        "property 'noise_level' = 'bogus'",
    ),
    "missing calibration": (
        lambda tmp: _pipeline_with(tmp, "detect", '<property name="noise_level" value="whitened"/>',
                                   '<property name="noise_level" value="whitened"/><property name="calibration" value="/nonexistent/cal.json"/>'),
        "/nonexistent/cal.json",
    ),
    "killed gadget": (
        lambda tmp: _pipeline_with(tmp, "defended", '<execute name="gadgets.detect" target="detect" type="python"/>',
                                   '<execute name="tests.faulty_gadgets" target="detect_killed" type="python"/>'),
        None,
    ),
    "gadget raises": (lambda tmp: _faulty_before_recon(tmp, "explode_on_second_buffer"), "slice 2 exploded"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_reach_the_real_client_once_and_nothing_hangs(gadgetron: Gadgetron, case: str, tmp_path: Path) -> None:
    make, message = ERROR_CASES[case]
    run = gadgetron.client_until_answered(DEMO_RAW, tmp_path / "real.h5", expect=message, script=make(tmp_path), timeout=int(ERROR_DEADLINE_S))
    assert run.seconds < ERROR_DEADLINE_S, run.output
    assert "ERROR" in run.output, run.output
    if message is not None:
        assert run.output.count(message) == 1, run.output
        assert "gadgets.detect:detect: gadgets.detect:detect" not in run.output
    _no_python_left(gadgetron)


def test_a_header_our_library_rejects_reaches_the_real_client(gadgetron: Gadgetron, tmp_path: Path) -> None:
    raw = demo_with_header(tmp_path / "radial.h5", ">cartesian<", ">radial<")
    run = gadgetron.client_until_answered(raw, tmp_path / "real.h5", config="detect.xml", timeout=int(ERROR_DEADLINE_S))
    assert run.seconds < ERROR_DEADLINE_S and not run.wrote
    assert run.output.count("trajectory 'radial' is not supported") >= 1, run.output
    _no_python_left(gadgetron)


def test_noise_scans_without_a_measurement_id_are_refused_as_gadgetron_refuses_them(gadgetron: Gadgetron, tmp_path: Path) -> None:
    raw = demo_with_header(tmp_path / "nomeas.h5", "<measurementID>CYCGUARD_SIM_00001</measurementID>", "")
    run = gadgetron.client(raw, tmp_path / "real.h5", config="recon.xml", timeout=int(ERROR_DEADLINE_S))
    assert run.seconds < ERROR_DEADLINE_S and not run.wrote and "NoiseAdjustGadget" in run.output
    result = replay(raw, "recon", tmp_path / "ours.h5", None, group="g", progress=False)
    assert not result.ok and any("measurementID" in failure for failure in result.failures), result.failures


def test_a_cut_off_file_reports_its_slices_through_real_gadgetron_and_keeps_the_rest(gadgetron: Gadgetron, tmp_path: Path) -> None:
    import h5py

    raw = tmp_path / "cut.h5"
    raw.write_bytes(DEMO_RAW.read_bytes())
    with h5py.File(raw, "r+") as handle:
        handle["dataset/data"].resize((len(handle["dataset/data"]) - 60,))
    run = gadgetron.client(raw, tmp_path / "real.h5", config="detect.xml")
    assert run.output.count("slice 2 (contrast 0, repetition 0): no ACQ_LAST_IN_SLICE acquisition") == 1, run.output
    assert run.output.count("slice 3: no data arrived") == 1, run.output
    kept = host.read_output(tmp_path / "real.h5")
    assert {key[0]: image.meta["CycGuard.Verdict"] for key, image in kept.items()} == {0: "clean", 1: "clean"}
    _no_python_left(gadgetron)
