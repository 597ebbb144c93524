"""Defense benchmark: attack damage, detection ROC, calibrated FPR, adaptive attack,
mitigation quality and cost. Figures go to benchmarks/RESULTS.md.

Usage: ``python -m benchmarks.defense [--clean 300] [--attacked 30] [--mitigated 8] [--out benchmarks/results]``

Data: simulated acquisitions of the held-out MNI152 slab with augmentation (random
contrast, flips, rotation, warp; new coils, phase, noise and mask per draw): a
calibration set and a disjoint clean test set (different seeds), and attacked copies of
the first ``--attacked`` clean test slices. R = 4 equispaced, 16 ACS lines, 8 coils.
Budgets are stated twice: k-space l2 attacks in acquisition-noise norms
(``sigma sqrt(n)`` over the n sampled entries) and as a fraction of ``||y||``; image
attacks relative to ``max |x_zf|`` (the paper's unit) and to the noise ``sigma``.
Damage is PSNR loss against the fully sampled reference; CG-SENSE on the same perturbed
data is reported beside it (forged-looking data damage every method).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from recon.attacks import benign_noise, fgsm_kspace, impulse_spikes, pgd_image_linf, pgd_kspace_l2, pgd_kspace_linf  # noqa: E402
from recon.attacks.adaptive import adaptive_kspace_l2  # noqa: E402
from recon.baselines import cg_sense  # noqa: E402
from recon.data.samples import Sample, simulated_slices  # noqa: E402
from recon.detect import CyclicDetector, calibrate  # noqa: E402
from recon.detect.calibration import Calibration, DetectorKey  # noqa: E402
from recon.detect.cyclic import DetectionScores, noise_norm  # noqa: E402
from recon.detect.defense import model_protocol  # noqa: E402
from recon.detect.statistics import STATISTICS  # noqa: E402
from recon.metrics import quality  # noqa: E402
from recon.mitigate import k_from_image, mitigate_faithful, mitigate_kspace, randomized_smoothing  # noqa: E402
from recon.models.weights import load_model  # noqa: E402
from recon.physics.masks import MaskFamily  # noqa: E402
from recon.physics.sense import SenseOp  # noqa: E402
from recon.report import before_after  # noqa: E402


@dataclass(frozen=True, eq=False)
class Item:
    """One slice ready for the benchmark."""

    op: SenseOp
    y: torch.Tensor
    x_zf: torch.Tensor
    reference: np.ndarray
    sigma: float

    @property
    def noise_norm(self) -> float:
        return noise_norm(self.op, self.y, self.sigma)

    @property
    def scale(self) -> float:
        return float(self.x_zf.abs().max())


def to_item(sample: Sample) -> Item:
    op = SenseOp(sample.maps[None], sample.mask[None])
    y = op.project(sample.kspace_full[None])
    return Item(op, y, op.adjoint(y), sample.reference.numpy(), sample.noise_std)


def psnr(image: torch.Tensor, item: Item) -> float:
    return quality(image[0].detach().numpy(), item.reference).psnr


@dataclass
class Observation:
    """What one (possibly attacked) input gave."""

    psnr: float
    psnr_cg: float
    scores: dict[str, float]
    seconds_recon: float
    seconds_detect: float


def observe(model: Any, detector: CyclicDetector, item: Item, y: torch.Tensor | None = None, x: torch.Tensor | None = None) -> tuple[Observation, torch.Tensor, torch.Tensor]:
    """Reconstruct and score a k-space input ``y`` or an image-domain input ``x``."""
    with torch.no_grad():
        if x is None:
            y = item.y if y is None else y
            x = item.op.adjoint(y)
        else:
            y = k_from_image(item.op, x)
        t0 = time.perf_counter()
        x1 = model(x, item.op)
        t1 = time.perf_counter()
        scores: DetectionScores = detector.score(item.op, y, x1, item.sigma, holdout=True)
        t2 = time.perf_counter()
        cg = cg_sense(item.op, y)
    return Observation(psnr(x1, item), psnr(cg, item), asdict(scores), t1 - t0, t2 - t1), x1, y


def attack(name: str, budget: float, model: Any, item: Item, detector: CyclicDetector, threshold: float, statistic: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "kspace-l2":
        return {"y": pgd_kspace_l2(model, item.op, item.y, budget * item.noise_norm, g)}
    if name == "kspace-linf":  # a Re/Im box whose corners are at ``budget`` noise norms (benchmarks.product_attacks)
        return {"y": pgd_kspace_linf(model, item.op, item.y, budget * item.sigma / math.sqrt(2), g)}
    if name == "kspace-fgsm":
        return {"y": fgsm_kspace(model, item.op, item.y, budget * item.noise_norm, g)}
    if name == "image-linf":
        return {"x": pgd_image_linf(model, item.op, item.x_zf, budget * item.scale, g)}
    if name == "impulse":
        return {"y": impulse_spikes(item.op, item.y, 10, budget * float(item.y.abs().max()), g)}
    if name == "benign":
        return {"y": benign_noise(item.op, item.y, budget * item.sigma, g)}
    if name == "adaptive":
        return {"y": adaptive_kspace_l2(model, item.op, item.y, budget * item.noise_norm, detector, statistic, threshold, g, noise_sigma=item.sigma)}
    raise ValueError(name)


ATTACKS: list[tuple[str, list[float], str]] = [
    ("kspace-l2", [0.3, 1.0, 3.0], "noise norms"),
    ("kspace-fgsm", [1.0, 3.0], "noise norms"),
    ("impulse", [0.05, 0.2], "x max|y| per spike, 10 spikes"),
    ("benign", [1.0], "x noise sigma"),
    ("image-linf", [0.001, 0.003, 0.01], "x max|x_zf|"),
]


def auc(clean: list[float], attacked: list[float]) -> float:
    labels = [0] * len(clean) + [1] * len(attacked)
    return float(roc_auc_score(labels, clean + attacked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", type=int, default=300)
    parser.add_argument("--attacked", type=int, default=30)
    parser.add_argument("--adaptive", type=int, default=15)
    parser.add_argument("--mitigated", type=int, default=8)
    parser.add_argument("--faithful", type=int, default=4, help="slices for the (slow) paper-faithful mitigation")
    parser.add_argument("--statistic", default="cyclic_noise", choices=STATISTICS, help="the deployed statistic (adaptive attack, mitigation safeguard)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--replot", action="store_true", help="only redraw plots and tables from OUT/defense.json")
    parser.add_argument("--image-domain", action="store_true", help="only the image-domain table, clean baseline through the same image path")
    parser.add_argument("--mitigation-only", action="store_true", help="only the mitigation table (and montage), merged into OUT/defense.json")
    parser.add_argument(
        "--calibration", type=Path, default=None,
        help="calibration whose prior_shift threshold gates the prior mitigation (default: the one shipped with the weights)",
    )
    args = parser.parse_args()
    if args.mitigation_only:
        torch.set_num_threads(args.threads)
        mitigation_only(args)
        return
    if args.image_domain:
        torch.set_num_threads(args.threads)
        image_domain_phase(args)
        return
    if args.replot:
        saved = json.loads((args.out / "defense.json").read_text())
        plot_damage(saved, args.out / "defense_damage.png")
        write_markdown(saved, args.out / "defense.md", args.statistic)
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, manifest = load_model(args.weights)
    family = MaskFamily(manifest.mask_kind, manifest.acceleration, manifest.acs_lines)
    detector = CyclicDetector(model, family)
    results: dict[str, Any] = {"hardware": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}", "args": {k: str(v) for k, v in vars(args).items()}}

    # 1. clean calibration and clean test sets
    calib_items = [to_item(s) for s in simulated_slices("heldout", args.clean, family, 8, seed=101)]
    test_items = [to_item(s) for s in simulated_slices("heldout", args.clean, family, 8, seed=202)]
    calib = [observe(model, detector, it)[0] for it in tqdm(calib_items, desc="clean calibration")]
    clean = [observe(model, detector, it)[0] for it in tqdm(test_items, desc="clean test")]
    protocol = model_protocol(manifest)
    calibrations = {}
    for stat in STATISTICS:
        key = DetectorKey.of(stat, detector)
        for fpr in (0.01, 0.05):
            cal = calibrate([o.scores[stat] for o in calib], fpr, manifest.sha256, protocol, key)
            calibrations[(stat, fpr)] = cal
    results["clean"] = {
        "psnr": float(np.mean([o.psnr for o in clean])),
        "psnr_cg": float(np.mean([o.psnr_cg for o in clean])),
        "seconds_recon": float(np.median([o.seconds_recon for o in clean])),
        "seconds_detect": float(np.median([o.seconds_detect for o in clean])),
        "fpr": {f"{s}@{f}": float(np.mean([calibrations[(s, f)].flags(o.scores[s]) for o in clean])) for (s, f) in calibrations},
        "thresholds": {f"{s}@{f}": calibrations[(s, f)].threshold for (s, f) in calibrations},
    }
    (args.out / "defense.json").write_text(json.dumps(results, indent=1))

    # 2. attacks
    victims = test_items[: args.attacked]
    per_attack: dict[str, Any] = {}
    roc_data: dict[str, tuple[list[float], list[float]]] = {}
    for name, budgets, unit in ATTACKS:
        for budget in budgets:
            label = f"{name} {budget:g} {unit}"
            rows = []
            for i, item in enumerate(tqdm(victims, desc=label)):
                adv = attack(name, budget, model, item, detector, 0.0, args.statistic, seed=1000 + i)
                obs = observe(model, detector, item, y=adv.get("y"), x=adv.get("x"))[0]
                base = clean[i]
                rows.append((obs, base))
            entry = {
                "damage_db": float(np.mean([b.psnr - o.psnr for o, b in rows])),
                "damage_db_max": float(np.max([b.psnr - o.psnr for o, b in rows])),
                "damage_cg_db": float(np.mean([b.psnr_cg - o.psnr_cg for o, b in rows])),
                "auc": {s: auc([c.scores[s] for c in clean], [o.scores[s] for o, _ in rows]) for s in STATISTICS},
                "tpr": {f"{s}@{f}": float(np.mean([calibrations[(s, f)].flags(o.scores[s]) for o, _ in rows])) for (s, f) in calibrations},
                "tpr_damaging_3db": {
                    f"{s}@{f}": (float(np.mean([calibrations[(s, f)].flags(o.scores[s]) for o, b in rows if b.psnr - o.psnr >= 3])) if any(b.psnr - o.psnr >= 3 for o, b in rows) else None)
                    for (s, f) in calibrations
                },
                "damaging_3db": int(sum(b.psnr - o.psnr >= 3 for o, b in rows)),
            }
            if name in ("kspace-l2", "kspace-fgsm"):
                entry["budget_relative_to_y"] = budget * float(np.mean([it.noise_norm / float(torch.linalg.vector_norm(it.y)) for it in victims]))
            elif name == "image-linf":
                entry["budget_relative_to_sigma"] = budget * float(np.mean([it.scale / it.sigma for it in victims]))
            per_attack[label] = entry
            roc_data[label] = ([c.scores[args.statistic] for c in clean], [o.scores[args.statistic] for o, _ in rows])
            results["attacks"] = per_attack
            (args.out / "defense.json").write_text(json.dumps(results, indent=1))

    # 3. adaptive attacker against the deployed statistic at 1 % FPR
    deployed = calibrations[(args.statistic, 0.01)]
    adaptive_rows = []
    for budget in (0.3, 1.0, 3.0):
        for i, item in enumerate(tqdm(victims[: args.adaptive], desc=f"adaptive {budget:g} noise norms")):
            adv = attack("adaptive", budget, model, item, detector, deployed.threshold, args.statistic, seed=5000 + i)
            obs, _, _ = observe(model, detector, item, y=adv["y"])
            adaptive_rows.append({"budget": budget, "damage_db": clean[i].psnr - obs.psnr, "flagged": deployed.flags(obs.scores[args.statistic])})
    unflagged = [r["damage_db"] for r in adaptive_rows if not r["flagged"]]
    results["adaptive"] = {
        "rows": adaptive_rows,
        "max_unflagged_damage_db": float(max(unflagged)) if unflagged else None,
        "flagged_rate": float(np.mean([r["flagged"] for r in adaptive_rows])),
    }
    (args.out / "defense.json").write_text(json.dumps(results, indent=1))

    # 4. mitigation on damaging attacks and on clean slices
    results["mitigation"] = mitigation_phase(model, detector, victims, clean, args, product_calibration(detector, manifest, args))
    (args.out / "defense.json").write_text(json.dumps(results, indent=1))
    plot_roc(roc_data, args.out / "defense_roc.png", args.statistic)
    plot_damage(results, args.out / "defense_damage.png")
    write_markdown(results, args.out / "defense.md", args.statistic)


def mitigation_only(args: argparse.Namespace) -> None:
    """The mitigation phase alone, on the first ``--mitigated`` clean test slices."""
    model, manifest = load_model(args.weights)
    family = MaskFamily(manifest.mask_kind, manifest.acceleration, manifest.acs_lines)
    detector = CyclicDetector(model, family)
    test_items = [to_item(s) for s in simulated_slices("heldout", args.clean, family, 8, seed=202)]
    victims = test_items[: args.mitigated]
    clean = [observe(model, detector, it)[0] for it in victims]
    cal = product_calibration(detector, manifest, args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "defense.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["mitigation"] = mitigation_phase(model, detector, victims, clean, args, cal)
    results["prior_on_clean"] = prior_on_clean(model, detector, test_items, cal)
    path.write_text(json.dumps(results, indent=1))
    (args.out / "mitigation.md").write_text("\n".join(mitigation_markdown(results)) + "\n")
    if "attacks" in results:  # a full run's figures are there: the tables again, with this mitigation
        write_markdown(results, args.out / "defense.md", args.statistic)


def product_calibration(detector: CyclicDetector, manifest: Any, args: argparse.Namespace) -> Calibration:
    """The calibration the product would use (``--calibration``, default the one shipped with
    the weights), checked against this model."""
    from recon.detect.defense import calibration_statistic, default_calibration_path

    path = args.calibration or default_calibration_path(manifest)
    return Calibration.load(path, manifest.sha256, model_protocol(manifest), DetectorKey.of(calibration_statistic(path), detector))


def gates_of(cal: Calibration) -> tuple[float, float | None]:
    """The clean thresholds of ``prior_shift`` and (``None`` when it holds none) ``null_shift``
    in the calibration: the gated mitigations' gates."""
    from recon.mitigate.gated import null_gate, prior_gate

    gate = prior_gate(cal)
    if gate is None:
        raise SystemExit(f"calibration of {cal.detector.statistic} holds no prior_shift threshold; the prior mitigation needs one")
    return gate, null_gate(cal)


