"""``cycguard replay``: an ISMRMRD raw file through a pipeline, images out, a per-slice report.

Acquisitions and waveforms are sent in time-stamp order, as ``gadgetron_ismrmrd_client``
sends them; images are appended, as they arrive, to ``/<group>/image_<series>`` of the
output file as that client writes them (the group defaults to the date and time). The run
fails (``ReplayResult.ok`` false, exit status 1) when any stage failed, when any slice of
the input came out with no image or with more than one, or when any image lacks a verdict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import ismrmrd
import numpy as np
from gadgetron.types.image_array import ImageArray
from gadgetron.types.recon_data import ReconData
from tqdm import tqdm

from gadgets import params
from gadgets.convert import image_key, image_pixels, is_received, meta_of, meta_value
from gadgets.runner.chain import run_pipeline
from gadgets.runner.config import (
    ExternalNode,
    Pipeline,
    PipelineError,
    check_pipeline,
    load_pipeline,
    stage_names,
    with_stage_properties,
)
from gadgets.runner.frontend import check_header
from gadgets.stages import SliceError
from recon.io.mrd import NOT_IMAGING, MRDError, parse_header, read_header_text, survey
from recon.io.mrd_write import check_output, read_images
from recon.io.pacs import PacsTarget, destination_spool
from recon.metrics import quality
from recon.report import RunContext, SliceReport, montage, write_report
from recon.types import SliceKey
from recon.verdict import VERDICT_KEY, VERDICTS

log = logging.getLogger("cycguard.replay")



@dataclass(frozen=True)
class ReplayResult:
    """What a replay produced and what went wrong."""

    output: Path
    group: str
    rows: tuple[SliceReport, ...]
    report_json: Path | None
    report_html: Path | None
    failures: tuple[str, ...]
    seconds: float
    slices: int
    dicom_files: int = 0
    pacs_pending: int | None = None
    spool: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class _Collected:
    key: SliceKey
    pixels: np.ndarray
    meta: dict[str, str]


def read_header(raw: Path, dataset: str = "dataset") -> str:
    """The XML header of a raw file, checked as ours and as Gadgetron's (:class:`MRDError`
    naming what is wrong)."""
    xml = read_header_text(raw, dataset)
    parse_header(xml, str(raw))
    check_header(xml, str(raw))
    return xml


def expected_slices(raw: Path, dataset: str = "dataset") -> list[SliceKey]:
    """The 2-D slices the file holds imaging data for, in order of first appearance."""
    with h5py.File(raw, "r") as handle:
        heads = handle[f"{dataset}/data"]["head"]
    keep = (heads["flags"].astype(np.uint64) & NOT_IMAGING) == 0
    idx = heads["idx"][keep]
    seen: dict[SliceKey, None] = {}
    for row in idx:
        seen.setdefault(SliceKey(int(row["slice"]), int(row["contrast"]), int(row["repetition"]), int(row["set"]), int(row["phase"])))
    return list(seen)


def preflight(raw: Path) -> tuple[str, list[SliceKey]]:
    """The checked header and the expected slices of a raw file, before any gadget starts
    (exit 2 in seconds): header as ours and as Gadgetron's, acquisition headers against it,
    and at least one slice that can be reconstructed."""
    header_xml = read_header(raw)
    problems = survey(raw, parse_header(header_xml, str(raw)))
    expected = expected_slices(raw)
    if len(problems) >= len({key.slice for key in expected}):
        raise MRDError("; ".join(problems) + " (no slice could be reconstructed)")
    return header_xml, expected


def stream_raw(raw: Path, dataset: str = "dataset", slices: frozenset[int] | None = None) -> Generator[Any, None, None]:
    """Acquisitions and waveforms interleaved by time stamp, as gadgetron_ismrmrd_client sends them
    (``slices``: only the acquisitions of these slices, and the noise scans)."""
    try:
        with ismrmrd.File(str(raw), "r") as handle:
            group = handle[dataset]
            waveforms = sorted(group.waveforms, key=lambda w: w.time_stamp) if group.has_waveforms() else []
            position = 0
            for acq in group.acquisitions:
                if slices is not None and acq.idx.slice not in slices and not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                    continue
                while position < len(waveforms) and waveforms[position].time_stamp <= acq.acquisition_time_stamp:
                    yield waveforms[position]
                    position += 1
                yield acq
            yield from waveforms[position:]
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise MRDError(f"{raw}: cannot read acquisitions (truncated or corrupt data?): {err}") from err


def attacked_slices(pipeline: Pipeline) -> frozenset[int] | None:
    """Slices a red-team stage of the pipeline attacks (``None`` when there is none; all slices
    are named by an empty set meaning every slice)."""
    for node in pipeline.externals:
        if not node.ours:
            continue
        settings = params.parse(node.module, node.target, node.configuration)
        if params.AttackSettings in settings:
            chosen = settings[params.AttackSettings].slice_set()
            return frozenset() if chosen is None else chosen
    return None


def replay(
    raw: Path,
    pipeline_name: str,
    output: Path,
    report_dir: Path | None = None,
    reference: Path | None = None,
    group: str | None = None,
    in_process: bool = False,
    threads: int | None = None,
    progress: bool = True,
    echo_stderr: bool = True,
    on_image: Callable[[], None] | None = None,
    dicom: Path | None = None,
    pacs: str | None = None,
    spool: Path | None = None,
    calling_aet: str = "CYCGUARD",
    slices: frozenset[int] | None = None,
) -> ReplayResult:
    """Replay ``raw`` through a pipeline (installed name or XML path); see the module docstring.

    ``on_image`` is called as each image arrives (benchmarks time the stream with it).
    ``slices``: only these slices of the file (a part of a large file in a batch replay): the
    others are neither sent nor expected, and the recon stage does not report them missing.
    ``dicom``, ``pacs`` (``AET@host:port``), ``spool`` and ``calling_aet`` set the export
    stage's properties of the same meaning (the pipeline must have one).
    """
    started = time.perf_counter()
    pipeline = load_pipeline(pipeline_name)
    export: dict[str, str] = {}
    if dicom is not None:
        export["dicom_folder"] = str(dicom.resolve())
    if pacs:
        target = PacsTarget.parse(pacs, calling_aet)
        export.update(pacs_aet=target.ae_title, pacs_host=target.host, pacs_port=str(target.port), calling_aet=calling_aet)
        if spool is not None:
            export["spool"] = str(spool.resolve())
    if export:
        pipeline = with_stage_properties(pipeline, "export", export)
    if report_dir is not None:  # the report shows each rewritten slice before and after
        try:
            pipeline = with_stage_properties(pipeline, "mitigate", {"send_received": "true"})
        except PipelineError:
            pass  # no mitigate stage: nothing is rewritten
    if slices is not None:
        try:
            pipeline = with_stage_properties(pipeline, "recon", {"account_slices": "false"})
        except PipelineError:
            pass  # no recon stage
    for warning in check_pipeline(pipeline):
        log.warning("%s", warning)
    header_xml, expected = preflight(raw)
    if slices is not None:
        expected = [key for key in expected if key.slice in slices]
    check_output(output, [raw] + ([reference] if reference is not None else []))
    references = [image for image, _ in read_images(reference)] if reference is not None else None
    if references is not None and len(references) != len(expected):
        raise ValueError(f"{reference} holds {len(references)} images, {raw} has {len(expected)} slices")
    group = group or datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
    try:
        with h5py.File(output, "a") as handle:
            if group in handle:
                raise ValueError(f"{output} already holds a group {group!r}: choose another with --group")
    except OSError as err:
        raise ValueError(f"cannot write the output {output}: {err.strerror or err}") from err
    collected: list[_Collected] = []
    received: dict[SliceKey, np.ndarray] = {}
    failures: list[str] = []
    dataset = ismrmrd.Dataset(str(output), group, create_if_needed=True)
    dataset.write_xml_header(header_xml)
    bar = tqdm(total=len(expected), desc=f"replay {raw.name}", unit="slice", disable=not progress)
    try:
        # the pipeline ends (its threads joined) before the raw file closes, both here and now: h5py
        # closes every object of a file when one handle to it closes, even another reader's
        with closing(stream_raw(raw, slices=slices)) as source, closing(run_pipeline(pipeline, header_xml, source, in_process=in_process, threads=threads, echo_stderr=echo_stderr)) as stream:
            for item in stream:
                if is_received(item):
                    dataset.append_image(f"image_{item.image_series_index}", item)
                    received[image_key(item)] = image_pixels(item)
                elif isinstance(item, ismrmrd.Image):
                    dataset.append_image(f"image_{item.image_series_index}", item)
                    meta = meta_of(item)
                    collected.append(
                        _Collected(image_key(item), image_pixels(item), {k: str(meta_value(meta, k)) for k in meta.keys()})
                    )
                    bar.update(1)
                    if on_image is not None:
                        on_image()
                elif isinstance(item, SliceError):  # in process; over the wire it arrives as the gadget's ERROR
                    failures.append(item.message)
                elif isinstance(item, ReconData) or isinstance(item, ImageArray):
                    failures.append(f"a {type(item).__name__} left the chain: end it with gadgets.export or set forward_internal=false")
                else:
                    log.info("passed through the chain: %s", type(item).__name__)
    except Exception as err:  # any stage's failure ends the run loudly, with what was already written kept
        log.error("%s", err)
        failures.append(str(err))
    finally:
        bar.close()
        dataset.close()
    failures += _completeness(expected, collected)
    attacked = attacked_slices(pipeline)
    rows = _rows(collected, received, expected, references, attacked, report_dir) if report_dir is not None else []
    json_path = html_path = None
    if report_dir is not None:
        title = f"CycGuard replay of {raw.name} through {Path(pipeline.source).name}"
        models = sorted({item.meta.get("CycGuard.Model", "") for item in collected} - {""})
        context = RunContext(", ".join(models) or "none (no CycGuard image)", str(pipeline.source), pipeline_properties(pipeline))
        json_path, html_path = write_report(report_dir, title, str(raw), rows, context)
    dicom_files = len(list(dicom.rglob("*.dcm"))) if dicom is not None and dicom.exists() else 0
    pending = None
    spool_used = None
    if pacs:
        target = PacsTarget.parse(pacs, calling_aet)
        spool_used = destination_spool(Path(export.get("spool") or params.ExportSettings().spool_folder()), target)
        pending = len(list(spool_used.glob("*.dcm"))) if spool_used.exists() else 0
    return ReplayResult(
        output, group, tuple(rows), json_path, html_path, tuple(failures), time.perf_counter() - started, len(expected),
        dicom_files, pending, spool_used,
    )


def _completeness(expected: list[SliceKey], collected: list[_Collected]) -> list[str]:
    problems = []
    counts: dict[SliceKey, int] = {}
    for item in collected:
        counts[item.key] = counts.get(item.key, 0) + 1
        verdict = item.meta.get(VERDICT_KEY)
        if verdict not in VERDICTS:
            problems.append(f"image of {item.key} carries no valid CycGuard.Verdict ({verdict!r})")
    missing = [k for k in expected if counts.get(k, 0) == 0]
    repeated = [k for k, n in counts.items() if n > 1]
    unexpected = [k for k in counts if k not in expected]
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} slices came out without an image: {missing}")
    if repeated:
        problems.append(f"slices with more than one image: {repeated}")
    if unexpected:
        problems.append(f"images of slices the input does not hold: {unexpected}")
    return problems


def pipeline_properties(pipeline: Pipeline) -> dict[str, str]:
    """The properties set on the pipeline's CycGuard nodes, ``stage.property -> value``."""
    return {
        f"{'+'.join(stage_names(node))}.{name}": value
        for node in pipeline.nodes
        if isinstance(node, ExternalNode) and node.ours
        for name, value in node.properties
    }


