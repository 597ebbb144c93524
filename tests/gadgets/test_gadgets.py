"""Gadget building blocks: properties, the message contract, the Python front end, the wire."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from gadgetron.external.connection import Connection

from gadgets import params
from gadgets.convert import buffer_slices, image_pixels, is_maps, maps_message, maps_of, meta_of, with_kspace
from gadgets.runner import frontend
from gadgets.runner.config import PipelineError, check_pipeline, installed_pipelines, load_pipeline, parse_pipeline
from gadgets.runner.external import READERS, write_item
from gadgets.runner.replay import stream_raw
from gadgets.stages import SafeSocket, run_stages, send_error
from recon.io.mrd import read_raw
from recon.io.mrd_write import to_ismrmrd_image as to_image
from recon.types import ReconImage, SliceKey
from tests import ROOT

# ------------------------------------------------------------------ properties


def _config(**values: str) -> str:
    return "<configuration>" + "".join(f'<property name="{k}" value="{v}"/>' for k, v in values.items()) + "</configuration>"


def test_properties_are_typed_and_checked() -> None:
    parsed = params.parse("gadgets.mitigate", "mitigate", _config(radius="2.5", iterations="7", enabled="no"))
    settings = parsed[params.MitigateSettings]
    assert settings.radius == 2.5 and settings.iterations == 7 and settings.enabled is False
    assert settings.patience == params.MitigateSettings().patience  # untouched properties keep defaults
    legacy = "<configuration><property><name>forward_internal</name><value>true</value></property></configuration>"
    assert params.parse("gadgets.recon", "recon", legacy)[params.ReconSettings].forward_internal is True


def test_every_mitigation_setting_is_a_property_that_reaches_the_pipeline() -> None:
    """Each field of the pipeline's ``MitigationSettings`` is a mitigate-gadget property, and a
    value set in the XML is the value the pipeline gets (e.g. ``rewrite_beyond_clean``)."""
    from dataclasses import fields

    from gadgets.mitigate import mitigation_settings
    from recon.settings import MitigationSettings

    names = {f.name for f in fields(MitigationSettings)}
    assert names <= {f.name for f in fields(params.MitigateSettings)}
    xml = _config(rewrite_beyond_clean="false", correct_null="false", correct_stop="0.5", method="prior", prior_gain="12")
    settings = mitigation_settings(params.parse("gadgets.mitigate", "mitigate", xml)[params.MitigateSettings])
    assert settings.rewrite_beyond_clean is False and settings.correct_null is False and settings.correct_stop == 0.5
    assert settings.method == "prior" and settings.prior_gain == 12.0 and settings.patience == MitigationSettings().patience
    assert mitigation_settings(params.MitigateSettings()) == MitigationSettings()  # the same defaults on both sides


@pytest.mark.parametrize(
    ("module", "target", "values", "message"),
    [
        ("gadgets.detect", "detect", {"treshold": "3"}, r"unknown property 'treshold' \(known: .*calibration"),
        ("gadgets.mitigate", "mitigate", {"radius": "-1"}, r"'radius' = '-1': must lie in \[0, 100\]"),
        ("gadgets.mitigate", "mitigate", {"iterations": "ten"}, r"'iterations' = 'ten': expected an integer"),
        ("gadgets.recon", "recon", {"forward_internal": "maybe"}, r"expected true or false"),
        ("gadgets.recon", "recon", {"device": "tpu"}, r"'device' = 'tpu': allowed values are auto, cpu, cuda"),
        ("gadgets.detect", "detect", {"noise_level": "guess"}, r"allowed values are estimate, whitened"),
        ("gadgets.recon", "recon", {"weights": "model@Recon"}, r"may not hold '@'"),
        ("gadgets.redteam", "attack", {"slices": "1;3"}, r"comma-separated slice indices"),
        ("gadgets.composed", "composed", {"stages": "recon,denoise"}, r"unknown stage 'denoise'"),
        ("gadgets.composed", "composed", {"stages": "recon", "radius": "2"}, r"unknown property 'radius'"),
    ],
)
def test_a_wrong_property_is_named(module: str, target: str, values: dict[str, str], message: str) -> None:
    with pytest.raises(params.PropertyError, match=message):
        params.parse(module, target, _config(**values))


def test_malformed_configuration_is_refused() -> None:
    with pytest.raises(params.PropertyError, match="not well-formed"):
        params.parse("gadgets.recon", "recon", "<configuration><property name='a'")
    with pytest.raises(params.PropertyError, match="given twice"):
        params.parse("gadgets.recon", "recon", _config(series="1") .replace("</configuration>", '<property name="series" value="2"/></configuration>'))


def test_property_reference_is_current() -> None:
    assert (ROOT / "docs" / "properties.md").read_text() == params.reference_markdown(), "regenerate: python -m gadgets.params > docs/properties.md"


# ------------------------------------------------------------------ pipelines


def test_every_installed_pipeline_passes_check() -> None:
    names = sorted(installed_pipelines())
    assert {"recon", "detect", "defended", "redteam", "defended_composed", "defended_connect"} <= set(names)
    for name in names:
        pipeline = load_pipeline(name)
        check_pipeline(pipeline, connect_stages="recon,detect,mitigate,export" if name.endswith("connect") else None)


def _pipeline(stream: str) -> str:
    front = (ROOT / "pipelines" / "recon.xml").read_text()
    start, end = front.index("    <external>"), front.index("  </stream>")
    return front[:start] + stream + front[end:]


def _external(module: str, target: str, **values: str) -> str:
    return f'<external><execute name="{module}" target="{target}" type="python"/>{_config(**values)}</external>\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_pipeline(_external("gadgets.detect", "detect", treshold="2")), "unknown property 'treshold'"),
        (_pipeline(_external("gadgets.recon", "recon", forward_internal="true") + _external("gadgets.detect", "detect", forward_internal="true")), "last CycGuard stage \\(detect\\)"),
        (_pipeline(_external("gadgets.recon", "recon") + _external("gadgets.detect", "detect")), "set forward_internal=true on the CycGuard gadget before it"),
        (_pipeline(_external("gadgets.recon", "recon") + "<gadget><classname>ExtractGadget</classname></gadget>"), "C\\+\\+ gadget 'ExtractGadget' has no Python equivalent"),
        (_pipeline(_external("gadgets.recon", "recon") + "<parallel/>"), "not supported by the CycGuard runner"),
        (_pipeline(_external("gadgets.recon", "recon") + "<gaget/>"), "unknown element"),
        (_pipeline(_external("gadgets.recon", "recon", weights="w@Recon")), "holds '@'"),
        (_pipeline(_external("gadgets.recon", "recon")).replace('value="slice"', 'value="slice@Acc"'), "holds '@'"),
        (_pipeline(_external("gadgets.recon", "recon")).replace('value="slice"', 'value="slices"'), "'trigger_dimension' = 'slices'"),
        (_pipeline(_external("gadgets.recon", "recon")).replace("<version>2</version>", ""), "<version>2</version> missing"),
        (_pipeline(_external("tests.faulty_gadgets", "explode_on_second_buffer")), None),
        (_pipeline(_external("gadgets.reconn", "recon")), "gadgets.reconn:recon is not a CycGuard gadget \\(did you mean gadgets.recon:recon\\?\\)"),
        (_pipeline(_external("nosuchpackage.gadget", "x")), "'nosuchpackage.gadget' is not installed"),
        ('<!DOCTYPE x [<!ENTITY a "aaaa">]><configuration/>', "safe XML"),
    ],
)
def test_check_names_what_is_wrong(text: str, message: str | None) -> None:
    if message is None:  # a foreign Python module: accepted with a warning, refused where only ours may run
        pipeline = parse_pipeline(text)
        assert any("not a CycGuard gadget" in w for w in check_pipeline(pipeline))
        with pytest.raises(PipelineError, match="CycGuard gadgets only"):
            check_pipeline(pipeline, allow_foreign=False)
        return
    with pytest.raises(PipelineError, match=message):
        check_pipeline(parse_pipeline(text, "test.xml"))


def test_check_command_reports_each_pipeline(tmp_path: Path) -> None:
    from gadgets.cli import main

    bad = tmp_path / "bad.xml"
    bad.write_text(_pipeline(_external("gadgets.mitigate", "mitigate", radius="lots")))
    assert main(["check", "recon", "defended"]) == 0
    assert main(["check", "defended", str(bad)]) == 1


# ------------------------------------------------------------------ front end and the message contract


def _front(header: str) -> list[object]:
    names = ["NoiseAdjustGadget", "RemoveROOversamplingGadget", "AcquisitionAccumulateTriggerGadget", "BucketToBufferGadget"]
    props = [{}, {}, {"trigger_dimension": "slice"}, {"split_slices": "true"}]
    return [frontend.build(n, header, p) for n, p in zip(names, props, strict=True)]



def test_recon_takes_acquisitions_and_sends_a_slices_image_at_its_last_one(small_raw: tuple) -> None:
    """A <distributed> worker stream stays open until the scan ends: the recon stage makes each
    slice's buffer itself, at its ACQ_LAST_IN_SLICE acquisition, not at the end of the stream."""
    from gadgets.stages import build_stages

    path = small_raw[0]
    scan = read_raw(path)
    config = _config(device="cpu", account_slices="false")
    from_buffers = [i for i in run_stages(build_stages("gadgets.recon", "recon", config, scan.xml),
                                          run_stages(_front(scan.xml), stream_raw(path))) if isinstance(i, ismrmrd.Image)]  # type: ignore[arg-type]
    acquisitions = list(run_stages(_front(scan.xml)[:2], stream_raw(path)))  # type: ignore[arg-type]  # whitened, readout cropped
    last_of_slice = [n for n, a in enumerate(acquisitions) if a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)]
    (stage,) = build_stages("gadgets.recon", "recon", config, scan.xml)
    sent_at, images = [], []
    for n, acq in enumerate(acquisitions):
        out = [i for i in stage.process(acq) if isinstance(i, ismrmrd.Image)]
        sent_at += [n] * len(out)
        images += out
    assert list(stage.close()) == []
    assert len(last_of_slice) == len(scan.slices) == 2 and sent_at == last_of_slice
    for image, reference in zip(images, from_buffers, strict=True):
        assert image.slice == reference.slice and image.image_index == reference.image_index
        np.testing.assert_array_equal(image.data, reference.data)


