"""Detection benchmark of the combined statistics (``holdout_union``, ``holdout_shift_union``, ``holdout_shift_spike_union``,
``shift_spike_union``, ``shift_null_spike_union``, ``null_spike_union``, ``null_first_union``) and their components (``holdout_noise``, ``holdout_sensitive``,
``prior_shift``, ``dc_spike``, ``null_shift``).

Usage: ``python -m benchmarks.detect_union [--clean 300] [--attacked 24] [--statistic S] [--test-seed 202] [--out benchmarks/results/union]``
(``--statistic``: the deployed one, whose calibration file the run writes and which the
adaptive attacker targets; default the product's, ``recon.detect.defense.DEFAULT_STATISTIC``),
then ``python -m benchmarks.detect_union --adaptive 6`` (the adaptive attacker against the
calibration the first run made) and ``python -m benchmarks.detect_union --keyed 3`` (a
site-keyed detector, ``CYCGUARD_DETECTOR_KEY``, at the same calibration: its clean
false-positive rate on the clean test slices, and the adaptive attacker without the key,
plain and averaging over random starts), and ``python -m benchmarks.detect_union --confirm 303``
(the deployed statistic alone on fresh clean and attacked slices of that seed, at the same
calibration).

The same data, seeds and attacks as ``benchmarks.defense`` (k-space attacks, impulse
spikes, benign noise; image-domain attacks are in that benchmark): the calibration set is
made by the product's own ``cycguard calibrate --simulate N`` procedure
(``recon.calibrate.scores_from_simulation`` and ``build_calibration``, seed 101), the clean
test set and the attacked copies of its first slices by seed 202. Writes every slice's
scores (``union.json``, so other combinations can be evaluated without rerunning the
network), the tables (``union.md``), the ROC of the union (``union_roc.png``) and the
calibration file the run made (``calibration.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import benchmarks.retired_detectors  # noqa: F401  (registers the detectors of earlier releases)
from benchmarks.defense import attack, auc, observe, plot_roc, psnr, to_item
from benchmarks.object_shift import victim_rows
from recon.attacks.adaptive import adaptive_kspace_l2
from recon.calibrate import build_calibration, scores_from_simulation
from recon.data.samples import simulated_slices
from recon.detect.calibration import Calibration, DetectorKey, ProtocolKey
from recon.detect.cyclic import DetectionScores
from recon.detect.defense import Defense, detector_for, model_protocol
from recon.detect.statistics import COMBINATIONS, DEFAULT_STATISTIC
from recon.models.weights import load_model

COMPONENTS = ("holdout_noise", "holdout_sensitive", "prior_shift", "dc_spike", "null_shift", "noise_excess")
STATISTICS = (*COMPONENTS, *COMBINATIONS)
DEPLOYABLE = ("null_noise_union", "null_first_union", "null_spike_union", "shift_null_spike_union", "holdout_shift_spike_union", "holdout_shift_union", "holdout_union")
ATTACKS: list[tuple[str, float, str]] = [
    ("kspace-l2", 0.3, "noise norms"),
    ("kspace-l2", 1.0, "noise norms"),
    ("kspace-l2", 3.0, "noise norms"),
    ("kspace-fgsm", 1.0, "noise norms"),
    ("kspace-fgsm", 3.0, "noise norms"),
    ("kspace-linf", 1.0, "component noise sds"),
    ("kspace-linf", 3.0, "component noise sds"),
    ("impulse", 0.05, "x max|y| per spike, 10 spikes"),
    ("impulse", 0.2, "x max|y| per spike, 10 spikes"),
    ("benign", 1.0, "x noise sigma"),
]


def _components(statistic: str) -> tuple[str, ...]:
    """The components of a combination, or the statistic alone."""
    return COMBINATIONS[statistic].components if statistic in COMBINATIONS else (statistic,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", type=int, default=300)
    parser.add_argument("--attacked", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/union"))
    parser.add_argument("--statistic", default=DEFAULT_STATISTIC, choices=DEPLOYABLE, help="the deployed statistic")
    parser.add_argument("--test-seed", type=int, default=202, help="seed of the clean test slices (and so of the attacked ones); 202 in every table so far")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adaptive", type=int, default=0, help="only the adaptive attacker on N slices per budget, against OUT/calibration.json")
    parser.add_argument("--keyed", type=int, default=0, help="only the site-keyed detector: clean FPR, and the adaptive attacker on N slices per budget")
    parser.add_argument("--confirm", type=int, default=0, help="only the deployed statistic on fresh slices of this seed, at OUT/calibration.json")
    parser.add_argument("--image-domain", action="store_true", help="only image-domain attacks against the shift statistics, clean slices through the same image path")
    parser.add_argument("--rescore", action="store_true", help="only the tables again, every statistic, from OUT/union.json's per-slice scores (no network)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rescore:
        rescore(args)
        return
    if args.adaptive:
        adaptive_phase(args)
        return
    if args.keyed:
        keyed_phase(args)
        return
    if args.confirm:
        confirm_phase(args)
        return
    if args.image_domain:
        image_domain_phase(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    model, manifest = load_model(None)
    calib_scores, protocol = scores_from_simulation(args.clean, model, manifest, seed=101)
    detector = detector_for(model, manifest)
    cals = {(s, f): build_calibration(calib_scores, protocol, manifest, detector, s, f) for s in STATISTICS for f in (0.01, 0.05)}
    cals[(args.statistic, 0.01)].save(args.out / "calibration.json")

    items = [to_item(s) for s in simulated_slices("heldout", args.clean, detector.family, manifest.coils, seed=args.test_seed)]
    clean = [observe(model, detector, it)[0] for it in tqdm(items, desc="clean test")]
    clean_scores = [DetectionScores(**o.scores) for o in clean]
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        **calibration_summary(cals, clean_scores),
        "seconds_detect": float(np.median([o.seconds_detect for o in clean])),
        "statistic": args.statistic,
        "calibration_scores": [{k: getattr(s, k) for k in COMPONENTS} for s in calib_scores],
        "clean_scores": [{k: o.scores[k] for k in COMPONENTS} | {"psnr": o.psnr} for o in clean],
        "attacks": {},
    }
    roc: dict[str, tuple[list[float], list[float]]] = {}
    for name, budget, unit in ATTACKS:
        label = f"{name} {budget:g} {unit}"
        rows = []
        for i, item in enumerate(tqdm(items[: args.attacked], desc=label)):
            adv = attack(name, budget, model, item, detector, 0.0, args.statistic, seed=1000 + i)
            rows.append(observe(model, detector, item, y=adv["y"])[0])
        scores = [DetectionScores(**o.scores) for o in rows]
        damage = [clean[i].psnr - o.psnr for i, o in enumerate(rows)]
        entry = attack_entry(cals, clean_scores, scores, damage)
        entry["scores"] = [{k: o.scores[k] for k in COMPONENTS} | {"damage_db": d} for o, d in zip(rows, damage, strict=True)]
        results["attacks"][label] = entry
        roc[label] = (_values(cals[(args.statistic, 0.01)], clean_scores), _values(cals[(args.statistic, 0.01)], scores))
        (args.out / "union.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out / "union.md")
    plot_roc(roc, args.out / "union_roc.png", args.statistic, mark_fpr=0.01)


def _values(cal: Calibration, scores: list[DetectionScores]) -> list[float]:
    return [cal.score_of(s) for s in scores]


def calibration_summary(cals: dict[tuple[str, float], Calibration], clean_scores: list[DetectionScores]) -> dict[str, Any]:
    """Thresholds, scales and clean false-positive rates of every calibration."""
    return {
        "thresholds": {f"{s}@{f}": c.threshold for (s, f), c in cals.items()},
        "scales": {f"{s}@{f}": dict(c.scales) for (s, f), c in cals.items() if c.scales},
        "clean_fpr": {f"{s}@{f}": float(np.mean([c.flags(v) for v in _values(c, clean_scores)])) for (s, f), c in cals.items()},
    }


def attack_entry(cals: dict[tuple[str, float], Calibration], clean_scores: list[DetectionScores], scores: list[DetectionScores], damage: list[float]) -> dict[str, Any]:
    """One attack's row: mean damage, AUC and TPR at 1 % and 5 % FPR of every calibrated
    statistic, overall and on the slices that lose >= 3 dB."""
    entry: dict[str, Any] = {"damage_db": float(np.mean(damage)), "damaging_3db": int(sum(d >= 3 for d in damage)), "auc": {}, "tpr": {}, "tpr_damaging_3db": {}}
    for s in dict.fromkeys(s for s, _ in cals):
        cal = cals[(s, 0.01)]
        entry["auc"][s] = auc(_values(cal, clean_scores), _values(cal, scores))
        for f in (0.01, 0.05):
            flagged = [cals[(s, f)].flags(v) for v in _values(cals[(s, f)], scores)]
            entry["tpr"][f"{s}@{f}"] = float(np.mean(flagged))
            hits = [fl for fl, d in zip(flagged, damage, strict=True) if d >= 3]
            entry["tpr_damaging_3db"][f"{s}@{f}"] = float(np.mean(hits)) if hits else None
    return entry


def _stored(record: dict[str, Any]) -> DetectionScores:
    """A slice's component scores as ``union.json`` keeps them (the cycle statistics, not
    kept, are NaN so that nothing can use them unseen)."""
    nan = float("nan")
    return DetectionScores(nan, nan, nan, nan, nan, **{k: record.get(k) for k in COMPONENTS})


def _stored_statistics(record: dict[str, Any]) -> list[str]:
    """The statistics whose components a stored record holds (older records lack ``null_shift``)."""
    return [s for s in STATISTICS if all(k in record for k in _components(s))]


def rescore(args: argparse.Namespace) -> None:
    """Every statistic's tables from the per-slice component scores a run stored (for a
    combination added after it): the product's calibration code on the stored calibration
    scores, the clean test and attacked slices as they were scored. No network pass; the
    adaptive and keyed phases are kept as they are."""
    results = json.loads((args.out / "union.json").read_text())
    model, manifest = load_model(None)
    detector = detector_for(model, manifest)
    stored = json.loads((args.out / "calibration.json").read_text())["protocol"]
    protocol = ProtocolKey(tuple(stored["matrix"]), stored["coils"], stored["mask_kind"], stored["acceleration"], stored["acs_lines"])
    calib = [_stored(r) for r in results["calibration_scores"]]
    clean_scores = [_stored(r) for r in results["clean_scores"]]
    names = _stored_statistics(results["calibration_scores"][0])
    cals = {(s, f): build_calibration(calib, protocol, manifest, detector, s, f) for s in names for f in (0.01, 0.05)}
    results.update(calibration_summary(cals, clean_scores))
    for label, old in results["attacks"].items():
        damage = [r["damage_db"] for r in old["scores"]]
        results["attacks"][label] = attack_entry(cals, clean_scores, [_stored(r) for r in old["scores"]], damage) | {"scores": old["scores"]}
    (args.out / "union.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out / "union.md")


def _run_calibration(args: argparse.Namespace, direction_key: bytes | None = None) -> tuple[Any, Any, Any, Calibration]:
    """The model, its manifest, the detector (keyed when asked) and the calibration the
    benchmark's first run wrote to OUT/calibration.json, checked against them."""
    model, manifest = load_model(None)
    detector = detector_for(model, manifest, direction_key=direction_key)
    protocol = model_protocol(manifest)
    cal = Calibration.load(args.out / "calibration.json", manifest.sha256, protocol, DetectorKey.of(args.statistic, detector))
    return model, manifest, detector, cal


