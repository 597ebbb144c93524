"""Online latency and throughput of `cycguard serve` with scanner-paced `cycguard send` clients.

    python -m benchmarks.online [--slices 20] [--clients 1,2,4]

A raw file of held-out axial slices in the demo protocol (TR 10 ms per line, about 44 lines a
slice) is sent to a `cycguard serve` process with acquisitions released at their time stamps.
Per slice: latency = image received - last acquisition of the slice sent; compared with the
in-process time of the same work for the same slice (``reconstruct`` for the recon-only
chain; ``reconstruct`` + ``check`` for the defended chain, whose clean slices are not
mitigated). Throughput: N unpaced clients at once, slices per second over all of them.
Results: ``benchmarks/results/online.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gadgets.runner.client import send
from recon.data import mni
from recon.data.demo import make_demo
from recon.detect.defense import ScanDefenses
from recon.io.mrd import read_raw
from recon.models.weights import load_model
from recon.pipeline import check, reconstruct
from recon.types import SliceKey

RESULTS = Path(__file__).resolve().parent / "results"


def in_process_seconds(raw: Path) -> dict[str, dict[SliceKey, float]]:
    """Per slice: seconds of reconstruct, and of reconstruct + check."""
    model, manifest = load_model()
    scan = read_raw(raw)
    out: dict[str, dict[SliceKey, float]] = {"recon": {}, "defended": {}}
    defenses = ScanDefenses(model, manifest, scan)
    for data in scan.slices:
        defense = defenses.for_slice(data)
        if defense is None:
            raise RuntimeError("the shipped calibration does not fit the benchmark's protocol")
        t0 = time.perf_counter()
        result = reconstruct(data, model)
        t1 = time.perf_counter()
        check(result.prepared, result.image, defense)
        t2 = time.perf_counter()
        out["recon"][data.key] = t1 - t0
        out["defended"][data.key] = t2 - t0
    return out


def start_server() -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "gadgets.cli", "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    while b"listening on" not in process.stderr.readline():
        assert process.poll() is None, "server did not start"
    threading.Thread(target=lambda: [None for _ in iter(process.stderr.readline, b"")], daemon=True).start()  # type: ignore[union-attr]
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--clients", default="1,2,4", help="concurrent clients for throughput ('' to skip)")
    parser.add_argument("--tr-ms", default="0,25", help="paces for latency: 0 = the file's time stamps (TR 10 ms), else one line every TR ms")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows, throughput = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw, _ = make_demo(folder, seed=11, slices=mni.heldout_axial(args.slices))
        reference = in_process_seconds(raw)
        server, port = start_server()
        try:
            for chain, pipeline, tr in ((c, pl, float(t)) for c, pl in (("recon only", "recon"), ("defended", "defended"), ("defended, composed", "defended_composed")) for t in args.tr_ms.split(",")):
                pace = "timestamps" if tr == 0 else "tr"
                result = send(raw, folder / f"{pipeline}-{tr}.h5", pipeline, port=port, group="g", pace=pace, tr_ms=tr, echo_text=False)
                if not result.ok:
                    raise RuntimeError(result.errors)
                base = reference["recon" if pipeline == "recon" else "defended"]  # clean slices: recon + check
                latency = [result.latency[k] for k in base]
                ratios = [result.latency[k] / base[k] for k in base]
                rows.append({
                    "chain": chain, "tr_ms": tr or 10.0, "slice_acquisition_s": (tr or 10.0) * 44 / 1000, "slices": len(latency),
                    "latency_median_s": statistics.median(latency), "latency_worst_s": max(latency),
                    "in_process_median_s": statistics.median(base.values()),
                    "ratio_median": statistics.median(ratios), "ratio_worst": max(ratios),
                })
                print(json.dumps(rows[-1]), flush=True)
            for pipeline in ("recon", "defended"):
                for n in (int(c) for c in args.clients.split(",") if c):
                    # separate client processes, as separate scanners would be (and HDF5 is not
                    # safe to drive from several threads of one process)
                    command = [sys.executable, "-m", "gadgets.cli", "send", str(raw), "-c", pipeline, "--port", str(port)]
                    started = time.perf_counter()
                    clients = [
                        subprocess.Popen([*command, "-o", str(folder / f"t-{pipeline}-{n}-{i}.h5")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        for i in range(n)
                    ]
                    codes = [c.wait() for c in clients]
                    wall = time.perf_counter() - started
                    if any(codes):
                        raise RuntimeError(f"{pipeline} with {n} clients: exit codes {codes}")
                    throughput.append({"pipeline": pipeline, "clients": n, "slices": n * args.slices, "seconds": wall, "slices_per_s": n * args.slices / wall})
                    print(json.dumps(throughput[-1]), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=300)
            if server.stderr is not None:
                server.stderr.close()
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count(), "torch": torch.__version__}
    (RESULTS / "online.json").write_text(json.dumps({"meta": meta, "latency": rows, "throughput": throughput}, indent=2) + "\n")
    lines = [
        "| chain | TR (ms) | acquisition per slice (s) | slices | latency median (s) | worst (s) | in-process median (s) | ratio median | ratio worst |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['chain']} | {r['tr_ms']:g} | {r['slice_acquisition_s']:.2f} | {r['slices']} | {r['latency_median_s']:.3f} | {r['latency_worst_s']:.3f} | {r['in_process_median_s']:.3f} | "
          f"{r['ratio_median']:.2f} | {r['ratio_worst']:.2f} |" for r in rows],
        "",
        "| pipeline | clients | slices | wall (s) | slices/s |",
        "|---|---|---|---|---|",
        *[f"| {t['pipeline']} | {t['clients']} | {t['slices']} | {t['seconds']:.1f} | {t['slices_per_s']:.2f} |" for t in throughput],
    ]
    (RESULTS / "online.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