def product_scores(detector: CyclicDetector, cal: Calibration, item: Item, y: torch.Tensor, x1: torch.Tensor) -> DetectionScores:
    """The scores the product's detector gives a received slice (its statistic's passes)."""
    with torch.no_grad():
        return detector.score_for(cal.detector.statistic, item.op, y, x1, item.sigma)


def product_rewrites(cal: Calibration, score: float) -> bool:
    """Whether the product sends a slice with ``score`` to its mitigation: flagged and past
    every clean calibration score (``MitigationSettings.rewrite_beyond_clean``)."""
    return cal.flags(score) and cal.beyond_clean(score)


def _null_gate(detector: CyclicDetector, item: Item, null_gate: float | None) -> Any:
    """The data correction's ``null_shift`` gate for one slice (``None`` without a threshold)."""
    from recon.mitigate.prior import NullGate

    return None if null_gate is None else NullGate(null_gate, detector.acs(item.op))


def prior_on_clean(model: Any, detector: CyclicDetector, items: list[Item], cal: Calibration) -> dict[str, Any]:
    """Every clean test slice pushed through the gated prior mitigation (a false positive's
    fate): how many the gate lets through and the PSNR change of what ships; likewise the
    data correction, and where the product's calibration ``cal`` holds a ``null_shift``
    threshold, the correction that also weighs it and what the product ships (that
    correction only when :func:`product_rewrites`), with how many it flags. The gates'
    evidence is the product detector's, scored once per slice."""
    from recon.mitigate.prior import mitigate_correct, mitigate_prior
    from recon.settings import MitigationSettings

    settings = MitigationSettings()
    gain = settings.prior_gain
    gate, null_gate = gates_of(cal)
    changes, accepted, raw, corrected, corrected_accepted, nulled, nulled_accepted = [], 0, [], [], 0, [], 0
    flagged, product = 0, []
    for item in tqdm(items, desc="clean through the gated mitigations"):
        with torch.no_grad():
            x1 = model(item.x_zf, item.op)
        scores = product_scores(detector, cal, item, item.y, x1)
        result = mitigate_prior(model, item.op, item.y, x1, item.sigma, gate, detector.prior_gain, gain, scores.prior_shift)
        base = psnr(x1, item)
        with torch.no_grad():
            raw.append(psnr(model(item.x_zf, item.op, prior_gain=gain), item) - base)
        accepted += result.accepted
        changes.append((psnr(result.image, item) if result.image is not None else base) - base)
        correct = mitigate_correct(
            model, item.op, item.y, x1, item.sigma, gate, detector.prior_gain, settings.correct_stop * gate,
            settings.correct_radius, settings.correct_steps, shift=result.shift,
        )
        corrected_accepted += correct.accepted
        corrected.append((psnr(correct.image, item) if correct.image is not None else base) - base)
        if null_gate is not None:
            null = mitigate_correct(
                model, item.op, item.y, x1, item.sigma, gate, detector.prior_gain, settings.correct_stop * gate,
                settings.correct_radius, settings.correct_steps, shift=result.shift, null=_null_gate(detector, item, null_gate), null_shift=scores.null_shift,
            )
            nulled_accepted += null.accepted
            nulled.append((psnr(null.image, item) if null.image is not None else base) - base)
            score = cal.score_of(scores)
            flagged += cal.flags(score)
            product.append(nulled[-1] if product_rewrites(cal, score) else 0.0)
    extra: dict[str, Any] = {}
    if product:
        extra = {
            "product_flagged": flagged, "product_clean_max": cal.clean_max,
            "product_rewritten_change_db": [c for c in product if c != 0.0], "product_change_db_mean": float(np.mean(product)),
        }
    if nulled:
        extra |= {
            "null_gate": null_gate, "null_accepted": nulled_accepted, "null_change_db_mean": float(np.mean(nulled)), "null_change_db_min": float(np.min(nulled)),
            "null_rewritten_change_db": [c for c in nulled if c != 0.0],
        }
    return extra | {
        "slices": len(items), "gate": gate, "gain": gain, "accepted": accepted,
        "shipped_change_db_mean": float(np.mean(changes)), "shipped_change_db_min": float(np.min(changes)),
        "raw_change_db_mean": float(np.mean(raw)),
        "correct_accepted": corrected_accepted, "correct_change_db_mean": float(np.mean(corrected)),
        "correct_change_db_min": float(np.min(corrected)),
    }


