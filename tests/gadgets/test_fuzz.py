"""Property-based and mutation tests of what reads untrusted input: pipeline XML, gadget
properties, the server's protocol states before data, ISMRMRD files. Each input must end in
the reader's own clear error, never another exception, a hang, or a crash."""

from __future__ import annotations

import shutil
import socket
import threading
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gadgets import params
from gadgets.convert import meta_of, meta_value
from gadgets.runner import protocol as p
from gadgets.runner.config import PipelineError, check_pipeline, parse_pipeline
from gadgets.runner.server import CycGuardServer, Session
from gadgets.stages import SafeSocket
from recon.io.mrd import MRDError, read_raw
from recon.verdict import VERDICT_KEY, VERDICTS
from tests import ROOT

PIPELINES = [path.read_text() for path in sorted((ROOT / "pipelines").glob("*.xml"))]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PIPELINES), st.integers(min_value=0, max_value=10**6), st.integers(min_value=1, max_value=40), st.text(max_size=20))
def test_mutated_pipeline_xml_fails_only_with_pipeline_errors(text: str, where: int, cut: int, insert: str) -> None:
    position = where % len(text)
    mutated = text[:position] + insert + text[position + cut :]
    try:
        check_pipeline(parse_pipeline(mutated, "fuzz.xml"))
    except (PipelineError, params.PropertyError):
        pass


def test_xml_bombs_and_external_entities_are_refused() -> None:
    bomb = '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><configuration>&b;</configuration>'
    external = '<?xml version="1.0"?><!DOCTYPE c [<!ENTITY x SYSTEM "file:///etc/passwd">]><configuration><version>&x;</version></configuration>'
    for text in (bomb, external):
        with pytest.raises(PipelineError, match="safe XML"):
            parse_pipeline(text)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(params.GADGETS)), st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=30), max_size=4))
def test_any_properties_parse_or_fail_with_property_errors(gadget: tuple[str, str], values: dict[str, str]) -> None:
    from xml.etree import ElementTree as ET

    element = ET.Element("configuration")
    for name, value in values.items():
        ET.SubElement(element, "property", name=name, value=value)
    try:
        params.parse(*gadget, ET.tostring(element))
    except params.PropertyError:
        pass


def _server() -> CycGuardServer:
    """The real server object (bound to a loopback port it never serves), with short deadlines."""
    server = CycGuardServer(("127.0.0.1", 0), threads=1, max_sessions=1)
    server.idle_timeout = server.queue_timeout = server.hello_timeout = 5.0
    return server


def _session(data: bytes, wait: float = 20.0) -> list[int]:
    """Run a server session on ``data`` (then EOF); the message ids it answered with. Images
    must carry a CycGuard verdict, TEXT must be an error."""
    ours, theirs = socket.socketpair()
    server = _server()
    with ours, theirs:
        session = Session(ours, "fuzz", server)
        worker = threading.Thread(target=session.run)
        worker.start()

        def feed() -> None:
            try:
                theirs.sendall(data)
                theirs.shutdown(socket.SHUT_WR)
            except OSError:  # the session stopped reading: it says why below
                pass

        feeder = threading.Thread(target=feed)
        feeder.start()
        theirs.settimeout(wait)
        wire, ids = SafeSocket(theirs), []
        while True:
            try:
                mid = p.read_id(wire)
            except ConnectionError:
                break
            ids.append(mid)
            if mid == p.TEXT:
                assert p.read_string(wire, "TEXT").startswith("[cycguard] ERROR")
            elif mid == p.RESPONSE:
                p.read_response(wire)
            elif mid == p.IMAGE:
                image = p.read_item(mid, wire)
                assert meta_value(meta_of(image), VERDICT_KEY) in VERDICTS
            elif mid == p.CLOSE:
                break
        worker.join(wait)
        assert not worker.is_alive(), "the session hung"
        ours.close()  # as the server does once a session ends: a feeder still writing gets EPIPE
        feeder.join(wait)
        server.server_close()
        return ids


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_garbage_before_the_header_ends_in_an_error_and_close(data: bytes) -> None:
    ids = _session(data)
    assert ids and ids[-1] == p.CLOSE
    assert set(ids) <= {p.TEXT, p.RESPONSE, p.CLOSE}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**32 - 1), st.binary(max_size=32))