def _rows(
    collected: list[_Collected], received: dict[SliceKey, np.ndarray], expected: list[SliceKey], references: list[np.ndarray] | None,
    attacked: frozenset[int] | None, folder: Path,
) -> list[SliceReport]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, item in enumerate(collected):
        meta = item.meta
        ref = references[expected.index(item.key)] if references is not None and item.key in expected else None
        before = received.get(item.key) if meta.get(VERDICT_KEY) == "mitigated" else None
        panels = ([("received", before)] if before is not None else []) + [("CycGuard", item.pixels)] + ([("reference", ref)] if ref is not None else [])
        picture = montage(folder / f"slice_{number:03d}.png", panels).name
        timings = {k.split(".")[-1]: float(v) for k, v in meta.items() if k.startswith("CycGuard.Seconds.")}

        rows.append(
            SliceReport(
                name=f"slice {item.key.slice} rep {item.key.repetition}",
                verdict=meta.get(VERDICT_KEY, "missing"),
                timings=timings,
                quality=quality(item.pixels, ref) if ref is not None else None,
                quality_zero_filled=None,
                picture=picture,
                score=_number(meta, "CycGuard.Score"),
                threshold=_number(meta, "CycGuard.Threshold"),
                p_value=_number(meta, "CycGuard.PValue"),
                reason=meta.get("ImageComment", ""),
                attacked=None if attacked is None else (not attacked or item.key.slice in attacked),
                received_quality=quality(before, ref) if before is not None and ref is not None else None,
                protocol=meta.get("CycGuard.Protocol", ""),
                calibration=meta.get("CycGuard.Calibration", ""),
                signal_level=_number(meta, "CycGuard.SignalLevel"),
            )
        )
    return rows


def _number(meta: dict[str, str], key: str) -> float | None:
    try:
        return float(meta[key]) if key in meta else None
    except ValueError:  # "unknown"
        return None