def image_domain_phase(args: argparse.Namespace) -> None:
    """Image-domain attacks scored against clean slices that took the same path.

    An image-domain input has no measured k-space; the detector uses the CG pseudo-inverse
    ``y(x)`` for it. Clean slices must then be scored through the same ``y(x_zf)`` (CG
    truncation lowers the residual on its own), or the comparison measures the path, not
    the attack.
    """
    model, manifest = load_model(args.weights)
    family = MaskFamily(manifest.mask_kind, manifest.acceleration, manifest.acs_lines)
    detector = CyclicDetector(model, family)
    calib_items = [to_item(s) for s in simulated_slices("heldout", args.clean, family, 8, seed=101)]
    test_items = [to_item(s) for s in simulated_slices("heldout", args.clean, family, 8, seed=202)]
    calib = [observe(model, detector, it, x=it.x_zf)[0] for it in tqdm(calib_items, desc="clean calibration (image path)")]
    clean = [observe(model, detector, it, x=it.x_zf)[0] for it in tqdm(test_items, desc="clean test (image path)")]
    protocol = model_protocol(manifest)
    cals = {
        stat: calibrate([o.scores[stat] for o in calib], 0.01, manifest.sha256, protocol, DetectorKey.of(stat, detector))
        for stat in STATISTICS
    }
    table: dict[str, Any] = {"clean_fpr": {s: float(np.mean([cals[s].flags(o.scores[s]) for o in clean])) for s in STATISTICS}}
    for budget in (0.001, 0.003, 0.01):
        rows = []
        for i, item in enumerate(tqdm(test_items[: args.attacked], desc=f"image-linf {budget:g}")):
            adv = attack("image-linf", budget, model, item, detector, 0.0, args.statistic, seed=1000 + i)
            rows.append((observe(model, detector, item, x=adv["x"])[0], clean[i]))
        table[f"{budget:g}"] = {
            "damage_db": float(np.mean([b.psnr - o.psnr for o, b in rows])),
            "auc": {s: auc([c.scores[s] for c in clean], [o.scores[s] for o, _ in rows]) for s in STATISTICS},
            "tpr": {s: float(np.mean([cals[s].flags(o.scores[s]) for o, _ in rows])) for s in STATISTICS},
        }
    path = args.out / "defense.json"
    results = json.loads(path.read_text())
    results["image_domain_same_path"] = table
    path.write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out / "defense.md", args.statistic)