def test_absurd_lengths_are_refused_before_reading(length: int, tail: bytes) -> None:
    data = p.config_file_message("recon") + (p.HEADER).to_bytes(2, "little") + length.to_bytes(4, "little") + tail
    ids = _session(data)
    assert ids[-1] == p.CLOSE and p.TEXT in ids  # too long, too short, or not an ISMRMRD header: an error either way


def test_a_close_before_the_data_is_answered_with_close() -> None:
    """Gadgetron answers a client's early CLOSE (before configuration or header) with CLOSE;
    so does the server (found by benchmarks/fuzz_campaign.py: it hung up without one)."""
    close = p.CLOSE.to_bytes(2, "little")
    assert _session(close + b"\0\0\0\0") == [p.CLOSE]
    assert _session(p.config_file_message("recon") + close) == [p.CLOSE]


def test_a_header_value_of_the_wrong_type_is_an_error_not_a_dropped_connection() -> None:
    """A header whose matrix size or field of view is not a number (found by the fuzz
    campaign: the session hung up without CLOSE, and the raw-file reader raised a bare
    ValueError): TEXT naming it, then CLOSE; the reader's MRDError."""
    from gadgets.runner.replay import read_header
    from recon.data.demo import DEMO_RAW
    from recon.io.mrd import parse_header

    header = read_header(DEMO_RAW)
    for old, new in (("<z>1</z>", "<z>1x</z>"), ("<x>240.0</x>", "<x>24x0.0</x>")):
        assert old in header, old
        bad = header.replace(old, new, 1)
        with warnings.catch_warnings():  # as in production, xsdata only warns and keeps the text
            warnings.simplefilter("ignore")
            with pytest.raises(MRDError, match="XML header holds a value of the wrong type"):
                parse_header(bad, "client header")
            ids = _session(p.config_file_message("recon") + p.string_message(p.HEADER, bad))
        assert ids[-2:] == [p.TEXT, p.CLOSE], ids


def _acquisitions(slices: int = 1) -> list[bytes]:
    """The demo's noise scans and the acquisitions of its first ``slices`` slices, as messages."""
    import ismrmrd

    from gadgets.runner.replay import stream_raw
    from recon.data.demo import DEMO_RAW

    messages = []
    for item in stream_raw(DEMO_RAW):
        if isinstance(item, ismrmrd.Acquisition) and item.idx.slice >= slices:
            break
        messages.append(p.item_message(item))
    return messages


@pytest.fixture(scope="module")
def data_phase() -> tuple[bytes, list[bytes]]:
    """``(CONFIG_FILE recon + HEADER, the acquisition messages of one slice)``."""
    from gadgets.runner.replay import read_header
    from recon.data.demo import DEMO_RAW

    return p.config_file_message("recon") + p.string_message(p.HEADER, read_header(DEMO_RAW)), _acquisitions()


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0, max_value=10**6), st.binary(min_size=1, max_size=64))
def test_garbage_in_the_data_phase_ends_in_an_error_and_close(data_phase: tuple[bytes, list[bytes]], where: int, junk: bytes) -> None:
    """Random bytes after some good acquisitions: the gadget processes already run; the session
    must stop them, say why and close."""
    prefix, messages = data_phase
    ids = _session(prefix + b"".join(messages[: where % len(messages)]) + junk, wait=60)
    assert ids[-1] == p.CLOSE and p.TEXT in ids


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6), st.binary(min_size=1, max_size=8))
def test_mutated_acquisitions_end_in_verdict_images_or_an_error(data_phase: tuple[bytes, list[bytes]], which: int, where: int, junk: bytes) -> None:
    """One acquisition's header overwritten (sizes, flags, counters, positions): the slice
    comes back with a verdict, or the session says why; always CLOSE, never a hang."""
    prefix, messages = data_phase
    index = which % len(messages)
    message = bytearray(messages[index])
    position = 2 + where % 338  # inside the message id's 2 bytes + the 340-byte AcquisitionHeader
    message[position : position + len(junk)] = junk
    mutated = messages[:index] + [bytes(message[: len(messages[index])])] + messages[index + 1 :]
    ids = _session(prefix + b"".join(mutated) + p.CLOSE.to_bytes(2, "little"), wait=60)
    assert ids[-1] == p.CLOSE
    assert p.TEXT in ids or p.IMAGE in ids  # never silence: images with verdicts, or an error