def adaptive_phase(args: argparse.Namespace) -> None:
    """The adaptive attacker (PGD that keeps the union under 0.9x its threshold, gradients
    through both components) against the calibration this benchmark made; beside each
    attack, the loss of the same head moved through the slice plane by the same budget
    (what any detector must let through, ``benchmarks.object_shift``) and the attack's
    excess over it."""
    model, manifest, detector, cal = _run_calibration(args)
    victims = [to_item(s) for s in simulated_slices("heldout", args.clean, detector.family, manifest.coils, seed=202)][: args.adaptive]
    floors = movement_floors(Defense(model, detector, cal, args.statistic), len(victims), manifest.coils, seed=202)
    clean = [observe(model, detector, it)[0] for it in victims]
    rows: list[dict[str, Any]] = []
    for budget in (0.3, 1.0, 3.0):
        for i, item in enumerate(tqdm(victims, desc=f"adaptive {budget:g} noise norms")):
            g = torch.Generator().manual_seed(5000 + i)
            y = adaptive_kspace_l2(model, item.op, item.y, budget * item.noise_norm, detector, args.statistic, cal.threshold, g, noise_sigma=item.sigma, scales=dict(cal.scales))
            obs = observe(model, detector, item, y=y)[0]
            value = cal.score_of(DetectionScores(**obs.scores))
            damage, floor = clean[i].psnr - obs.psnr, floors[i][budget]
            excess = None if floor is None else damage - floor
            rows.append({"budget": budget, "damage_db": damage, "score": value, "flagged": cal.flags(value), "floor_db": floor, "excess_db": excess})
    unflagged = [r["damage_db"] for r in rows if not r["flagged"]]
    adaptive = {"rows": rows, "max_unflagged_damage_db": max(unflagged) if unflagged else None, "flagged_rate": float(np.mean([r["flagged"] for r in rows]))}
    path = args.out / "union.json"
    if not path.exists():  # a calibration made apart (cycguard calibrate): the attacker's table alone
        (args.out / "adaptive.json").write_text(json.dumps({"statistic": args.statistic, "threshold": cal.threshold, "adaptive": adaptive}, indent=1))
        (args.out / "adaptive.md").write_text("\n".join([f"Adaptive attacker against {args.statistic} (threshold {cal.threshold:.4g}).", "", *_adaptive_lines(adaptive)]) + "\n")
        return
    results = json.loads(path.read_text())
    results["adaptive"] = adaptive
    path.write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out / "union.md")


