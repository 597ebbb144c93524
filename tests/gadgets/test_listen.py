"""The warm gadget server's compute slots: at most N forked sessions compute at once, and a
session that dies holding a slot gives it back."""

from __future__ import annotations

import os
import signal
import time

from gadgets.listen import ComputeSlots


def _hold(slots: ComputeSlots, seconds: float, log: int) -> None:
    """In a forked child: take a slot, note when, hold it, leave."""
    with slots:
        os.write(log, f"{time.monotonic():.4f} {os.getpid()}\n".encode())
        time.sleep(seconds)
    os._exit(0)


def _fork(slots: ComputeSlots, seconds: float, log: int) -> int:
    pid = os.fork()
    if pid == 0:
        _hold(slots, seconds, log)
    return pid


def test_one_slot_lets_one_session_compute_at_a_time() -> None:
    slots = ComputeSlots(1)
    read, write = os.pipe()
    try:
        pids = [_fork(slots, 0.3, write) for _ in range(3)]
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(write)
        starts = sorted(float(line.split()[0]) for line in os.read(read, 4096).decode().splitlines())
    finally:
        slots.remove()
    assert len(starts) == 3
    assert all(later - earlier >= 0.29 for earlier, later in zip(starts, starts[1:], strict=False))


def test_two_slots_let_two_compute_together() -> None:
    slots = ComputeSlots(2)
    read, write = os.pipe()
    try:
        pids = [_fork(slots, 0.5, write) for _ in range(2)]
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(write)
        starts = sorted(float(line.split()[0]) for line in os.read(read, 4096).decode().splitlines())
    finally:
        slots.remove()
    assert len(starts) == 2 and starts[1] - starts[0] < 0.4


def test_a_session_killed_holding_its_slot_frees_it() -> None:
    slots = ComputeSlots(1)
    read, write = os.pipe()
    try:
        stuck = _fork(slots, 60.0, write)
        os.read(read, 64)  # it holds the slot now
        os.kill(stuck, signal.SIGKILL)
        os.waitpid(stuck, 0)
        started = time.monotonic()
        with slots:
            waited = time.monotonic() - started
    finally:
        slots.remove()
        os.close(read)
        os.close(write)
    assert waited < 1.0
