"""``cycguard``: the command line.

Sub-commands:

* ``demo``: replay the bundled demo raw file through the red-team chain (two slices
  attacked) and show each slice's verdict, with the report's path.
* ``replay IN.h5 -c PIPELINE -o OUT.h5``: a raw file through a Gadgetron pipeline, each
  ``<external>`` node launched as Gadgetron launches it.
* ``check PIPELINE...``: validate pipelines (names what is wrong).
* ``recon IN.h5 -o OUT.h5``: reconstruct a raw file in process (no gadgets).
* ``train``: retrain the default network (needs the ``data`` extra).
* ``calibrate``: threshold the detector on clean slices for a target false-positive rate.
* ``make-demo``: regenerate the bundled demo raw file and its reference (``data`` extra).

Results and summaries go to stdout; logs and progress bars to stderr.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("cycguard")
# simulated clean slices of a site's protocol for `calibrate --like` (a 1 % target needs 99 at least)
LIKE_SLICES = 300


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
    return "\n".join(lines + [_counts(rows)])


def _verdicts(result: Any) -> str:
    rows = result.rows
    lines = [f"{'slice':<16} {'attacked':<9} {'verdict':<11} {'score':>8} {'thresh':>8} {'PSNR dB':>8} {'received':>8} {'sec':>6}"]
    for row in rows:
        attacked = "-" if row.attacked is None else ("yes" if row.attacked else "no")
        score = f"{row.score:8.3f}" if row.score is not None else f"{'-':>8}"
        threshold = f"{row.threshold:8.3f}" if row.threshold is not None else f"{'-':>8}"
        psnr = f"{row.quality.psnr:8.2f}" if row.quality else f"{'-':>8}"
        before = f"{row.received_quality.psnr:8.2f}" if row.received_quality else f"{'-':>8}"  # a rewritten slice as received
        lines.append(f"{row.name:<16} {attacked:<9} {row.verdict:<11} {score} {threshold} {psnr} {before} {sum(row.timings.values()):6.2f}")
    return "\n".join(lines + [_counts(rows)])


def _counts(rows: Sequence[Any]) -> str:
    from recon.report import verdict_counts

    return "verdicts: " + ", ".join(f"{verdict} {n}" for verdict, n in verdict_counts(rows).items())


def _report_replay(result: Any) -> int:
    _out(_verdicts(result))
    _out(f"images: {result.output} (group {result.group!r})\nreport: {result.report_html}")
    if result.dicom_files:
        _out(f"DICOM: {result.dicom_files} files")
    if result.pacs_pending is not None:
        _out(f"PACS: {result.pacs_pending} image(s) pending in {result.spool}" + (" (resent on the next run or `cycguard pacs push`)" if result.pacs_pending else ""))
    for failure in result.failures:
        log.error("FAILED: %s", failure)
    return 0 if result.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from gadgets.runner.replay import replay
    from recon.data.demo import DEMO_RAW, DEMO_REFERENCE

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / "demo_images.h5"
    output.unlink(missing_ok=True)  # the demo's own output folder: rerunning replaces it
    dicom = out_dir / "dicom"
    if dicom.is_dir():
        shutil.rmtree(dicom)  # the demo's own output folder: rerunning replaces it
    result = replay(DEMO_RAW, args.pipeline, output, out_dir / "report", DEMO_REFERENCE, group="images", in_process=args.in_process, dicom=dicom)
    return _report_replay(result)


def _cmd_replay(args: argparse.Namespace) -> int:
    from gadgets.runner.batch import is_archive
    from gadgets.runner.replay import replay

    if is_archive(args.input):
        return _replay_batch(args)
    if args.scheduler or args.workers or args.slices_per_task:
        raise ValueError("--scheduler, --workers and --slices-per-task are for several raw files (a folder, a glob, a list file)")
    out = Path(args.output)
    report = Path(args.report) if args.report else out.with_suffix("").with_name(out.stem + "_report")
    result = replay(
        Path(args.input[0]), args.config, out, report, Path(args.reference) if args.reference else None,
        group=args.group, in_process=args.in_process, threads=args.threads,
        dicom=Path(args.dicom) if args.dicom else None, pacs=args.pacs, spool=Path(args.spool) if args.spool else None, calling_aet=args.calling_aet,
    )
    return _report_replay(result)


def _replay_batch(args: argparse.Namespace) -> int:
    """``replay`` of several raw files: one Dask task a file, into the folder ``-o``."""
    from gadgets.runner.batch import replay_many

    unsupported = [name for name in ("report", "reference", "group", "dicom", "pacs", "spool") if getattr(args, name)]
    if unsupported:
        raise ValueError(f"--{', --'.join(unsupported)}: for one raw file only (several write per-file reports into the -o folder)")
    summary = replay_many(
        args.input, args.config, Path(args.output), scheduler=args.scheduler, workers=args.workers, memory_limit=args.memory_limit,
        in_process=not args.over_the_wire, threads=args.threads, slices_per_task=args.slices_per_task,
    )
    _out(f"files: {', '.join(f'{k} {v}' for k, v in summary.statuses().items())}; images: {', '.join(f'{k} {v}' for k, v in sorted(summary.verdicts().items()))}")
    _out(f"summary: {summary.summary_html}")
    for outcome in summary.files:
        if outcome.status == "failed":
            log.error("FAILED %s: %s", outcome.raw, "; ".join(outcome.failures))
    return 0 if summary.ok else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from gadgets.runner.config import check_pipeline, load_pipeline

    status = 0
    for name in args.pipelines:
        try:
            pipeline = load_pipeline(name)
            warnings = check_pipeline(pipeline, connect_stages=args.connect_stages)
        except ValueError as err:
            _out(f"FAIL {name}: {err}")
            status = 1
            continue
        _out(f"ok   {name} ({len(pipeline.nodes)} nodes: {', '.join(_node_name(n) for n in pipeline.nodes)})")
        if pipeline.distributed:
            start, end = pipeline.span
            nodes = f"node {end} runs" if end == start + 1 else f"nodes {start + 1}-{end} run"
            _out(f"     distributed: {nodes} on Gadgetron workers ({pipeline.distributed}); replay and serve run the block in line")
        for warning in warnings:
            _out(f"     warning: {warning}")
    return status


def _cmd_serve(args: argparse.Namespace) -> int:
    from gadgets.runner.server import serve

    return serve(args.bind, args.port, args.threads, args.allow_redteam, args.max_sessions, args.tls_cert, args.tls_key, args.grace, args.hello_timeout)


def _cmd_send(args: argparse.Namespace) -> int:
    from gadgets.runner.client import query, send

    if args.query:
        _out(query(args.host, args.port, args.query, tls_ca=args.tls_ca))
        return 0
    if not args.input or not args.output:
        raise ValueError("send needs IN.h5 and -o OUT.h5 (or --query)")
    result = send(
        Path(args.input), Path(args.output), args.config, Path(args.config_script) if args.config_script else None,
        args.host, args.port, args.group, args.pace, args.tr_ms, tls_ca=args.tls_ca,
    )
    if result.images:
        _out(_image_verdicts(result.output, result.group))
    _out(f"{result.images} image(s) in {result.output} (group {result.group!r}), {result.seconds:.1f} s")
    if result.latency:
        values = sorted(result.latency.values())
        _out(f"latency (last acquisition -> image): median {values[len(values) // 2]:.3f} s, worst {values[-1]:.3f} s")
    for error in result.errors:
        log.error("%s", error)
    return 0 if result.ok else 1


def _image_verdicts(path: Path, group: str) -> str:
    """Each image's slice and verdict, as ``replay`` prints them."""
    import h5py
    import ismrmrd

    lines = [f"{'slice':<16} {'verdict':<11} {'score':>8} {'thresh':>8}"]
    with h5py.File(path, "r") as handle:
        for series in handle[group].values():
            if not isinstance(series, h5py.Group) or "header" not in series:
                continue
            for head, text in zip(series["header"][()], series["attributes"][()], strict=True):
                meta = ismrmrd.Meta.deserialize(text.decode() if isinstance(text, bytes) else str(text))

                def value(key: str, meta: ismrmrd.Meta = meta) -> str:
                    found = meta[key] if key in meta else "-"
                    return str(found[0] if isinstance(found, list) else found)

                name = f"slice {head['slice']} rep {head['repetition']}"
                lines.append(f"{name:<16} {value('CycGuard.Verdict'):<11} {value('CycGuard.Score'):>8} {value('CycGuard.Threshold'):>8}")
    return "\n".join(lines)


