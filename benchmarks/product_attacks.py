"""Every k-space attack family through the product: damage, verdict and what ships, in PSNR and SSIM.

    python -m benchmarks.product_attacks [--seeds 2] [--slices 8] [--set training-like|held-out] [--out DIR]

The product's own path, as ``cycguard recon`` runs a raw file: slices of one of the two sets
of ``benchmarks.sets`` (``training-like``, the default: the MNI152 held-out axial slab and the
training coil model; ``held-out``: an anatomy source and a coil model nothing was made from)
in the demo protocol (8 coils, R = 4 + 16 ACS, 2x readout oversampling, noise scans;
``recon.data.demo.make_demo``, one raw file per seed, each with its own coil maps, phase and
noise) read by ``read_raw`` (prewhitening, oversampling removed), the shipped weights and
calibration (``ScanDefenses``), ``recon.pipeline.defend`` per slice. Each slice is sent
clean and then attacked by every family and budget below: the attacker perturbs the lines of
the sampling mask (the ACS block is part of it) with white-box gradients through the network
at the operator of the clean slice, and the perturbed lines go back into the raw slice
(``SliceKSpace.with_measured``), so the product estimates its coil maps from the attacked
ACS lines as it would in the field.

Budgets are in acquisition-noise units of the whitened data (noise sigma 1 per complex
sample): the l2 attacks and FGSM in noise norms (``sigma sqrt(n)`` over the n measured
entries); the l-inf PGD as a box on Re and Im of half-width ``b sigma / sqrt(2)`` (``b``
standard deviations of one component's noise), so that a perturbation at the box's corners
has the l2 norm of ``b`` noise norms, the l2 attack's budget: the two attacks of one budget
spend the same energy, distributed differently. The l2 norm each attack spent is reported.
Impulse spikes: 10 samples of modulus ``b max|y|``; benign: extra noise of ``b`` sigma.
Image-domain attacks are not on this path (the product receives k-space); they are in
``benchmarks.defense --image-domain`` and ``benchmarks.detect_union --image-domain``.

Per case: the network's PSNR/SSIM on the received data against the fully sampled reference
(the damage is its loss against the network on the clean data), CG-SENSE's on the same data,
the verdict, and the PSNR/SSIM of the image the product ships; the share of the loss
recovered, per slice, on the slices that lose >= 3 dB (an image shipped unrewritten
recovers 0). Results: ``OUT/product_attacks.{json,md,png}``, the JSON written after every
slice.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.defense import Item, attack  # noqa: E402
from benchmarks.sets import SETS, raw_file  # noqa: E402
from recon.baselines import cg_sense  # noqa: E402
from recon.detect.cyclic import noise_norm  # noqa: E402
from recon.detect.defense import (
    Defense,  # noqa: E402
    ScanDefenses,  # noqa: E402
)
from recon.io.mrd import read_raw  # noqa: E402
from recon.io.mrd_write import read_images  # noqa: E402
from recon.metrics import quality  # noqa: E402
from recon.models.modl import MoDL  # noqa: E402
from recon.models.weights import load_model  # noqa: E402
from recon.pipeline import PreparedSlice, defend, prepare  # noqa: E402
from recon.types import SliceKSpace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ATTACKS: list[tuple[str, float, str]] = [
    ("kspace-l2", 0.3, "noise norms"),
    ("kspace-l2", 1.0, "noise norms"),
    ("kspace-l2", 3.0, "noise norms"),
    ("kspace-linf", 0.3, "component noise sds (l2 <= 0.3 noise norms)"),
    ("kspace-linf", 1.0, "component noise sds (l2 <= 1 noise norm)"),
    ("kspace-linf", 3.0, "component noise sds (l2 <= 3 noise norms)"),
    ("kspace-fgsm", 1.0, "noise norms"),
    ("kspace-fgsm", 3.0, "noise norms"),
    ("impulse", 0.05, "x max|y| per spike, 10 spikes"),
    ("impulse", 0.2, "x max|y| per spike, 10 spikes"),
    ("benign", 1.0, "x noise sigma"),
]
DAMAGING_DB = 3.0


def label(name: str, budget: float, unit: str) -> str:
    return f"{name} {budget:g} {unit}"


def attacked_lines(name: str, budget: float, model: MoDL, prepared: PreparedSlice, reference: np.ndarray, sigma: float, seed: int) -> torch.Tensor:
    """The measured lines ``(1, C, ky, kx)`` after one attack of ``budget`` (units: module
    docstring), drawn as ``benchmarks.defense`` draws it."""
    item = Item(prepared.op, prepared.y, prepared.x_zf, reference, sigma)
    return attack(name, budget, model, item, None, 0.0, "", seed)["y"]  # type: ignore[arg-type]


def attack_cases(
    data: SliceKSpace, defense: Defense, reference: np.ndarray, model: MoDL, attacks: Sequence[tuple[str, float, str]], seed: int,
    on_case: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """What the product does with ``data`` under each attack (seeds ``seed``, ``seed + 1``, ...),
    by label, each with the l2 norm it spent in noise norms."""
    prepared = prepare(data)
    norm = noise_norm(prepared.op, prepared.y, defense.noise_sigma)
    cases = {}
    for a, (name, budget, unit) in enumerate(attacks):
        lines = attacked_lines(name, budget, model, prepared, reference, defense.noise_sigma, seed=seed + a)
        case = outcome(data.with_measured(lines[0].numpy()), defense, reference)
        case["spent_noise_norms"] = float(torch.linalg.vector_norm(lines - prepared.y)) / norm
        cases[label(name, budget, unit)] = case
        if on_case is not None:
            on_case()
    return cases


def outcome(data: SliceKSpace, defense: Defense, reference: np.ndarray) -> dict[str, Any]:
    """What the product does with one received slice, and what the network and CG-SENSE
    alone make of the same data (qualities against ``reference``)."""
    result = defend(data, defense)
    op, y = result.prepared.op, result.prepared.y
    with torch.no_grad():
        # an image that was not rewritten is the network's, bit for bit: no second pass for it
        network = result.image if result.verdict != "mitigated" else defense.model(result.prepared.x_zf, op)[0].numpy()
        classical = cg_sense(op, y)[0].numpy()
    q_net, q_cg, q_ship = (quality(image, reference) for image in (network, classical, result.image))
    return {
        "verdict": result.verdict, "score": result.score,
        "psnr": q_net.psnr, "ssim": q_net.ssim, "psnr_cg": q_cg.psnr, "ssim_cg": q_cg.ssim,
        "psnr_shipped": q_ship.psnr, "ssim_shipped": q_ship.ssim,
        "passes": dict(result.network_passes), "seconds": dict(result.timings),
    }


def victims(
    model: MoDL, manifest: Any, seeds: int, slices: int, folder: Path, calibration: Path | None = None, data_set: str = "training-like"
) -> list[tuple[SliceKSpace, np.ndarray, Defense]]:
    """Every slice of ``seeds`` raw files of ``slices`` slices of ``data_set``, with its
    reference and the defense the product gives it."""
    out = []
    for seed in range(3000, 3000 + seeds):
        raw, reference = raw_file(data_set, folder / str(seed), seed, slices)
        defenses = ScanDefenses(model, manifest, read_raw(raw), calibration)
        refs = [image for image, _ in read_images(reference)]
        for data, ref in zip(defenses.scan.slices, refs, strict=True):
            defense = defenses.for_slice(data)
            if defense is None:
                raise RuntimeError("the shipped calibration does not fit the demo protocol")
            out.append((data, ref, defense))
    return out


def run(seeds: int, slices: int, out: Path, calibration: Path | None = None, data_set: str = "training-like") -> dict[str, Any]:
    """Every victim clean and under every attack; the JSON after every slice."""
    model, manifest = load_model()
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {"hardware": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}", "set": data_set, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        items = victims(model, manifest, seeds, slices, Path(tmp), calibration, data_set)
    with tqdm(total=len(items) * (len(ATTACKS) + 1), desc="slices x cases", unit="case") as bar:
        for n, (data, reference, defense) in enumerate(items):
            results["statistic"], results["threshold"] = defense.statistic, defense.calibration.threshold
            row: dict[str, Any] = {"file": n // slices, "slice": data.key.slice, "clean": outcome(data, defense, reference), "attacks": {}}
            bar.update()
            row["attacks"] = attack_cases(data, defense, reference, model, ATTACKS, 7000 + 100 * n, lambda: bar.update())
            rows.append(row)
            (out / "product_attacks.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def loss_share(clean: float, attacked: float, shipped: float) -> float:
    return (shipped - attacked) / (clean - attacked)


def summarise(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per attack: means of damage, flagged and rewritten shares, shipped quality, and the
    share of the loss recovered on the slices losing >= 3 dB."""
    rows = results["rows"]
    summary: dict[str, dict[str, Any]] = {}
    for name, budget, unit in ATTACKS:
        key = label(name, budget, unit)
        pairs = [(r["clean"], r["attacks"][key]) for r in rows if key in r["attacks"]]
        if not pairs:
            continue
        damaging = [(c, a) for c, a in pairs if c["psnr"] - a["psnr"] >= DAMAGING_DB]
        summary[key] = {
            "name": name, "budget": budget, "slices": len(pairs),
            "spent_noise_norms": float(np.mean([a["spent_noise_norms"] for _, a in pairs])),
            "damage_db": float(np.mean([c["psnr"] - a["psnr"] for c, a in pairs])),
            "damage_db_max": float(np.max([c["psnr"] - a["psnr"] for c, a in pairs])),
            "ssim_loss": float(np.mean([c["ssim"] - a["ssim"] for c, a in pairs])),
            "damage_cg_db": float(np.mean([c["psnr_cg"] - a["psnr_cg"] for c, a in pairs])),
            "flagged": float(np.mean([a["verdict"] != "clean" for _, a in pairs])),
            "rewritten": float(np.mean([a["verdict"] == "mitigated" for _, a in pairs])),
            "shipped_loss_db": float(np.mean([c["psnr"] - a["psnr_shipped"] for c, a in pairs])),
            "shipped_ssim_loss": float(np.mean([c["ssim"] - a["ssim_shipped"] for c, a in pairs])),
            "damaging": len(damaging),
            "flagged_damaging": float(np.mean([a["verdict"] != "clean" for _, a in damaging])) if damaging else None,
            "recovered_psnr": float(np.mean([loss_share(c["psnr"], a["psnr"], a["psnr_shipped"]) for c, a in damaging])) if damaging else None,
            "recovered_ssim": float(np.mean([loss_share(c["ssim"], a["ssim"], a["ssim_shipped"]) for c, a in damaging])) if damaging else None,
            "mitigate_passes": float(np.mean([a["passes"].get("mitigate", 0) for _, a in pairs if a["verdict"] == "mitigated"] or [0])),
        }
    return summary


