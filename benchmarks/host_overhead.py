"""Time per file and per slice: the real Gadgetron 4.7.2 vs ``cycguard replay`` vs ``cycguard serve``.

    python -m benchmarks.host_overhead [--repeats 3] [--raw FILE]

The same raw file (the demo by default: 4 slices) goes through ``recon``, ``defended`` and
``defended_composed`` three ways, each timed end to end from the command a user types to
its exit (process start-up, model loading and the Python gadgets' start-up included):

* the real Gadgetron server, driven by its real ``gadgetron_ismrmrd_client`` (config folder,
  ``-c NAME.xml``), the server started once before;
* ``cycguard replay IN -c NAME -o OUT`` (our runner, same gadget processes);
* ``cycguard send IN -c NAME -o OUT`` against a ``cycguard serve`` started once before.

Every run's verdicts must agree with the others'. Needs the real Gadgetron unpacked
(``scripts/bootstrap.sh dev``; ``tests/gadgetron_host.py``). Results go to
``benchmarks/results/host_overhead.{json,md}``; RESULTS.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from recon.data.demo import DEMO_RAW
from recon.verdict import VERDICT_KEY
from tests import gadgetron_host as host

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINES = ("recon", "defended", "defended_composed")


def _cycguard(*args: str) -> list[str]:
    return [sys.executable, "-m", "gadgets.cli", *args]


def _timed(command: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    return time.monotonic() - start


def _verdicts(path: Path) -> list[str]:
    images = host.read_output(path)
    return [images[key].meta.get(VERDICT_KEY, "?") for key in sorted(images)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--raw", type=Path, default=DEMO_RAW)
    args = parser.parse_args()
    reason = host.unavailable()
    if reason:
        raise SystemExit(f"real Gadgetron unavailable: {reason}")
    host.install_pipelines()
    slices: int | None = None  # counted from the first run's images
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        gadgetron = host.Gadgetron(tmp / "gadgetron")
        port = host.free_port()
        server = subprocess.Popen(_cycguard("serve", "--port", str(port)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert server.stderr is not None
            while b"listening on" not in server.stderr.readline():
                if server.poll() is not None:
                    raise SystemExit("cycguard serve did not start")
            os.set_blocking(server.stderr.fileno(), False)
            runs = [(pipeline, way, n) for pipeline in PIPELINES for n in range(args.repeats) for way in ("gadgetron", "replay", "serve")]
            seconds: dict[tuple[str, str], list[float]] = {}
            verdicts: dict[tuple[str, str], list[str]] = {}
            for pipeline, way, n in tqdm(runs, desc="host overhead", unit="run"):
                out = tmp / f"{pipeline}-{way}-{n}.h5"
                if way == "gadgetron":
                    run = gadgetron.client(args.raw, out, config=f"{pipeline}.xml", timeout=900)
                    if not run.wrote:
                        raise SystemExit(f"real Gadgetron wrote nothing for {pipeline}: {run.output}")
                    took = run.seconds
                elif way == "replay":
                    took = _timed(_cycguard("replay", str(args.raw), "-c", pipeline, "-o", str(out), "--report", str(tmp / "report")))
                else:
                    took = _timed(_cycguard("send", str(args.raw), "-c", pipeline, "-o", str(out), "--port", str(port)))
                seconds.setdefault((pipeline, way), []).append(took)
                verdicts[(pipeline, way)] = _verdicts(out)
                slices = len(verdicts[(pipeline, way)])
                server.stderr.read()  # keep the pipe drained
        finally:
            server.terminate()
            server.wait(timeout=120)
            if server.stderr is not None:
                server.stderr.close()
            gadgetron.stop()
    assert slices
    for pipeline in PIPELINES:
        agreed = {tuple(verdicts[(pipeline, way)]) for way in ("gadgetron", "replay", "serve")}
        if len(agreed) != 1:
            raise SystemExit(f"{pipeline}: the three ways disagree on verdicts: {agreed}")
        for way in ("gadgetron", "replay", "serve"):
            times = seconds[(pipeline, way)]
            rows.append({
                "pipeline": pipeline, "way": way, "median_s_per_file": statistics.median(times),
                "median_s_per_slice": statistics.median(times) / slices, "runs_s": times, "verdicts": verdicts[(pipeline, way)],
            })
    RESULTS.mkdir(exist_ok=True)
    meta = {"raw": str(args.raw.name), "slices": slices, "repeats": args.repeats, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}
    (RESULTS / "host_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"{args.raw.name}, {slices} slices, median of {args.repeats} runs, {os.cpu_count()} CPU cores; "
        "from the command to its exit (start-up and model loading included)",
        "",
        "| pipeline | real Gadgetron 4.7.2 s/file | replay s/file | serve+send s/file | real s/slice | replay s/slice | serve s/slice | verdicts (all three) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pipeline in PIPELINES:
        by = {row["way"]: row for row in rows if row["pipeline"] == pipeline}
        per_file = " | ".join(f"{by[w]['median_s_per_file']:.1f}" for w in ("gadgetron", "replay", "serve"))
        per_slice = " | ".join(f"{by[w]['median_s_per_slice']:.2f}" for w in ("gadgetron", "replay", "serve"))
        lines.append(f"| `{pipeline}` | {per_file} | {per_slice} | {', '.join(by['gadgetron']['verdicts'])} |")  # type: ignore[arg-type]
    (RESULTS / "host_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
