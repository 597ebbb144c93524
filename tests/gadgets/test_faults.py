"""Fault injection, one table: a failure in each stage of the defended chain (one process per
gadget, as Gadgetron runs it). The real stages run; only the one under test misbehaves at the
demo's second slice (tests/faulty_gadgets.py). Every row: the run fails loudly, naming what
failed; the first slice, done before the fault, is kept with its verdict; no image looks
checked that was not, none is duplicated. Faults that the chain absorbs (mitigation past its
time budget, PACS down, a full spool disk) are tested where they live: see the last table of
benchmarks/RESULTS.md, section 9."""

from __future__ import annotations

from pathlib import Path

import pytest

from gadgets.runner.replay import replay
from recon.data.demo import DEMO_RAW
from recon.io.mrd_write import read_images
from tests import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# (stage replaced, faulty target, what the run's failure must say)
FAULTS = [
    ("recon", "recon_raises", "injected fault: the recon stage raised on slice 2"),
    ("detect", "detect_raises", "injected fault: the detect stage raised on slice 2"),
    ("detect", "detect_killed", "exited with status -9 (killed by signal 9)"),
    ("mitigate", "mitigate_raises", "injected fault: the mitigate stage raised on slice 2"),
    ("mitigate", "mitigate_network_breaks", "mitigate_network_breaks: connection lost before CLOSE"),
    ("export", "export_raises", "injected fault: the export stage raised on slice 2"),
]


@pytest.mark.parametrize(("stage", "target", "message"), FAULTS, ids=[f[1] for f in FAULTS])
def test_a_fault_in_any_stage_fails_the_run_loudly_and_keeps_what_was_done(
    stage: str, target: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `check` rightly refuses a chain whose gadget it cannot see into (the stand-in hides what
    # the real one forwards); the stand-in runs the real stage, so that pre-flight is skipped.
    monkeypatch.setattr("gadgets.runner.replay.check_pipeline", lambda pipeline: [])
    text = (ROOT / "pipelines" / "defended.xml").read_text()
    real = f'<execute name="gadgets.{stage}" target="{stage}" type="python"/>'
    assert real in text
    path = tmp_path / f"{target}.xml"
    path.write_text(text.replace(real, f'<execute name="tests.faulty_gadgets" target="{target}" type="python"/>'))
    result = replay(DEMO_RAW, str(path), tmp_path / "out.h5", None, group="g", progress=False, echo_stderr=False)
    assert not result.ok
    assert any(message in failure for failure in result.failures), result.failures
    assert any("3 of 4 slices came out without an image" in failure for failure in result.failures), result.failures
    kept = read_images(tmp_path / "out.h5", group="g")
    assert [meta["CycGuard.Verdict"] for _, meta in kept] == ["clean"]  # slice 1 (clean on the demo), checked, once