def _cmd_pipelines(args: argparse.Namespace) -> int:
    import re

    from gadgets.runner.config import installed_pipelines

    shipped = installed_pipelines()
    for name, path in sorted(shipped.items()):
        comment = re.search(r"<!--\s*(.*?)\s*-->", path.read_text(), re.S)
        summary = " ".join(comment.group(1).split()) if comment else ""
        _out(f"{name:<20} {summary.removeprefix('CycGuard: ')}")
    folder = next(iter(shipped.values())).parent if shipped else None
    _out(f"\nfiles: {folder}/*.xml (copy them into Gadgetron's share/gadgetron/config/ to use them there)")
    return 0


def _cmd_workers(args: argparse.Namespace) -> int:
    from gadgets.workers import WORKERS_ENV, answering, configured, discovery_output

    try:
        workers = configured(args.workers)
    except ValueError as err:
        log.error("%s", err)
        return 2
    if not workers:
        log.error("no workers: name them (host:port ...) or set %s", WORKERS_ENV)
        return 2
    alive = answering(workers, args.timeout)
    if not alive:
        log.error("none of the %d worker(s) answers: Gadgetron runs the distributed stream on the main node", len(workers))
        return 1
    _out(discovery_output(alive))
    return 0


def _cmd_pacs(args: argparse.Namespace) -> int:
    from gadgets.params import ExportSettings
    from recon.io.pacs import PacsTarget, Pusher, destinations, rejected

    root = Path(args.spool or ExportSettings().spool_folder())
    found = destinations(root) if root.is_dir() else []
    if args.destination:
        wanted = PacsTarget.parse(args.destination, args.calling_aet)
        found = [(t, f) for t, f in found if (t.ae_title, t.host, t.port, t.calling_ae) == (wanted.ae_title, wanted.host, wanted.port, wanted.calling_ae)]
        if not found:
            raise ValueError(f"no spool for {wanted} under {root}")
    if not found:
        _out(f"no destination has a spool under {root}")
        return 0
    status = 0
    for target, folder in found:
        if args.action == "push":
            pusher = Pusher(target, root, timeout=args.timeout)
            sent = pusher.flush()
            _out(f"{target}: {sent} delivered now")
        pending = sorted(folder.glob("*.dcm"))
        refused = rejected(folder)
        _out(f"{target}: {len(pending)} pending, {len(refused)} rejected ({folder})")
        for path, reason in refused:
            _out(f"  rejected {path.name}: {reason}")
        if args.action == "push" and (pending or refused):
            status = 1
    return status