@pytest.fixture(scope="module")
def raw_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recon.data.demo import DEMO_RAW

    path = tmp_path_factory.mktemp("fuzz") / "raw.h5"
    shutil.copy(DEMO_RAW, path)
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0, max_value=10**9), st.binary(min_size=1, max_size=64), st.booleans())
def test_corrupted_raw_files_fail_with_mrd_errors(raw_copy: Path, tmp_path: Path, where: int, junk: bytes, truncate: bool) -> None:
    data = bytearray(raw_copy.read_bytes())
    position = where % len(data)
    target = tmp_path / f"bad-{where}-{len(junk)}-{truncate}.h5"
    target.write_bytes(bytes(data[:position]) if truncate else bytes(data[:position] + junk + data[position + len(junk) :]))
    try:
        scan = read_raw(target, strict=False)
    except MRDError:
        return
    for data_slice in scan.slices:  # what was read is finite data; anything else is listed in problems
        assert np.isfinite(data_slice.kspace).all()


def test_inconsistent_header_is_named(raw_copy: Path, tmp_path: Path) -> None:
    target = tmp_path / "inconsistent.h5"
    shutil.copy(raw_copy, target)
    with h5py.File(target, "r+") as handle:
        xml = handle["dataset/xml"][0].decode()
        del handle["dataset/xml"]
        handle.create_dataset("dataset/xml", data=[xml.replace("<trajectory>cartesian</trajectory>", "<trajectory>radial</trajectory>").encode()])
    with pytest.raises(MRDError, match="trajectory 'radial' is not supported"):
        read_raw(target)


def test_non_finite_samples_are_a_problem_not_data(raw_copy: Path, tmp_path: Path) -> None:
    import ismrmrd

    target = tmp_path / "nan.h5"
    shutil.copy(raw_copy, target)
    with h5py.File(target, "r+") as handle:
        rows = handle["dataset/data"]
        heads = rows["head"]
        noise = (heads["flags"].astype(np.uint64) >> np.uint64(ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)) & np.uint64(1)
        first = int(np.flatnonzero(noise == 0)[0])
        row = rows[first]
        row["data"][:] = np.nan
        rows[first] = row
    with pytest.raises(MRDError, match="slice 0 .* holds non-finite samples"):
        read_raw(target)
    assert len(read_raw(target, strict=False).slices) == 3  # the other slices are kept


def test_a_corrupt_variable_length_is_refused_before_hdf5_allocates_it(raw_copy: Path, tmp_path: Path) -> None:
    """One acquisition's trajectory length overwritten on disk (found by the fuzz campaign:
    HDF5 allocated 11 GB for it before failing): the reader names it, in a subprocess whose
    memory stays small."""
    import subprocess
    import sys

    target = tmp_path / "vlen.h5"
    shutil.copy(raw_copy, target)
    with h5py.File(target, "r") as handle:
        data = handle["dataset/data"]
        ftype = data.id.get_type()
        names = [ftype.get_member_name(i).decode() for i in range(ftype.get_nmembers())]
        offset = ftype.get_member_offset(names.index("traj"))
        where = data.id.get_chunk_info(7).byte_offset + offset
    with target.open("r+b") as handle:
        handle.seek(where)
        handle.write((2_900_000_000).to_bytes(4, "little"))
    with pytest.raises(MRDError, match="claims 2900000000 traj values, more than the"):
        read_raw(target)
    # the peak of this process's own memory (VmHWM): getrusage's ru_maxrss would also count the
    # forked pytest's, which Linux carries over an exec
    code = (
        "from recon.io.mrd import MRDError, read_raw\n"
        f"try:\n    read_raw({str(target)!r})\nexcept MRDError:\n    pass\n"
        "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:')) // 1024)"
    )
    peak_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout.split()[-1])
    assert peak_mb < 2000, peak_mb
