"""Seconds and network evaluations per slice for each stage of the defended pipeline, per device.

    python -m benchmarks.stage_cost [--devices cpu cuda] [--slices 20] [--attacked 4] [--tag NAME]

The product's own path, as ``cycguard recon`` runs it: a raw file of held-out axial slices in
the demo protocol (8 coils, R = 4 + 16 ACS, 2x readout oversampling, noise scans) is read by
``read_raw``; the shipped weights and calibration give the :class:`recon.pipeline.Defense`;
``recon.pipeline.defend`` runs every slice and reports its stages' seconds and network passes.
The first ``--attacked`` slices are also sent attacked (l2 PGD on the measured lines, 1
acquisition-noise norm: flagged above the clean range, so the mitigation runs), and those
give the mitigation's cost. Each device gets one untimed warm-up of a clean and an attacked
slice (CUDA start-up, kernel selection), then every slice once. With ``--variants N`` the
first N attacked slices also go through the other mitigations, timed alike: the product's
``cyclic`` method (the k-space cyclic mitigation behind its safeguard, through ``defend``) and
the paper-faithful image-domain one (``recon.mitigate.mitigate_faithful``, 100 iterations,
as ``benchmarks.defense`` runs it).

With several devices, the same raw data go through each and the verdicts, scores and
images are compared (the GPU check: a device may change the arithmetic's rounding, not the
result). Results go to ``OUT/stage_cost_TAG.{json,md}``; RESULTS.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from recon.attacks.kspace import pgd_kspace_l2
from recon.data import mni
from recon.data.demo import make_demo
from recon.detect.cyclic import noise_norm
from recon.detect.defense import Defense, load_defense, protocol_of, slice_noise_sigma
from recon.io.mrd import read_raw
from recon.mitigate import mitigate_faithful
from recon.models.weights import load_model, resolve_device
from recon.pipeline import DefendedResult, clock, defend, prepare, reconstruct
from recon.types import SliceKSpace

RESULTS = Path(__file__).resolve().parent / "results"
ATTACK_NOISE_NORMS = 1.0


def attacked_copy(data: SliceKSpace, model: Any, sigma: float, seed: int) -> SliceKSpace:
    """``data`` with its measured lines moved by l2 PGD of ``ATTACK_NOISE_NORMS`` noise norms
    against the network (on the CPU, so that every device receives the same bytes)."""
    prepared = prepare(data, "cpu")
    eps = ATTACK_NOISE_NORMS * noise_norm(prepared.op, prepared.y, sigma)
    attacked = pgd_kspace_l2(model, prepared.op, prepared.y, eps, torch.Generator().manual_seed(seed))
    return data.with_measured(attacked[0].numpy())


def inputs(slices: int, attacked: int, folder: Path) -> tuple[list[tuple[str, SliceKSpace, float]], int]:
    """The raw file's slices (``clean``) and the attacked copies of the first ``attacked``
    (``attacked``), each with its noise sigma; and the protocol's acceleration."""
    z = mni.heldout_axial(slices)
    raw, _ = make_demo(folder, seed=11, slices=z)
    scan = read_raw(raw)
    whitened = scan.whitened
    model, _ = load_model()
    out = [("clean", data, slice_noise_sigma(data, whitened)) for data in scan.slices]
    for n, (_, data, sigma) in enumerate(tqdm(out[:attacked], desc="attack (cpu)", unit="slice")):
        out.append(("attacked", attacked_copy(data, model, sigma, seed=n), sigma))
    return out, scan.protocol.acceleration


def variant_costs(defense: Defense, data: SliceKSpace, sigma: float, device: torch.device) -> dict[str, dict[str, Any]]:
    """Seconds and network passes of the other mitigations on one attacked slice."""
    cyclic = replace(defense, noise_sigma=sigma, mitigation=replace(defense.mitigation, method="cyclic"))
    result = defend(data, cyclic, device)
    timings, passes = dict(result.timings), dict(result.network_passes)
    out = {"cyclic": {"seconds": timings.get("mitigate", 0.0), "passes": passes.get("mitigate", 0), "verdict": result.verdict}}
    received = reconstruct(data, defense.model, device)  # the flagged image the mitigations start from
    prepared = received.prepared
    x1 = prepared.image_tensor(received.image)
    scale = float(prepared.x_zf.abs().max())
    t0 = clock(x1)
    with torch.no_grad():
        cycle = defense.detector.cycle(prepared.op, prepared.y, x1)
    faithful = mitigate_faithful(defense.model, prepared.op, prepared.x_zf, cycle, 0.01 * scale, 0.005 * scale)
    out["faithful"] = {"seconds": clock(faithful.image) - t0, "passes": faithful.network_passes}
    return out


