"""``cycguard send``: the client half of Gadgetron's protocol, as ``gadgetron_ismrmrd_client``.

Sends CONFIG_FILE (a pipeline name) or CONFIG_SCRIPT (an XML file), the raw file's XML
header, its acquisitions and waveforms interleaved by time stamp, then CLOSE; a reader
thread writes the images that come back to ``/<group>/image_<series>`` as that client does
and prints TEXT messages. Optionally paced like a scanner: each acquisition released at its
time stamp (``pace="timestamps"``) or one per ``tr_ms``. Records, per slice, the time from
its last acquisition sent to its image received (the online latency). One ``send`` per
process: HDF5 (reading the raw file, writing the images) is not safe across threads.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ismrmrd

from gadgets.convert import image_key
from gadgets.runner import protocol as p
from gadgets.runner.replay import preflight, stream_raw
from gadgets.stages import SafeSocket
from recon.io.mrd_write import check_output
from recon.types import SliceKey

log = logging.getLogger("cycguard.send")
TICK_S = 0.0025  # ISMRMRD time stamps count 2.5 ms ticks


@dataclass
class SendResult:
    """What came back and how long it took."""

    output: Path
    group: str
    images: int = 0
    errors: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    latency: dict[SliceKey, float] = field(default_factory=dict)
    missing: list[SliceKey] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and not self.missing


def send(
    raw: Path,
    output: Path,
    config_name: str | None = None,
    config_script: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 9002,
    group: str | None = None,
    pace: str = "none",
    tr_ms: float = 0.0,
    timeout: float = 900.0,
    echo_text: bool = True,
    tls_ca: str | None = None,
) -> SendResult:
    """Send ``raw`` to a Gadgetron-protocol server and write the images it returns
    (over TLS, checking the server against ``tls_ca``, when given)."""
    if (config_name is None) == (config_script is None):
        raise ValueError("give a pipeline name (-c) or an XML file (-C), not both")
    header, expected = preflight(raw)  # before anything is sent
    check_output(output, [raw])
    group = group or datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
    result = SendResult(output, group)
    started = time.perf_counter()
    sock = connect(host, port, tls_ca)
    sock.settimeout(timeout)
    wire = p.wire_for(sock)  # images are read by a second thread while acquisitions are written
    last_sent: dict[SliceKey, float] = {}
    dataset = ismrmrd.Dataset(str(output), group, create_if_needed=True)
    dataset.write_xml_header(header)
    reader = threading.Thread(target=_receive, args=(wire, dataset, result, last_sent, echo_text), daemon=True)
    try:
        if config_name is not None:
            wire.write(p.config_file_message(config_name))
        else:
            assert config_script is not None
            wire.write(p.string_message(p.CONFIG_SCRIPT, config_script.read_bytes()))
        wire.write(p.string_message(p.HEADER, header))
        reader.start()
        try:
            _stream(wire, raw, pace, tr_ms, last_sent)
            wire.write(struct.pack("<H", p.CLOSE))
        except OSError as err:  # the server closed early: its TEXT says why
            log.debug("send stopped: %s", err)
        reader.join(timeout)
        if reader.is_alive():
            result.errors.append(f"no CLOSE from the server within {timeout:.0f} s")
    finally:
        sock.close()
        dataset.close()
    got = set(result.latency)
    result.missing = [k for k in expected if k not in got] if not result.errors else []
    if result.missing:
        result.errors.append(f"{len(result.missing)} of {len(expected)} slices came back without an image")
    result.seconds = time.perf_counter() - started
    return result


def _stream(wire: SafeSocket, raw: Path, pace: str, tr_ms: float, last_sent: dict[SliceKey, float]) -> None:
    start_wall = time.perf_counter()
    first_stamp: int | None = None
    count = 0
    for item in stream_raw(raw):
        if isinstance(item, ismrmrd.Acquisition) and pace != "none":
            if pace == "timestamps":
                first_stamp = item.acquisition_time_stamp if first_stamp is None else first_stamp
                due = start_wall + (item.acquisition_time_stamp - first_stamp) * TICK_S
            else:
                due = start_wall + count * tr_ms / 1000.0
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            count += 1
        wire.write(p.item_message(item))
        if isinstance(item, ismrmrd.Acquisition) and not item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            idx = item.idx
            last_sent[SliceKey(int(idx.slice), int(idx.contrast), int(idx.repetition), int(idx.set), int(idx.phase))] = time.perf_counter()


def _receive(wire: SafeSocket, dataset: Any, result: SendResult, last_sent: dict[SliceKey, float], echo_text: bool) -> None:
    try:
        while True:
            mid = p.read_id(wire)
            if mid == p.CLOSE:
                return
            if mid == p.IMAGE:
                image = p.read_item(mid, wire)
                arrived = time.perf_counter()
                dataset.append_image(f"image_{image.image_series_index}", image)
                key = image_key(image)
                result.images += 1
                result.latency[key] = arrived - last_sent.get(key, arrived)
            elif mid == p.TEXT:
                text = p.read_string(wire, "TEXT")
                result.texts.append(text)
                if echo_text:
                    sys.stderr.write(text + "\n")
                if "ERROR" in text:
                    result.errors.append(text)
            elif mid == p.RESPONSE:
                p.read_response(wire)
            else:
                result.errors.append(f"unexpected message id {mid} from the server")
                return
    except (ConnectionError, OSError, ValueError) as err:
        result.errors.append(f"connection lost before CLOSE: {err}")


def connect(host: str, port: int, tls_ca: str | None = None, timeout: float = 30.0) -> socket.socket:
    """A connection to the server, over TLS when ``tls_ca`` names the CA to check it against."""
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls_ca:
        context = ssl.create_default_context(cafile=tls_ca)
        try:
            return context.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, OSError):
            sock.close()
            raise
    return sock


def query(host: str, port: int, text: str, timeout: float = 10.0, tls_ca: str | None = None) -> str:
    """Send one QUERY and return the RESPONSE."""
    with connect(host, port, tls_ca, timeout) as sock:
        wire = p.wire_for(sock)
        wire.write(p.query_message(text, 1))
        mid = p.read_id(wire)
        if mid != p.RESPONSE:
            raise p.ProtocolError(f"expected RESPONSE, got message id {mid}")
        _, answer = p.read_response(wire)
        wire.write(struct.pack("<H", p.CLOSE))
        return answer