def movement_floors(defense: Defense, count: int, coils: int, seed: int) -> list[dict[float, float | None]]:
    """Per victim (the first ``count`` clean test slices of ``seed``, in order), the loss of
    the same head moved through the slice plane by each budget, or ``None`` where 20 mm of
    movement does not spend it (``benchmarks.object_shift.victim_rows`` draws its victims as
    ``simulated_slices`` does)."""
    rng = np.random.default_rng(seed)
    floors = []
    for _ in tqdm(range(count), desc="head moved by each budget", unit="slice"):
        victim, _ = victim_rows(defense, rng, 20, coils)
        floors.append({r["budget"]: r.get("damage_db") for r in victim["rows"]})
    return floors


def confirm_phase(args: argparse.Namespace) -> None:
    """The deployed statistic alone on fresh slices: a clean test set and attacked copies of
    its first slices drawn with another seed (``--confirm SEED``), scored with only the
    passes the statistic needs at the calibration this benchmark made. A check that the
    tables' figures are not an accident of the slices a statistic was chosen on."""
    model, manifest, detector, cal = _run_calibration(args)
    items = [to_item(s) for s in simulated_slices("heldout", args.clean, detector.family, manifest.coils, seed=args.confirm)]

    components = _components(args.statistic)

    def scored(item: Any, y: torch.Tensor) -> tuple[float, float, dict[str, float]]:
        with torch.no_grad():
            x1 = model(item.op.adjoint(y), item.op)
        scores = detector.score_for(args.statistic, item.op, y, x1, item.sigma)
        return cal.score_of(scores), psnr(x1, item), {name: scores.get(name) for name in components}

    clean = [scored(it, it.y) for it in tqdm(items, desc=f"clean (seed {args.confirm})")]
    clean_values = [v for v, _, _ in clean]
    results: dict[str, Any] = {
        "statistic": args.statistic, "seed": args.confirm, "threshold": cal.threshold, "clean_slices": len(clean),
        "clean_fpr": float(np.mean([cal.flags(v) for v in clean_values])), "attacks": {},
        "clean_components": [c for _, _, c in clean],  # so that other scalings can be rescored
    }
    for name, budget, unit in ATTACKS:
        label = f"{name} {budget:g} {unit}"
        rows: list[dict[str, Any]] = []
        for i, item in enumerate(tqdm(items[: args.attacked], desc=label)):
            value, attacked_psnr, parts = scored(item, attack(name, budget, model, item, detector, 0.0, args.statistic, seed=1000 + i)["y"])
            rows.append({"damage_db": clean[i][1] - attacked_psnr, "score": value, "flagged": cal.flags(value), "components": parts})
        hits = [r["flagged"] for r in rows if r["damage_db"] >= 3]
        results["attacks"][label] = {
            "damage_db": float(np.mean([r["damage_db"] for r in rows])), "auc": auc(clean_values, [r["score"] for r in rows]),
            "tpr": float(np.mean([r["flagged"] for r in rows])), "damaging_3db": len(hits), "tpr_damaging_3db": float(np.mean(hits)) if hits else None, "rows": rows,
        }
    stem = args.out / f"confirm_{args.confirm}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [
        f"{args.statistic} at the calibration of {args.out / 'calibration.json'} (threshold {cal.threshold:.4g}), fresh slices (seed {args.confirm}): "
        f"clean FPR {results['clean_fpr']:.3f} on {len(clean)} slices.", "",
        "| attack (budget) | damage dB | AUC | TPR | n >= 3 dB | TPR on >= 3 dB |", "|---|---|---|---|---|---|",
    ]
    for label, e in results["attacks"].items():
        hit = e["tpr_damaging_3db"]
        lines.append(f"| {label} | {e['damage_db']:.2f} | {e['auc']:.3f} | {e['tpr']:.2f} | {e['damaging_3db']} | {'n/a' if hit is None else f'{hit:.2f}'} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


IMAGE_STATISTICS = ("prior_shift", "null_shift", "dc_spike", "shift_null_spike_union", "null_spike_union", "null_first_union")


def image_domain_phase(args: argparse.Namespace) -> None:
    """The paper's threat model (l-inf PGD on the zero-filled image, ``benchmarks.defense``'s
    ``image-linf``) against the shift statistics and their unions. An image has no measured
    k-space: the detector scores it with the CG pseudo-inverse ``y(x)``, so the calibration
    (seed 101) and clean test slices (``--test-seed``) take the same path
    (``benchmarks.defense.image_domain_phase`` explains why). Only the shift pass and the
    cycle's (no folds)."""
    from recon.mitigate.cyclic import k_from_image

    model, manifest = load_model(None)
    detector = detector_for(model, manifest)
    protocol = model_protocol(manifest)

    def scored(item: Any, x: torch.Tensor) -> tuple[DetectionScores, float]:
        with torch.no_grad():
            x1 = model(x, item.op)
            return detector.score_for("shift_null_spike_union", item.op, k_from_image(item.op, x), x1, item.sigma), psnr(x1, item)

    def slices(seed: int) -> list[Any]:
        return [to_item(s) for s in simulated_slices("heldout", args.clean, detector.family, manifest.coils, seed=seed)]

    calib = [scored(it, it.x_zf)[0] for it in tqdm(slices(101), desc="clean calibration (image path)")]
    test_items = slices(args.test_seed)
    clean = [scored(it, it.x_zf) for it in tqdm(test_items, desc="clean test (image path)")]
    cals = {s: build_calibration(calib, protocol, manifest, detector, s, 0.01) for s in IMAGE_STATISTICS}
    results: dict[str, Any] = {
        "clean_slices": len(clean), "test_seed": args.test_seed,
        "clean_fpr": {s: float(np.mean([c.flags(c.score_of(o)) for o, _ in clean])) for s, c in cals.items()},
        "budgets": {},
    }
    for budget in (0.001, 0.003, 0.01):
        rows = []
        for i, item in enumerate(tqdm(test_items[: args.attacked], desc=f"image-linf {budget:g}")):
            adv = attack("image-linf", budget, model, item, detector, 0.0, args.statistic, seed=1000 + i)
            score, attacked_psnr = scored(item, adv["x"])
            rows.append((score, clean[i][1] - attacked_psnr))
        damaging = [o for o, d in rows if d >= 3]
        results["budgets"][f"{budget:g}"] = {
            "damage_db": float(np.mean([d for _, d in rows])), "damaging_3db": len(damaging),
            "auc": {s: auc([c.score_of(o) for o, _ in clean], [c.score_of(o) for o, _ in rows]) for s, c in cals.items()},
            "tpr": {s: float(np.mean([c.flags(c.score_of(o)) for o, _ in rows])) for s, c in cals.items()},
            "tpr_damaging_3db": {s: float(np.mean([c.flags(c.score_of(o)) for o in damaging])) if damaging else None for s, c in cals.items()},
        }
    (args.out / "image_domain.json").write_text(json.dumps(results, indent=1))
    names = " / ".join(IMAGE_STATISTICS)
    lines = [
        f"Image-domain l-inf PGD, clean slices through the same image path (seed 101 calibration, seed {args.test_seed} test, {len(clean)} slices each).", "",
        f"| l-inf budget x max|x_zf| | damage dB | n >= 3 dB | AUC {names} | TPR@1% {names} | TPR@1% on >= 3 dB {names} |", "|---|---|---|---|---|---|",
    ]
    for budget, e in results["budgets"].items():
        cells = [" / ".join(f"{e['auc'][s]:.3f}" for s in IMAGE_STATISTICS), " / ".join(f"{e['tpr'][s]:.2f}" for s in IMAGE_STATISTICS)]
        cells.append(" / ".join("n/a" if e["tpr_damaging_3db"][s] is None else f"{e['tpr_damaging_3db'][s]:.2f}" for s in IMAGE_STATISTICS))
        lines.append(f"| {budget} | {e['damage_db']:.2f} | {e['damaging_3db']} | {' | '.join(cells)} |")
    lines += ["", "Clean FPR (image path, 1 % target): " + ", ".join(f"{s} {v:.3f}" for s, v in results["clean_fpr"].items())]
    (args.out / "image_domain.md").write_text("\n".join(lines) + "\n")


KEY = b"benchmark site key"  # any secret the attacker does not have


def keyed_phase(args: argparse.Namespace) -> None:
    """A detector keyed by a site secret against the calibration this benchmark made (with
    the public seed): clean FPR on the same clean test slices, and the adaptive attacker who
    has everything but the key, plain (public seed) and with fresh random starts per step."""
    model, manifest, keyed, cal = _run_calibration(args, KEY)
    items = [to_item(s) for s in simulated_slices("heldout", args.clean, keyed.family, manifest.coils, seed=202)]
    clean = [observe(model, keyed, it)[0] for it in tqdm(items, desc="clean test, keyed")]  # the victims' clean PSNR too
    clean_scores = [cal.score_of(DetectionScores(**o.scores)) for o in clean]
    victims = items[: args.keyed]
    rows = []
    for resample in (False, True):
        for budget in (0.3, 1.0, 3.0):
            for i, item in enumerate(tqdm(victims, desc=f"adaptive {budget:g} noise norms{', resampled' if resample else ''}")):
                g = torch.Generator().manual_seed(5000 + i)
                y = adaptive_kspace_l2(model, item.op, item.y, budget * item.noise_norm, keyed, args.statistic, cal.threshold, g, noise_sigma=item.sigma, scales=dict(cal.scales), resample_directions=resample)
                obs = observe(model, keyed, item, y=y)[0]
                value = cal.score_of(DetectionScores(**obs.scores))
                rows.append({"resample": resample, "budget": budget, "damage_db": clean[i].psnr - obs.psnr, "score": value, "flagged": cal.flags(value)})
    path = args.out / "union.json"
    results = json.loads(path.read_text())
    results["keyed"] = {"clean_fpr": float(np.mean([cal.flags(v) for v in clean_scores])), "clean_slices": len(clean_scores), "threshold": cal.threshold, "adaptive": rows}
    path.write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out / "union.md")


