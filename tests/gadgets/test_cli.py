"""The ``cycguard`` command line, end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recon.io.mrd_write import read_images
from tests import ROOT

pytestmark = pytest.mark.e2e


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gadgets.cli", *args], capture_output=True, text=True, timeout=600)


def test_demo_replays_the_red_team_chain_over_the_wire(tmp_path: Path) -> None:
    """The README's main command: every gadget is its own `python -m gadgetron` process."""
    result = _run("demo", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "report:" in result.stdout
    images = read_images(tmp_path / "demo_images.h5")
    assert len(images) == 4
    verdicts = [meta["CycGuard.Verdict"] for _, meta in images]
    # slices 1 and 3 are attacked by the red-team gadget (pipelines/redteam.xml), 0 and 2 are clean data
    assert verdicts[0] == verdicts[2] == "clean"
    assert verdicts[1] in ("flagged", "mitigated") and verdicts[3] in ("flagged", "mitigated")
    for _, meta in images:
        assert 0 < float(meta["CycGuard.PValue"]) <= 1
        assert meta["CycGuard.Model"].startswith("modl_default:")
        assert meta["ImageComment"].startswith(meta["CycGuard.Verdict"])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = report["slices"]
    assert [row["attacked"] for row in rows] == [False, True, False, True]
    assert rows[0]["quality"]["psnr"] > 33 and rows[2]["quality"]["psnr"] > 33  # clean slices: the network's image
    assert rows[1]["quality"]["psnr"] < rows[0]["quality"]["psnr"] - 3  # the attack does damage
    for row in rows:
        assert (tmp_path / "report" / row["picture"]).stat().st_size > 1000
        assert row["protocol"] == "128x128, 8 coils, equispaced R=4, 16 ACS lines" and len(row["calibration"]) == 12
        assert row["signal_level"] > 0
    # a rewritten slice shows the image as received and as rewritten, each with its PSNR
    rewritten = [row for row in rows if row["verdict"] == "mitigated"]
    assert rewritten and all(row["received_quality"]["psnr"] < row["quality"]["psnr"] for row in rewritten)
    assert all(row["received_quality"] is None for row in rows if row["verdict"] != "mitigated")
    received = read_images(tmp_path / "demo_images.h5", series_index=101)  # the before images, never exported
    assert [meta["GADGETRON_DataRole"] for _, meta in received] == ["CycGuard.Received"] * len(rewritten)
    assert report["verdicts"] == {v: verdicts.count(v) for v in ("clean", "flagged", "mitigated", "unverified")}
    assert report["model"].startswith("modl_default:") and report["calibrations"] == [rows[0]["calibration"]]
    assert report["software"]["cycguard"] and report["software"]["torch"] and datetime.fromisoformat(report["created"]).tzinfo
    assert report["properties"]["attack.slices"] == "1,3" and report["properties"]["mitigate.send_received"] == "true"
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<table>" in page and "zero-filled" not in page and " received<br>&rarr; " in page
    assert [line.split()[5] for line in result.stdout.splitlines()[1:5]] == verdicts
    assert "verdicts: " + ", ".join(f"{v} {verdicts.count(v)}" for v in ("clean", "flagged", "mitigated", "unverified")) in result.stdout
    assert "Warning" not in result.stderr, result.stderr  # gadgets and runner log, they do not warn
    assert len(list((tmp_path / "dicom").rglob("*.dcm"))) == 4


def test_calibrate_from_clean_raw_files_and_use_it(tmp_path: Path) -> None:
    from recon.data.demo import DEMO_RAW

    too_strict = _run("calibrate", str(DEMO_RAW), "-o", str(tmp_path / "c.json"))
    assert too_strict.returncode == 2 and "cannot calibrate a 0.01 false-positive rate" in too_strict.stderr
    made = _run("calibrate", str(DEMO_RAW), "--fpr", "0.25", "-o", str(tmp_path / "c.json"))
    assert made.returncode == 0, made.stderr
    assert "4 clean slices" in made.stdout
    assert "mitigation rewrites only a flagged slice scoring above " in made.stdout
    assert "covers signal levels " in made.stdout and "a slice outside cannot be clean" in made.stdout
    assert "scales: null_shift " in made.stdout and "mitigation gates: prior_shift " in made.stdout  # the deployed statistic's
    # two backstops scaled by the largest of 4 clean slices: each may add 1/5 on new clean slices
    assert "backstops: dc_spike, prior_shift (false-positive rate on new clean slices up to 0.65;" in made.stdout
    used = _run("recon", str(DEMO_RAW), "-o", str(tmp_path / "out.h5"), "--calibration", str(tmp_path / "c.json"), "--device", "cpu")
    assert used.returncode == 0, used.stderr
    verdicts = [meta["CycGuard.Verdict"] for _, meta in read_images(tmp_path / "out.h5")]
    assert len(verdicts) == 4 and set(verdicts) <= {"clean", "flagged", "mitigated"}


def test_calibrating_one_statistic_scores_only_what_it_needs() -> None:
    """``cycguard calibrate --statistic S`` scores the clean slices with S's passes only (the
    deployed statistic: no folds), and the components come out as the full scoring's."""
    from recon.calibrate import scores_from_raw
    from recon.data.demo import DEMO_RAW
    from recon.detect.statistics import COMBINATIONS, DEFAULT_STATISTIC
    from recon.models.weights import load_model

    model, manifest = load_model()
    full, protocol = scores_from_raw([DEMO_RAW], model, manifest, progress=False)
    only, same = scores_from_raw([DEMO_RAW], model, manifest, progress=False, statistic=DEFAULT_STATISTIC)
    assert same == protocol and len(only) == len(full) == 4
    assert all(s.holdout_noise is None for s in only) and all(s.holdout_noise is not None for s in full)
    for a, b in zip(only, full, strict=True):
        for name in COMBINATIONS[DEFAULT_STATISTIC].components:
            assert a.get(name) == pytest.approx(b.get(name), rel=1e-5)


def test_a_calibration_for_another_protocol_is_refused(small_raw: tuple, tmp_path: Path) -> None:
    from recon.models.weights import DEFAULT_WEIGHTS

    default = DEFAULT_WEIGHTS.with_name("modl_default.calibration.json")
    result = _run("recon", str(small_raw[0]), "-o", str(tmp_path / "o.h5"), "--calibration", str(default))
    assert result.returncode == 2
    assert "was made for another protocol" in result.stderr
    assert not (tmp_path / "o.h5").exists()


def test_bad_input_fails_with_its_reason(tmp_path: Path) -> None:
    from recon.data.demo import DEMO_RAW

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 64)
    result = _run("recon", str(junk), "-o", str(tmp_path / "out.h5"))
    assert result.returncode == 2
    assert "not a readable HDF5 file" in result.stderr
    assert not (tmp_path / "out.h5").exists()
    device = "tpu" if _cuda() else "cuda:7"
    result = _run("recon", str(DEMO_RAW), "-o", str(tmp_path / "out2.h5"), "--device", device)
    assert result.returncode == 2
    assert "device" in result.stderr


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_an_output_that_is_the_input_or_holds_raw_data_is_refused(tmp_path: Path) -> None:
    import shutil

    from recon.data.demo import DEMO_RAW

    raw = tmp_path / "scan.h5"
    shutil.copyfile(DEMO_RAW, raw)
    before = raw.read_bytes()
    link = tmp_path / "link.h5"
    link.symlink_to(raw)
    other = tmp_path / "other_scan.h5"
    shutil.copyfile(DEMO_RAW, other)
    cases = [
        (("recon", str(raw), "-o", str(raw)), "is the input"),
        (("replay", str(raw), "-c", "recon", "-o", str(raw)), "is the input"),
        (("recon", str(raw), "-o", str(link)), "is the input"),
        (("replay", str(link), "-c", "recon", "-o", str(tmp_path / "." / "scan.h5")), "is the input"),
        (("replay", str(raw), "-c", "recon", "-o", str(other)), "holds raw data"),
        (("recon", str(raw), "-o", str(other)), "holds raw data"),
    ]
    for args, reason in cases:
        result = _run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert reason in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert raw.read_bytes() == before and other.read_bytes() == DEMO_RAW.read_bytes()


