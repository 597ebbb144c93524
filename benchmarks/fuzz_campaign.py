"""A fuzz campaign over everything that reads untrusted input: crashes, hangs, peak memory.

    python -m benchmarks.fuzz_campaign [--scale 1.0] [--seed 0]

Four families of malformed input (10,000 cases at ``--scale 1``), each case made from
``(seed, family, index)`` so that any finding can be replayed alone
(``--replay FAMILY:INDEX``):

* ``xml`` (3,000): shipped pipeline files with random cut-and-insert, random bytes, duplicated
  or dropped elements and random property values, through ``parse_pipeline`` + ``check``
  (what ``cycguard check``, ``replay``, ``serve`` and the runner read).
* ``properties`` (1,500): random ``<property>`` sets for every shipped gadget, through
  ``params.parse``.
* ``raw`` (3,000): copies of the demo raw file with random bytes overwritten, truncated, or with
  one acquisition header field or the XML header mutated, through replay's pre-flight check
  and ``read_raw`` (what ``replay``, ``send`` and ``recon`` read before any gadget starts).
* ``wire`` (2,500): malformed client streams against one ``cycguard serve`` process: random
  bytes, absurd lengths, random message ids, a mutated XML header, random bytes in the data
  phase, and mutated acquisition headers (the gadget processes run by then).

The in-process families run in worker processes (2), one case at a time under a 30 s limit:
a worker that dies is a crash, a case past its limit a hang. A case passes when it ends in
the reader's own error (``PipelineError``, ``PropertyError``, ``MRDError``; for the wire
a TEXT error then CLOSE) or in a valid result (finite k-space; images that carry a verdict).
Anything else is a finding, listed with its case. Peak resident memory: per worker (the
largest of any case of the family) and of the server with its gadget processes.
Results: ``benchmarks/results/fuzz_campaign.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import struct
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"xml": 3000, "properties": 1500, "raw": 3000, "wire": 2500}
CASE_LIMIT = 30.0


# ------------------------------------------------------------------ cases (made in the worker)


def _rng(seed: int, family: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{family}:{index}")


def _mutate_text(text: str, rng: random.Random) -> str:
    """One of: cut and insert, random bytes, an element duplicated or dropped, a value replaced."""
    kind = rng.randrange(4)
    at = rng.randrange(len(text))
    if kind == 0:
        return text[:at] + "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(20))) + text[at + rng.randrange(1, 40) :]
    if kind == 1:
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))).decode("latin-1")
        return text[:at] + junk + text[at:]
    tags = [i for i in range(len(text)) if text.startswith("<property", i) or text.startswith("<external", i) or text.startswith("<gadget", i)]
    if not tags:
        return text
    start = rng.choice(tags)
    end = text.find(">", start) + 1
    if not text[start:end].endswith("/>"):  # an element with content: up to its closing tag
        name = text[start + 1 :].split(None, 1)[0].rstrip(">")
        close = text.find(f"</{name}>", end)
        end = close + len(name) + 3 if close > 0 else end
    element = text[start:end]
    if kind == 2:
        return text[:end] + element + text[end:]  # duplicated
    if rng.random() < 0.5:
        return text[:start] + text[end:]  # dropped
    value = rng.choice(["", "-1", "1e309", "nan", "true", "x" * 300, "0", "../../etc/passwd", "@", "1,2,,3", "\u00e9"])
    return text[:start] + element.replace('value="', f'value="{value}', 1) + text[end:]


def case_xml(rng: random.Random) -> str:
    from gadgets import params
    from gadgets.runner.config import PipelineError, check_pipeline, parse_pipeline

    sources = sorted((ROOT / "pipelines").glob("*.xml"))
    text = rng.choice(sources).read_text()
    for _ in range(rng.randrange(1, 4)):
        text = _mutate_text(text, rng)
    try:
        check_pipeline(parse_pipeline(text, "fuzz.xml"))
    except (PipelineError, params.PropertyError):
        return "refused"
    return "accepted"


def case_properties(rng: random.Random) -> str:
    from xml.etree import ElementTree as ET

    from gadgets import params

    gadget = rng.choice(sorted(params.GADGETS))
    own = sorted({f.name for cls in params.GADGETS[gadget] for f in fields(cls)})  # mostly its own properties
    known = sorted({f.name for cls in params.STAGE_SETTINGS.values() for f in fields(cls)})
    element = ET.Element("configuration")
    for _ in range(rng.randrange(1, 5)):
        draw = rng.random()
        name = rng.choice(own) if draw < 0.85 else rng.choice(known) if draw < 0.95 else "".join(chr(rng.randrange(33, 127)) for _ in range(rng.randrange(1, 12)))
        value = rng.choice([
            "", "0", "1", "-1", "1e309", "nan", "inf", "true", "false", "no", "x" * 200, "1;3", "1,3", "cpu", "cuda:99", "correct", "prior",
            "recon,detect", "recon,detect,mitigate,export", "@x", "/tmp", "whitened", "estimate", str(rng.random() * 10 ** rng.randrange(-6, 9)),
            str(rng.randrange(-5, 2000)),
        ])
        ET.SubElement(element, "property", name=name, value=value)
    try:
        params.parse(*gadget, ET.tostring(element))
    except params.PropertyError:
        return "refused"
    return "accepted"


def _corrupt_raw(rng: random.Random, target: Path) -> str:
    import h5py

    from recon.data.demo import DEMO_RAW

    kind = rng.randrange(4)
    if kind < 2:
        data = bytearray(DEMO_RAW.read_bytes())
        at = rng.randrange(len(data))
        if kind == 0:
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            data[at : at + len(junk)] = junk
            target.write_bytes(bytes(data))
            return "bytes overwritten"
        target.write_bytes(bytes(data[:at]))
        return "truncated"
    shutil.copy(DEMO_RAW, target)
    with h5py.File(target, "r+") as handle:
        if kind == 2:
            rows = handle["dataset/data"]
            index = rng.randrange(len(rows))
            row = rows[index]
            head = row["head"]
            name = rng.choice(head.dtype.names)
            field = head[name]
            if np.ndim(field) == 0:
                head[name] = np.array(rng.choice([0, 1, -1, 2**15, 2**31 - 1, rng.randrange(-(2**31), 2**31)])).astype(field.dtype, casting="unsafe")
            else:
                flat = np.asarray(field).reshape(-1).copy()
                flat[rng.randrange(flat.size)] = np.array(rng.choice([0, -1, 255, 65535, 1e30, float("nan")])).astype(flat.dtype, casting="unsafe")
                head[name] = flat.reshape(np.shape(field))
            row["head"] = head
            rows[index] = row
            return f"acquisition header field {name}"
        xml = handle["dataset/xml"][0]
        xml = xml.decode("utf-8", "replace") if isinstance(xml, bytes) else str(xml)
        mutated = _mutate_text(xml, rng).replace("\x00", "")  # HDF5 strings cannot hold NUL
        del handle["dataset/xml"]
        handle.create_dataset("dataset/xml", data=[mutated.encode("utf-8", "surrogatepass")])
        return "XML header"


def case_raw(rng: random.Random) -> str:
    from gadgets.runner.replay import preflight
    from recon.io.mrd import MRDError, read_raw

    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "case.h5"
        _corrupt_raw(rng, target)
        try:
            preflight(target)
            scan = read_raw(target, strict=False)
        except MRDError:
            return "refused"
        if not all(np.isfinite(s.kspace).all() for s in scan.slices):
            raise AssertionError("non-finite k-space read as data")
        return f"read {len(scan.slices)} slices"


def run_case(seed: int, family: str, index: int) -> tuple[str, str, float, float]:
    """One case in a worker: ``(outcome, detail, peak RSS MB of this worker so far, how much
    this case raised that peak)``; outcome ``ok`` or ``defect`` (another exception: the
    detail says which)."""
    import signal

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def alarm(*_: object) -> None:
        raise TimeoutError(f"case took more than {CASE_LIMIT:.0f} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(CASE_LIMIT) - 2)
    try:
        detail = {"xml": case_xml, "properties": case_properties, "raw": case_raw}[family](_rng(seed, family, index))
        outcome = "ok"
    except TimeoutError as err:
        outcome, detail = "hang", str(err)
    except Exception as err:  # a finding: the reader let an exception that is not its own through
        outcome, detail = "defect", f"{type(err).__name__}: {err}"[:300] + " @ " + traceback.format_tb(err.__traceback__)[-1].strip().splitlines()[0]
    finally:
        signal.alarm(0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return outcome, detail, peak, peak - before


def _kill(pool: ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()


def _alone(seed: int, family: str, index: int) -> tuple[str, str, float, float]:
    """Run one case in a fresh worker of its own: a crash there is this case's."""
    pool = ProcessPoolExecutor(max_workers=1)
    try:
        return pool.submit(run_case, seed, family, index).result(timeout=CASE_LIMIT + 30)
    except BrokenProcessPool as err:
        return "crash", f"the worker died: {err}", 0.0, 0.0
    except FutureTimeout:
        return "hang", "no result (worker stuck past the alarm)", 0.0, 0.0
    finally:
        _kill(pool)