def test_a_slice_whose_last_acquisition_never_came_is_an_error_at_the_end_as_a_cut_off_one(small_raw: tuple) -> None:
    from gadgets.stages import SliceError, build_stages

    path = small_raw[0]
    scan = read_raw(path)
    acquisitions = list(run_stages(_front(scan.xml)[:2], stream_raw(path)))  # type: ignore[arg-type]
    for acq in acquisitions:
        acq.clear_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    (stage,) = build_stages("gadgets.recon", "recon", _config(device="cpu"), scan.xml)
    assert [out for acq in acquisitions for out in stage.process(acq)] == []  # held: no slice is complete
    closing = list(stage.close())
    assert all(isinstance(item, SliceError) for item in closing) and len(closing) == 2
    assert all("no ACQ_LAST_IN_SLICE acquisition: the data are truncated; not reconstructed" in e.message for e in closing)


def test_lines_after_a_slices_last_one_are_an_error_and_noise_scans_a_contract_error(small_raw: tuple) -> None:
    from gadgets.convert import ContractError
    from gadgets.stages import SliceError, build_stages

    path = small_raw[0]
    scan = read_raw(path)
    acquisitions = list(run_stages(_front(scan.xml)[:2], stream_raw(path)))  # type: ignore[arg-type]
    first_slice = [a for a in acquisitions if a.idx.slice == 0]
    (stage,) = build_stages("gadgets.recon", "recon", _config(device="cpu", account_slices="false"), scan.xml)
    sent = [out for acq in first_slice for out in stage.process(acq)]
    assert sum(isinstance(i, ismrmrd.Image) for i in sent) == 1
    again = [out for acq in first_slice[:3] for out in stage.process(acq)]  # a second average of slice 0
    assert len(again) == 1 and isinstance(again[0], SliceError) and "after its ACQ_LAST_IN_SLICE" in again[0].message
    raw_noise = next(a for a in stream_raw(path) if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
    with pytest.raises(ContractError, match="put NoiseAdjustGadget before it"):
        stage.process(raw_noise)

def test_front_end_gives_the_slices_the_offline_reader_gives(small_raw: tuple) -> None:
    path = small_raw[0]
    scan = read_raw(path)
    buffers = list(run_stages(_front(scan.xml), stream_raw(path)))  # type: ignore[arg-type]
    parts = [part for buffer in buffers for part in buffer_slices(buffer)]
    assert len(parts) == len(scan.slices) == 2
    for part, expected in zip(parts, scan.slices, strict=True):
        assert part.data.key == expected.key
        np.testing.assert_array_equal(part.data.mask, expected.mask)
        np.testing.assert_array_equal(part.data.acs, expected.acs)
        scale = np.abs(expected.kspace).max()
        np.testing.assert_allclose(part.data.kspace, expected.kspace, atol=2e-5 * scale)  # float32 FFT/whitening order
        assert part.data.geometry.position == expected.geometry.position


def test_trigger_releases_a_slice_when_the_next_begins() -> None:
    trigger = frontend.AccumulateTrigger("", {"trigger_dimension": "slice"})
    acqs = []
    for s in (0, 0, 1, 1):
        acq = ismrmrd.Acquisition.from_array(np.zeros((1, 4), np.complex64))
        acq.idx.slice = s
        acqs.append(acq)
    released = [list(trigger.process(a)) for a in acqs]
    assert [len(r) for r in released] == [0, 0, 1, 0]
    assert [a.idx.slice for a in released[2][0].acquisitions] == [0, 0]
    assert [a.idx.slice for a in list(trigger.close())[0].acquisitions] == [1, 1]


def test_buffer_round_trips_the_wire_and_kspace_can_be_replaced(small_raw: tuple) -> None:
    path = small_raw[0]
    scan = read_raw(path)
    buffer = list(run_stages(_front(scan.xml), stream_raw(path)))[0]  # type: ignore[arg-type]
    back = _through_wire(buffer)
    part, again = buffer_slices(buffer)[0], buffer_slices(back)[0]
    np.testing.assert_array_equal(part.data.kspace, again.data.kspace)
    changed = np.array(part.data.kspace)
    changed[:, part.data.mask] *= 2
    edited = buffer_slices(with_kspace(back, again, changed))[0]
    np.testing.assert_allclose(edited.data.kspace, changed, rtol=1e-6)
    np.testing.assert_array_equal(buffer_slices(back)[0].data.kspace, part.data.kspace)  # the original is untouched


def test_red_team_linf_attack_stays_in_its_box_on_the_chosen_slice(small_raw: tuple) -> None:
    """``attack=pgd_linf``: slice 0's measured lines move within a box of half-width budget
    sigma / sqrt(2) on Re and Im (so at most budget noise norms in l2), slice 1 is untouched."""
    from gadgets.stages import build_stages
    from recon.detect.cyclic import noise_norm
    from recon.physics.noise import estimate_noise_sigma
    from recon.pipeline import prepare

    path = small_raw[0]
    scan = read_raw(path)
    buffers = list(run_stages(_front(scan.xml), stream_raw(path)))  # type: ignore[arg-type]
    stages = build_stages("gadgets.redteam", "attack", _config(attack="pgd_linf", budget="2", steps="3", slices="0", device="cpu"), scan.xml)
    attacked = list(run_stages(stages, iter(buffers)))
    before = {p.data.key.slice: p.data for b in buffers for p in buffer_slices(b)}
    after = {p.data.key.slice: p.data for b in attacked for p in buffer_slices(b)}
    np.testing.assert_array_equal(after[1].kspace, before[1].kspace)
    original = before[0]
    delta = after[0].kspace - original.kspace
    assert not np.any(delta[:, ~original.mask, :])  # only the measured lines
    half_width = 2 * estimate_noise_sigma(original.kspace, original.mask) / np.sqrt(2)
    assert max(np.abs(delta.real).max(), np.abs(delta.imag).max()) <= half_width * (1 + 1e-4)
    assert np.abs(delta.real).max() > 0.5 * half_width  # it used its budget
    prepared = prepare(original)
    spent = float(np.linalg.norm(delta)) / noise_norm(prepared.op, prepared.y, estimate_noise_sigma(original.kspace, original.mask))
    assert 0 < spent <= 2 * (1 + 1e-4)


def test_image_and_maps_messages_round_trip(rng: np.random.Generator) -> None:
    pixels = (rng.standard_normal((6, 5)) + 1j * rng.standard_normal((6, 5))).astype(np.complex64)
    image = to_image(ReconImage(pixels, SliceKey(slice=3, repetition=1), meta=(("CycGuard.Verdict", "unverified"),)), 7, 2)
    maps = (rng.standard_normal((4, 6, 5)) + 1j * rng.standard_normal((4, 6, 5))).astype(np.complex64)
    got_image, got_maps = _through_wire(image), _through_wire(maps_message(maps, image))
    np.testing.assert_array_equal(image_pixels(got_image), pixels)
    assert meta_of(got_image)["CycGuard.Verdict"] == "unverified"
    assert (got_image.image_index, got_image.image_series_index, got_image.slice, got_image.repetition) == (7, 2, 3, 1)
    assert is_maps(got_maps) and not is_maps(got_image)
    key, back = maps_of(got_maps)
    assert key == SliceKey(slice=3, repetition=1)
    np.testing.assert_array_equal(back, maps)


def _through_wire(item: object) -> object:
    a, b = socket.socketpair()
    with a, b:
        writer = threading.Thread(target=write_item, args=(SafeSocket(a), item))
        writer.start()
        wire = SafeSocket(b)
        (mid,) = struct.unpack("<H", wire.read(2))
        out = READERS[mid](wire)
        writer.join()
    return out


def test_error_message_is_framed_as_gadgetron_reads_it() -> None:
    a, b = socket.socketpair()
    with a, b:
        class Holder:
            socket = SafeSocket(a)

        send_error(Holder(), "boom")
        wire = SafeSocket(b)
        (mid,) = struct.unpack("<H", wire.read(2))
        (length,) = struct.unpack("<Q", wire.read(8))
        assert (mid, wire.read(length)) == (8, b"boom")
        assert struct.unpack("<H", wire.read(2)) == (4,)  # CLOSE follows: Gadgetron reads the next id after ERROR


def test_safe_socket_detects_a_dead_peer_and_caps_reads() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(b"\x01\x02")
        a.close()
        wire = SafeSocket(b)
        with pytest.raises(ConnectionError, match="refusing"):
            wire.read(1 << 40)
        with pytest.raises(ConnectionError, match="peer closed"):
            wire.read(10)


def test_gadgetron_connection_reads_our_config_and_header(small_raw: tuple) -> None:
    """The gadget side is gadgetron-python's own Connection: it must accept what we send."""
    scan = read_raw(small_raw[0])
    a, b = socket.socketpair()
    with a, b:
        wire = SafeSocket(a)
        config = _config(forward_internal="true").encode()
        wire.write(struct.pack("<HI", 2, len(config)) + config)
        wire.write(struct.pack("<HI", 3, len(scan.xml.encode())) + scan.xml.encode())
        wire.write(struct.pack("<H", 4))
        connection = Connection(b)
        assert connection.config.tag == "configuration"
        assert params.parse("gadgets.recon", "recon", connection.raw_bytes.config)[params.ReconSettings].forward_internal
        assert list(connection) == []