def test_an_empty_data_set_and_an_unwritable_output_fail_with_status_2(tmp_path: Path) -> None:
    import shutil

    import h5py

    from recon.data.demo import DEMO_RAW

    empty = tmp_path / "empty.h5"
    shutil.copyfile(DEMO_RAW, empty)
    with h5py.File(empty, "r+") as handle:
        handle["dataset/data"].resize((0,))
    for args in (("recon", str(empty), "-o", str(tmp_path / "a.h5")), ("replay", str(empty), "-c", "recon", "-o", str(tmp_path / "b.h5"))):
        result = _run(*args)
        assert result.returncode == 2 and "no imaging acquisitions" in result.stderr, result.stderr
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    result = _run("replay", str(DEMO_RAW), "-c", "recon", "-o", str(blocker / "out.h5"))
    assert result.returncode == 2 and "cannot write the output" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_check_names_the_line_of_a_misspelt_gadget_and_of_a_missing_file(tmp_path: Path) -> None:
    root = ROOT
    text = (root / "pipelines" / "defended.xml").read_text()
    line = next(n for n, row in enumerate(text.splitlines(), start=1) if 'name="gadgets.mitigate"' in row) - 1  # its <external>
    cases = {
        "typo": (text.replace('name="gadgets.mitigate"', 'name="gadgets.mitigat"'), "did you mean gadgets.mitigate:mitigate?"),
        "absent": (text.replace('name="gadgets.mitigate"', 'name="nosuchmodule.gadget"'), "'nosuchmodule.gadget' is not installed"),
        "calibration": (text.replace('<execute name="gadgets.mitigate" target="mitigate" type="python"/>\n      <configuration>',
                                     '<execute name="gadgets.mitigate" target="mitigate" type="python"/>\n      <configuration>'
                                     '<property name="calibration" value="/no/such/cal.json"/>'), "/no/such/cal.json, which does not exist"),
    }
    for name, (xml, reason) in cases.items():
        path = tmp_path / f"{name}.xml"
        path.write_text(xml)
        result = _run("check", str(path))
        assert result.returncode == 1, (name, result.stdout)
        assert f"{path}:{line}:" in result.stdout and reason in result.stdout, result.stdout
        replay = _run("replay", str(root / "recon" / "data" / "demo" / "demo_raw.h5"), "-c", str(path), "-o", str(tmp_path / f"{name}.h5"))
        assert replay.returncode == 2 and reason in replay.stderr and "Traceback" not in replay.stderr, replay.stderr


