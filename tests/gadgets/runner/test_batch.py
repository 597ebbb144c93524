"""Many raw files on a Dask cluster: every file once, results as a single-file replay gives
them, failures listed, a rerun resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gadgets.runner.batch import expand_inputs, output_names
from gadgets.runner.replay import replay
from recon.data.demo import DEMO_RAW
from recon.io.mrd_write import read_images

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_inputs_are_files_folders_globs_and_lists_each_once(tmp_path: Path) -> None:
    for name in ("a.h5", "b.h5", "sub/a.h5"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# archive\nb.h5\nsub/a.h5\n")
    found = expand_inputs([str(tmp_path), str(tmp_path / "*.h5"), str(tmp_path / "list.txt")])
    assert found == [(tmp_path / "a.h5").resolve(), (tmp_path / "b.h5").resolve(), (tmp_path / "sub" / "a.h5").resolve()]
    assert list(output_names(found).values()) == ["a", "b", "a-2"]
    with pytest.raises(ValueError, match="not a raw file: .*missing.h5"):
        expand_inputs([str(tmp_path / "missing.h5")])


def test_an_archive_replays_on_dask_as_each_file_alone_and_resumes(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("first.h5", "second.h5"):
        shutil.copyfile(DEMO_RAW, archive / name)
    (archive / "broken.h5").write_bytes(DEMO_RAW.read_bytes()[:5000])  # a truncated transfer
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gadgets.cli", "replay", str(archive), "-c", "defended", "-o", str(out), "--workers", "2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 1, run.stderr  # one file failed; the others are done
    assert "files: done 2, skipped 0, failed 1; images: clean 8" in run.stdout, run.stdout
    assert "FAILED" in run.stderr and "broken.h5" in run.stderr and "truncated" in run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == {"done": 2, "skipped": 0, "failed": 1} and summary["verdicts"] == {"clean": 8}
    assert "first_report/report.html" in (out / "summary.html").read_text()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # as each of the 2 workers runs (sums over other thread counts round otherwise)
    alone = replay(archive / "first.h5", "defended", tmp_path / "alone.h5", group="images", in_process=True, progress=False)
    assert alone.ok
    for name in ("first", "second"):
        batch = read_images(out / f"{name}.h5", group="images")
        assert len(batch) == 4
        for (image, meta), (reference, reference_meta) in zip(batch, read_images(tmp_path / "alone.h5", group="images"), strict=True):
            assert np.array_equal(image, reference) and meta["CycGuard.Verdict"] == reference_meta["CycGuard.Verdict"]
            assert meta["CycGuard.Score"] == reference_meta["CycGuard.Score"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert "files: done 0, skipped 2, failed 1; images: clean 8" in again.stdout, again.stdout


def test_a_worker_killed_mid_archive_loses_and_duplicates_no_file(tmp_path: Path) -> None:
    """A worker process dies (SIGKILL) while it replays a file: Dask's nanny starts a new one and
    the task runs again; every file ends done exactly once, with its images once."""
    import signal
    import threading
    import time

    from distributed import Client, LocalCluster

    from gadgets.runner.batch import DONE_SUFFIX, replay_many

    archive = tmp_path / "archive"
    archive.mkdir()
    names = [f"scan{n}" for n in range(4)]
    for name in names:
        shutil.copyfile(DEMO_RAW, archive / f"{name}.h5")
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        killed: list[int] = []

        def kill_a_busy_worker() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                busy = [address for address, keys in client.processing().items() if keys]
                if busy:
                    time.sleep(2.0)  # the task has started: the model is loading or the file replaying
                    killed.append(pids[busy[0]])
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        summary = replay_many([str(archive)], "recon", out, scheduler=cluster.scheduler_address, progress=False)
        killer.join()
    assert killed, "no worker was killed"
    assert [(f.name, f.status) for f in sorted(summary.files, key=lambda f: f.name)] == [(name, "done") for name in names]
    assert sorted(p.name for p in out.glob(f"*{DONE_SUFFIX}")) == [f"{name}{DONE_SUFFIX}" for name in names]
    for name in names:
        assert len(read_images(out / f"{name}.h5", group="images")) == 4
    assert json.loads((out / "summary.json").read_text())["files"] == {"done": 4, "skipped": 0, "failed": 0}


def test_a_worker_process_loads_the_network_once() -> None:
    from gadgets.stages import Resources

    header = "<ismrmrdHeader/>"
    first, second = Resources(header).model("", "cpu"), Resources(header).model("", "cpu")
    assert first[0] is second[0]
