"""Replay an archive of raw files on a Dask cluster (``cycguard replay`` with several inputs).

One task per file, each the single-file replay (:func:`gadgets.runner.replay.replay`, its
images, report and verdicts exactly as a replay of that file alone gives them), on a local
cluster of worker processes (one thread each, a memory limit each) or on an existing
scheduler (``--scheduler ADDRESS``). Per file the output folder gets ``NAME.h5`` (group
``images``), ``NAME_report/`` and, written last, ``NAME.done.json``: the file's fingerprint
(its path, size and modification time, the pipeline's text and the model's hash) and what
came out. A later run with the same pipeline and model skips every file whose marker matches;
a file whose task died (a killed worker) has no marker and runs again, its partial output
replaced, so no file is lost or written twice. A file that fails is listed with its reasons and
never stops the others. ``summary.json`` and ``summary.html`` count the verdicts over all files
and link each file's report.
"""

from __future__ import annotations

import glob
import hashlib
import html
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

DONE_SUFFIX = ".done.json"
LIST_SUFFIXES = (".txt", ".lst")
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class FileOutcome:
    """What became of one raw file: ``done``, ``skipped`` (done before with the same pipeline
    and model) or ``failed`` (with its reasons)."""

    raw: str
    name: str
    status: str
    verdicts: dict[str, int] = field(default_factory=dict)
    failures: tuple[str, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class BatchSummary:
    """The outcome of every file and where the summary went."""

    files: tuple[FileOutcome, ...]
    summary_json: Path
    summary_html: Path
    seconds: float

    @property
    def ok(self) -> bool:
        return all(f.status != "failed" for f in self.files)

    def verdicts(self) -> dict[str, int]:
        """Images per verdict over every file (done and skipped)."""
        return count_verdicts(self.files)

    def statuses(self) -> dict[str, int]:
        """Files per status (``done``, ``skipped``, ``failed``)."""
        return count_statuses(self.files)


def count_verdicts(files: Sequence[FileOutcome]) -> dict[str, int]:
    """Images per verdict over ``files``."""
    total: dict[str, int] = {}
    for outcome in files:
        for verdict, count in outcome.verdicts.items():
            total[verdict] = total.get(verdict, 0) + count
    return total


def count_statuses(files: Sequence[FileOutcome]) -> dict[str, int]:
    """Files per status, every status named."""
    return {status: sum(f.status == status for f in files) for status in ("done", "skipped", "failed")}


def is_archive(specs: Sequence[str]) -> bool:
    """Whether ``specs`` name more than one raw file's worth: several, a folder, a list file or a glob."""
    first = Path(specs[0])
    return len(specs) > 1 or first.is_dir() or first.suffix in LIST_SUFFIXES or any(char in specs[0] for char in GLOB_CHARS)


def expand_inputs(specs: Sequence[str]) -> list[Path]:
    """The raw files named by ``specs``: files, folders (their ``*.h5``), globs, and list files
    (``.txt``/``.lst``: one path a line, ``#`` comments), each once, in the order given.

    Raises:
        ValueError: a name that is no file, or nothing at all.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found += sorted(path.glob("*.h5"))
        elif path.suffix in LIST_SUFFIXES and path.is_file():
            lines = [line.strip() for line in path.read_text().splitlines()]
            found += [(path.parent / line) for line in lines if line and not line.startswith("#")]
        elif any(char in spec for char in GLOB_CHARS):
            found += sorted(Path(p) for p in glob.glob(spec, recursive=True))
        else:
            found.append(path)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    missing = [str(p) for p in unique if not p.is_file()]
    if missing:
        raise ValueError(f"not a raw file: {', '.join(missing)}")
    if not unique:
        raise ValueError(f"no raw file in {', '.join(specs)}")
    return unique


def output_names(files: Sequence[Path]) -> dict[Path, str]:
    """An output name per file: its stem, numbered where two files share one."""
    names: dict[Path, str] = {}
    used: dict[str, int] = {}
    for path in files:
        count = used.get(path.stem, 0) + 1
        used[path.stem] = count
        names[path] = path.stem if count == 1 else f"{path.stem}-{count}"
    return names


def fingerprint(raw: Path, pipeline_text: str, model_sha256: str) -> dict[str, Any]:
    """What a file's result depends on: the file as it is, the pipeline's text, the model."""
    stat = raw.stat()
    return {
        "input": str(raw), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "pipeline_sha256": hashlib.sha256(pipeline_text.encode()).hexdigest(), "model_sha256": model_sha256,
    }


def replay_one(raw: str, pipeline: str, out_dir: str, name: str, print_: dict[str, Any], in_process: bool, threads: int) -> dict[str, Any]:
    """One file on a worker: the single-file replay, then its marker (a task killed before
    the end leaves none, so the file runs again)."""
    import torch

    from gadgets.runner.replay import replay

    if in_process:  # the stages run in this worker: its share of the cores
        torch.set_num_threads(threads)
    started = time.perf_counter()
    out = Path(out_dir) / f"{name}.h5"
    out.unlink(missing_ok=True)  # a partial output of an interrupted run
    verdicts: dict[str, int] = {}
    try:
        result = replay(
            Path(raw), pipeline, out, Path(out_dir) / f"{name}_report", group="images", in_process=in_process, threads=threads,
            progress=False, echo_stderr=False,
        )
        failures = list(result.failures)
        for row in result.rows:
            verdicts[row.verdict] = verdicts.get(row.verdict, 0) + 1
    except Exception as err:  # a file's failure is its own: listed, never the batch's end
        failures = [f"{type(err).__name__}: {err}"]
    outcome = FileOutcome(raw, name, "failed" if failures else "done", verdicts, tuple(failures), time.perf_counter() - started)
    if not failures:
        marker = Path(out_dir) / f"{name}{DONE_SUFFIX}"
        partial = marker.with_suffix(".tmp")
        partial.write_text(json.dumps({"fingerprint": print_, "outcome": asdict(outcome)}, indent=1))
        partial.replace(marker)
    return asdict(outcome)


def _skipped(out_dir: Path, name: str, print_: dict[str, Any]) -> FileOutcome | None:
    """The earlier outcome of a file done with the same fingerprint, or ``None``."""
    marker = out_dir / f"{name}{DONE_SUFFIX}"
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if done.get("fingerprint") != print_ or not (out_dir / f"{name}.h5").is_file():
        return None
    earlier = done["outcome"]
    return FileOutcome(earlier["raw"], name, "skipped", dict(earlier["verdicts"]), (), 0.0)


def replay_many(
    inputs: Sequence[str],
    pipeline: str,
    out_dir: Path,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str = "6GiB",
    in_process: bool = True,
    progress: bool = True,
    threads: int | None = None,
) -> BatchSummary:
    """Replay every raw file of ``inputs`` through ``pipeline`` on a Dask cluster, one task a
    file; see the module docstring. ``workers`` (default: the cores) and ``memory_limit`` size
    the local cluster; ``scheduler`` uses an existing one instead. ``threads``: torch threads
    of each task (default: the cores shared among the local workers, 1 on a scheduler's)."""
    from distributed import Client, LocalCluster, as_completed

    from gadgets.runner.config import load_pipeline
    from recon.models.weights import DEFAULT_WEIGHTS

    started = time.perf_counter()
    logging.getLogger("distributed").setLevel(logging.WARNING)  # its start-up and shut-down chatter
    files = expand_inputs(inputs)
    names = output_names(files)
    source = Path(load_pipeline(pipeline).source)
    pipeline_text = source.read_text() if source.is_file() else pipeline
    model_sha256 = str(json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())["sha256"])
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, FileOutcome] = {}
    todo: list[tuple[Path, dict[str, Any]]] = []
    for raw in files:
        print_ = fingerprint(raw, pipeline_text, model_sha256)
        earlier = _skipped(out_dir, names[raw], print_)
        if earlier is not None:
            outcomes[names[raw]] = earlier
        else:
            todo.append((raw, print_))
    log.info("%d files: %d done before with this pipeline and model, %d to replay", len(files), len(outcomes), len(todo))
    if todo:
        cores = os.cpu_count() or 1
        count = workers or cores
        threads = threads or (max(1, cores // count) if scheduler is None else 1)
        cluster = None if scheduler else LocalCluster(
            n_workers=count, threads_per_worker=1, processes=True, memory_limit=memory_limit, dashboard_address=":0",
        )
        try:
            with Client(scheduler or cluster) as client:
                futures = {
                    client.submit(
                        replay_one, str(raw), pipeline, str(out_dir.resolve()), names[raw], print_, in_process, threads,
                        key=f"replay-{names[raw]}-{print_['mtime_ns']}", pure=False, retries=1,
                    ): (raw, names[raw])
                    for raw, print_ in todo
                }
                for future in tqdm(as_completed(futures), total=len(futures), desc="replay", unit="file", disable=not progress):
                    raw, name = futures[future]
                    try:
                        done = future.result()
                        outcomes[name] = FileOutcome(**{**done, "failures": tuple(done["failures"])})
                    except Exception as err:  # the task itself died (e.g. its worker, twice)
                        outcomes[name] = FileOutcome(str(raw), name, "failed", {}, (f"{type(err).__name__}: {err}",))
        finally:
            if cluster is not None:
                cluster.close()
    ordered = tuple(outcomes[names[raw]] for raw in files)
    seconds = time.perf_counter() - started
    json_path, html_path = _write_summary(out_dir, pipeline, ordered, seconds)
    return BatchSummary(ordered, json_path, html_path, seconds)


def _write_summary(out_dir: Path, pipeline: str, files: Sequence[FileOutcome], seconds: float) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.html``: counts per verdict and status, failures, a row a file."""
    verdicts, statuses = count_verdicts(files), count_statuses(files)
    payload = {"pipeline": pipeline, "seconds": seconds, "files": statuses, "verdicts": verdicts, "outcomes": [asdict(f) for f in files]}
    json_path = out_dir / "summary.json"
    json_path.write_text(json.dumps(payload, indent=1))
    rows = []
    for outcome in files:
        report = f"{outcome.name}_report/report.html"
        link = f'<a href="{html.escape(report)}">report</a>' if (out_dir / report).is_file() else ""
        counts = ", ".join(f"{verdict} {count}" for verdict, count in sorted(outcome.verdicts.items()))
        rows.append(
            f"<tr><td>{html.escape(outcome.raw)}</td><td>{outcome.status}</td><td>{html.escape(counts)}</td>"
            f"<td>{html.escape('; '.join(outcome.failures))}</td><td>{link}</td></tr>"
        )
    head = ", ".join(f"{k} {v}" for k, v in statuses.items()) + "; images: " + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
    page = (
        f"<!doctype html><meta charset='utf-8'><title>CycGuard batch replay</title><h1>CycGuard batch replay through {html.escape(pipeline)}</h1>"
        f"<p>{html.escape(head)} ({seconds:.0f} s)</p><table border='1'><tr><th>file</th><th>status</th><th>verdicts</th><th>failures</th>"
        f"<th></th></tr>{''.join(rows)}</table>"
    )
    html_path = out_dir / "summary.html"
    html_path.write_text(page)
    return json_path, html_path
