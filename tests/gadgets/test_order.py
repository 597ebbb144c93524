"""Gadgetron's distributed mode without a server: the order stage, the ``<distributed>`` block in
the runner's pipelines and ``cycguard workers`` (the real Gadgetron runs: test_distributed.py)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from gadgets.convert import received_copy
from gadgets.order import OrderStage
from gadgets.params import OrderSettings
from gadgets.runner.config import PipelineError, check_pipeline, load_pipeline, parse_pipeline
from gadgets.stages import Resources, SliceError, launched_without_target
from gadgets.workers import Worker, answering, discovery_output, parse_workers
from recon.data.demo import DEMO_RAW
from recon.io.mrd import read_header_text
from tests import ROOT

DISTRIBUTED = ROOT / "pipelines" / "defended_distributed.xml"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _stage(hold: float = 600.0) -> tuple[OrderStage, Clock]:
    stage = OrderStage(OrderSettings(hold_seconds=hold), Resources(read_header_text(DEMO_RAW)))  # 4 slices
    clock = Clock()
    stage.clock = clock
    return stage, clock


def _image(slice_: int, worker_index: int = 1) -> ismrmrd.Image:
    image = ismrmrd.Image.from_array(np.full((8, 8), slice_ + 1, dtype=np.complex64))
    image.slice = slice_
    image.image_index = worker_index
    return image


def _slices(items: list[object]) -> list[tuple[int, int]]:
    return [(item.slice, item.image_index) for item in items if isinstance(item, ismrmrd.Image)]


def test_images_go_out_in_slice_order_as_soon_as_the_slices_before_them_are_out() -> None:
    stage, _ = _stage()
    assert list(stage.process(_image(2))) == []
    assert list(stage.process(_image(1))) == []
    assert _slices(list(stage.process(_image(0)))) == [(0, 1), (1, 2), (2, 3)]
    assert _slices(list(stage.process(_image(3)))) == [(3, 4)]
    assert list(stage.close()) == []


def test_a_received_image_follows_its_rewritten_image() -> None:
    stage, _ = _stage()
    flagged = _image(1)
    assert list(stage.process(flagged)) == []
    assert list(stage.process(received_copy(flagged))) == []
    out = list(stage.process(_image(0)))
    assert _slices(out) == [(0, 1), (1, 2), (1, 2)] and out[2].image_series_index == flagged.image_series_index + 100
    late = _image(2)
    assert _slices(list(stage.process(late))) == [(2, 3)]
    assert _slices(list(stage.process(received_copy(late)))) == [(2, 3)]  # its image is already out


def test_every_slice_no_worker_returned_is_an_error_and_a_second_copy_is_not_sent() -> None:
    stage, _ = _stage()
    stage.process(_image(0))
    stage.process(_image(2))
    twice = list(stage.process(_image(0)))
    assert len(twice) == 1 and isinstance(twice[0], SliceError) and "slice 0: came back twice" in twice[0].message
    out = list(stage.close())
    assert _slices(out) == [(2, 3)]
    errors = [item.message for item in out if isinstance(item, SliceError)]
    assert [re.match(r"slice (\d+): no image came back", e).group(1) for e in errors] == ["1", "3"]  # type: ignore[union-attr]


def test_when_nothing_comes_back_the_run_fails_naming_the_likely_cause() -> None:
    stage, _ = _stage()
    with pytest.raises(RuntimeError, match="stock Gadgetron 4.7.2 drops the target"):
        list(stage.close())


def test_an_image_stops_waiting_after_hold_seconds_and_the_late_slice_follows() -> None:
    stage, clock = _stage(hold=10.0)
    stage.process(_image(0))
    assert list(stage.process(_image(2))) == []
    clock.now = 11.0  # 2 has waited 11 s for 1: it goes, and 3 with it (it waits for nothing now)
    assert _slices(list(stage.process(_image(3)))) == [(2, 3), (3, 4)]
    assert _slices(list(stage.process(_image(1)))) == [(1, 2)]  # late, sent when it comes, with its own number
    assert list(stage.close()) == []


def test_images_the_header_does_not_announce_go_out_last_numbered_after_the_rest() -> None:
    stage, _ = _stage()
    extra = _image(7)
    assert list(stage.process(extra)) == []
    for n in range(4):
        stage.process(_image(n))
    assert _slices(list(stage.close())) == [(7, 5)]


# ------------------------------------------------------------------ the <distributed> block in pipelines


def _block(stream_nodes: str, distributor: str = "AcquisitionDistributor", dimension: str = "slice") -> str:
    text = DISTRIBUTED.read_text()
    start, end = text.index("      <stream>"), text.index("      </stream>") + len("      </stream>")
    text = text[:start] + f"<stream>{stream_nodes}</stream>" + text[end:]
    return text.replace("AcquisitionDistributor", distributor).replace('value="slice"/>\n      </distributor>', f'value="{dimension}"/>\n      </distributor>')


WORKER_STREAM = DISTRIBUTED.read_text()[DISTRIBUTED.read_text().index("      <stream>") + 14 : DISTRIBUTED.read_text().index("      </stream>")]


def test_the_runner_runs_a_distributed_block_in_line() -> None:
    pipeline = load_pipeline("defended_distributed")
    assert pipeline.distributed == "AcquisitionDistributor"
    start, end = pipeline.span
    assert [getattr(n, "classname", getattr(n, "module", "")) for n in pipeline.nodes[start:end]] == [
        "gadgets.recon", "gadgets.detect", "gadgets.mitigate"]  # the slice's acquisitions straight to recon
    assert check_pipeline(pipeline) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_block(WORKER_STREAM.replace('<property name="account_slices" value="false"/>', "")), "set its account_slices=false"),
        (_block(WORKER_STREAM, distributor="ImageDistributor"), "'ImageDistributor' is not supported"),
        (_block(WORKER_STREAM, dimension="repetition"), "need whole slices"),
        (_block(WORKER_STREAM + '<external><execute name="gadgets.export" target="export" type="python"/></external>'),
         "export stage inside the <distributed> block"),
        (_block(WORKER_STREAM + "<distributed/>"), "only one <distributed> block"),
        (DISTRIBUTED.read_text().replace("<classname>ImageReader</classname>", "<classname>AcquisitionReader</classname>"), "need the ImageReader"),
        (_block(""), "needs a <stream>"),
        (DISTRIBUTED.read_text().replace("<classname>NoiseAdjustGadget</classname>", "<classname>RemoveROOversamplingGadget</classname>", 1),
         "NoiseAdjustGadget must come before the <distributed> block"),
    ],
)
def test_a_wrong_distributed_block_is_named(text: str, message: str) -> None:
    with pytest.raises(PipelineError, match=re.escape(message)):
        check_pipeline(parse_pipeline(text, "test.xml"))


def test_without_the_order_stage_the_check_warns() -> None:
    text = DISTRIBUTED.read_text()
    start = text.index('    <external>\n      <execute name="gadgets.order"')
    text = text[:start] + text[text.index("    <external>", start + 10):]
    assert any("put gadgets.order after the block" in w for w in check_pipeline(parse_pipeline(text)))


# ------------------------------------------------------------------ discovery


def test_workers_lists_only_those_that_answer_as_gadgetron_reads_them() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        alive = Worker("127.0.0.1", listening.getsockname()[1])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            down = Worker("127.0.0.1", s.getsockname()[1])  # bound, not listening: refuses
        assert answering([down, alive], timeout=1.0) == [alive]
        assert discovery_output([alive]) == f'["127.0.0.1:{alive.port}"]'
        cli = [str(Path(sys.executable).parent / "cycguard"), "workers"]
        run = subprocess.run([*cli, str(down), str(alive)], capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 0 and run.stdout.strip() == f'["127.0.0.1:{alive.port}"]', run.stderr
        none = subprocess.run([*cli, str(down)], capture_output=True, text=True, timeout=60, check=False)
        assert none.returncode == 1 and none.stdout == "" and "runs the distributed stream on the main node" in none.stderr


def test_worker_addresses_are_checked() -> None:
    assert parse_workers(["a.example:9002, [::1]:9003", "10.0.0.5:9004"]) == [Worker("a.example", 9002), Worker("::1", 9003), Worker("10.0.0.5", 9004)]
    assert str(Worker("::1", 9003)) == "[::1]:9003"
    for bad in ("host", "host:99999", "host:port", "http://host:9002"):
        with pytest.raises(ValueError, match="worker"):
            parse_workers([bad])


def test_a_gadget_started_without_its_target_is_recognised() -> None:
    assert launched_without_target(["/x/site-packages/gadgetron/__main__.py", "9002", "gadgets.recon"])
    assert not launched_without_target(["/x/site-packages/gadgetron/__main__.py", "9002", "gadgets.recon", "recon"])
    assert not launched_without_target(["/x/bin/cycguard", "workers", "gadgets.x"])


def test_outside_a_distributed_block_recon_still_needs_the_buffer() -> None:
    text = (ROOT / "pipelines" / "recon.xml").read_text()
    for classname in ("AcquisitionAccumulateTriggerGadget", "BucketToBufferGadget"):
        start = text.index(f"<gadget><dll>gadgetron_mricore</dll><classname>{classname}</classname>")
        text = text[:start] + text[text.index("</gadget>", start) + len("</gadget>"):]
    with pytest.raises(PipelineError, match="needs BucketToBufferGadget before it"):
        check_pipeline(parse_pipeline(text, "test.xml"))