def run_in_workers(seed: int, family: str, count: int) -> dict[str, object]:
    """Every case of an in-process family, a worker per core; crashes and hangs are findings."""
    outcomes: Counter[str] = Counter()
    details: Counter[str] = Counter()
    findings: list[dict[str, object]] = []
    peak = 0.0
    pool = ProcessPoolExecutor(max_workers=2)
    pending: dict[int, Future[tuple[str, str, float, float]]] = {}
    memory: list[tuple[float, int]] = []  # (MB a case raised its worker's peak by, case)
    next_index = 0
    bar = tqdm(total=count, desc=f"fuzz {family}", unit="case")
    started = time.perf_counter()
    while next_index < count or pending:
        while next_index < count and len(pending) < 4:
            pending[next_index] = pool.submit(run_case, seed, family, next_index)
            next_index += 1
        index = min(pending)
        future = pending.pop(index)
        broken = False
        try:
            outcome, detail, rss, grew = future.result(timeout=CASE_LIMIT + 30)
        except FutureTimeout:
            outcome, detail, rss, grew = "hang", "no result (worker stuck past the alarm)", 0.0, 0.0
            broken = True
        except BrokenProcessPool:
            outcome, detail, rss, grew = _alone(seed, family, index)  # a worker died: was it this case?
            broken = True
        if broken:  # restart the workers; resubmit what was in flight
            _kill(pool)
            pool = ProcessPoolExecutor(max_workers=2)
            for other in sorted(pending):
                pending[other] = pool.submit(run_case, seed, family, other)
        outcomes[outcome] += 1
        if outcome == "ok":
            details[detail.split(" slices")[0] if detail.startswith("read") else detail] += 1
        else:
            findings.append({"case": f"{family}:{index}", "outcome": outcome, "detail": detail})
        peak = max(peak, rss)
        memory.append((grew, index))
        bar.update(1)
    bar.close()
    pool.shutdown()
    return {
        "cases": count,
        "outcomes": dict(outcomes),
        "results": dict(details),
        "findings": findings,
        "worker_peak_rss_mb": round(peak, 1),
        "largest_peak_raises": [{"case": f"{family}:{i}", "mb": round(mb, 1)} for mb, i in sorted(memory, reverse=True)[:5] if mb > 0],
        "seconds": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------ the wire family

WIRE_KINDS = {
    "random bytes before the header": 700,
    "absurd HEADER length": 400,
    "random message ids and lengths": 400,
    "mutated XML header": 400,
    "random bytes in the data phase": 300,
    "mutated acquisition header": 300,
}


def wire_cases(seed: int, scale: float) -> list[tuple[str, bytes]]:
    from gadgets.runner import protocol as p
    from gadgets.runner.replay import read_header
    from recon.data.demo import DEMO_RAW

    header = read_header(DEMO_RAW)
    prefix = p.config_file_message("recon") + p.string_message(p.HEADER, header)
    messages = _first_slice_messages()
    cases = []
    for kind, total in WIRE_KINDS.items():
        for index in range(max(1, round(total * scale))):
            rng = _rng(seed, kind, index)
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 65)))
            if kind == "random bytes before the header":
                data = junk
            elif kind == "absurd HEADER length":
                data = p.config_file_message("recon") + struct.pack("<HI", p.HEADER, rng.randrange(2**32)) + junk
            elif kind == "random message ids and lengths":
                parts = [struct.pack("<HI", rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 1008, 1022, 1026, rng.randrange(2**16)]), rng.choice([0, 1, 7, 64, 2**20, rng.randrange(2**32)])) + junk[: rng.randrange(len(junk) + 1)] for _ in range(rng.randrange(1, 4))]
                data = (p.config_file_message("recon") if rng.random() < 0.5 else b"") + b"".join(parts)
            elif kind == "mutated XML header":
                data = p.config_file_message("recon") + p.string_message(p.HEADER, _mutate_text(header, rng)) + b"".join(messages[: rng.randrange(len(messages))])
            elif kind == "random bytes in the data phase":
                data = prefix + b"".join(messages[: rng.randrange(len(messages))]) + junk
            else:
                which = rng.randrange(len(messages))
                message = bytearray(messages[which])
                at = 2 + rng.randrange(338)
                message[at : at + 8] = junk[:8]
                data = prefix + b"".join(messages[:which] + [bytes(message[: len(messages[which])])] + messages[which + 1 :]) + struct.pack("<H", p.CLOSE)
            cases.append((kind, data))
    return cases