def markdown(results: dict[str, Any], summary: dict[str, dict[str, Any]], command: str) -> str:
    rows = results["rows"]
    clean = [r["clean"] for r in rows]
    flagged = sum(c["verdict"] != "clean" for c in clean)
    rewritten = sum(c["verdict"] == "mitigated" for c in clean)

    def f(v: float | None, spec: str = ".2f") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"Command: `{command}` ({results['hardware']}).", "",
        f"{len(rows)} slices of the `{results.get('set', 'training-like')}` set through `defend` (`{results['statistic']}`, threshold {results['threshold']:.4g}). "
        f"Clean: network {np.mean([c['psnr'] for c in clean]):.2f} dB / SSIM {np.mean([c['ssim'] for c in clean]):.4f}, "
        f"CG-SENSE {np.mean([c['psnr_cg'] for c in clean]):.2f} dB; flagged {flagged}, rewritten {rewritten}; "
        f"shipped {np.mean([c['psnr_shipped'] for c in clean]):.2f} dB.", "",
        "| attack (budget) | spent, noise norms | damage dB (mean / max) | SSIM loss | CG-SENSE damage dB | flagged | rewritten | "
        "shipped loss dB / SSIM | n >= 3 dB | flagged of those | recovered PSNR / SSIM (>= 3 dB) | passes per rewrite |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        lines.append(
            f"| {key} | {s['spent_noise_norms']:.2f} | {s['damage_db']:.2f} / {s['damage_db_max']:.2f} | {s['ssim_loss']:.4f} | {s['damage_cg_db']:.2f} | "
            f"{s['flagged']:.2f} | {s['rewritten']:.2f} | {s['shipped_loss_db']:.2f} / {s['shipped_ssim_loss']:.4f} | {s['damaging']} | "
            f"{f(s['flagged_damaging'])} | {f(s['recovered_psnr'])} / {f(s['recovered_ssim'])} | {s['mitigate_passes']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """PSNR loss against budget, received and shipped, per gradient attack; flagged share."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("kspace-l2", "C0"), ("kspace-linf", "C1"), ("kspace-fgsm", "C2")):
        entries = [s for s in summary.values() if s["name"] == name]
        if not entries:
            continue
        budgets = [s["budget"] for s in entries]
        ax.plot(budgets, [s["damage_db"] for s in entries], "o-", color=color, label=f"{name}: network on the received data")
        ax.plot(budgets, [s["shipped_loss_db"] for s in entries], "s--", color=color, label=f"{name}: what the product ships")
        bx.plot(budgets, [s["flagged"] for s in entries], "o-", color=color, label=f"{name}: flagged")
        bx.plot(budgets, [s["rewritten"] for s in entries], "s--", color=color, label=f"{name}: rewritten")
    ax.axhline(DAMAGING_DB, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="budget (noise norms; l-inf: component noise sds)", ylabel="PSNR loss against the clean recon, dB", title="damage")
    bx.set(xscale="log", xlabel="budget", ylabel="share of slices", ylim=(-0.02, 1.02), title="verdicts")
    for axis in (ax, bx):
        axis.set_xticks([0.3, 1.0, 3.0], ["0.3", "1", "3"])
        axis.minorticks_off()
        axis.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="raw files, each with its own coil maps, phase and noise")
    parser.add_argument("--slices", type=int, default=8, help="held-out axial slices per file (at most 20)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--calibration", type=Path, default=None, help="calibration JSON (default: the one shipped with the weights)")
    parser.add_argument("--set", dest="data_set", choices=SETS, default="training-like", help="the data set (benchmarks.sets)")
    parser.add_argument("--replot", action="store_true", help="only the tables and the plot again from OUT/product_attacks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = f"python -m benchmarks.product_attacks --seeds {args.seeds} --slices {args.slices}" + (f" --calibration {args.calibration}" if args.calibration else "")
    if args.data_set != "training-like" or args.out != RESULTS:
        command += f" --set {args.data_set} --out {args.out}"
    results = json.loads((args.out / "product_attacks.json").read_text()) if args.replot else run(args.seeds, args.slices, args.out, args.calibration, args.data_set)
    summary = summarise(results)
    results["summary"] = summary
    (args.out / "product_attacks.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results, summary, command)
    (args.out / "product_attacks.md").write_text(text)
    plot(summary, args.out / "product_attacks.png")
    print(text, flush=True)


if __name__ == "__main__":
    main()