def _correction_columns(
    row: dict[str, Any], key: str, model: Any, detector: CyclicDetector, item: Item, y_in: torch.Tensor, x1: torch.Tensor, gate: float, settings: Any, null: Any = None
) -> torch.Tensor:
    """One data correction's columns in ``row`` (``key``: the descent's image, ungated;
    ``key_shipped``, ``key_accepted``, ``key_passes``, ``key_seconds``); returns what ships."""
    from recon.mitigate.prior import correct_data, mitigate_correct

    stop = settings.correct_stop * gate
    t0 = time.perf_counter()
    result = mitigate_correct(model, item.op, y_in, x1, item.sigma, gate, detector.prior_gain, stop, settings.correct_radius, settings.correct_steps, null=null)
    row[f"{key}_seconds"], row[f"{key}_passes"] = time.perf_counter() - t0, result.network_passes
    if result.image is None:  # refused at the gate: the image the descent would have shipped, for the raw column
        row[key] = psnr(correct_data(model, item.op, y_in, item.sigma, detector.prior_gain, stop, settings.correct_radius, settings.correct_steps, null).image, item)
    else:
        row[key] = psnr(result.image, item)
    row[f"{key}_accepted"] = float(result.accepted)
    shipped = result.image if result.image is not None else x1
    row[f"{key}_shipped"] = psnr(shipped, item)
    return shipped