def _node_name(node: Any) -> str:
    return str(getattr(node, "classname", None) or node.name)


def _cmd_recon(args: argparse.Namespace) -> int:
    from recon.offline import reconstruct_file

    out = Path(args.output)
    report = Path(args.report) if args.report else out.with_suffix("").with_name(out.stem + "_report")
    result = reconstruct_file(
        Path(args.input), out, report, Path(args.reference) if args.reference else None, args.weights, args.device, calibration=args.calibration,
        on_missing=None if args.calibration or args.no_auto_calibrate else _background_calibration(str(args.weights or ""), args.auto_calibrate_slices),
    )
    _out(_summary(result.rows))
    _out(f"images: {result.images}\nreport: {result.report_html}")
    return 0


def _at_least(low: int) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _background_calibration(weights: str, slices: int) -> Any:
    """For ``cycguard recon``: a protocol without calibration gets one made in the background,
    as the detect stage does (:mod:`gadgets.autocalibrate`; ``CYCGUARD_AUTO_CALIBRATE=off``
    turns it off); its slices carry the job's state."""
    from gadgets import autocalibrate
    from recon.detect.defense import cached_calibration_path, model_protocol

    if not autocalibrate.auto_calibration_allowed():
        return None

    def on_missing(protocol: Any, manifest: Any, seed: Any, why: str) -> str:
        if protocol == model_protocol(manifest):  # the shipped calibration is missing or broken: not simulated over
            return why
        target = cached_calibration_path(manifest, protocol)
        return autocalibrate.ensure(target, seed, weights, slices, why)

    return on_missing


