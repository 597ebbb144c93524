"""``cycguard``: the command line.

Sub-commands:

* ``demo``: reconstruct the bundled demo raw file and write images plus a report.
* ``recon IN.h5 -o OUT.h5``: reconstruct a raw file.
* ``train``: retrain the default network (needs the ``data`` extra).
* ``calibrate``: threshold the detector on clean slices for a target false-positive rate.
* ``make-demo``: regenerate the bundled demo raw file and its reference (``data`` extra).

Results and summaries go to stdout; logs and progress bars to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("cycguard")


def _out(text: str) -> None:
    """Results for the person at the terminal. Only the command line writes to stdout:
    gadget modules, which Gadgetron runs with stdout as its data pipe, never do."""
    sys.stdout.write(text + "\n")


def _summary(rows: Sequence[object]) -> str:
    lines = [f"{'slice':<18} {'verdict':<11} {'PSNR dB':>8} {'SSIM':>6} {'ZF PSNR':>8} {'sec':>6}"]
    for row in rows:
        q, z = row.quality, row.quality_zero_filled  # type: ignore[attr-defined]
        psnr = f"{q.psnr:8.2f} {q.ssim:6.3f}" if q else f"{'-':>8} {'-':>6}"
        zf = f"{z.psnr:8.2f}" if z else f"{'-':>8}"
        seconds = sum(row.timings.values())  # type: ignore[attr-defined]
        lines.append(f"{row.name:<18} {row.verdict:<11} {psnr} {zf} {seconds:6.2f}")  # type: ignore[attr-defined]
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from recon.data.demo import DEMO_RAW, DEMO_REFERENCE
    from recon.offline import reconstruct_file

    out_dir = Path(args.out)
    result = reconstruct_file(
        DEMO_RAW, out_dir / "demo_images.h5", out_dir / "report", DEMO_REFERENCE, args.weights, args.device, calibration=args.calibration
    )
    _out(_summary(result.rows))
    _out(f"images: {result.images}\nreport: {result.report_html}")
    return 0


def _cmd_recon(args: argparse.Namespace) -> int:
    from recon.offline import reconstruct_file

    out = Path(args.output)
    report = Path(args.report) if args.report else out.with_suffix("").with_name(out.stem + "_report")
    result = reconstruct_file(
        Path(args.input), out, report, Path(args.reference) if args.reference else None, args.weights, args.device, calibration=args.calibration
    )
    _out(_summary(result.rows))
    _out(f"images: {result.images}\nreport: {result.report_html}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from recon.train import TrainConfig, train

    config = TrainConfig(steps=args.steps, pool=args.pool, seed=args.seed, val_every=args.val_every, workers=args.workers)
    weights = train(config, Path(args.out), name=args.name)
    _out(f"weights: {weights}\nmanifest: {weights.with_suffix('.json')}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from recon.calibrate import (
        build_calibration,
        default_calibration_path,
        detector_for,
        scores_from_raw,
        scores_from_simulation,
    )
    from recon.models.weights import load_model

    model, manifest = load_model(args.weights)
    if bool(args.raw) == bool(args.simulate):
        raise ValueError("give clean raw files or --simulate N (not both)")
    if args.raw:
        scores, protocol = scores_from_raw([Path(p) for p in args.raw], model, manifest)
    else:
        scores, protocol = scores_from_simulation(args.simulate, model, manifest, seed=args.seed)
    detector = detector_for(model, manifest, protocol.acs_lines)
    calibration = build_calibration(scores, protocol, manifest, detector, args.statistic, args.fpr)
    out = Path(args.output) if args.output else default_calibration_path(manifest)
    calibration.save(out)
    _out(f"calibration: {out}\nstatistic {args.statistic}, {len(scores)} clean slices, threshold {calibration.threshold:.6g} for FPR {args.fpr:g}")
    return 0


def _cmd_make_demo(args: argparse.Namespace) -> int:
    from recon.data.demo import make_demo

    raw, reference = make_demo(Path(args.out), seed=args.seed)
    _out(f"raw: {raw}\nreference: {reference}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cycguard``."""
    from recon.data.demo import DEMO_DIR
    from recon.train import TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="cycguard", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="reconstruct the bundled demo raw file, with a report")
    demo.add_argument("--out", default="cycguard-demo", help="output folder (default: ./cycguard-demo)")
    demo.add_argument("--weights", type=Path, default=None, help="network weights (.pt with .json manifest)")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    demo.add_argument("--calibration", type=Path, default=None, help="detection calibration (default: shipped)")
    demo.set_defaults(func=_cmd_demo)

    recon = sub.add_parser("recon", help="reconstruct an ISMRMRD raw file")
    recon.add_argument("input", help="ISMRMRD raw .h5")
    recon.add_argument("-o", "--output", required=True, help="ISMRMRD image .h5 to write")
    recon.add_argument("--report", help="report folder (default: OUTPUT_report)")
    recon.add_argument("--reference", help="ISMRMRD image .h5 with one reference per slice")
    recon.add_argument("--weights", type=Path, default=None)
    recon.add_argument("--device", default="auto")
    recon.add_argument("--calibration", type=Path, default=None, help="detection calibration (default: shipped)")
    recon.set_defaults(func=_cmd_recon)

    train = sub.add_parser("train", help="retrain the default network (needs cycguard[data])")
    train.add_argument("--out", default="cycguard-train", help="folder for weights, manifest, checkpoint")
    train.add_argument("--name", default="modl_default")
    train.add_argument("--steps", type=int, default=defaults.steps)
    train.add_argument("--pool", type=int, default=defaults.pool, help="simulated training samples")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--val-every", type=int, default=defaults.val_every)
    train.add_argument("--workers", type=int, default=defaults.workers)
    train.set_defaults(func=_cmd_train)

    cal = sub.add_parser("calibrate", help="calibrate the detection threshold on clean slices")
    cal.add_argument("raw", nargs="*", help="clean ISMRMRD raw files of one protocol")
    cal.add_argument("--simulate", type=int, default=0, help="use N simulated held-out slices instead (needs cycguard[data])")
    cal.add_argument("--seed", type=int, default=101, help="seed of the simulated slices")
    cal.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    cal.add_argument(
        "--statistic",
        default="cyclic_noise",
        choices=["cyclic_noise", "cyclic", "cycle_image", "dc", "dc_noise"],
        help="detection statistic (default cyclic_noise; see recon/detect/cyclic.py)",
    )
    cal.add_argument("--weights", type=Path, default=None)
    cal.add_argument("-o", "--output", help="calibration JSON (default: beside the weights)")
    cal.set_defaults(func=_cmd_calibrate)

    make_demo = sub.add_parser("make-demo", help="regenerate the demo raw file (needs cycguard[data])")
    make_demo.add_argument("--out", default=str(DEMO_DIR))
    make_demo.add_argument("--seed", type=int, default=2026)
    make_demo.set_defaults(func=_cmd_make_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cycguard`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, ImportError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