def _first_slice_messages() -> list[bytes]:
    import ismrmrd

    from gadgets.runner import protocol as p
    from gadgets.runner.replay import stream_raw
    from recon.data.demo import DEMO_RAW

    messages = []
    for item in stream_raw(DEMO_RAW):
        if isinstance(item, ismrmrd.Acquisition) and item.idx.slice > 0:
            break
        messages.append(p.item_message(item))
    return messages


def run_wire(seed: int, scale: float) -> dict[str, object]:
    from benchmarks.fuzz_memory import _descendants, _run
    from benchmarks.load import _tree_rss_mb
    from benchmarks.online import start_server
    from gadgets.runner.client import query

    cases = wire_cases(seed, scale)
    outcomes: dict[str, Counter[str]] = {kind: Counter() for kind in WIRE_KINDS}
    findings: list[dict[str, object]] = []
    server_mb, tree_mb, leftover = [], [], []
    started = time.perf_counter()
    server, port = start_server()
    try:
        counters: Counter[str] = Counter()
        for kind, data in tqdm(cases, desc="fuzz wire", unit="case"):
            outcome = _run(port, data)
            outcomes[kind][outcome] += 1
            if outcome not in ("error", "images", "close only"):
                findings.append({"case": f"{kind}:{counters[kind]}", "outcome": outcome})
            counters[kind] += 1
            tree, own = _tree_rss_mb(server.pid)
            server_mb.append(own)
            tree_mb.append(tree)
            leftover.append(len(_descendants(server.pid)))
            if server.poll() is not None:
                findings.append({"case": f"{kind}:{counters[kind] - 1}", "outcome": f"server exited {server.returncode}"})
                break
        alive = query("127.0.0.1", port, "cycguard::version").strip() != ""
    finally:
        server.terminate()
        server.wait(timeout=120)
    return {
        "cases": len(cases),
        "outcomes": {kind: dict(counts) for kind, counts in outcomes.items()},
        "findings": findings,
        "server_rss_mb": {"after_first": server_mb[0], "last": server_mb[-1], "max": max(server_mb)},
        "server_and_gadgets_rss_mb_max": max(tree_mb),
        "gadget_processes_left_after_a_case_max": max(leftover),
        "still_serving": alive,
        "server_exit_on_sigterm": server.returncode,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 10,000 cases to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ", ".join(FAMILIES))
    parser.add_argument("--replay", default="", help="run one in-process case, FAMILY:INDEX, and print its outcome")
    args = parser.parse_args()
    if args.replay:
        family, index = args.replay.split(":")
        print(run_case(args.seed, family, int(index)))
        return
    report: dict[str, object] = {"command": f"python -m benchmarks.fuzz_campaign --scale {args.scale:g} --seed {args.seed}", "families": {}}
    families = report["families"]
    assert isinstance(families, dict)
    for family in args.families.split(","):
        if family == "wire":
            families[family] = run_wire(args.seed, args.scale)
        else:
            families[family] = run_in_workers(args.seed, family, max(1, round(FAMILIES[family] * args.scale)))
    report["cases"] = sum(int(f["cases"]) for f in families.values())
    report["findings"] = sum(len(f["findings"]) for f in families.values())
    RESULTS.mkdir(exist_ok=True)
    name = "fuzz_campaign.json" if args.families == ",".join(FAMILIES) and args.scale == 1.0 else "fuzz_campaign_partial.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "families"} | {f: {k: v for k, v in d.items() if k != "findings"} for f, d in families.items()}, indent=2))


if __name__ == "__main__":
    main()
