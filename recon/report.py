"""Per-slice reports a person reads: JSON for machines, HTML with PNG montages for people."""

from __future__ import annotations

import html
import json
import platform
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from recon.metrics import Quality  # noqa: E402
from recon.verdict import VERDICTS  # noqa: E402


@dataclass(frozen=True)
class SliceReport:
    """One slice's line in the report.

    Attributes:
        name: human-readable slice label.
        verdict: the CycGuard verdict carried by the image (``unverified`` when no check ran).
        timings: seconds per stage.
        quality: against the reference, when one was given.
        quality_zero_filled: the zero-filled image against the same reference.
        picture: PNG file name of the montage (relative to the report folder).
        score: the detection statistic (``None`` when no check ran).
        threshold: its calibrated threshold.
        p_value: conformal p-value among clean calibration slices.
        reason: one line on what the defense did and why (for ``unverified``: what did not
            match or was not covered).
        attacked: whether a red-team stage perturbed this slice (``None``: no red team).
        received_quality: for a rewritten (``mitigated``) slice, the image before the rewrite
            against the reference.
        protocol: the slice's protocol as the detect stage saw it.
        calibration: the SHA-256 prefix of the calibration that judged it.
        signal_level: its ACS RMS in noise sigmas (what the calibration's range must cover).
    """

    name: str
    verdict: str
    timings: dict[str, float]
    quality: Quality | None
    quality_zero_filled: Quality | None
    picture: str
    score: float | None = None
    threshold: float | None = None
    p_value: float | None = None
    reason: str = ""
    attacked: bool | None = None
    received_quality: Quality | None = None
    protocol: str = ""
    calibration: str = ""
    signal_level: float | None = None


@dataclass(frozen=True)
class RunContext:
    """What a report says about the run that made it: when, with which software, model,
    calibration, pipeline and properties."""

    model: str
    pipeline: str = "in-process defended reconstruction (recon.pipeline.defend)"
    properties: dict[str, str] = field(default_factory=dict)  # "stage.property" -> value, as configured
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"))
    software: dict[str, str] = field(default_factory=lambda: software_versions())


