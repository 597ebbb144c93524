"""Offline defended reconstruction of a raw file (``cycguard recon`` / ``cycguard demo``).

Runs ``recon.pipeline`` in process (the Gadgetron chain calls the same core). When a
calibration fits the model and the scan's protocol, every slice goes through
recon -> detect -> mitigate-if-flagged and carries its verdict (``clean``, ``flagged``,
``mitigated``); otherwise images leave with ``CycGuard.Verdict = unverified`` and a
warning: an image never looks verified when it is not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from recon.detect.defense import ProtocolKey, ScanDefenses, protocol_of
from recon.io.mrd import read_raw
from recon.io.mrd_write import check_output, read_images, write_images
from recon.metrics import quality
from recon.models.weights import load_model, model_tag, resolve_device
from recon.pipeline import DefendedResult, check_meta, defend, reconstruct
from recon.report import RunContext, SliceReport, montage, write_report
from recon.types import ReconImage
from recon.verdict import (
    CALIBRATION_KEY,
    PROTOCOL_KEY,
    SECONDS_PREFIX,
    MetaValue,
    mitigation_meta,
    recon_meta,
    verdict_meta,
)

log = logging.getLogger(__name__)

# called for a protocol without calibration: (protocol, model manifest, the scan's LikeSeed
# for it when asked, why no calibration fits) -> the reason its slices carry
OnMissing = Callable[[ProtocolKey, Any, Callable[[], Any], str], str]


@dataclass(frozen=True)
class OfflineResult:
    """Where the outputs went and the per-slice report rows."""

    images: Path
    report_json: Path
    report_html: Path
    rows: tuple[SliceReport, ...]


def reconstruct_file(
    raw: Path,
    out: Path,
    report_dir: Path,
    reference: Path | None = None,
    weights: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    calibration: Path | None = None,
    on_missing: OnMissing | None = None,
) -> OfflineResult:
    """Reconstruct every slice of ``raw``, write images to ``out`` and a report to ``report_dir``.

    Args:
        raw: ISMRMRD raw file.
        out: ISMRMRD file for the images (group ``images``, series 1; overwritten).
        report_dir: folder for ``report.json``, ``report.html`` and PNG montages.
        reference: optional ISMRMRD image file with one complex reference per slice.
        weights: network weights (the shipped default when ``None``).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        progress: show a progress bar on stderr.
        calibration: detection calibration (default: the one shipped beside the weights;
            a missing default makes images ``unverified``, a named file that does not fit
            is an error).
        on_missing: for a protocol no calibration fits, once per protocol: may start one
            (``cycguard recon`` starts it in the background) and returns the reason its
            slices carry; they stay ``unverified`` in this run either way.
    """
    check_output(out, [raw] + ([reference] if reference is not None else []))
    torch_device = resolve_device(device)
    scan = read_raw(raw)  # bad input fails before the weights are touched
    model, manifest = load_model(weights, torch_device)
    references = [image for image, _ in read_images(reference)] if reference is not None else None
    if references is not None and len(references) != len(scan.slices):
        raise ValueError(f"{reference} holds {len(references)} images, {raw} has {len(scan.slices)} slices")
    report_dir.mkdir(parents=True, exist_ok=True)
    defenses = ScanDefenses(model, manifest, scan, calibration)
    tag = model_tag(manifest)
    images, rows = [], []
    missing: dict[ProtocolKey, str] = {}
    for n, data in enumerate(tqdm(scan.slices, desc="recon", unit="slice", disable=not progress)):
        defense = defenses.fit(data)
        key = protocol_of(data, manifest, scan.protocol.acceleration)
        protocol = key.describe()
        if isinstance(defense, str) and on_missing is not None:
            if key not in missing:
                missing[key] = on_missing(key, manifest, partial(_seed, raw, scan, manifest, key), defense)
            defense = missing[key]
        checked: dict[str, str] = {}
        if isinstance(defense, str):
            result = reconstruct(data, model, torch_device)
            image = received = result.image
            verdict, timings = "unverified", dict(result.timings)
            x_zf = result.prepared.x_zf[0].cpu().numpy()
            score = threshold = p_value = level = None
            reason = f"unverified: no consistency check ran: {defense}"
            meta: dict[str, MetaValue] = {**recon_meta(tag, timings["prepare"] + timings["network"]), **verdict_meta(verdict, reason), PROTOCOL_KEY: protocol}
        else:
            defended = defend(data, defense, torch_device)
            image, received, verdict, timings = defended.image, defended.received, defended.verdict, dict(defended.timings)
            x_zf = defended.prepared.x_zf[0].cpu().numpy()
            score, threshold, p_value, reason = defended.score, defended.threshold, defended.p_value, defended.reason
            level = defended.scores.signal_level
            checked = check_meta(defense, score, threshold, p_value, defended.scores)
            meta = defended_meta(defended, checked, tag, protocol, defense.mitigation.method)
        images.append(ReconImage(image, data.key, data.geometry, tuple(meta.items())))
        ref = references[n] if references is not None else None
        name = f"slice {data.key.slice} rep {data.key.repetition}"
        rewritten = verdict == "mitigated"
        panels = [("zero-filled", x_zf)] + ([("received", received)] if rewritten else []) + [("CycGuard", image)] + ([("reference", ref)] if ref is not None else [])
        picture = montage(report_dir / f"slice_{n:03d}.png", panels).name
        rows.append(
            SliceReport(
                name=name,
                verdict=verdict,
                timings=timings,
                quality=quality(image, ref) if ref is not None else None,
                quality_zero_filled=quality(x_zf, ref) if ref is not None else None,
                picture=picture,
                score=score,
                threshold=threshold,
                p_value=p_value,
                reason=reason,
                received_quality=quality(received, ref) if ref is not None and rewritten else None,
                protocol=protocol,
                calibration=checked.get(CALIBRATION_KEY, ""),
                signal_level=level,
            )
        )
    out.unlink(missing_ok=True)
    write_images(out, images, xml=scan.xml, magnitude=False)
    json_path, html_path = write_report(report_dir, f"CycGuard reconstruction of {raw.name}", str(raw), rows, RunContext(tag))
    if references is not None:
        log.info("mean PSNR %.2f dB", float(np.mean([r.quality.psnr for r in rows if r.quality])))
    return OfflineResult(out, json_path, html_path, tuple(rows))


def _seed(raw: Path, scan: Any, manifest: Any, protocol: ProtocolKey) -> Any:
    """What a calibration by simulation needs from the slices of ``protocol`` in ``scan``."""
    from recon.calibrate import LikeSeed

    acceleration = scan.protocol.acceleration
    slices = [data for data in scan.slices if protocol_of(data, manifest, acceleration) == protocol]
    return LikeSeed.of_slices(slices, scan.whitened, manifest, acceleration, raw.name)


def defended_meta(defended: DefendedResult, checked: dict[str, str], tag: str, protocol: str, method: str) -> dict[str, MetaValue]:
    """The meta the gadget chain writes on this slice, stage by stage: recon, detect, and
    mitigate for a flagged slice (``checked``: :func:`recon.pipeline.check_meta`)."""
    timings = dict(defended.timings)
    check_verdict = "flagged" if defended.verdict in ("flagged", "mitigated") else defended.verdict
    meta: dict[str, MetaValue] = {
        **recon_meta(tag, timings["prepare"] + timings["network"]),
        **verdict_meta(check_verdict, defended.reason),  # a flagged slice's reason is the mitigation's below
        **checked,
        PROTOCOL_KEY: protocol,
        SECONDS_PREFIX + "detect": f"{timings['detect']:.4f}",
    }
    if check_verdict == "flagged":
        meta.update(mitigation_meta(defended.verdict, defended.reason, timings.get("mitigate", 0.0), defended.mitigated_score, method))
    return meta