def test_replay_refuses_bad_files_before_starting_any_gadget(tmp_path: Path) -> None:
    """Too few calibration lines in every slice, or a header claiming a matrix far beyond what
    the file holds: status 2 in seconds, no traceback, no gadget started, memory bounded."""
    import shutil
    import time

    import h5py
    import ismrmrd

    from recon.data.demo import DEMO_RAW
    from tests.conftest import demo_with_header

    few_acs = tmp_path / "few_acs.h5"
    shutil.copyfile(DEMO_RAW, few_acs)
    with h5py.File(few_acs, "r+") as handle:  # keep 4 of the 16 calibration lines of every slice
        data = handle["dataset/data"]
        rows = data[()]
        e1 = rows["head"]["idx"]["kspace_encode_step_1"]
        rows = rows[(e1 < 62) | (e1 > 65) | ((rows["head"]["flags"] & (1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))) != 0)]
        del handle["dataset/data"]
        handle.create_dataset("dataset/data", data=rows, maxshape=(None,), chunks=True)
    huge = demo_with_header(tmp_path / "huge.h5", "<y>128</y>", "<y>8192</y>")
    for raw, reason in ((few_acs, "contiguous calibration lines at the centre"), (huge, "refusing a claim over 32 times what the file holds")):
        start = time.monotonic()
        # the run's own peak memory (and its children's), reported by a wrapper: apart from earlier tests' children
        measured = (
            "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak-kB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
        )
        command = [sys.executable, "-m", "gadgets.cli", "replay", str(raw), "-c", "defended", "-o", str(tmp_path / f"{raw.stem}.out.h5")]
        result = subprocess.run([sys.executable, "-c", measured, *command], capture_output=True, text=True, timeout=600)
        assert result.returncode == 2 and reason in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert time.monotonic() - start < 30
        assert int(result.stderr.rsplit("peak-kB ", 1)[1].split()[0]) < 1_500_000  # no buffer sized by the claim


def test_the_calibrate_command_offers_the_product_detectors_and_defaults_to_the_deployed_one() -> None:
    from gadgets.cli import build_parser
    from recon.detect.statistics import DEFAULT_STATISTIC, DETECTORS

    parser = build_parser()
    args = parser.parse_args(["calibrate", "--simulate", "1"])
    assert args.statistic == DEFAULT_STATISTIC
    action = next(a for a in parser._subparsers._group_actions[0].choices["calibrate"]._actions if a.dest == "statistic")  # type: ignore[union-attr]
    assert list(action.choices) == [*(d.name for d in DETECTORS), "cyclic"] and len(DETECTORS) == 2


