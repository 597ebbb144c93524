"""What a mitigation method returns, and the time budget every method answers to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from recon.physics.prepared import clock
from recon.verdict import CheckResult


@dataclass(frozen=True, eq=False)
class MitigationOutcome:
    """What the mitigation stage did to a flagged image: the image to ship, its verdict
    (``mitigated`` or still ``flagged``), the rewrite's score where a method measured one,
    the reason, seconds and network passes spent."""

    image: np.ndarray
    verdict: str
    mitigated_score: float | None
    reason: str
    seconds: float
    network_passes: int


def unchanged(image: np.ndarray, checked: CheckResult, why: str, seconds: float = 0.0, passes: int = 0) -> MitigationOutcome:
    """The original image, ``flagged``, with the check's reason and ``why`` it was not rewritten."""
    return MitigationOutcome(image, "flagged", None, f"{checked.reason}; {why}", seconds, passes)


def past_budget(seconds: float, budget: float, passes: int, original: np.ndarray, checked: CheckResult) -> MitigationOutcome | None:
    """The original, ``flagged``, when a rewrite took ``seconds`` past its time ``budget``; else ``None``."""
    if seconds <= budget:
        return None
    return unchanged(original, checked, f"mitigation took {seconds:.3g} s, past its time budget ({budget:g} s): the original image ships", seconds, passes)


def shipped(x: Tensor, reason: str, t0: float, passes: int, budget: float, original: np.ndarray, checked: CheckResult) -> MitigationOutcome:
    """A rewrite ``x`` (``(1, y, x)``) that ships as ``mitigated`` unless it came past the time budget."""
    seconds = clock(x) - t0
    late = past_budget(seconds, budget, passes, original, checked)
    return late if late is not None else MitigationOutcome(x[0].cpu().numpy().astype(np.complex64), "mitigated", None, reason, seconds, passes)
