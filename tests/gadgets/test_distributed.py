"""The defended chain on Gadgetron's distributed mode: a real Gadgetron 4.7.2 main node and workers.

Two workers on loopback, found by ``cycguard workers``: every slice comes back exactly once,
in slice order, with the single-node chain's images and verdicts; a worker killed mid-scan
leaves no slice silently missing; a worker that is down is left out instead of bringing the
main server down; a Gadgetron that drops the gadgets' target on its workers (stock 4.7.2)
fails with a message that says so. Nothing may hang or leave a Python gadget behind.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from recon.data.demo import DEMO_RAW
from tests import ROOT
from tests import gadgetron_host as host
from tests.gadgetron_host import Cluster, Gadgetron

pytestmark = [pytest.mark.gadgetron, pytest.mark.slow]

DISTRIBUTED = ROOT / "pipelines" / "defended_distributed.xml"
SLICES = {0, 1, 2, 3}


@pytest.fixture
def cluster(gadgetron: Gadgetron, tmp_path: Path) -> Iterator[Cluster]:
    """Two workers and a main node (the session's server only proves the package is there)."""
    started = Cluster(tmp_path / "cluster", workers=2)
    yield started
    started.stop()


def _missing(output: str) -> set[int]:
    return {int(n) for n in re.findall(r"slice (\d+): no image came back from the <distributed> workers", output)}


def test_two_workers_give_every_slice_once_in_order_as_the_single_node_chain(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.main is not None
    run = cluster.main.client(DEMO_RAW, tmp_path / "distributed.h5", script=DISTRIBUTED)
    assert run.wrote, f"no images ({run.seconds:.0f} s):\n{run.output}\n{cluster.main.log()[-3000:]}"
    distributed = host.read_output(run.out)  # raises when a slice comes twice
    single = host.read_output(cluster.main.client(DEMO_RAW, tmp_path / "single.h5", config="defended.xml").out)
    assert host.parity_problems(distributed, single, score_rtol=1e-6, image_rtol=1e-6) == []
    assert {key[0] for key in distributed} == SLICES
    assert [distributed[key].image_index for key in sorted(distributed)] == [1, 2, 3, 4]
    assert [single[key].image_index for key in sorted(single)] == [1, 2, 3, 4]
    # the slices really went to both workers (round-robin), and each worker's gadgets ended
    for worker in cluster.workers:
        assert "gadgets.recon" in worker.log(), "a worker got no slice"
        assert not worker.python_children()
    assert not cluster.main.python_children()
    assert "Errors received" not in run.output, run.output


def _kill_run(cluster: Cluster, out: Path) -> host.ClientRun:
    """One scan through ``cluster`` whose second worker is killed (the server and its gadget
    processes) as soon as its first gadget starts."""
    assert cluster.main is not None
    victim = cluster.workers[1]
    killed = threading.Event()

    def kill_when_it_starts_a_slice() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "gadgets.recon" not in victim.log():
            time.sleep(0.1)
        victim.stop()
        killed.set()

    threading.Thread(target=kill_when_it_starts_a_slice, daemon=True).start()
    run = cluster.main.client(DEMO_RAW, out, script=DISTRIBUTED)
    assert killed.is_set()
    return run


def _host_race(run: host.ClientRun) -> bool:
    """Whether the client died in Gadgetron 4.7.2's reset race (see
    ``Gadgetron.client_until_answered``): "read: End of file", or an output file it never closed."""
    return run.returncode != 0 and ("read: End of file" in run.output or (run.wrote and not host.readable_output(run.out)))


def test_a_worker_killed_mid_scan_leaves_no_slice_silently_missing(cluster: Cluster, tmp_path: Path) -> None:
    """A run the host's reset race cut short says nothing about our chain: it is repeated on a
    fresh cluster (the killed worker is gone), at most twice."""
    clusters = [cluster]
    try:
        run = _kill_run(cluster, tmp_path / "out.h5")
        for attempt in range(2):
            if not _host_race(run):
                break
            clusters.append(Cluster(tmp_path / f"again{attempt}", workers=2))
            run = _kill_run(clusters[-1], tmp_path / f"out-again{attempt}.h5")
        answered = clusters[-1]
        assert answered.main is not None
        came_back = {key[0] for key in host.read_output(run.out)} if run.wrote else set()
        missing = _missing(run.output)
        assert missing, f"the killed worker's slices are not reported:\n{run.output}"
        assert came_back | missing == SLICES and not came_back & missing, (came_back, missing, run.output)
        assert answered.main.alive(), "the main server died with its worker"
        assert not answered.main.python_children() and not answered.workers[0].python_children()
    finally:
        for started in clusters[1:]:
            started.stop()


def test_a_worker_that_does_not_answer_is_left_out_and_the_main_server_lives(gadgetron: Gadgetron, tmp_path: Path) -> None:
    # unlisted, a dead worker makes Gadgetron 4.7.2 retry for about 18 s and abort the main server
    down = f"127.0.0.1:{host.free_port()}"
    partial = Cluster(tmp_path / "cluster", workers=1, listed=(down,))
    try:
        assert partial.main is not None
        run = partial.main.client(DEMO_RAW, tmp_path / "out.h5", script=DISTRIBUTED)
        assert run.wrote, f"{run.output}\n{partial.main.log()[-3000:]}"
        assert {key[0] for key in host.read_output(run.out)} == SLICES
        assert partial.main.alive()
        assert f"Connecting to peer: {down}" not in partial.main.log()
    finally:
        partial.stop()


def test_a_gadgetron_that_drops_the_target_on_its_workers_fails_saying_so(cluster: Cluster, tmp_path: Path) -> None:
    """Stock Gadgetron 4.7.2 forwards ``<execute name= type=/>`` without its target: the same
    stream written without targets reaches the workers exactly as stock 4.7.2 sends ours."""
    assert cluster.main is not None
    text = re.sub(r'(<execute name="gadgets\.(recon|detect|mitigate)") target="\w+"', r"\1", DISTRIBUTED.read_text())
    stock = tmp_path / "as_stock_sends_it.xml"
    stock.write_text(text)
    run = cluster.main.client_until_answered(DEMO_RAW, tmp_path / "out.h5", expect="stock Gadgetron 4.7.2", script=stock)
    assert "no image came back from the <distributed> workers for any of the 4 slice(s)" in run.output, run.output
    assert "stock Gadgetron 4.7.2 drops the target" in run.output
    assert not run.wrote or not host.read_output(run.out)
    workers_log = "".join(worker.log() for worker in cluster.workers)
    assert "started gadgets.recon without a target" in workers_log
    assert not cluster.main.python_children()


def test_warm_workers_give_the_same_slices_from_one_forking_gadget_server(cluster: Cluster, tmp_path: Path) -> None:
    """``defended_distributed_warm``: each worker's slice stream connects to a CycGuard gadget
    server started once (``gadgets.listen --forever``), which forks a warm process per slice."""
    import subprocess
    import sys

    assert cluster.main is not None
    port = host.free_port()
    pipeline = tmp_path / "warm.xml"
    pipeline.write_text((ROOT / "pipelines" / "defended_distributed_warm.xml").read_text().replace('port="18000"', f'port="{port}"'))
    log = tmp_path / "listen.log"
    with log.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "gadgets.listen", "gadgets.composed", "composed", "--port", str(port), "--forever", "--max-busy", "2"],
            stdout=subprocess.DEVNULL, stderr=sink, env=host.tool_env(),
        )
    try:
        deadline = time.monotonic() + 120
        while "warm: serving" not in log.read_text() and time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            time.sleep(0.2)
        run = cluster.main.client(DEMO_RAW, tmp_path / "warm.h5", script=pipeline)
        assert run.wrote, f"{run.output}\n{log.read_text()[-3000:]}"
        warm = host.read_output(run.out)
        single = host.read_output(cluster.main.client(DEMO_RAW, tmp_path / "single.h5", config="defended.xml").out)
        # one torch thread per session here against two in the single node: sums round differently
        assert host.parity_problems(warm, single) == []
        assert [warm[key].image_index for key in sorted(warm)] == [1, 2, 3, 4]
        assert log.read_text().count("connection from") == 4  # one forked session per slice
        assert server.poll() is None, "the gadget server ended with a session"
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert server.returncode == 0, log.read_text()[-2000:]