def _cmd_train(args: argparse.Namespace) -> int:
    from recon.train import TrainConfig, train

    config = TrainConfig(steps=args.steps, pool=args.pool, seed=args.seed, val_every=args.val_every, workers=args.workers)
    weights = train(config, Path(args.out), name=args.name)
    _out(f"weights: {weights}\nmanifest: {weights.with_suffix('.json')}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if not args.progress_file:
        return _calibrate(args)
    from gadgets.autocalibrate import finish  # a background job: its pending file tells the stages how it went

    try:
        status = _calibrate(args)
    except Exception as err:
        finish(Path(args.progress_file), f"{type(err).__name__}: {err}")
        raise
    finish(Path(args.progress_file), None)
    return status


def _calibrate(args: argparse.Namespace) -> int:
    from recon.calibrate import LikeSeed, build_calibration, scores_from_raw, scores_from_simulation, scores_like
    from recon.detect.defense import cached_calibration_path, default_calibration_path, detector_for, model_protocol
    from recon.detect.statistics import COMBINATIONS
    from recon.models.weights import load_model

    model, manifest = load_model(args.weights)
    if sum((bool(args.raw), bool(args.like))) + (bool(args.simulate) and not args.like) != 1:
        raise ValueError("give clean raw files, --like SCAN.h5 [--simulate N], or --simulate N (one of them)")
    started = time.monotonic()
    if args.raw:
        scores, protocol = scores_from_raw([Path(p) for p in args.raw], model, manifest, statistic=args.statistic)
        source = f"clean scans: {', '.join(Path(p).name for p in args.raw)} ({len(scores)} slices)"
    elif args.like:
        from gadgets.autocalibrate import progress_writer

        count = args.simulate or LIKE_SLICES
        like = LikeSeed.load(Path(args.like)) if args.like.endswith(".npz") else LikeSeed.of_scan(Path(args.like), manifest)
        progress = progress_writer(Path(args.progress_file)) if args.progress_file else None
        scores, protocol, levels = scores_like(like, count, model, manifest, seed=args.seed, statistic=args.statistic, on_progress=progress)
        _out(f"simulated {count} clean slices of {protocol.describe()} with the coil maps of {like.origin}, signal levels {levels[0]:.3g}-{levels[1]:.3g}")
        source = f"simulated: {count} held-out MNI152 brain slices (augmented) with the coil maps of {like.origin}, unit noise"
    else:
        scores, protocol = scores_from_simulation(args.simulate, model, manifest, seed=args.seed, statistic=args.statistic)
        source = f"simulated: {args.simulate} held-out MNI152 brain slices (augmented), birdcage coil model, correlated noise"
    seconds = time.monotonic() - started
    detector = detector_for(model, manifest, protocol)
    calibration = build_calibration(scores, protocol, manifest, detector, args.statistic, args.fpr, source)
    if args.output:
        out = Path(args.output)
    else:  # the model's protocol beside the weights; a site's protocol in the calibration cache, where the stages look
        out = default_calibration_path(manifest) if protocol == model_protocol(manifest) else cached_calibration_path(manifest, protocol)
    out.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(out)
    _out(f"calibration: {out}\nstatistic {args.statistic}, {len(scores)} clean slices, threshold {calibration.threshold:.6g} for FPR {args.fpr:g}")
    _out(f"scored in {seconds:.0f} s ({seconds / max(len(scores), 1):.2f} s a slice)\ncovers {source}")
    if args.like:
        _out("made by simulation: clean scans of the protocol make a stronger calibration (cycguard calibrate CLEAN.h5 ...); "
             "on real files of new protocols such calibrations flagged 2.5-25 % of clean slices, not the target rate "
             "(benchmarks/RESULTS.md section 13)")
    if calibration.scales:
        _out("scales: " + ", ".join(f"{name} {scale:.4g}" for name, scale in calibration.scales))
    if calibration.gates:
        _out("mitigation gates: " + ", ".join(f"{name} {gate:.4g}" for name, gate in calibration.gates))
    if calibration.signal_range is not None:
        low, high = calibration.signal_range
        _out(f"covers signal levels {low:.3g}-{high:.3g} noise sigmas (ACS RMS); a slice outside cannot be clean (unverified)")
    _out(
        f"mitigation rewrites only a flagged slice scoring above {calibration.clean_max:.6g}, the largest of the {len(scores)} clean "
        "scores (rewrite_beyond_clean)"
    )
    backstops = COMBINATIONS[args.statistic].backstops if args.statistic in COMBINATIONS else ()
    if backstops:  # each scaled by the largest clean value: a new clean slice exceeds it with probability up to 1 / (n + 1)
        bound = args.fpr + len(backstops) / (len(scores) + 1)
        _out(f"backstops: {', '.join(backstops)} (false-positive rate on new clean slices up to {bound:.3g}; more clean slices lower it)")
    return 0


def _cmd_make_demo(args: argparse.Namespace) -> int:
    from recon.data.demo import make_demo

    raw, reference = make_demo(Path(args.out), seed=args.seed)
    _out(f"raw: {raw}\nreference: {reference}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cycguard``."""
    from recon.data.demo import DEMO_DIR
    from recon.detect.statistics import DEFAULT_STATISTIC, PRODUCT_CHOICES
    from recon.train import TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="cycguard", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="replay the bundled demo raw file through the red-team chain, with a report")
    demo.add_argument("--out", default="cycguard-demo", help="output folder (default: ./cycguard-demo)")
    demo.add_argument("--pipeline", default="redteam", help="pipeline name or XML (default: redteam)")
    demo.add_argument("--in-process", action="store_true", help="run the gadget stages in this process (no sockets)")
    demo.set_defaults(func=_cmd_demo)

    rep = sub.add_parser("replay", help="replay an ISMRMRD raw file through a Gadgetron pipeline")
    rep.add_argument("input", nargs="+", help="ISMRMRD raw .h5; several, a folder, a glob or a list file (.txt): replayed on a Dask cluster")
    rep.add_argument("-c", "--config", required=True, help="pipeline: installed name (recon, detect, defended, redteam, ...) or XML file")
    rep.add_argument("-o", "--output", required=True, help="ISMRMRD .h5 for the images (appended as a new group); for several inputs, a folder")
    rep.add_argument("-G", "--group", default=None, help="HDF5 group of the images (default: date and time, as gadgetron_ismrmrd_client)")
    rep.add_argument("--report", help="report folder (default: OUTPUT_report)")
    rep.add_argument("--reference", help="ISMRMRD image .h5 with one reference per slice (adds PSNR/SSIM)")
    rep.add_argument("--in-process", action="store_true", help="run the gadget stages in this process (no sockets)")
    rep.add_argument("--threads", type=int, default=None, help="torch threads per gadget process (default: cores / gadgets; several inputs: per file's task, default cores / workers)")
    rep.add_argument("--dicom", help="also write DICOM files into this folder (the pipeline needs gadgets.export)")
    rep.add_argument("--pacs", help="push DICOM by C-STORE to AET@host:port; unacknowledged images stay spooled")
    rep.add_argument("--spool", help="spool folder for the PACS (default ~/.local/state/cycguard/spool)")
    rep.add_argument("--calling-aet", default="CYCGUARD", help="our AE title (default CYCGUARD)")
    rep.add_argument("--scheduler", help="several inputs: an existing Dask scheduler's address (default: a local cluster)")
    rep.add_argument("--workers", type=int, default=None, help="several inputs: local worker processes (default: the cores)")
    rep.add_argument("--slices-per-task", type=int, default=0, help="several inputs: split files of more slices into tasks of this many (default 0: a task a file)")
    rep.add_argument("--memory-limit", default="6GiB", help="several inputs: memory per local worker (default 6GiB; past it Dask restarts the worker)")
    rep.add_argument("--over-the-wire", action="store_true", help="several inputs: each stage as its own gadget process (default: in each worker's process)")
    rep.set_defaults(func=_cmd_replay)

    srv = sub.add_parser("serve", help="serve Gadgetron's client protocol with CycGuard pipelines")
    srv.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback; the protocol has no authentication)")
    srv.add_argument("--port", type=int, default=9002)
    srv.add_argument("--threads", type=int, default=None, help="torch threads per gadget process")
    srv.add_argument("--allow-redteam", action="store_true", help="let clients run pipelines with the attack stage")
    srv.add_argument("--max-sessions", type=int, default=4, help="sessions at once; more wait for a slot (default 4; each runs its own gadget processes)")
    srv.add_argument("--tls-cert", help="PEM certificate: serve over TLS (with --tls-key)")
    srv.add_argument("--tls-key", help="PEM private key of --tls-cert")
    srv.add_argument("--grace", type=float, default=60.0, help="on SIGTERM, seconds the sessions in flight get to finish before they are ended with an error (default 60; a second signal stops at once)")
    srv.add_argument("--hello-timeout", type=float, default=10.0, help="seconds a client has to send configuration and header; no session slot is held before (default 10)")
    srv.set_defaults(func=_cmd_serve)

    snd = sub.add_parser("send", help="send a raw file to a Gadgetron-protocol server, write the images")
    snd.add_argument("input", nargs="?", help="ISMRMRD raw .h5")
    snd.add_argument("-o", "--output", help="ISMRMRD .h5 for the images")
    which = snd.add_mutually_exclusive_group()
    which.add_argument("-c", "--config", help="pipeline name on the server (CONFIG_FILE)")
    which.add_argument("-C", "--config-script", help="pipeline XML file to send (CONFIG_SCRIPT)")
    snd.add_argument("--host", default="127.0.0.1")
    snd.add_argument("--port", type=int, default=9002)
    snd.add_argument("-G", "--group", default=None)
    snd.add_argument("--pace", choices=["none", "timestamps", "tr"], default="none", help="release acquisitions like a scanner")
    snd.add_argument("--tr-ms", type=float, default=10.0, help="with --pace tr: one acquisition every TR ms")
    snd.add_argument("--query", help="send this QUERY and print the answer instead")
    snd.add_argument("--tls-ca", help="connect over TLS, checking the server's certificate against this CA (PEM)")
    snd.set_defaults(func=_cmd_send)

    pls = sub.add_parser("pipelines", help="list the installed pipelines and where their XML files are")
    pls.set_defaults(func=_cmd_pipelines)

    pacs = sub.add_parser("pacs", help="what waits in the PACS spools, and push it without a reconstruction")
    pacs.add_argument("action", choices=["status", "push"], help="status: pending and rejected per destination; push: send what is pending")
    pacs.add_argument("--spool", help="spool root (default ~/.local/state/cycguard/spool)")
    pacs.add_argument("--destination", help="only this AET@host:port")
    pacs.add_argument("--calling-aet", default="CYCGUARD", help="our AE title (default CYCGUARD)")
    pacs.add_argument("--timeout", type=float, default=10.0, help="seconds per network step")
    pacs.set_defaults(func=_cmd_pacs)

    wrk = sub.add_parser("workers", help="Gadgetron worker discovery: print the workers that answer, as $GADGETRON_REMOTE_WORKER_COMMAND must")
    wrk.add_argument("workers", nargs="*", help="host:port of each worker (default: $CYCGUARD_WORKERS, comma- or space-separated)")
    wrk.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for each worker's TCP connection (default 1)")
    wrk.set_defaults(func=_cmd_workers)

    chk = sub.add_parser("check", help="validate Gadgetron pipelines (exit 1 naming what is wrong)")
    chk.add_argument("pipelines", nargs="+", help="installed names or XML files")
    chk.add_argument("--connect-stages", default=None, help="stages behind a passive <connect> node, e.g. recon,detect")
    chk.set_defaults(func=_cmd_check)

    recon = sub.add_parser("recon", help="reconstruct an ISMRMRD raw file")
    recon.add_argument("input", help="ISMRMRD raw .h5")
    recon.add_argument("-o", "--output", required=True, help="ISMRMRD image .h5 to write")
    recon.add_argument("--report", help="report folder (default: OUTPUT_report)")
    recon.add_argument("--reference", help="ISMRMRD image .h5 with one reference per slice")
    recon.add_argument("--weights", type=Path, default=None)
    recon.add_argument("--device", default="auto")
    recon.add_argument("--calibration", type=Path, default=None, help="detection calibration (default: shipped)")
    recon.add_argument("--no-auto-calibrate", action="store_true",
                       help="do not start a background calibration for a protocol that has none (its slices stay unverified)")
    recon.add_argument("--auto-calibrate-slices", type=_at_least(100), default=300, metavar="N",
                       help="simulated clean slices of such a calibration (default 300, at least 100: a 1%% false-positive rate needs 99)")
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
    cal.add_argument(
        "--like", metavar="SCAN.h5", default=None,
        help=f"calibrate for the protocol of this raw file by simulation (its coil maps, {LIKE_SLICES} slices unless --simulate N; "
        "written to the calibration cache, CYCGUARD_CALIBRATIONS, where the stages find it); also a .seed.npz the detect stage wrote",
    )
    cal.add_argument("--progress-file", default=None, help=argparse.SUPPRESS)  # a background job's pending file (gadgets.autocalibrate)
    cal.add_argument("--seed", type=int, default=101, help="seed of the simulated slices")
    cal.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    cal.add_argument(
        "--statistic",
        default=DEFAULT_STATISTIC,
        choices=PRODUCT_CHOICES,
        help=f"detector (default {DEFAULT_STATISTIC}; null_noise_union adds the noise backstop for prewhitened data; cyclic is the "
        "paper's statistic, for comparison; docs/STATISTICS.md)",
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
    from gadgets.stages import quiet_known_warnings

    quiet_known_warnings()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, ImportError, ConnectionError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