def test_a_protocol_without_a_calibration_gets_one_by_simulation(small_raw: tuple, tmp_path: Path, _calibration_cache: Path) -> None:
    """A scan of another protocol (32x32, 4 coils, R = 2, 8 ACS lines) is ``unverified`` and
    told how to get a calibration; ``calibrate --like`` makes one from its own protocol and
    coil maps into the cache, and the same scan is then checked."""
    raw = str(small_raw[0])
    before = _run("recon", raw, "-o", str(tmp_path / "before.h5"))
    assert before.returncode == 0, before.stderr
    assert {meta["CycGuard.Verdict"] for _, meta in read_images(tmp_path / "before.h5")} == {"unverified"}
    assert "make one with `cycguard calibrate --like SCAN.h5`" in before.stderr
    made = _run("calibrate", "--like", raw, "--simulate", "120", "--fpr", "0.05")
    assert made.returncode == 0, made.stderr
    assert "simulated 120 clean slices of 32x32, 4 coils, equispaced R=2, 8 ACS lines" in made.stdout
    assert f"calibration: {_calibration_cache}" in made.stdout and "made by simulation" in made.stdout
    assert "covers simulated: 120 held-out MNI152 brain slices (augmented) with the coil maps of small.h5" in made.stdout
    [cached] = _calibration_cache.rglob("32x32_4ch_equispaced_R2_acs8.json")
    assert json.loads(cached.read_text())["source"].startswith("simulated: 120 held-out MNI152")
    after = _run("recon", raw, "-o", str(tmp_path / "after.h5"))
    assert after.returncode == 0, after.stderr
    verdicts = [meta["CycGuard.Verdict"] for _, meta in read_images(tmp_path / "after.h5")]
    assert len(verdicts) == 2 and "unverified" not in verdicts, after.stderr
    from recon.data.demo import DEMO_RAW

    again = _run("calibrate", "--like", str(DEMO_RAW), "--simulate", "5")
    assert again.returncode == 2 and "has the model's own protocol" in again.stderr


def test_the_detector_takes_the_alternatives_a_protocol_has() -> None:
    from recon.detect.calibration import ProtocolKey
    from recon.detect.defense import detector_for
    from recon.models.weights import load_model

    model, manifest = load_model()
    assert detector_for(model, manifest).alternatives == 3
    assert [detector_for(model, manifest, ProtocolKey((64, 64), 4, "equispaced", r, 12)).alternatives for r in (2, 3, 5)] == [1, 2, 3]


