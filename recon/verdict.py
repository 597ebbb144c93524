"""The verdict contract: what every image says about its check, in its ISMRMRD meta.

One place for the verdicts and the meta keys that carry them, written by the gadgets and
the in-process path alike and read by export, DICOM, replay and reports (the meanings are
in ``docs/DESIGN.md``, section 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recon.detect.cyclic import DetectionScores

VERDICTS = ("clean", "flagged", "mitigated", "unverified")

VERDICT_KEY = "CycGuard.Verdict"
MODEL_KEY = "CycGuard.Model"
SCORE_KEY = "CycGuard.Score"
THRESHOLD_KEY = "CycGuard.Threshold"
P_VALUE_KEY = "CycGuard.PValue"
STATISTIC_KEY = "CycGuard.Statistic"
NOISE_SIGMA_KEY = "CycGuard.NoiseSigma"
SIGNAL_LEVEL_KEY = "CycGuard.SignalLevel"
CALIBRATION_KEY = "CycGuard.Calibration"
PROTOCOL_KEY = "CycGuard.Protocol"
SECONDS_PREFIX = "CycGuard.Seconds."


def verdict_meta(verdict: str, reason: str) -> dict[str, str]:
    """The meta that states a verdict: the verdict, its one-line reason (``ImageComment``)
    and Gadgetron's short comment.

    Raises:
        ValueError: a verdict outside :data:`VERDICTS`.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    return {VERDICT_KEY: verdict, "ImageComment": reason, "GADGETRON_ImageComment": f"CycGuard {verdict}"}


@dataclass(frozen=True, eq=False)
class CheckResult:
    """The consistency check of one reconstruction (the detection stage): its verdict and
    the evidence behind it.

    ``scores`` holds every statistic; it is ``None`` when the result was read back from
    image meta (the mitigation gadget), which carries only the calibrated one.
    """

    verdict: str
    score: float
    threshold: float
    p_value: float
    scores: DetectionScores | None
    reason: str
    seconds: float