def software_versions() -> dict[str, str]:
    """Versions of CycGuard and what its results depend on."""
    versions = {"python": platform.python_version()}
    for name in ("cycguard", "torch", "numpy", "ismrmrd", "gadgetron", "pydicom"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def montage(path: Path, panels: Sequence[tuple[str, np.ndarray]], error_gain: float = 5.0) -> Path:
    """Save magnitude panels side by side (common grey scale), with ``|error| x gain`` panels
    for every panel after a ``reference`` one when present."""
    names = [n for n, _ in panels]
    images = [np.abs(p) for _, p in panels]
    vmax = float(np.percentile(np.concatenate([i.ravel() for i in images]), 99.5)) or 1.0
    reference = images[names.index("reference")] if "reference" in names else None
    extra = [(f"|{n} - ref| x{error_gain:g}", np.abs(i - reference) * error_gain) for n, i in zip(names, images, strict=True) if reference is not None and n != "reference"]
    columns = list(zip(names, images, strict=True)) + extra
    fig, axes = plt.subplots(1, len(columns), figsize=(2.2 * len(columns), 2.4), squeeze=False)
    for ax, (title, image) in zip(axes[0], columns, strict=True):
        ax.imshow(image, cmap="gray", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def before_after(path: Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray]], reference: np.ndarray, labels: tuple[str, str] = ("received", "mitigated"), error_gain: float = 5.0) -> Path:
    """A before/after grid: one row per case ``(name, before, after)`` with both magnitudes
    and their ``|error| x gain`` against ``reference``, PSNR in the titles; the reference
    heads the grid."""
    from recon.metrics import quality

    vmax = float(np.percentile(np.abs(reference), 99.5)) or 1.0
    fig, axes = plt.subplots(len(rows) + 1, 4, figsize=(8.8, 2.3 * (len(rows) + 1)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0][0].imshow(np.abs(reference), cmap="gray", vmin=0, vmax=vmax)
    axes[0][0].set_title("reference (fully sampled)", fontsize=8)
    for r, (name, before, after) in enumerate(rows, start=1):
        for c, (label, image) in enumerate(((labels[0], before), (labels[1], after))):
            psnr = quality(image, reference).psnr
            axes[r][c].imshow(np.abs(image), cmap="gray", vmin=0, vmax=vmax)
            axes[r][c].set_title(f"{name}: {label}\n{psnr:.1f} dB", fontsize=7)
            axes[r][c + 2].imshow(np.abs(image - reference) * error_gain, cmap="gray", vmin=0, vmax=vmax)
            axes[r][c + 2].set_title(f"|{label} - ref| x{error_gain:g}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def verdict_counts(rows: Sequence[SliceReport]) -> dict[str, int]:
    """How many slices got each verdict, in the contract's order (absent verdicts count 0)."""
    counts = Counter(r.verdict for r in rows)
    return {**{v: counts.get(v, 0) for v in VERDICTS}, **{v: n for v, n in counts.items() if v not in VERDICTS}}


def _distinct(values: Sequence[str]) -> list[str]:
    return sorted({v for v in values if v})


def write_report(folder: Path, title: str, source: str, rows: Sequence[SliceReport], context: RunContext) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``folder``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = verdict_counts(rows)
    protocols = _distinct([r.protocol for r in rows])
    calibrations = _distinct([r.calibration for r in rows])
    summary = {
        "title": title,
        "source": source,
        **asdict(context),
        "protocols": protocols,
        "calibrations": calibrations,
        "verdicts": counts,
        "slices": [asdict(r) for r in rows],
    }
    json_path = folder / "report.json"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")

    def fmt(q: Quality | None) -> str:
        return "&ndash;" if q is None else f"{q.psnr:.2f} dB / {q.ssim:.3f}"

    def quality_cell(r: SliceReport) -> str:
        if r.received_quality is None:
            return fmt(r.quality)
        return f"{fmt(r.received_quality)} received<br>&rarr; {fmt(r.quality)} rewritten"

    zero_filled = any(r.quality_zero_filled is not None for r in rows)
    body = "\n".join(
        f"<tr><td>{html.escape(r.name)}{'<br><b>attacked</b>' if r.attacked else ''}</td><td class='{html.escape(r.verdict)}'>{html.escape(r.verdict)}<br><small>{html.escape(r.reason)}</small></td>"
        f"<td>{quality_cell(r)}</td>" + (f"<td>{fmt(r.quality_zero_filled)}</td>" if zero_filled else "")
        + f"<td>{'&ndash;' if r.signal_level is None else f'{r.signal_level:.3g}'}</td>"
        f"<td>{sum(r.timings.values()):.2f}</td><td><img src='{html.escape(r.picture)}'></td></tr>"
        for r in rows
    )
    facts = [
        ("verdicts", ", ".join(f"<span class='{html.escape(v)}'>{html.escape(v)}</span> {n}" for v, n in counts.items()) + f" (of {len(rows)} slices)"),
        ("made", html.escape(context.created)),
        ("software", html.escape(", ".join(f"{k} {v}" for k, v in context.software.items()))),
        ("model", f"<code>{html.escape(context.model)}</code>"),
        ("calibration", ", ".join(f"<code>{html.escape(c)}</code>" for c in calibrations) or "none fitted (no check ran)"),
        ("protocol", html.escape("; ".join(protocols)) or "&ndash;"),
        ("pipeline", f"<code>{html.escape(context.pipeline)}</code>"),
        ("properties", html.escape(", ".join(f"{k}={v}" for k, v in context.properties.items())) or "defaults"),
    ]
    head = "\n".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} td,th{{padding:4px 8px;vertical-align:middle;text-align:left}}
.unverified{{color:#a60}} .clean{{color:#070}} .flagged{{color:#c00}} .mitigated{{color:#06c}}</style></head>
<body><h1>{html.escape(title)}</h1><p>Source: <code>{html.escape(source)}</code></p>
<table>{head}</table>
<table><tr><th>slice</th><th>verdict</th><th>PSNR / SSIM vs reference</th>{'<th>zero-filled</th>' if zero_filled else ''}<th>signal level (noise sigmas)</th><th>seconds</th><th>images</th></tr>
{body}</table></body></html>
"""
    html_path = folder / "report.html"
    html_path.write_text(page)
    return json_path, html_path
