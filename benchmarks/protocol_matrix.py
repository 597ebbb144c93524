"""The defense on the protocols a site runs: reconstruction, calibration by simulation, false
positives, every attack family and cost, per protocol.

    python -m benchmarks.protocol_matrix [--calibration-slices 100] [--clean-files 4] [--clean-slices 10] [--victims 3]

For each protocol of ``PROTOCOLS`` (the shipped one and five the network never saw: other
matrices, a rectangular one, 4-12 coils, R = 2-4, 12-24 ACS lines; all equispaced), raw files
of the ``training-like`` set (``benchmarks.sets``: the MNI152 held-out slab, the head-array
coil model) are written in that protocol, each with its own coil maps, phase and noise, and go
the product's way (``read_raw``: prewhitening, oversampling removed; ``ScanDefenses``;
``recon.pipeline.defend``):

1. The first file plays the site's first scan of the protocol: its calibration is made by
   simulation from it as ``cycguard calibrate --like`` makes it (``--calibration-slices``
   simulated clean slices, into a temporary calibration cache); the shipped protocol keeps the
   shipped calibration. Seconds a simulated slice, and the wait for the default 300.
2. The other files' slices are the clean test: false positives among the checked slices,
   ``unverified`` and rewritten shares, seconds a slice through ``defend``.
3. Their first ``--victims`` slices: the network, CG-SENSE and BART (``pics`` l1-wavelet,
   lambda 0.003 as tuned in ``benchmarks.recon_table``) against the fully sampled reference,
   and every attack family of ``ATTACKS`` (as ``benchmarks.product_attacks`` draws them): the
   flagged share of the slices an attack costs >= 3 dB and the share of the loss recovered.

Results: ``benchmarks/results/protocol_matrix.{json,md,png}``, the JSON after every protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.bart import pics_l1_wavelet  # noqa: E402
from benchmarks.product_attacks import DAMAGING_DB, attack_cases, label, loss_share, outcome  # noqa: E402
from benchmarks.sets import raw_file  # noqa: E402
from recon.calibrate import build_calibration, scores_like  # noqa: E402
from recon.detect.calibration import ProtocolKey  # noqa: E402
from recon.detect.defense import ScanDefenses, cached_calibration_path, detector_for, model_protocol  # noqa: E402
from recon.detect.statistics import DEFAULT_STATISTIC  # noqa: E402
from recon.io.mrd import read_raw  # noqa: E402
from recon.io.mrd_write import ScanDescription, read_images  # noqa: E402
from recon.metrics import quality  # noqa: E402
from recon.models.weights import load_model  # noqa: E402
from recon.pipeline import defend, prepare  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (matrix (ny, nx), coils, acceleration, ACS lines); the first is the shipped protocol
PROTOCOLS: tuple[tuple[tuple[int, int], int, int, int], ...] = (
    ((128, 128), 8, 4, 16),
    ((128, 128), 8, 4, 12),
    ((128, 128), 12, 3, 20),
    ((160, 128), 4, 2, 24),
    ((192, 192), 12, 2, 24),
    ((256, 256), 12, 3, 20),
)
ATTACKS: tuple[tuple[str, float, str], ...] = (
    ("kspace-l2", 0.3, "noise norms"),
    ("kspace-l2", 1.0, "noise norms"),
    ("kspace-l2", 3.0, "noise norms"),
    ("kspace-linf", 1.0, "component noise sds (l2 <= 1 noise norm)"),
    ("kspace-linf", 3.0, "component noise sds (l2 <= 3 noise norms)"),
    ("kspace-fgsm", 1.0, "noise norms"),
    ("impulse", 0.2, "x max|y| per spike, 10 spikes"),
)
BART_LAMBDA = 0.003


def short(name: str, budget: float) -> str:
    return {"kspace-l2": "l2", "kspace-linf": "linf", "kspace-fgsm": "fgsm", "impulse": "spikes"}[name] + f" {budget:g}"


def calibrate_like(raw: Path, count: int, model: Any, manifest: Any) -> dict[str, Any]:
    """The protocol's calibration by simulation from ``raw`` into the calibration cache."""
    started = time.monotonic()
    scores, protocol, levels = scores_like(raw, count, model, manifest, progress=False, statistic=DEFAULT_STATISTIC)
    seconds = (time.monotonic() - started) / count
    calibration = build_calibration(scores, protocol, manifest, detector_for(model, manifest, protocol))
    path = cached_calibration_path(manifest, protocol)
    path.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(path)
    return {"source": "simulated", "slices": count, "seconds_per_slice": seconds, "wait_minutes_for_300": seconds * 300 / 60,
            "threshold": calibration.threshold, "signal_levels": list(levels)}


