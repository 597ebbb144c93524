"""`cycguard serve` and `cycguard send` over Gadgetron's client protocol (a real server process)."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gadgets.runner import protocol as p
from gadgets.runner.client import query, send
from gadgets.runner.replay import replay
from gadgets.stages import SafeSocket
from recon.data.demo import DEMO_RAW
from recon.io.mrd_write import read_images
from tests import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process, self.port = process, port
        self.log: list[str] = []  # the server's stderr, as it comes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    port = _free_port()
    extra = list(getattr(request, "param", []))
    if extra == ["tls"]:
        cert, key = request.getfixturevalue("tls_files")
        extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
    process = subprocess.Popen([sys.executable, "-m", "gadgets.cli", "serve", "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stderr is not None
    while b"listening on" not in (line := process.stderr.readline()):
        assert line, "the server exited before listening"
    running = Server(process, port)
    threading.Thread(target=lambda: [running.log.append(line.decode(errors="replace")) for line in iter(process.stderr.readline, b"")], daemon=True).start()  # type: ignore[union-attr]
    yield running
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)  # every session must have ended: none may hang
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stdout is not None
    assert process.stdout.read() == b""  # nothing on stdout
    process.stdout.close()
    process.stderr.close()  # type: ignore[union-attr]


def test_serve_and_send_give_what_replay_gives(server: Server, tmp_path: Path) -> None:
    online = send(DEMO_RAW, tmp_path / "online.h5", "defended", port=server.port, group="g", echo_text=False)
    assert online.ok, online.errors
    offline = replay(DEMO_RAW, "defended", tmp_path / "offline.h5", None, group="g", progress=False)
    assert offline.ok
    got, want = read_images(tmp_path / "online.h5", group="g"), read_images(tmp_path / "offline.h5", group="g")
    assert len(got) == len(want) == 4
    for (a, meta_a), (b, meta_b) in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
        assert meta_a["CycGuard.Verdict"] == meta_b["CycGuard.Verdict"] == "clean"
        assert float(meta_a["CycGuard.Score"]) == pytest.approx(float(meta_b["CycGuard.Score"]), rel=1e-3)
    assert set(online.latency) == {k for k in online.latency} and len(online.latency) == 4


@pytest.mark.parametrize("server", [[], ["--max-sessions", "1"]], indirect=True, ids=["parallel", "queued"])
def test_two_clients_at_once_get_only_their_own_images(server: Server, tmp_path: Path, small_raw: tuple) -> None:
    # two client processes, as two scanners would be (HDF5 is not safe across threads of one process)
    command = [sys.executable, "-m", "gadgets.cli", "send", "-c", "recon", "--port", str(server.port), "-G", "g"]
    clients = [
        subprocess.Popen([*command, str(raw), "-o", str(tmp_path / f"out-{name}.h5")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, raw in (("demo", DEMO_RAW), ("small", small_raw[0]))
    ]
    outputs = [c.communicate(timeout=600) for c in clients]
    assert [c.returncode for c in clients] == [0, 0], [err.decode()[-2000:] for _, err in outputs]
    demo, small = read_images(tmp_path / "out-demo.h5", group="g"), read_images(tmp_path / "out-small.h5", group="g")
    assert [image.shape for image, _ in demo] == [(128, 128)] * 4
    assert [image.shape for image, _ in small] == [(32, 32)] * 2
    printed = outputs[0][0].decode()  # send prints each slice's verdict, as replay does
    assert [line.split()[4] for line in printed.splitlines() if line.startswith("slice ") and " rep " in line] == ["unverified"] * 4, printed


def _raw_session(port: int, *messages: bytes) -> tuple[list[str], bool]:
    """Send raw messages; collect TEXT messages until CLOSE."""
    texts: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        wire = SafeSocket(sock)
        for message in messages:
            try:
                wire.write(message)
            except OSError:
                break
        while True:
            mid = p.read_id(wire)
            if mid == p.CLOSE:
                return texts, True
            assert mid == p.TEXT, mid
            texts.append(p.read_string(wire, "TEXT"))


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ((p.config_file_message("no_such_pipeline"),), "no installed pipeline 'no_such_pipeline'"),
        ((p.config_file_message("../../etc/passwd"),), "no installed pipeline '../../etc/passwd'"),
        ((p.config_file_message("/etc/hosts"),), "no installed pipeline '/etc/hosts'"),
        ((p.config_file_message("recon"), struct.pack("<H", p.ACQUISITION)), "message id 1008 before HEADER"),
        ((struct.pack("<H", p.HEADER),), "message id 3 before the configuration"),
        ((p.string_message(p.CONFIG_SCRIPT, "<configuration><version>2</version><stream>"
                           '<external><execute name="os" target="system" type="python"/></external></stream></configuration>'),),
         "not a CycGuard gadget"),
        ((p.config_file_message("redteam"), p.string_message(p.HEADER, "<x/>")), "ERROR"),
        ((p.config_file_message("recon"), struct.pack("<HI", p.HEADER, 1 << 30)), "exceeds the"),
    ],
    ids=["unknown-name", "path-escape", "absolute-path", "data-before-header", "header-first", "foreign-module", "bad-header", "absurd-length"],
)
def test_bad_clients_get_an_error_and_the_server_keeps_serving(server: Server, messages: tuple[bytes, ...], expected: str, tmp_path: Path) -> None:
    texts, closed = _raw_session(server.port, *messages)
    assert closed and len(texts) == 1 and texts[0].startswith("[cycguard] ERROR") and expected in texts[0], texts
    assert query("127.0.0.1", server.port, "cycguard::version")  # still serving


def test_redteam_is_refused_by_default(server: Server, tmp_path: Path) -> None:
    result = send(DEMO_RAW, tmp_path / "o.h5", "redteam", port=server.port, echo_text=False)
    assert not result.ok and any("--allow-redteam" in e for e in result.errors)


def test_a_gadget_failure_reaches_the_client(server: Server, tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not a model")
    (tmp_path / "w.json").write_text((ROOT / "recon/models/weights/modl_default.json").read_text())
    script = tmp_path / "p.xml"
    script.write_text((ROOT / "pipelines/recon.xml").read_text().replace("<configuration/>", f'<configuration><property name="weights" value="{weights}"/></configuration>'))
    result = send(DEMO_RAW, tmp_path / "o.h5", config_script=script, port=server.port, echo_text=False)
    assert not result.ok
    assert any("gadgets.recon:recon" in e and "SHA-256" in e for e in result.errors), result.errors
    cli = subprocess.run(
        [sys.executable, "-m", "gadgets.cli", "send", str(DEMO_RAW), "-C", str(script), "--port", str(server.port), "-o", str(tmp_path / "c.h5")],
        capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 1 and "SHA-256" in cli.stderr


def test_query_answers_versions_only(server: Server) -> None:
    assert query("127.0.0.1", server.port, "cycguard::version")[0].isdigit()
    assert query("127.0.0.1", server.port, "gadgetron::info::memory").startswith("unknown query")


def test_sigterm_finishes_the_connections_in_flight(server: Server, tmp_path: Path) -> None:
    outcome: dict[str, object] = {}
    sender = threading.Thread(target=lambda: outcome.update(r=send(DEMO_RAW, tmp_path / "o.h5", "recon", port=server.port, pace="tr", tr_ms=5, echo_text=False)))
    sender.start()
    import time

    time.sleep(2.0)  # the paced client is mid-stream
    server.process.send_signal(signal.SIGTERM)
    sender.join(300)
    assert outcome["r"].ok, outcome["r"].errors  # type: ignore[attr-defined]
    assert server.process.wait(timeout=120) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_a_client_vanishing_mid_stream_does_not_hold_the_server(server: Server) -> None:
    from gadgets.runner.replay import read_header, stream_raw

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        wire = SafeSocket(sock)
        wire.write(p.config_file_message("recon"))
        wire.write(p.string_message(p.HEADER, read_header(DEMO_RAW)))
        for n, item in enumerate(stream_raw(DEMO_RAW)):
            wire.write(p.item_message(item))
            if n == 60:
                break  # then the connection drops without CLOSE
    assert query("127.0.0.1", server.port, "cycguard::version")  # still serving
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0  # the abandoned session ended by itself


@pytest.mark.parametrize("server", [["tls"]], indirect=True)
def test_tls_server_serves_tls_clients_only(server: Server, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cert = str(tls_files[0])
    secure = send(DEMO_RAW, tmp_path / "s.h5", "recon", port=server.port, group="g", echo_text=False, tls_ca=cert)
    assert secure.ok, secure.errors
    assert len(read_images(tmp_path / "s.h5", group="g")) == 4
    plain = send(DEMO_RAW, tmp_path / "p.h5", "recon", port=server.port, echo_text=False, timeout=60)
    assert not plain.ok and plain.images == 0  # no handshake, no images, no hang
    assert query("127.0.0.1", server.port, "cycguard::version", tls_ca=cert)[0].isdigit()  # still serving


def _tls_pair(tls_files: tuple[Path, Path], timeout: float = 30.0) -> tuple[socket.socket, socket.socket]:
    """Connected TLS sockets ``(server side, client side)`` over loopback, handshakes done."""
    import ssl

    cert, key = (str(f) for f in tls_files)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cert)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        plain = socket.create_connection(listener.getsockname(), timeout=timeout)
        accepted, _ = listener.accept()
    accepted.settimeout(timeout)
    server_side = server_context.wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    handshake = threading.Thread(target=server_side.do_handshake)
    handshake.start()
    client_side = client_context.wrap_socket(plain, server_hostname="127.0.0.1")
    handshake.join()
    return server_side, client_side


def test_tls_wire_survives_both_directions_at_once(tls_files: tuple[Path, Path]) -> None:
    """Server and client each read in one thread while writing in another (as `serve` and `send`
    do). On a plain SSLSocket that corrupts records now and then (CI saw "bad record mac" in
    about 1 connection in 30); every byte must arrive intact, every time."""
    block = np.random.default_rng(0).bytes(1 << 20)
    for _ in range(12):
        ends = _tls_pair(tls_files)
        received: dict[int, bytes] = {}

        def talk(i: int, sock: socket.socket, received: dict[int, bytes] = received) -> None:
            wire = p.wire_for(sock)
            reader = threading.Thread(target=lambda: received.__setitem__(i, wire.read(4 * len(block))))
            reader.start()
            for _ in range(4):
                wire.write(block)
            reader.join(60)

        talkers = [threading.Thread(target=talk, args=(i, s)) for i, s in enumerate(ends)]
        for t in talkers:
            t.start()
        for t in talkers:
            t.join(90)
        for s in ends:
            s.close()
        assert received == {0: block * 4, 1: block * 4}


def test_tls_wire_times_out_on_a_silent_peer(tls_files: tuple[Path, Path]) -> None:
    server_side, client_side = _tls_pair(tls_files, timeout=0.5)
    with server_side, client_side:
        with pytest.raises(TimeoutError):
            p.wire_for(server_side).read(2)


def _paced_sender(server: Server, out: Path, tr_ms: float) -> tuple[threading.Thread, dict[str, object]]:
    """A client sending the demo at one acquisition every ``tr_ms`` (started; its result lands in ``["r"]``)."""
    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(r=send(DEMO_RAW, out, "recon", port=server.port, pace="tr", tr_ms=tr_ms, echo_text=False)), daemon=True)
    thread.start()
    return thread, outcome


def _read_to_end(sock: socket.socket, seconds: float = 30) -> bytes:
    sock.settimeout(seconds)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("server", [["--max-sessions", "1", "--hello-timeout", "3"]], indirect=True)
def test_idle_connections_hold_no_slot_and_are_closed_after_the_hello_deadline(server: Server, tmp_path: Path) -> None:
    import time

    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(4)]
    started = time.monotonic()
    result = send(DEMO_RAW, tmp_path / "o.h5", "recon", port=server.port, echo_text=False)
    assert result.ok, result.errors
    assert time.monotonic() - started < 120  # not behind the idle ones' 300 s
    for sock in idle:
        with sock:
            assert b"no configuration and header within 3 s" in _read_to_end(sock)


@pytest.mark.parametrize("server", [["--max-sessions", "1"]], indirect=True)
def test_a_queued_client_is_told_and_one_that_leaves_costs_nothing(server: Server, tmp_path: Path) -> None:
    import time

    from gadgets.runner.replay import read_header

    first, outcome = _paced_sender(server, tmp_path / "a.h5", 40)
    time.sleep(2.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        wire = SafeSocket(sock)
        wire.write(p.config_file_message("recon"))
        wire.write(p.string_message(p.HEADER, read_header(DEMO_RAW)))
        assert p.read_id(wire) == p.TEXT
        assert "[cycguard] queued: 1 session(s) in flight" in p.read_string(wire, "TEXT")
    first.join(300)
    assert outcome["r"].ok, outcome["r"].errors  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while not any("left while queued: nothing was run for it" in line for line in server.log) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any("left while queued: nothing was run for it" in line for line in server.log), server.log[-20:]
    assert sum("pipeline 'recon'" in line for line in server.log) == 2 and sum("image(s) sent" in line for line in server.log) == 1


def test_sigterm_with_an_idle_client_stops_at_once(server: Server) -> None:
    import time

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as idle:
        time.sleep(0.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
        assert b"shutting down" in _read_to_end(idle)


@pytest.mark.parametrize("server", [["--grace", "3"]], indirect=True)
def test_sigterm_ends_a_session_past_its_grace_with_an_error(server: Server, tmp_path: Path) -> None:
    import time

    sender, outcome = _paced_sender(server, tmp_path / "o.h5", 300)
    time.sleep(3.0)  # mid-stream: 180 acquisitions take 54 s
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    assert time.monotonic() - started < 20
    sender.join(60)
    result = outcome["r"]
    assert not result.ok and any("ended after the 3 s grace" in e for e in result.errors), result.errors  # type: ignore[attr-defined]


def test_a_second_signal_stops_the_server_at_once(server: Server, tmp_path: Path) -> None:
    import time

    _paced_sender(server, tmp_path / "o.h5", 300)
    time.sleep(3.0)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    started = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    server.process.wait(timeout=30)
    assert time.monotonic() - started < 10  # not the 60 s grace
