"""Thread budgets follow the cores a process may run on, not the machine's count."""

from __future__ import annotations

import os
import subprocess
import sys

from gadgets.cores import available_cores, share

PROBE = "from gadgets.cores import available_cores, share; import torch; print(available_cores(), share(2), torch.get_num_threads())"


def test_a_process_pinned_to_one_core_budgets_one_thread_as_torch_does() -> None:
    first = min(os.sched_getaffinity(0))
    pinned = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120,
                            preexec_fn=lambda: os.sched_setaffinity(0, {first}))
    assert pinned.stdout.split() == ["1", "1", "1"]


def test_the_cores_are_split_between_the_parts_at_least_one_each() -> None:
    cores = len(os.sched_getaffinity(0))
    assert available_cores() == cores
    assert share(1) == cores and share(cores) == 1 and share(cores + 5) == 1 and share(0) == cores
