"""Every product-path defense figure twice: on data like the training data and on the held-out set.

    python -m benchmarks.generalization [--seeds 1] [--slices 8] [--clean-seeds 10] [--clean-slices 20] [--compose-only]

Runs ``benchmarks.product_fpr`` (clean slices: false positives, `unverified`, clean slices
rewritten) and ``benchmarks.product_attacks`` (every attack family: damage, flagged share,
loss recovered) on both sets of ``benchmarks.sets``, each into
``benchmarks/results/generalization/SET/``, and writes the two side by side with the gap
(held-out minus training-like) to ``benchmarks/results/generalization.{json,md,png}``.
``--compose-only`` writes the side-by-side tables again from the sets' JSON files.
Nothing is tuned on the held-out set; its figures are reported as they come.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.sets import SETS, describe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FOLDER = RESULTS / "generalization"


def _run(module: str, data_set: str, *options: str) -> None:
    out = FOLDER / data_set
    subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *options, "--set", data_set, "--out", str(out)], check=True)


def clean_figures(fpr: dict[str, Any], attacks: dict[str, Any]) -> dict[str, float]:
    """The clean-slice figures of one set: verdict shares over every clean slice of the
    false-positive run, and the reconstruction quality of the attack run's clean slices."""
    rows = fpr["rows"]
    n = len(rows)
    checked = [r for r in rows if r["verdict"] != "unverified"]
    clean = [r["clean"] for r in attacks["rows"]]
    return {
        "clean slices": n,
        "flagged of the checked (FPR)": sum(r["verdict"] in ("flagged", "mitigated") for r in checked) / max(len(checked), 1),
        "unverified": sum(r["verdict"] == "unverified" for r in rows) / n,
        "rewritten (mitigated)": sum(r["verdict"] == "mitigated" for r in rows) / n,
        "network PSNR dB": float(np.mean([c["psnr"] for c in clean])),
        "network SSIM": float(np.mean([c["ssim"] for c in clean])),
        "CG-SENSE PSNR dB": float(np.mean([c["psnr_cg"] for c in clean])),
        "shipped clean loss dB": float(np.mean([c["psnr"] - c["psnr_shipped"] for c in clean])),
    }


def attack_figures(attacks: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per attack: damage, the flagged share of the slices it costs >= 3 dB, the loss
    recovered on those, and what the product ships."""
    return {
        key: {
            "damage dB": s["damage_db"],
            "n >= 3 dB": s["damaging"],
            "flagged (>= 3 dB)": s["flagged_damaging"],
            "flagged (all)": s["flagged"],
            "recovered PSNR share": s["recovered_psnr"],
            "shipped loss dB": s["shipped_loss_db"],
        }
        for key, s in attacks["summary"].items()
    }


def compose() -> dict[str, Any]:
    by_set: dict[str, Any] = {}
    for name in SETS:
        fpr = json.loads((FOLDER / name / "product_fpr.json").read_text())
        attacks = json.loads((FOLDER / name / "product_attacks.json").read_text())
        by_set[name] = {"describe": describe(name), "clean": clean_figures(fpr, attacks), "attacks": attack_figures(attacks),
                        "victims": len(attacks["rows"])}
    return by_set


def _cell(value: float | int | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _gap(a: float | int | None, b: float | int | None, spec: str) -> str:
    return "n/a" if a is None or b is None else format(b - a, "+" + spec)


def markdown(by_set: dict[str, Any], command: str) -> str:
    train, held = by_set["training-like"], by_set["held-out"]
    lines = [
        f"Command: `{command}`.", "",
        f"- training-like: {train['describe']}",
        f"- held-out: {held['describe']}",
        "", "Clean slices:", "",
        "| figure | training-like | held-out | gap (held-out - training-like) |", "|---|---|---|---|",
    ]
    for key, value in train["clean"].items():
        spec = "d" if isinstance(value, int) else ".3f" if abs(value) < 2 else ".2f"
        lines.append(f"| {key} | {_cell(value, spec)} | {_cell(held['clean'][key], spec)} | {_gap(value, held['clean'][key], spec)} |")
    lines += [
        "", f"Attacks ({train['victims']} / {held['victims']} slices; flagged and recovered on the slices an attack costs >= 3 dB):", "",
        "| attack | damage dB | flagged (>= 3 dB) | gap | recovered PSNR share | gap | shipped loss dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, a in train["attacks"].items():
        b = held["attacks"].get(key)
        if b is None:
            continue
        lines.append(
            f"| {key} | {a['damage dB']:.2f} / {b['damage dB']:.2f} | {_cell(a['flagged (>= 3 dB)'], '.2f')} / {_cell(b['flagged (>= 3 dB)'], '.2f')} "
            f"| {_gap(a['flagged (>= 3 dB)'], b['flagged (>= 3 dB)'], '.2f')} | {_cell(a['recovered PSNR share'], '.2f')} / {_cell(b['recovered PSNR share'], '.2f')} "
            f"| {_gap(a['recovered PSNR share'], b['recovered PSNR share'], '.2f')} | {a['shipped loss dB']:.2f} / {b['shipped loss dB']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(by_set: dict[str, Any], path: Path) -> None:
    """Flagged share (>= 3 dB) and recovered share per attack, the two sets side by side."""
    keys = [k for k in by_set["training-like"]["attacks"] if k in by_set["held-out"]["attacks"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, figure in zip(axes, ("flagged (>= 3 dB)", "recovered PSNR share"), strict=True):
        for offset, (name, color) in enumerate((("training-like", "C0"), ("held-out", "C3"))):
            values = [by_set[name]["attacks"][k][figure] for k in keys]
            ax.bar(np.arange(len(keys)) + 0.4 * offset - 0.2, [np.nan if v is None else v for v in values], 0.4, color=color, label=name)
        ax.set_xticks(np.arange(len(keys)), [k.split(" (")[0].replace(" noise norms", " nn").replace(" component noise sds", " sd") for k in keys],
                      rotation=60, ha="right", fontsize=7)
        ax.set(ylim=(0, 1.05), title=figure)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=1, help="raw files per set for the attacks")
    parser.add_argument("--slices", type=int, default=8, help="slices per raw file for the attacks")
    parser.add_argument("--clean-seeds", type=int, default=10, help="raw files per set for the clean slices")
    parser.add_argument("--clean-slices", type=int, default=20, help="slices per raw file for the clean slices")
    parser.add_argument("--compose-only", action="store_true", help="only the side-by-side tables from the sets' JSON files")
    args = parser.parse_args()
    command = (f"python -m benchmarks.generalization --seeds {args.seeds} --slices {args.slices} "
               f"--clean-seeds {args.clean_seeds} --clean-slices {args.clean_slices}")
    if not args.compose_only:
        for name in SETS:
            _run("product_fpr", name, "--seeds", str(args.clean_seeds), "--slices", str(args.clean_slices))
            _run("product_attacks", name, "--seeds", str(args.seeds), "--slices", str(args.slices))
    by_set = compose()
    (RESULTS / "generalization.json").write_text(json.dumps(by_set, indent=1) + "\n")
    text = markdown(by_set, command)
    (RESULTS / "generalization.md").write_text(text)
    plot(by_set, RESULTS / "generalization.png")
    print(text, flush=True)


if __name__ == "__main__":
    main()