def test_the_detect_stage_has_a_new_protocol_calibrated_in_the_background(
    small_raw: tuple, tmp_path: Path, _calibration_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan of a protocol with no calibration through the defended chain: its slices leave
    ``unverified`` saying a calibration is being made; one background job makes it into the
    cache (from the scan's coil maps: no image kept); the same scan is then checked."""

    from gadgets import autocalibrate
    from gadgets.runner.replay import replay

    monkeypatch.setenv("CYCGUARD_AUTO_CALIBRATE", "on")
    monkeypatch.setattr(autocalibrate, "_STARTED", [])
    try:
        _calibrated_in_the_background(small_raw, tmp_path, _calibration_cache, replay)
    finally:
        for job in autocalibrate._STARTED:  # a job of a failed run does not outlive the test
            job.kill()
            job.wait()


def _calibrated_in_the_background(small_raw: tuple, tmp_path: Path, _calibration_cache: Path, replay: Any) -> None:
    import time

    text = (ROOT / "pipelines" / "defended.xml").read_text().replace(
        '<property name="noise_level" value="whitened"/>', '<property name="noise_level" value="whitened"/><property name="auto_calibrate_slices" value="100"/>'
    )
    pipeline = tmp_path / "defended_auto.xml"
    pipeline.write_text(text)
    first = replay(small_raw[0], str(pipeline), tmp_path / "first.h5", None, group="images", in_process=True, progress=False)
    reasons = [meta.get("ImageComment", "") for _, meta in read_images(tmp_path / "first.h5", group="images")]
    assert [meta["CycGuard.Verdict"] for _, meta in read_images(tmp_path / "first.h5", group="images")] == ["unverified", "unverified"]
    assert all("is being made in the background" in r and "of 100 slices" in r for r in reasons), reasons
    assert first.ok or all("unverified" in f for f in first.failures), first.failures
    folder = next(_calibration_cache.iterdir())
    target = folder / "32x32_4ch_equispaced_R2_acs8.json"
    assert len(list(folder.glob("*.pending.json"))) <= 1  # one job, though two slices asked
    deadline = time.monotonic() + 300
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(1)
    pending = folder / "32x32_4ch_equispaced_R2_acs8.pending.json"
    while pending.exists() and time.monotonic() < deadline:  # the job removes it once the calibration is in place
        time.sleep(0.5)
    assert target.exists() and not pending.exists(), (folder / "32x32_4ch_equispaced_R2_acs8.log").read_text()[-2000:]
    made = json.loads(target.read_text())
    assert made["source"].startswith("simulated: 100 held-out MNI152 brain slices (augmented) with the coil maps of a detect-stage slice")
    with np.load(folder / "32x32_4ch_equispaced_R2_acs8.seed.npz") as seed:
        assert sorted(seed.files) == ["header", "maps"] and seed["maps"].shape == (1, 4, 32, 32)
    replay(small_raw[0], str(pipeline), tmp_path / "second.h5", None, group="images", in_process=True, progress=False)
    verdicts = [meta["CycGuard.Verdict"] for _, meta in read_images(tmp_path / "second.h5", group="images")]
    assert len(verdicts) == 2 and "unverified" not in verdicts, [meta.get("ImageComment") for _, meta in read_images(tmp_path / "second.h5", group="images")]


def test_cycguard_recon_has_a_new_rectangular_protocol_calibrated_in_the_background(
    tmp_path: Path, _calibration_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """48x32 (a rectangular field of view), no calibration: ``cycguard recon`` leaves its slices
    ``unverified`` and starts one calibration by simulation in the background (the square
    anatomy cropped about its centre), which outlives the command; the same scan is checked
    once it is in place. ``--no-auto-calibrate`` starts none."""
    import os
    import signal
    import time

    from tests.conftest import write_small_raw

    monkeypatch.setenv("CYCGUARD_AUTO_CALIBRATE", "on")
    raw = str(write_small_raw(tmp_path / "rect.h5", matrix=(48, 32), seed=5)[0])
    off = _run("recon", raw, "-o", str(tmp_path / "off.h5"), "--no-auto-calibrate")
    assert off.returncode == 0, off.stderr
    assert {meta["CycGuard.Verdict"] for _, meta in read_images(tmp_path / "off.h5")} == {"unverified"}
    assert "make one with `cycguard calibrate --like SCAN.h5`" in off.stderr
    assert not list(_calibration_cache.rglob("*.pending.json"))
    first = _run("recon", raw, "-o", str(tmp_path / "first.h5"), "--auto-calibrate-slices", "100")
    assert first.returncode == 0, first.stderr
    images = read_images(tmp_path / "first.h5")
    assert {meta["CycGuard.Verdict"] for _, meta in images} == {"unverified"}
    assert all("is being made in the background" in meta["ImageComment"] and "of 100 slices" in meta["ImageComment"] for _, meta in images)
    [pending] = _calibration_cache.rglob("48x32_4ch_equispaced_R2_acs8.pending.json")
    target = pending.with_name("48x32_4ch_equispaced_R2_acs8.json")
    try:
        deadline = time.monotonic() + 300
        while (pending.exists() or not target.exists()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert target.exists() and not pending.exists(), pending.with_name("48x32_4ch_equispaced_R2_acs8.log").read_text()[-2000:]
    finally:
        if pending.exists():  # a job that did not finish does not outlive the test
            pid = json.loads(pending.read_text() or "{}").get("pid")
            if pid:
                os.kill(int(pid), signal.SIGKILL)
    assert json.loads(target.read_text())["source"].startswith("simulated: 100 held-out MNI152 brain slices (augmented) with the coil maps of rect.h5")
    after = _run("recon", raw, "-o", str(tmp_path / "after.h5"))
    assert after.returncode == 0, after.stderr
    verdicts = [meta["CycGuard.Verdict"] for _, meta in read_images(tmp_path / "after.h5")]
    assert len(verdicts) == 2 and "unverified" not in verdicts, after.stderr
