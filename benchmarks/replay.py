"""Replay throughput and the cost of the gadget chain over the pure pipeline in process.

    python -m benchmarks.replay [--slices 20] [--repeats 2]

A raw file of held-out axial slices (the demo's protocol: 8 coils, R = 4 + 16 ACS, 2x
readout oversampling, noise scans) is reconstructed four ways, timed end to end (file in,
images out, model loading and process start-up included):

* in process: ``read_raw``, ``recon.pipeline.reconstruct`` / ``defend`` per slice, images written;
* replay, one ``python -m gadgetron`` process per gadget (the real wire path);
* replay, the composed gadget (all stages in one external process);
* replay with the stages called in the runner's process (no sockets).

Also the steady state: seconds between the first and the last image, per slice. Results go
to ``benchmarks/results/replay.{json,md}``; RESULTS.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from gadgets.runner.replay import replay
from recon.data import mni
from recon.data.demo import make_demo
from recon.detect.defense import load_defense, protocol_of
from recon.io.mrd import read_raw
from recon.io.mrd_write import write_images
from recon.models.weights import load_model
from recon.pipeline import defend, reconstruct
from recon.types import ReconImage

RESULTS = Path(__file__).resolve().parent / "results"


def in_process(raw: Path, defended: bool, folder: Path) -> tuple[float, float]:
    """Seconds for the pure pipeline on every slice, weights loading and writing the images
    included (as replay does), and seconds per slice between the first and the last image."""
    started = time.perf_counter()
    model, manifest = load_model()
    scan = read_raw(raw)
    defense = None
    stamps = []
    images = []
    for data in scan.slices:
        if defended:
            if defense is None:
                defense = load_defense(model, manifest, protocol_of(data, manifest, scan.protocol.acceleration), None)
                assert defense is not None, "the shipped calibration must fit the demo protocol"
            image = defend(data, defense).image
        else:
            image = reconstruct(data, model).image
        images.append(ReconImage(image, data.key, data.geometry))
        stamps.append(time.perf_counter())
    write_images(folder / f"in-process-{time.monotonic_ns()}.h5", images, magnitude=False)
    return time.perf_counter() - started, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def chain(raw: Path, pipeline: str, folder: Path, in_proc: bool = False) -> tuple[float, float]:
    """Wall seconds of a replay, and seconds per slice from the first image to the last."""
    out = folder / f"{pipeline}-{int(in_proc)}-{time.monotonic_ns()}.h5"
    stamps: list[float] = []
    started = time.perf_counter()
    result = replay(raw, pipeline, out, None, group="g", in_process=in_proc, progress=False, echo_stderr=False, on_image=lambda: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"{pipeline}: {result.failures}")
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return wall, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for every figure")
    args = parser.parse_args()
    torch.set_num_threads(2)
    z = mni.heldout_axial(args.slices)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw, _ = make_demo(folder, seed=7, slices=z)
        for label, defended, pipeline, composed in (("recon only", False, "recon", None), ("defended", True, "defended", "defended_composed")):
            base = min((in_process(raw, defended, folder) for _ in range(args.repeats)), key=lambda t: t[0])
            ext = min((chain(raw, pipeline, folder) for _ in range(args.repeats)), key=lambda t: t[0])
            local = min((chain(raw, pipeline, folder, in_proc=True) for _ in range(args.repeats)), key=lambda t: t[0])
            row = {
                "chain": label,
                "slices": args.slices,
                "in_process_s": base[0],
                "in_process_steady_s_per_slice": base[1],
                "external_per_stage_s": ext[0],
                "external_per_stage_steady_s_per_slice": ext[1],
                "runner_in_process_s": local[0],
                "runner_in_process_steady_s_per_slice": local[1],
            }
            if composed:
                comp = min((chain(raw, composed, folder) for _ in range(args.repeats)), key=lambda t: t[0])
                row["composed_s"], row["composed_steady_s_per_slice"] = comp
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    (RESULTS / "replay.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "| chain | slices | in process (s) | external per stage (s) | overhead | composed (s) | overhead | runner in process (s) | overhead | slices/s (per stage) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def pct(t: float, r: dict = r) -> str:
            return f"{100 * (t / r['in_process_s'] - 1):+.0f} %"

        composed_cell = f"{r['composed_s']:.1f} | {pct(r['composed_s'])}" if "composed_s" in r else "- | -"
        lines.append(
            f"| {r['chain']} | {r['slices']} | {r['in_process_s']:.1f} | {r['external_per_stage_s']:.1f} | {pct(r['external_per_stage_s'])} | "
            f"{composed_cell} | {r['runner_in_process_s']:.1f} | {pct(r['runner_in_process_s'])} | {r['slices'] / r['external_per_stage_s']:.2f} |"
        )
    lines += [
        "",
        "Steady state, seconds per slice between the first and the last image (start-up excluded):",
        "",
        "| chain | in process | external per stage | overhead | composed | overhead | runner in process | overhead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r["in_process_steady_s_per_slice"]

        def rel(t: float, base: float = base) -> str:
            return f"{t:.3f} | {100 * (t / base - 1):+.0f} %"

        composed_cell = rel(r["composed_steady_s_per_slice"]) if "composed_steady_s_per_slice" in r else "- | -"
        lines.append(
            f"| {r['chain']} | {base:.3f} | {rel(r['external_per_stage_steady_s_per_slice'])} | {composed_cell} | {rel(r['runner_in_process_steady_s_per_slice'])} |"
        )
    (RESULTS / "replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
