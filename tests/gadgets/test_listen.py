"""The warm gadget server's compute slots: at most N forked sessions compute at once, and a
session that dies holding a slot gives it back."""

from __future__ import annotations

import os
import signal
import time

from gadgets.listen import ComputeSlots


def _hold(slots: ComputeSlots, seconds: float, log: int) -> None:
    """In a forked child: take a slot, note when, hold it, leave (never back into pytest)."""
    try:
        with slots:
            os.write(log, f"{time.monotonic():.4f} {os.getpid()}\n".encode())
            time.sleep(seconds)
    finally:
        os._exit(0)


def _too_long(*_: object) -> None:
    raise TimeoutError("the killed session's slot was not freed")


def _fork(slots: ComputeSlots, seconds: float, log: int) -> int:
    pid = os.fork()
    if pid == 0:
        _hold(slots, seconds, log)
    return pid


def _starts(count: int, sessions: int, seconds: float) -> list[float]:
    """When each of ``sessions`` forked sessions got one of ``count`` slots, holding it ``seconds``."""
    slots = ComputeSlots(count)
    read, write = os.pipe()
    try:
        for pid in [_fork(slots, seconds, write) for _ in range(sessions)]:
            os.waitpid(pid, 0)
        os.close(write)
        return sorted(float(line.split()[0]) for line in os.read(read, 4096).decode().splitlines())
    finally:
        slots.remove()
        os.close(read)


def test_one_slot_lets_one_session_compute_at_a_time() -> None:
    starts = _starts(1, 3, 0.3)
    assert len(starts) == 3
    assert all(later - earlier >= 0.29 for earlier, later in zip(starts, starts[1:], strict=False))


def test_two_slots_let_two_compute_together() -> None:
    starts = _starts(2, 2, 0.5)
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
        signal.signal(signal.SIGALRM, _too_long)
        signal.alarm(10)  # a slot the kernel did not free would wait for ever
        try:
            with slots:
                waited = time.monotonic() - started
        finally:
            signal.alarm(0)
    finally:
        slots.remove()
        os.close(read)
        os.close(write)
    assert waited < 1.0


def test_the_gate_is_held_while_an_item_goes_through_the_stages_never_while_its_output_moves_on() -> None:
    from gadgets.stages import run_stages

    class Gate:
        def __init__(self) -> None:
            self.held, self.entered = False, 0

        def __enter__(self) -> None:
            assert not self.held, "taken twice: nested, or held while output moved on"
            self.held, self.entered = True, self.entered + 1

        def __exit__(self, *_: object) -> None:
            self.held = False

    gate = Gate()

    class Stage:
        def process(self, item: int) -> list[int]:
            assert gate.held
            return [item, item * 10]

        def close(self) -> list[int]:
            assert gate.held
            return [99]

    out = []
    for item in run_stages([Stage(), Stage()], [1, 2], gate):  # type: ignore[list-item]
        assert not gate.held  # what leaves the chain is sent without the gate
        out.append(item)
    assert out == [1, 10, 10, 100, 2, 20, 20, 200, 99, 990, 99]
    assert gate.entered == 3  # once per item (both stages under it) and once for the closing



def test_collecting_an_acquisition_is_not_computing_its_slices_last_one_is() -> None:
    import ismrmrd

    from gadgets.stages import run_stages

    class Gate:
        held = False

        def __enter__(self) -> None:
            Gate.held = True

        def __exit__(self, *_: object) -> None:
            Gate.held = False

    seen: list[bool] = []

    class Stage:
        def process(self, item: object) -> list[object]:
            seen.append(Gate.held)
            return []

        def close(self) -> list[object]:
            return []

    line, last = ismrmrd.Acquisition(), ismrmrd.Acquisition()
    last.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    list(run_stages([Stage()], [line, line, last], Gate()))  # type: ignore[list-item]
    assert seen == [False, False, True]