def write_markdown(results: dict[str, Any], path: Path) -> None:
    deployed = results.get("statistic", "holdout_union")  # older files hold holdout_union
    names = [s for s in STATISTICS if s in next(iter(results["attacks"].values()))["auc"]]
    short = " / ".join("prior+spike" if s == "shift_spike_union" else s.replace("holdout_", "").replace("prior_", "") for s in names)
    lines = [
        f"Deployed: {deployed}.",
        "",
        f"| attack (budget) | damage dB | n >= 3 dB | AUC {short} | TPR@1% {short} | TPR@5% {short} | deployed TPR@1% on >= 3 dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, e in results["attacks"].items():
        a = " / ".join(f"{e['auc'][s]:.3f}" for s in names)
        t1 = " / ".join(f"{e['tpr'][f'{s}@0.01']:.2f}" for s in names)
        t5 = " / ".join(f"{e['tpr'][f'{s}@0.05']:.2f}" for s in names)
        hit = e["tpr_damaging_3db"][f"{deployed}@0.01"]
        lines.append(f"| {label} | {e['damage_db']:.2f} | {e['damaging_3db']} | {a} | {t1} | {t5} | {'n/a' if hit is None else f'{hit:.2f}'} |")
    lines += ["", "Clean FPR at the calibrated thresholds: " + ", ".join(f"{k} {v:.3f}" for k, v in results["clean_fpr"].items())]
    lines += ["", "Thresholds: " + ", ".join(f"{k} {v:.4g}" for k, v in results["thresholds"].items())]
    lines += [f"Detection: {results['seconds_detect']:.2f} s per slice (median, clean test)"]
    adaptive = results.get("adaptive")
    if adaptive:
        lines += ["", *_adaptive_lines(adaptive)]
    keyed = results.get("keyed")
    if keyed:
        lines += ["", f"Site-keyed detector at the same calibration (threshold {keyed['threshold']:.4g}): clean FPR {keyed['clean_fpr']:.3f} on {keyed['clean_slices']} clean test slices.", ""]
        lines += ["| adaptive attacker without the key | budget | flagged | damage dB of unflagged (mean / max) |", "|---|---|---|---|"]
        for resample in (False, True):
            for budget in sorted({r["budget"] for r in keyed["adaptive"]}):
                rows = [r for r in keyed["adaptive"] if r["budget"] == budget and r["resample"] == resample]
                lines.append(f"| {'random starts per step' if resample else 'public seed'} | {budget:g} noise norms | {_flagged_and_spread(rows)} |")
    path.write_text("\n".join(lines) + "\n")


def _adaptive_lines(adaptive: dict[str, Any]) -> list[str]:
    """The adaptive attacker's table, one row per budget."""
    lines = [
        "| adaptive attacker budget | flagged | damage dB of unflagged (mean / max) | head moved by the budget, loss dB (mean / max) | excess of the unflagged over it dB (mean / max) |",
        "|---|---|---|---|---|",
    ]
    for budget in sorted({r["budget"] for r in adaptive["rows"]}):
        rows = [r for r in adaptive["rows"] if r["budget"] == budget]
        floors = [r["floor_db"] for r in rows if r.get("floor_db") is not None]
        excess = [r["excess_db"] for r in rows if not r["flagged"] and r.get("excess_db") is not None]
        cells = [f"{np.mean(v):.1f} / {max(v):.1f}" if v else "-" for v in (floors, excess)]
        lines.append(f"| {budget:g} noise norms | {_flagged_and_spread(rows)} | {' | '.join(cells)} |")
    return lines


def _flagged_and_spread(rows: list[dict[str, Any]]) -> str:
    """``flagged N of M | mean / max damage of the unflagged`` cells of an adaptive table."""
    kept = [r["damage_db"] for r in rows if not r["flagged"]]
    spread = f"{np.mean(kept):.1f} / {max(kept):.1f}" if kept else "none unflagged"
    return f"{sum(r['flagged'] for r in rows)} of {len(rows)} | {spread}"


if __name__ == "__main__":
    main()
