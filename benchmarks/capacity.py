"""How many workers a site needs: a calculation from measured costs, not a measurement.

    python -m benchmarks.capacity

Reads the measured figures in ``benchmarks/results/`` and writes
``benchmarks/results/capacity.{json,md}``:

* per-slice costs in process (``stage_cost_build.json``: 2 CPU cores; ``stage_cost_gpu.json``:
  one H200): a clean slice end to end, and a rewrite on top of it;
* what the distributed path adds per slice on a worker (``distributed_scaling_warm.json`` and
  ``distributed_scaling_warm_16slices.json``: a warm worker's wall time per slice beyond the
  single node's, on this machine, the mean of the two runs);
* per-file cost of an archive replay on one Dask worker (``batch_scaling.json``).

Online: a worker keeps up when its busy share stays under ``UTILISATION`` (queues grow without
bound as it nears 1), so a scanner that sends a slice every ``T`` seconds needs
``ceil(cost / (T * UTILISATION))`` workers, ``cost = clean + flagged_share * rewrite +
overhead``. Archive: ``files * per_file / machines``, a machine being one like this (2 cores,
2 Dask workers of one torch thread each, its measured best: ``per_file`` is that run's wall
time, cluster start-up included, over its files); linear across machines, which nothing here
measures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import median
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WARM_RUNS = ("distributed_scaling_warm.json", "distributed_scaling_warm_16slices.json")
UTILISATION = 0.8
INTERVALS_S = (0.2, 0.3, 0.5)
FLAGGED_SHARES = (0.01, 0.10)  # the calibrated false-positive rate; a scan under attack on a tenth of its slices
ARCHIVE_FILES = 10_000
ARCHIVE_WORKERS = (1, 4, 16, 64)


def _load(name: str) -> dict[str, Any]:
    return dict(json.loads((RESULTS / name).read_text()))


def per_slice_costs() -> dict[str, tuple[float, float]]:
    """``device -> (clean slice s, rewrite s)``, medians of the stage-cost runs."""
    out = {}
    for name, device in (("stage_cost_build.json", "cpu"), ("stage_cost_gpu.json", "cuda")):
        for run in _load(name)["runs"]:
            if run["meta"]["device"] != device:
                continue
            clean = median(row["wall"] for row in run["rows"] if row["kind"] == "clean")
            rewrite = median(row["seconds"]["mitigate"] for row in run["rows"] if "mitigate" in row.get("seconds", {}))
            out["2 CPU cores" if device == "cpu" else "one NVIDIA H200"] = (clean, rewrite)
    return out


def distributed_overhead() -> float:
    """Seconds a slice costs a warm worker beyond the single node's in-chain time (this machine):
    the mean over the unpaced runs on every core (8 and 16 slices), at least 0."""
    differences = []
    for name in WARM_RUNS:
        data = _load(name)
        rows = {row["case"]: row for row in data["rows"]}
        single = rows["defended (single node)"]["wall_s"] / data["slices"]
        warm = [row for row in data["rows"] if row["case"].startswith("defended_distributed_warm, 1 ")]
        differences += [warm[0]["wall_s"] / data["slices"] - single] if warm else []
    return max(0.0, sum(differences) / len(differences)) if differences else 0.0


def main() -> int:
    costs = per_slice_costs()
    overhead = distributed_overhead()
    online = []
    for device, (clean, rewrite) in costs.items():
        for share in FLAGGED_SHARES:
            cost = clean + share * rewrite
            for interval in INTERVALS_S:
                online.append({
                    "device": device, "flagged_share": share, "slice_every_s": interval, "cost_s": round(cost, 3),
                    "workers_in_process": math.ceil(cost / (interval * UTILISATION)),
                    "workers_distributed_warm": math.ceil((cost + overhead) / (interval * UTILISATION)),
                })
    batch = {(row["pipeline"], row["workers"], row["threads"]): row for row in _load("batch_scaling.json")["rows"]}
    archive = []
    for pipeline in ("recon", "defended"):
        machine = batch[(pipeline, 2, 1)]
        per_file = machine["seconds"] / machine["files"]
        for workers in ARCHIVE_WORKERS:
            hours = ARCHIVE_FILES * per_file / workers / 3600
            archive.append({"pipeline": pipeline, "workers": workers, "per_file_s": round(per_file, 2), "hours": round(hours, 1)})
    result = {"command": "python -m benchmarks.capacity", "utilisation": UTILISATION, "distributed_overhead_s": round(overhead, 3),
              "online": online, "archive": archive}
    (RESULTS / "capacity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"`python -m benchmarks.capacity` (a calculation from measured costs; busy share at most {UTILISATION:.0%}; "
        f"the warm distributed path adds {overhead:.2f} s a slice on this machine)", "",
        "| worker | flagged share | slice every s | cost a slice s | workers, in process | workers, distributed (warm) |",
        "|---|---|---|---|---|---|",
    ]
    for row in online:
        lines.append(f"| {row['device']} | {row['flagged_share']:.0%} | {row['slice_every_s']} | {row['cost_s']} | "
                     f"{row['workers_in_process']} | {row['workers_distributed_warm']} |")
    lines += ["", f"| archive of {ARCHIVE_FILES:,} demo-sized files (4 slices) | machines of 2 cores | s a file | hours |",
              "|---|---|---|---|"]
    for row in archive:
        lines.append(f"| `{row['pipeline']}` | {row['workers']} | {row['per_file_s']} | {row['hours']} |")
    (RESULTS / "capacity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