def run_device(
    name: str, slices: list[tuple[str, SliceKSpace, float]], acceleration: int, variants: int = 0
) -> tuple[dict[str, Any], list[DefendedResult]]:
    """Every slice through ``defend`` on one device: per-slice stage seconds, passes, verdicts."""
    device = resolve_device(name)
    model, manifest = load_model(None, device)
    defense = load_defense(model, manifest, protocol_of(slices[0][1], manifest, acceleration), None)
    if defense is None:
        raise RuntimeError("the shipped calibration does not fit the benchmark's protocol")

    def one(data: SliceKSpace, sigma: float, d: Defense = defense) -> tuple[DefendedResult, float]:
        t0 = time.perf_counter()
        result = defend(data, replace(d, noise_sigma=sigma), device)
        return result, time.perf_counter() - t0

    for kind in ("clean", "attacked"):  # warm-up, not recorded
        first = next(((data, sigma) for k, data, sigma in slices if k == kind), None)
        if first is not None:
            one(*first)
    rows, results = [], []
    for kind, data, sigma in tqdm(slices, desc=f"defend ({device})", unit="slice"):
        result, wall = one(data, sigma)
        results.append(result)
        rows.append(
            {
                "kind": kind,
                "slice": data.key.slice,
                "verdict": result.verdict,
                "score": result.score,
                "seconds": dict(result.timings),
                "passes": dict(result.network_passes),
                "wall": wall,
            }
        )
    attacked = [(data, sigma) for kind, data, sigma in slices if kind == "attacked"][:variants]
    costs = [variant_costs(defense, data, sigma, device) for data, sigma in tqdm(attacked, desc=f"other mitigations ({device})", unit="slice")]
    meta: dict[str, Any] = {"device": str(device), "statistic": defense.statistic, "mitigation": defense.mitigation.method}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    else:
        meta["threads"] = torch.get_num_threads()
    summary = summarise(rows)
    for method in ("cyclic", "faithful"):
        if costs:
            seconds = statistics.median(c[method]["seconds"] for c in costs)
            summary[f"{method}_s"] = seconds
            summary[f"{method}_passes"] = statistics.median(c[method]["passes"] for c in costs)
            summary[f"{method}_over_recon"] = seconds / summary["recon_s"] if summary.get("recon_s") else None
    return {"meta": meta, "rows": rows, "variants": costs, "summary": summary}, results


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per stage: recon (prepare + network) and detect on the clean slices, mitigate on
    the attacked slices the mitigation ran on; network passes alike; ratios to recon."""
    clean = [r for r in rows if r["kind"] == "clean"]
    mitigated = [r for r in rows if "mitigate" in r["seconds"]]

    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    recon = med([r["seconds"]["prepare"] + r["seconds"]["network"] for r in clean])
    out: dict[str, Any] = {
        "clean_slices": len(clean),
        "mitigated_slices": len(mitigated),
        "verdicts": {v: sum(r["verdict"] == v for r in rows) for v in sorted({r["verdict"] for r in rows})},
        "prepare_s": med([r["seconds"]["prepare"] for r in clean]),
        "network_s": med([r["seconds"]["network"] for r in clean]),
        "recon_s": recon,
        "detect_s": med([r["seconds"]["detect"] for r in clean]),
        "mitigate_s": med([r["seconds"]["mitigate"] for r in mitigated]),
        "clean_wall_s": med([r["wall"] for r in clean]),
        "recon_passes": med([r["passes"]["recon"] for r in clean]),
        "detect_passes": med([r["passes"]["detect"] for r in clean]),
        "mitigate_passes": med([r["passes"]["mitigate"] for r in mitigated]),
    }
    if recon:
        out["detect_over_recon"] = out["detect_s"] / recon
        out["mitigate_over_recon"] = out["mitigate_s"] / recon if out["mitigate_s"] is not None else None
    return out


def agreement(reference: list[DefendedResult], other: list[DefendedResult]) -> dict[str, Any]:
    """How another device's results differ from the first device's, slice by slice."""
    image_error = [
        float(np.abs(a.image - b.image).max() / np.abs(a.image).max()) for a, b in zip(reference, other, strict=True)
    ]
    score_error = [abs(a.score - b.score) / abs(a.score) for a, b in zip(reference, other, strict=True)]
    return {
        "verdicts_equal": sum(a.verdict == b.verdict for a, b in zip(reference, other, strict=True)),
        "slices": len(reference),
        "max_image_error": max(image_error),
        "max_score_error": max(score_error),
    }


def device_label(meta: dict[str, Any]) -> str:
    """A run's device as the tables name it: the GPU's name, or the CPU with its threads."""
    return str(meta.get("gpu", f"{meta['device']} ({meta.get('threads')} threads)"))


def markdown(report: dict[str, Any]) -> list[str]:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"Host: {report['host']}; torch {report['torch']}; statistic `{report['runs'][0]['meta']['statistic']}`, "
        f"mitigation `{report['runs'][0]['meta']['mitigation']}`; medians over {report['runs'][0]['summary']['clean_slices']} "
        f"clean slices (recon, detect) and the attacked slices the mitigation ran on.",
        "",
        "| device | recon s (prepare + network) | detect s | mitigate s | passes recon / detect / mitigate | detect / recon | mitigate / recon | clean slice end to end s | verdicts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        s, device = run["summary"], device_label(run["meta"])
        passes = " / ".join(cell(s[k], "g") for k in ("recon_passes", "detect_passes", "mitigate_passes"))
        verdicts = ", ".join(f"{k} {v}" for k, v in s["verdicts"].items())
        lines.append(
            f"| {device} | {cell(s['recon_s'], '.4f')} ({cell(s['prepare_s'], '.4f')} + {cell(s['network_s'], '.4f')}) | "
            f"{cell(s['detect_s'], '.4f')} | {cell(s['mitigate_s'], '.3f')} | {passes} | {cell(s.get('detect_over_recon'), '.1f')} | "
            f"{cell(s.get('mitigate_over_recon'), '.0f')} | {cell(s['clean_wall_s'], '.4f')} | {verdicts} |"
        )
    if any("faithful_s" in run["summary"] for run in report["runs"]):
        lines += [
            "",
            "Other mitigations on the first attacked slices (medians):",
            "",
            "| device | ours, k-space cyclic (`cyclic`): s / passes / over recon | paper-faithful: s / passes / over recon |",
            "|---|---|---|",
        ]
        for run in report["runs"]:
            s, device = run["summary"], device_label(run["meta"])
            cells = [f"{cell(s.get(m + '_s'), '.2f')} / {cell(s.get(m + '_passes'), 'g')} / {cell(s.get(m + '_over_recon'), '.0f')}" for m in ("cyclic", "faithful")]
            lines.append(f"| {device} | {cells[0]} | {cells[1]} |")
    for name, agree in report.get("agreement", {}).items():
        lines += [
            "",
            f"{name} against {report['runs'][0]['meta']['device']}: verdicts equal on {agree['verdicts_equal']} of {agree['slices']} slices; "
            f"largest image difference {agree['max_image_error']:.2e} of the image's maximum; largest score difference "
            f"{agree['max_score_error']:.2e} (relative).",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"], help="torch devices in turn (cpu, cuda, cuda:N)")
    parser.add_argument("--slices", type=int, default=20, help="clean held-out slices (at most 20: the held-out slab)")
    parser.add_argument("--attacked", type=int, default=4, help="of those, sent attacked too (the mitigation's cost)")
    parser.add_argument("--variants", type=int, default=0, help="of the attacked slices, time the other mitigations on this many")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--tag", default="build", help="names the output files (the machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    span = mni.HELDOUT_AXIAL[1] - mni.HELDOUT_AXIAL[0]
    if not 1 <= args.slices <= span or not 0 <= args.attacked <= args.slices or not 0 <= args.variants <= args.attacked:
        parser.error(f"--slices must be 1-{span}, --attacked 0-{args.slices} and --variants 0-{args.attacked}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        slices, acceleration = inputs(args.slices, args.attacked, Path(tmp))
    runs, results = [], []
    for name in args.devices:
        run, result = run_device(name, slices, acceleration, args.variants)
        runs.append(run)
        results.append(result)
    report: dict[str, Any] = {
        "host": f"{platform.machine()}, {torch.get_num_threads()} torch threads of {len(os.sched_getaffinity(0))} cores",
        "torch": torch.__version__,
        "command": "python -m benchmarks.stage_cost " + " ".join(f"--{k} {v}" if not isinstance(v, list) else f"--{k} {' '.join(v)}" for k, v in (("devices", args.devices), ("slices", args.slices), ("attacked", args.attacked), ("variants", args.variants), ("tag", args.tag))),
        "runs": runs,
        "agreement": {run["meta"]["device"]: agreement(results[0], other) for run, other in zip(runs[1:], results[1:], strict=True)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"stage_cost_{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = "\n".join([f"Command: `{report['command']}`", "", *markdown(report)]) + "\n"
    (args.out / f"stage_cost_{args.tag}.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