def mitigation_phase(model: Any, detector: CyclicDetector, victims: list[Item], clean: list[Observation], args: argparse.Namespace, cal: Calibration) -> dict[str, Any]:
    """Every mitigation and baseline on attacked and clean victims, gated by the clean
    thresholds in the product's calibration ``cal`` (:func:`gates_of`). Where it holds a
    ``null_shift`` threshold: the ``null`` columns (the product's default data correction)
    and the ``product`` column, what the product ships (that correction's image only when
    :func:`product_rewrites`). Each mitigation pays its own gate pass, as it would alone."""
    from recon.mitigate.cyclic import safeguard, safeguard_statistic
    from recon.mitigate.prior import mitigate_prior
    from recon.settings import MitigationSettings

    settings = MitigationSettings()
    gate, null_gate = gates_of(cal)
    judge = safeguard_statistic(args.statistic)
    cases = {
        "kspace-l2 0.3 noise norms": ("kspace-l2", 0.3), "kspace-l2 1 noise norms": ("kspace-l2", 1.0), "kspace-l2 3 noise norms": ("kspace-l2", 3.0),
        "kspace-fgsm 1 noise norms": ("kspace-fgsm", 1.0), "image-linf 0.01 max|x_zf|": ("image-linf", 0.01), "clean": ("none", 0.0),
    }
    out: dict[str, Any] = {}
    montage_rows: list[tuple[str, np.ndarray, np.ndarray]] = []
    for case, (name, budget) in cases.items():
        rows = []
        for i, item in enumerate(tqdm(victims[: args.mitigated], desc=f"mitigate {case}")):
            g = torch.Generator().manual_seed(7000 + i)
            adv = attack(name, budget, model, item, detector, 0.0, args.statistic, 1000 + i) if name != "none" else {"y": item.y}
            x_in = adv.get("x")
            y_in = adv["y"] if x_in is None else k_from_image(item.op, x_in)
            with torch.no_grad():
                x1 = model(item.op.adjoint(y_in) if x_in is None else x_in, item.op)
            cycle = detector.cycle(item.op, y_in, x1)
            row: dict[str, Any] = {"clean": clean[i].psnr, "attacked": psnr(x1, item)}
            t0 = time.perf_counter()
            ours = mitigate_kspace(model, item.op, y_in, cycle, item.sigma, settings.fidelity, settings.radius, settings.iterations, settings.lr, settings.patience)
            row["ours"], row["ours_seconds"], row["ours_passes"] = psnr(ours.image, item), time.perf_counter() - t0, ours.network_passes
            # what ships in the product: the rewrite only when the safeguard accepts it
            verdict = safeguard(detector, item.op, y_in, x1, ours.image, judge, item.sigma, settings.max_dc_increase)
            row["ours_accepted"] = float(verdict.accepted)
            row["ours_shipped"] = psnr(ours.image if verdict.accepted else x1, item)
            # the prior-weighted re-reconstruction (the product's default): raw, and behind its gate
            t0 = time.perf_counter()
            prior = mitigate_prior(model, item.op, y_in, x1, item.sigma, gate, detector.prior_gain, settings.prior_gain)
            row["prior_seconds"], row["prior_passes"] = time.perf_counter() - t0, prior.network_passes
            if prior.image is None:  # refused at the gate: the rewrite it would have shipped, for the "raw" column
                with torch.no_grad():
                    row["prior"] = psnr(model(item.op.adjoint(y_in), item.op, prior_gain=settings.prior_gain), item)
            else:
                row["prior"] = psnr(prior.image, item)
            row["prior_accepted"] = float(prior.accepted)
            row["prior_shipped"] = psnr(prior.image if prior.image is not None else x1, item)
            # the data correction behind the prior gate; "raw": the descent ungated
            shipped = _correction_columns(row, "correct", model, detector, item, y_in, x1, gate, settings)
            if null_gate is not None:  # the correction that also weighs null_shift (the product's default with such a calibration)
                shipped = _correction_columns(row, "null", model, detector, item, y_in, x1, gate, settings, _null_gate(detector, item, null_gate))
                row["score"] = cal.score_of(product_scores(detector, cal, item, y_in, x1))
                row["product_flagged"] = float(cal.flags(row["score"]))
                row["product_rewritten"] = float(product_rewrites(cal, row["score"]) and row["null_accepted"] > 0)
                shipped = shipped if row["product_rewritten"] else x1
                row["product"] = psnr(shipped, item)
            if i < args.faithful:
                x_rx = item.op.adjoint(y_in) if x_in is None else x_in
                t0 = time.perf_counter()
                faithful = mitigate_faithful(model, item.op, x_rx, cycle, 0.01 * item.scale, 0.005 * item.scale)
                row["faithful"], row["faithful_seconds"], row["faithful_passes"] = psnr(faithful.image, item), time.perf_counter() - t0, faithful.network_passes
            with torch.no_grad():
                row["range_projection"] = psnr(model(item.op.adjoint(y_in), item.op), item)
                row["smoothing"] = psnr(randomized_smoothing(model, item.op, y_in, item.sigma, 8, g), item)
                row["cg_sense"] = psnr(cg_sense(item.op, y_in), item)
            rows.append(row)
            if i == 0:
                montage_rows.append((case, x1[0].numpy(), shipped[0].numpy()))
        summary: dict[str, Any] = {k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0] if not k.endswith("_passes")}
        summary["faithful_passes"] = float(np.mean([r["faithful_passes"] for r in rows if "faithful_passes" in r])) if any("faithful_passes" in r for r in rows) else None
        summary["ours_passes"] = float(np.mean([r["ours_passes"] for r in rows]))
        summary["prior_passes"] = float(np.mean([r["prior_passes"] for r in rows]))
        summary["correct_passes"] = float(np.mean([r["correct_passes"] for r in rows]))
        if "null_passes" in rows[0]:
            summary["null_passes"] = float(np.mean([r["null_passes"] for r in rows]))
        loss = summary["clean"] - summary["attacked"]
        for method in ("product", "ours", "ours_shipped", "prior", "prior_shipped", "correct", "correct_shipped", "null", "null_shipped", "faithful", "range_projection", "smoothing", "cg_sense"):
            if method in summary and loss > 0.5:
                summary[f"{method}_recovered"] = (summary[method] - summary["attacked"]) / loss
        damaging = [r for r in rows if r["clean"] - r["attacked"] >= 3]  # the target's cases: attacks costing >= 3 dB
        if damaging and name != "none":
            for method in ("product", "correct", "correct_shipped", "null", "null_shipped", "prior", "prior_shipped", "ours_shipped"):
                if method not in damaging[0]:
                    continue
                summary[f"{method}_recovered_3db"] = float(np.mean([(r[method] - r["attacked"]) / (r["clean"] - r["attacked"]) for r in damaging]))
            summary["damaging_3db"] = len(damaging)
        out[case] = {"summary": summary, "rows": rows}
    before_after(args.out / "defense_montage.png", montage_rows, victims[0].reference, ("received", "what the product ships"))
    return out


