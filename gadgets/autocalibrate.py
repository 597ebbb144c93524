"""Calibrations made in the background for protocols that have none (the detect stage's ``auto_calibrate``).

When the detect stage (or ``cycguard recon``) meets a protocol with no calibration (not the
model's own, none named, none in the calibration cache), it starts ``cycguard calibrate --like SEED`` as a detached
process: the seed is what a calibration by simulation needs from the scan (its protocol, the
coil maps estimated from the slice's ACS lines and its signal level; no image), written beside
the calibration it will make, in the cache. One job per protocol and model, whichever gadget
process meets it first (an exclusive ``.pending.json`` file, which the job keeps current with
its progress and removes when the calibration is in place). The slices of that protocol stay
``unverified`` until the calibration exists; their reason says how far the job is and when
it should be ready. A job that failed leaves its reason in the pending file and is not
restarted (``cycguard calibrate --like`` by hand, or deleting the file, tries again); one that
died without a word (a reboot) is started again. ``CYCGUARD_AUTO_CALIBRATE=off`` turns the
feature off for a whole installation.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("cycguard.autocalibrate")

_STARTED: list[subprocess.Popen[bytes]] = []  # this process's jobs, reaped when asked about
SWITCH_ENV = "CYCGUARD_AUTO_CALIBRATE"


def auto_calibration_allowed() -> bool:
    """Whether the site allows background calibrations at all (``CYCGUARD_AUTO_CALIBRATE=off``
    turns them off in every gadget, whatever its ``auto_calibrate`` property says)."""
    return os.environ.get(SWITCH_ENV, "on").strip().lower() not in ("0", "off", "false", "no")


def pending_path(target: Path) -> Path:
    return target.with_name(target.stem + ".pending.json")


def seed_path(target: Path) -> Path:
    return target.with_name(target.stem + ".seed.npz")


def log_path(target: Path) -> Path:
    return target.with_name(target.stem + ".log")


def _alive(pid: int) -> bool:
    for job in _STARTED:
        if job.pid == pid:
            return job.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(") ", 1)[-1].startswith("Z"))


def status(target: Path) -> dict[str, Any] | None:
    """The job making ``target``: ``None`` when none runs (or a dead one left its file, which is
    removed), else its pending file (``pid``, ``started``, ``done``, ``total``, or ``failed``)."""
    path = pending_path(target)
    try:
        state = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except ValueError:
        return {"starting": True}  # created, not yet written
    if state.get("failed") or not state.get("pid") or _alive(int(state["pid"])):
        return dict(state)
    if target.exists():
        return None
    log.warning("the background calibration for %s (pid %s) ended without a word: started again", target.name, state.get("pid"))
    path.unlink(missing_ok=True)
    return None


def describe(state: dict[str, Any], target: Path) -> str:
    """A job's state in words, for an ``unverified`` slice's reason."""
    if state.get("failed"):
        return (f"its background calibration failed ({state['failed']}; log {log_path(target)}): make one with "
                f"`cycguard calibrate --like SCAN.h5` or delete {pending_path(target)} to try again")
    done, total = int(state.get("done", 0)), int(state.get("total", 0))
    started = float(state.get("started", time.time()))
    if done and total:
        left = (total - done) * (time.time() - started) / done
        when = f"ready in about {max(left, 1) / 60:.1f} min"
    else:
        when = "starting"
    return (f"a calibration for it is being made in the background by simulation from this scan's coil maps "
            f"(pid {state.get('pid', '?')}, {done} of {total or '?'} slices, {when}; log {log_path(target)}); "
            "its slices stay unverified until it is ready")


def start(seed: Any, target: Path, weights: str, slices: int) -> dict[str, Any]:
    """Start the job for ``target`` unless one runs (or failed): its state. ``seed`` is a
    :class:`recon.calibrate.LikeSeed`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    pending = pending_path(target)
    try:
        handle = os.open(pending, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return status(target) or {"starting": True}
    os.close(handle)
    try:
        seed.save(seed_path(target))
        command = [sys.executable, "-m", "gadgets.cli", "calibrate", "--like", str(seed_path(target)), "--simulate", str(slices),
                   "--progress-file", str(pending), "-o", str(target), *(["--weights", weights] if weights else [])]
        with log_path(target).open("ab") as sink:
            job = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    except Exception:
        pending.unlink(missing_ok=True)
        raise
    _STARTED.append(job)
    state = {"pid": job.pid, "started": time.time(), "done": 0, "total": slices}
    _write(pending, {**state, **_read(pending)})  # the job may already have written its progress
    log.warning("%s: no calibration; started one in the background (pid %d, %d simulated slices, log %s)", target.stem, job.pid, slices, log_path(target))
    return state


def ensure(target: Path, seed: Callable[[], Any], weights: str, slices: int, why: str) -> str:
    """Why a slice is ``unverified`` (``why`` no calibration fits, without its advice to make
    one) and the state of the job making ``target``, started (from ``seed()``, a
    :class:`recon.calibrate.LikeSeed`) when none runs and the calibration does not exist yet."""
    state = status(target)
    if state is None and not target.exists():
        state = start(seed(), target, weights, slices)
    return f"{why.split(': make one with')[0]}: {describe(state or {}, target)}"


def _read(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text() or "{}"))
    except (OSError, ValueError):
        return {}


def _write(path: Path, state: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(state))
    partial.replace(path)


def progress_writer(path: Path, every_s: float = 2.0) -> Callable[[int, int], None]:
    """For the job: keeps its pending file current (at most every ``every_s`` seconds)."""
    started = time.time()
    last = {"t": 0.0}

    def report(done: int, total: int) -> None:
        now = time.time()
        if done == total or now - last["t"] >= every_s:
            last["t"] = now
            _write(path, {"pid": os.getpid(), "started": started, "done": done, "total": total})

    return report


def finish(path: Path, error: str | None) -> None:
    """For the job: remove its pending file (the calibration is in place), or leave why it failed."""
    if error is None:
        path.unlink(missing_ok=True)
    else:
        _write(path, {"pid": os.getpid(), "failed": error})