def run_protocol(spec: tuple[tuple[int, int], int, int, int], args: argparse.Namespace, model: Any, manifest: Any, folder: Path) -> dict[str, Any]:
    matrix, coils, acceleration, acs = spec
    desc = ScanDescription(matrix=matrix, coils=coils, acceleration=acceleration)
    files = [raw_file("training-like", folder / f"f{n}", 4000 + n, args.clean_slices, desc, acs) for n in range(args.clean_files + 1)]
    shipped = ProtocolKey(matrix, coils, "equispaced", acceleration, acs) == model_protocol(manifest)
    row: dict[str, Any] = {"protocol": f"{matrix[0]}x{matrix[1]}, {coils} coils, R = {acceleration}, {acs} ACS", "shipped": shipped}
    row["calibration"] = {"source": "shipped (1000 simulated slices)"} if shipped else calibrate_like(files[0][0], args.calibration_slices, model, manifest)
    clean: list[dict[str, Any]] = []
    victims: list[dict[str, Any]] = []
    bar = tqdm(total=args.clean_files * args.clean_slices + args.victims * (len(ATTACKS) + 1), desc=row["protocol"], unit="case")
    for raw, reference in files[1:]:
        defenses = ScanDefenses(model, manifest, read_raw(raw), None)
        refs = [image for image, _ in read_images(reference)]
        for data, ref in zip(defenses.scan.slices, refs, strict=True):
            defense = defenses.fit(data)
            if isinstance(defense, str):
                clean.append({"verdict": "unverified", "reason": defense[:300]})
                bar.update()
                continue
            started = time.monotonic()
            result = defend(data, defense)
            clean.append({"verdict": result.verdict, "score": result.score, "seconds": time.monotonic() - started})
            bar.update()
            if len(victims) < args.victims:
                victims.append(attack_victim(data, ref, defense, model, len(victims)))
                bar.update(len(ATTACKS) + 1)
    bar.close()
    row["clean"] = clean
    row["victims"] = victims
    return row


def attack_victim(data: Any, reference: np.ndarray, defense: Any, model: Any, n: int) -> dict[str, Any]:
    """One clean slice: the three reconstructions and every attack through the product."""
    prepared = prepare(data)
    started = time.monotonic()
    bart = pics_l1_wavelet(prepared.y[0].numpy(), prepared.op.maps[0].numpy(), BART_LAMBDA)
    bart_seconds = time.monotonic() - started
    q_bart = quality(bart, reference)
    return {"clean": outcome(data, defense, reference), "bart_psnr": q_bart.psnr, "bart_ssim": q_bart.ssim, "bart_seconds": bart_seconds,
            "attacks": attack_cases(data, defense, reference, model, ATTACKS, 9000 + 100 * n)}


def summarise(row: dict[str, Any]) -> dict[str, Any]:
    clean, victims = row["clean"], row["victims"]
    checked = [c for c in clean if c["verdict"] != "unverified"]
    out: dict[str, Any] = {
        "clean slices": len(clean),
        "fpr": sum(c["verdict"] in ("flagged", "mitigated") for c in checked) / max(len(checked), 1),
        "unverified": sum(c["verdict"] == "unverified" for c in clean) / max(len(clean), 1),
        "rewritten": sum(c["verdict"] == "mitigated" for c in clean) / max(len(clean), 1),
        "seconds_per_slice": float(np.mean([c["seconds"] for c in checked])) if checked else None,
    }
    if victims:
        out.update({
            "psnr": float(np.mean([v["clean"]["psnr"] for v in victims])), "ssim": float(np.mean([v["clean"]["ssim"] for v in victims])),
            "psnr_cg": float(np.mean([v["clean"]["psnr_cg"] for v in victims])), "ssim_cg": float(np.mean([v["clean"]["ssim_cg"] for v in victims])),
            "psnr_bart": float(np.mean([v["bart_psnr"] for v in victims])), "ssim_bart": float(np.mean([v["bart_ssim"] for v in victims])),
            "bart_seconds": float(np.mean([v["bart_seconds"] for v in victims])),
        })
    per_attack: dict[str, Any] = {}
    for name, budget, unit in ATTACKS:
        pairs = [(v["clean"], v["attacks"][label(name, budget, unit)]) for v in victims]
        damaging = [(c, a) for c, a in pairs if c["psnr"] - a["psnr"] >= DAMAGING_DB]
        per_attack[short(name, budget)] = {
            "damage_db": float(np.mean([c["psnr"] - a["psnr"] for c, a in pairs])) if pairs else None,
            "damaging": len(damaging),
            "tpr": float(np.mean([a["verdict"] != "clean" for _, a in damaging])) if damaging else None,
            "recovered": float(np.mean([loss_share(c["psnr"], a["psnr"], a["psnr_shipped"]) for c, a in damaging])) if damaging else None,
        }
    out["attacks"] = per_attack
    return out


