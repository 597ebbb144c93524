"""Replay an archive of raw files on a Dask cluster (``cycguard replay`` with several inputs).

One task per file, each the single-file replay (:func:`gadgets.runner.replay.replay`, its
images, report and verdicts exactly as a replay of that file alone gives them), on a local
cluster of worker processes (one thread each, a memory limit each) or on an existing
scheduler (``--scheduler ADDRESS``). A file of more slices than ``--slices-per-task`` is
split: one task per group of slices (the others' acquisitions are not sent to it), then one
task that merges their images into the file's output in slice order, numbered as a replay of
the whole file numbers them, and their report lines into one report. Per file the output
folder gets ``NAME.h5`` (group ``images``), ``NAME_report/`` and, written last, ``NAME.done.json``: the file's fingerprint
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
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gadgets.cores import available_cores

log = logging.getLogger(__name__)

DONE_SUFFIX = ".done.json"
LIST_SUFFIXES = (".txt", ".lst")
GLOB_CHARS = "*?["
COUNTERS = ("repetition", "slice", "contrast", "set", "phase")  # the merge's order of an image's counters, most significant first


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


def _replay_into(
    raw: str, pipeline: str, out: Path, report: Path, in_process: bool, threads: int, slices: list[int] | None = None
) -> tuple[Any, list[str]]:
    """The single-file replay on a worker (of ``slices`` only, when given) into ``out``, which
    an interrupted run may have left half-written: ``(result or None, failures)``."""
    import torch

    from gadgets.runner.replay import replay

    if in_process:  # the stages run in this worker: its share of the cores
        torch.set_num_threads(threads)
    out.unlink(missing_ok=True)
    try:
        result = replay(
            Path(raw), pipeline, out, report, group="images", in_process=in_process, threads=threads, progress=False,
            echo_stderr=False, slices=None if slices is None else frozenset(slices),
        )
        return result, list(result.failures)
    except Exception as err:  # a file's (or part's) failure is its own: listed, never the batch's end
        return None, [f"{f'slices {slices}: ' if slices is not None else ''}{type(err).__name__}: {err}"]


def _verdicts(rows: Sequence[Any]) -> dict[str, int]:
    """Images per verdict over report rows (verdicts that occur only)."""
    return dict(Counter(row.verdict for row in rows))


def replay_one(raw: str, pipeline: str, out_dir: str, name: str, print_: dict[str, Any], in_process: bool, threads: int) -> dict[str, Any]:
    """One file on a worker: the single-file replay, then its marker (a task killed before
    the end leaves none, so the file runs again)."""
    started = time.perf_counter()
    result, failures = _replay_into(raw, pipeline, Path(out_dir) / f"{name}.h5", Path(out_dir) / f"{name}_report", in_process, threads)
    verdicts = _verdicts(result.rows) if result is not None else {}
    outcome = FileOutcome(raw, name, "failed" if failures else "done", verdicts, tuple(failures), time.perf_counter() - started)
    if not failures:
        _mark_done(Path(out_dir), name, print_, outcome)
    return asdict(outcome)


def replay_part(
    raw: str, pipeline: str, out_dir: str, name: str, part: int, slices: list[int], in_process: bool, threads: int
) -> dict[str, Any]:
    """One group of slices of a large file on a worker: ``NAME.partK.h5`` and ``NAME_report/partK/``."""
    out = Path(out_dir) / f"{name}.part{part}.h5"
    result, failures = _replay_into(raw, pipeline, out, Path(out_dir) / f"{name}_report" / f"part{part}", in_process, threads, slices)
    rows = list(result.rows) if result is not None else []
    report = str(result.report_json or "") if result is not None else ""
    return {"part": part, "output": str(out), "rows": rows, "report": report, "failures": failures}


def merge_parts(parts: list[dict[str, Any]], raw: str, out_dir: str, name: str, print_: dict[str, Any], started: float) -> dict[str, Any]:
    """The parts of a large file into its ``NAME.h5`` (slice order, numbered as one replay),
    one report over all their slices, and its marker when no part failed."""
    from dataclasses import replace

    from recon.report import RunContext, write_report

    parts = sorted(parts, key=lambda p: int(p["part"]))
    failures = [failure for p in parts for failure in p["failures"]]
    out = Path(out_dir) / f"{name}.h5"
    outputs = [Path(p["output"]) for p in parts if Path(p["output"]).is_file()]
    if outputs:
        merge_image_files(outputs, out, "images")
    rows = [replace(row, picture=f"part{p['part']}/{row.picture}") for p in parts for row in p["rows"]]
    context = next((json.loads(Path(p["report"]).read_text()) for p in parts if p["report"]), None)
    if context is not None:
        run = RunContext(context["model"], context["pipeline"], context["properties"], context["created"], context["software"])
        write_report(Path(out_dir) / f"{name}_report", f"CycGuard replay of {Path(raw).name} in {len(parts)} parts", raw, rows, run)
    for path in outputs:
        path.unlink()
    outcome = FileOutcome(raw, name, "failed" if failures else "done", _verdicts(rows), tuple(failures), time.time() - started)
    if not failures:
        _mark_done(Path(out_dir), name, print_, outcome)
    return asdict(outcome)


def merge_image_files(parts: Sequence[Path], out: Path, group: str) -> None:
    """Images of several outputs of one file's slices into one output, every series in slice
    order, ``image_index`` numbered 1, 2, ... by slice as a replay of the whole file numbers them
    (an as-received copy keeps its image's number)."""
    import h5py
    import numpy as np

    series: dict[str, list[tuple[Any, Any, Any]]] = {}
    with h5py.File(parts[0], "r") as first:
        header_xml = first[group]["xml"][()]
    for path in parts:
        with h5py.File(path, "r") as handle:
            for key, item in handle[group].items():
                if isinstance(item, h5py.Group) and "header" in item:
                    series.setdefault(key, []).append((item["header"][()], item["data"][()], item["attributes"][()] if "attributes" in item else None))
    def counters(header: Any) -> tuple[int, ...]:
        return tuple(int(header[field]) for field in COUNTERS)

    merged = {}
    for key, chunks in series.items():
        headers = np.concatenate([c[0] for c in chunks])
        order = np.lexsort([headers[field] for field in reversed(COUNTERS)])
        attributes = None if any(c[2] is None for c in chunks) else np.concatenate([c[2] for c in chunks])[order]
        merged[key] = (headers[order], np.concatenate([c[1] for c in chunks])[order], attributes)
    main = min(merged, key=lambda k: int(merged[k][0]["image_series_index"][0]))
    number = {counters(h): n + 1 for n, h in enumerate(merged[main][0])}
    partial = out.with_name(out.name + ".partial")
    with h5py.File(partial, "w") as handle:
        target = handle.create_group(group)
        target.create_dataset("xml", data=header_xml)
        for key, (headers, data, attributes) in merged.items():
            for h in headers:
                h["image_index"] = number.get(counters(h), h["image_index"])
            holder = target.create_group(key)
            holder.create_dataset("header", data=headers)
            holder.create_dataset("data", data=data)
            if attributes is not None:
                holder.create_dataset("attributes", data=attributes, dtype=h5py.string_dtype())
    partial.replace(out)


def _mark_done(out_dir: Path, name: str, print_: dict[str, Any], outcome: FileOutcome) -> None:
    """``NAME.done.json``, written whole and last."""
    marker = out_dir / f"{name}{DONE_SUFFIX}"
    partial = marker.with_suffix(".tmp")
    partial.write_text(json.dumps({"fingerprint": print_, "outcome": asdict(outcome)}, indent=1))
    partial.replace(marker)


def slice_groups(raw: Path, per_task: int) -> list[list[int]] | None:
    """The slices of a file in groups of ``per_task`` when it has more, else ``None`` (one task);
    ``None`` too for a file that cannot be surveyed (its own task reports why)."""
    from gadgets.runner.replay import preflight

    if per_task <= 0:
        return None
    try:
        slices = sorted({key.slice for key in preflight(raw)[1]})
    except Exception:  # noqa: BLE001 - the whole-file task fails with the message
        return None
    if len(slices) <= per_task:
        return None
    return [slices[n : n + per_task] for n in range(0, len(slices), per_task)]


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
    slices_per_task: int = 0,
) -> BatchSummary:
    """Replay every raw file of ``inputs`` through ``pipeline`` on a Dask cluster, one task a
    file; see the module docstring. ``workers`` (default: the cores) and ``memory_limit`` size
    the local cluster; ``scheduler`` uses an existing one instead. ``threads``: torch threads
    of each task (default: the cores shared among the local workers, 1 on a scheduler's).
    ``slices_per_task``: split files of more slices than that (0: one task a file)."""
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
        cores = available_cores()
        count = workers or cores
        threads = threads or (max(1, cores // count) if scheduler is None else 1)
        cluster = None if scheduler else LocalCluster(
            n_workers=count, threads_per_worker=1, processes=True, memory_limit=memory_limit, dashboard_address=":0",
        )
        try:
            with Client(scheduler or cluster) as client:
                futures = {}
                for raw, print_ in todo:
                    name, folder, key = names[raw], str(out_dir.resolve()), f"{names[raw]}-{print_['mtime_ns']}"
                    groups = slice_groups(raw, slices_per_task)
                    if groups is None:
                        future = client.submit(replay_one, str(raw), pipeline, folder, name, print_, in_process, threads, key=f"replay-{key}", pure=False, retries=1)
                    else:
                        parts = [
                            client.submit(replay_part, str(raw), pipeline, folder, name, n, group, in_process, threads, key=f"part{n}-{key}", pure=False, retries=1)
                            for n, group in enumerate(groups)
                        ]
                        future = client.submit(merge_parts, parts, str(raw), folder, name, print_, time.time(), key=f"merge-{key}", pure=False, retries=1)
                    futures[future] = (raw, name)
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