def plot_roc(roc_data: dict[str, tuple[list[float], list[float]]], path: Path, statistic: str, mark_fpr: float | None = None) -> None:
    """One ROC curve per attack (clean scores, attacked scores), log FPR axis; a grey line
    at ``mark_fpr`` when given (the calibrated rate)."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, (clean, attacked) in roc_data.items():
        fpr, tpr, _ = roc_curve([0] * len(clean) + [1] * len(attacked), clean + attacked)
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc(clean, attacked):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    if mark_fpr is not None:
        ax.axvline(mark_fpr, color="grey", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_xlabel("false-positive rate (clean held-out slices)")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"Detection ROC, statistic: {statistic}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_damage(results: dict[str, Any], path: Path) -> None:
    """Damage (network and CG-SENSE) and AUC against budget, one line per attack family."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    families: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for label, entry in results["attacks"].items():
        name, budget = label.split(" ")[:2]
        families.setdefault(name, []).append((float(budget), entry))
    for name, points in families.items():
        if len(points) < 2:
            continue
        points.sort(key=lambda p: p[0])
        budgets = [p[0] for p in points]
        axes[0].plot(budgets, [p[1]["damage_db"] for p in points], "o-", label=f"{name}: network")
        axes[0].plot(budgets, [p[1]["damage_cg_db"] for p in points], "x--", label=f"{name}: CG-SENSE")
        same_path = results.get("image_domain_same_path", {})
        for stat in STATISTICS:
            if name == "image-linf" and same_path:  # AUC against clean slices taken through the same path
                aucs = [same_path[f"{b:g}"]["auc"][stat] for b in budgets]
            elif name == "image-linf":
                continue
            else:
                aucs = [p[1]["auc"][stat] for p in points]
            axes[1].plot(budgets, aucs, "o-", label=f"{name}: {stat}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("budget (k-space: noise norms; image: x max|x_zf|)")
    axes[0].set_ylabel("PSNR loss (dB)")
    axes[0].legend(fontsize=6)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("budget")
    axes[1].set_ylabel("detection ROC-AUC")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _formatter(summary: dict[str, Any]) -> Any:
    def f(key: str) -> str:
        v = summary.get(key)
        return "-" if v is None else f"{v:.2f}"

    return f


def mitigation_markdown(results: dict[str, Any]) -> list[str]:
    """The mitigation tables (PSNR dB means; recovered = share of the attack's loss)."""
    lines = [
        "| mitigation case | clean | attacked | **product ships** | flagged / rewritten | correct + null | correct + null shipped (gates) | accepted | correct | correct shipped (gate) | accepted | prior | prior shipped (gate) | accepted | cyclic (ours) | cyclic shipped (safeguard) | accepted | faithful | range proj. | smoothing | CG-SENSE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mitigation = results.get("mitigation", {})
    for case, m in mitigation.items():
        f = _formatter(m["summary"])
        lines.append(
            f"| {case} | {f('clean')} | {f('attacked')} | {f('product')} | {f('product_flagged')} / {f('product_rewritten')} | {f('null')} | {f('null_shipped')} | {f('null_accepted')} | {f('correct')} | {f('correct_shipped')} | {f('correct_accepted')} | {f('prior')} | {f('prior_shipped')} | {f('prior_accepted')} | {f('ours')} | {f('ours_shipped')} | "
            f"{f('ours_accepted')} | {f('faithful')} | {f('range_projection')} | {f('smoothing')} | {f('cg_sense')} |"
        )
    lines += [
        "",
        "| mitigation case | recovered: product / correct + null / shipped / correct / correct shipped / prior / prior shipped / cyclic / cyclic shipped / faithful / range proj. / smoothing / CG-SENSE | on slices losing >= 3 dB: product / correct + null / shipped / correct / correct shipped / prior / prior shipped / cyclic shipped (n) | passes correct + null / correct / prior / cyclic / faithful |",
        "|---|---|---|---|",
    ]
    for case, m in mitigation.items():
        f = _formatter(m["summary"])
        shares = " / ".join(f(f"{k}_recovered") for k in ("product", "null", "null_shipped", "correct", "correct_shipped", "prior", "prior_shipped", "ours", "ours_shipped", "faithful", "range_projection", "smoothing", "cg_sense"))
        damaging = " / ".join(f(f"{k}_recovered_3db") for k in ("product", "null", "null_shipped", "correct", "correct_shipped", "prior", "prior_shipped", "ours_shipped")) + f" ({m['summary'].get('damaging_3db', 0)})"
        lines.append(f"| {case} | {shares} | {damaging} | {f('null_passes')} / {f('correct_passes')} / {f('prior_passes')} / {f('ours_passes')} / {f('faithful_passes')} |")
    c = results.get("prior_on_clean")
    if c:
        lines += [
            "",
            f"Clean test slices through the gated prior mitigation: {c['accepted']} of {c['slices']} rewritten (gate: prior_shift > {c['gate']:.4g}); "
            f"PSNR change of what ships mean {c['shipped_change_db_mean']:+.3f} dB, worst {c['shipped_change_db_min']:+.2f} dB "
            f"(ungated rewrite at {c['gain']:g}x: {c['raw_change_db_mean']:+.2f} dB).",
        ]
        if "correct_accepted" in c:
            lines.append(
                f"Through the gated data correction: {c['correct_accepted']} of {c['slices']} rewritten; PSNR change of what ships mean "
                f"{c['correct_change_db_mean']:+.3f} dB, worst {c['correct_change_db_min']:+.2f} dB."
            )
        if "null_accepted" in c:
            lines.append(
                f"Through the gated data correction with null_shift (gates: prior_shift > {c['gate']:.4g} or null_shift > {c['null_gate']:.4g}): "
                f"{c['null_accepted']} of {c['slices']} rewritten; PSNR change of what ships mean {c['null_change_db_mean']:+.3f} dB, "
                f"worst {c['null_change_db_min']:+.2f} dB (the rewritten: {', '.join(f'{v:+.2f}' for v in c['null_rewritten_change_db'])})."
            )
        if "product_flagged" in c:
            rewritten = c["product_rewritten_change_db"]
            lines.append(
                f"What the product ships (rewrite only beyond the largest clean calibration score, {c['product_clean_max']:.4g}): "
                f"{c['product_flagged']} of {c['slices']} flagged, {len(rewritten)} rewritten"
                + (f" ({', '.join(f'{v:+.2f}' for v in rewritten)} dB)" if rewritten else "")
                + f"; PSNR change of what ships mean {c['product_change_db_mean']:+.3f} dB."
            )
    return lines


def write_markdown(results: dict[str, Any], path: Path, statistic: str) -> None:
    c = results["clean"]
    lines = [
        f"Clean held-out test slices: network {c['psnr']:.2f} dB, CG-SENSE {c['psnr_cg']:.2f} dB; "
        f"recon {c['seconds_recon']:.3f} s, detect {c['seconds_detect']:.3f} s per slice (ratio {c['seconds_detect'] / c['seconds_recon']:.2f}).",
        "",
        "| attack (budget) | other unit | damage dB (mean / max) | CG-SENSE damage dB | AUC cyclic (paper) | AUC cycle_image | AUC dc | AUC cyclic_noise | AUC dc_noise | TPR@1% cyclic / cyclic_noise / dc_noise | deployed TPR@1% on >=3 dB (n) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, e in results["attacks"].items():
        tpr = e["tpr"]
        dmg = e["tpr_damaging_3db"]
        damaging = "n/a" if e["damaging_3db"] == 0 else f"{dmg[statistic + '@0.01']:.2f} ({e['damaging_3db']})"
        if e.get("budget_relative_to_y") is not None:
            other = f"{e['budget_relative_to_y']:.4f} ||y||"
        elif e.get("budget_relative_to_sigma") is not None:
            other = f"{e['budget_relative_to_sigma']:.2f} sigma"
        else:
            other = ""
        lines.append(
            f"| {label} | {other} | {e['damage_db']:.2f} / {e['damage_db_max']:.2f} | {e['damage_cg_db']:.2f} | {e['auc']['cyclic']:.3f} | {e['auc']['cycle_image']:.3f} | {e['auc']['dc']:.3f} | "
            f"{e['auc']['cyclic_noise']:.3f} | {e['auc']['dc_noise']:.3f} | {tpr['cyclic@0.01']:.2f} / {tpr['cyclic_noise@0.01']:.2f} / {tpr['dc_noise@0.01']:.2f} | {damaging} |"
        )
    lines += ["", "Clean FPR at calibrated thresholds: " + ", ".join(f"{k} {v:.3f}" for k, v in c["fpr"].items())]
    a = results["adaptive"]
    lines += ["", f"Adaptive attacker ({statistic}, 1 % FPR threshold): flagged {a['flagged_rate']:.2f}; largest unflagged damage {a['max_unflagged_damage_db']} dB."]
    lines += [""] + mitigation_markdown(results)
    same = results.get("image_domain_same_path")
    if same:
        lines += ["", "Image-domain attacks against clean slices scored through the same pseudo-inverse path (AUC / TPR@1%):", ""]
        lines += ["| l-inf budget x max|x_zf| | damage dB | " + " | ".join(STATISTICS) + " |", "|---|---|" + "---|" * len(STATISTICS)]
        for budget, e in same.items():
            if budget == "clean_fpr":
                continue
            lines.append(f"| {budget} | {e['damage_db']:.2f} | " + " | ".join(f"{e['auc'][s]:.3f} / {e['tpr'][s]:.2f}" for s in STATISTICS) + " |")
        lines.append("")
        lines.append("Clean FPR (image path, 1 % target): " + ", ".join(f"{k} {v:.3f}" for k, v in same["clean_fpr"].items()))
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
