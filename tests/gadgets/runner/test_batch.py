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

from gadgets.cores import share
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
    torch.set_num_threads(share(2))  # as each of the 2 workers runs (sums over other thread counts round otherwise)
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


def test_a_large_file_in_slice_tasks_gives_what_its_whole_replay_gives(tmp_path: Path) -> None:
    """``--slices-per-task 2``: each 4-slice file runs as two tasks of 2 slices and a merge; its
    output holds the pixels, numbers and meta (timings aside) of a replay of the whole file, and
    one report over its slices."""
    from gadgets.runner.batch import DONE_SUFFIX, replay_many

    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("first.h5", "second.h5"):
        shutil.copyfile(DEMO_RAW, archive / name)
    out = tmp_path / "out"
    summary = replay_many([str(archive)], "defended", out, workers=2, threads=1, slices_per_task=2, progress=False)
    assert [(f.name, f.status) for f in summary.files] == [("first", "done"), ("second", "done")], summary.files
    assert summary.verdicts() == {"clean": 8}
    assert not list(out.glob("*.part*.h5")) and (out / f"first{DONE_SUFFIX}").is_file()
    torch.set_num_threads(1)
    whole = replay(DEMO_RAW, "defended", tmp_path / "whole.h5", tmp_path / "whole_report", group="images", in_process=True, threads=1, progress=False)
    assert whole.ok
    expected = _series(tmp_path / "whole.h5")
    for name in ("first", "second"):
        merged = _series(out / f"{name}.h5")
        assert sorted(merged) == sorted(expected) == ["image_1"]
        headers, data, attributes = expected["image_1"]
        got = merged["image_1"]
        assert np.array_equal(got[1], data)
        for field in ("slice", "image_index", "image_series_index"):
            assert list(got[0][field]) == list(headers[field]), field
        without_seconds = [[line for line in text.split("<meta>") if "Seconds" not in line] for text in attributes]
        assert [[line for line in text.split("<meta>") if "Seconds" not in line] for text in got[2]] == without_seconds
        report = json.loads((out / f"{name}_report" / "report.json").read_text())
        assert [s["verdict"] for s in report["slices"]] == ["clean"] * 4
        assert all((out / f"{name}_report" / s["picture"]).is_file() for s in report["slices"])


def test_merged_parts_are_in_slice_order_numbered_as_one_replay(tmp_path: Path) -> None:
    """An as-received copy (series 101) keeps its rewritten image's number."""
    import ismrmrd

    from gadgets.runner.batch import merge_image_files

    def part(path: Path, slices: list[int]) -> Path:
        dataset = ismrmrd.Dataset(str(path), "images", create_if_needed=True)
        dataset.write_xml_header("<ismrmrdHeader/>")
        for number, slice_ in enumerate(slices, start=1):
            for series in (1, 101) if slice_ == 3 else (1,):
                image = ismrmrd.Image.from_array(np.full((4, 4), slice_ + series, dtype=np.complex64))
                image.slice, image.image_index, image.image_series_index = slice_, number, series
                dataset.append_image(f"image_{series}", image)
        dataset.close()
        return path

    merge_image_files([part(tmp_path / "b.h5", [2, 3]), part(tmp_path / "a.h5", [0, 1])], tmp_path / "out.h5", "images")
    merged = _series(tmp_path / "out.h5")
    assert list(merged["image_1"][0]["slice"]) == [0, 1, 2, 3] and list(merged["image_1"][0]["image_index"]) == [1, 2, 3, 4]
    assert [float(d[0, 0, 0, 0]["real"]) for d in merged["image_1"][1]] == [1.0, 2.0, 3.0, 4.0]
    assert list(merged["image_101"][0]["slice"]) == [3] and list(merged["image_101"][0]["image_index"]) == [4]


def _series(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Every image series of an output's ``images`` group: headers, pixels, meta text."""
    import h5py

    with h5py.File(path, "r") as handle:
        return {
            key: (item["header"][()], item["data"][()], [a.decode() if isinstance(a, bytes) else str(a) for a in item["attributes"][()]])
            for key, item in handle["images"].items()
            if isinstance(item, h5py.Group)
        }