def _f(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [f"Command: `{command}` (2 CPU cores, torch {torch.__version__}).", "",
             "| protocol | calibration | s / simulated slice (wait for 300) | network dB / SSIM | CG-SENSE dB / SSIM | BART dB / SSIM | "
             "clean FPR (checked) | unverified | clean rewritten | s / slice (defend) | BART s / slice |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s, cal = row["summary"], row["calibration"]
        wait = f"{cal['seconds_per_slice']:.2f} ({cal['wait_minutes_for_300']:.1f} min)" if "seconds_per_slice" in cal else "n/a"
        source = "shipped" if row["shipped"] else f"simulated, {cal['slices']} slices"
        lines.append(
            f"| {row['protocol']} | {source} | {wait} | "
            f"{_f(s.get('psnr'))} / {_f(s.get('ssim'), '.3f')} | {_f(s.get('psnr_cg'))} / {_f(s.get('ssim_cg'), '.3f')} | "
            f"{_f(s.get('psnr_bart'))} / {_f(s.get('ssim_bart'), '.3f')} | {s['fpr']:.3f} ({s['clean slices']}) | {s['unverified']:.2f} | "
            f"{s['rewritten']:.2f} | {_f(s['seconds_per_slice'])} | {_f(s.get('bart_seconds'))} |"
        )
    names = [short(n, b) for n, b, _ in ATTACKS]
    lines += ["", "Attacks: flagged share of the slices an attack costs >= 3 dB / share of the loss recovered (n: such slices)", "",
              "| protocol | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{_f(a['tpr'])} / {_f(a['recovered'])} (n {a['damaging']})" for a in (row["summary"]["attacks"][k] for k in names)]
        lines.append(f"| {row['protocol']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    names = [short(n, b) for n, b, _ in ATTACKS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2))
    for ax, key, title in zip(axes, ("tpr", "recovered"), ("flagged (attacks costing >= 3 dB)", "share of the loss recovered"), strict=True):
        grid = np.array([[np.nan if row["summary"]["attacks"][k][key] is None else row["summary"]["attacks"][k][key] for k in names] for row in rows])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", color="w" if np.isnan(value) or value < 0.6 else "k", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), [row["protocol"] for row in rows], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration-slices", type=int, default=100, help="simulated clean slices per new protocol's calibration")
    parser.add_argument("--clean-files", type=int, default=4, help="raw files per protocol for the clean test (after the calibration's scan)")
    parser.add_argument("--clean-slices", type=int, default=10, help="slices per raw file")
    parser.add_argument("--victims", type=int, default=3, help="clean slices per protocol that are reconstructed by every method and attacked")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="indices into PROTOCOLS")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="only the tables and the plot again from OUT/protocol_matrix.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    command = (f"python -m benchmarks.protocol_matrix --calibration-slices {args.calibration_slices} --clean-files {args.clean_files} "
               f"--clean-slices {args.clean_slices} --victims {args.victims}")
    path = args.out / "protocol_matrix.json"
    if args.replot:
        rows = json.loads(path.read_text())["rows"]
    else:
        model, manifest = load_model()
        rows = []
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["CYCGUARD_CALIBRATIONS"] = str(Path(tmp) / "calibrations")
            for n, spec in enumerate(PROTOCOLS):
                if args.only is not None and n not in args.only:
                    continue
                row = run_protocol(spec, args, model, manifest, Path(tmp) / f"p{n}")
                row["summary"] = summarise(row)
                rows.append(row)
                path.write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    text = markdown(rows, command)
    (args.out / "protocol_matrix.md").write_text(text)
    plot(rows, args.out / "protocol_matrix.png")
    print(text, flush=True)


if __name__ == "__main__":
    main()
