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
MITIGATED_SCORE_KEY = "CycGuard.MitigatedScore"
METHOD_KEY = "CycGuard.MitigationMethod"
HISTORY_KEY = "ImageProcessingHistory"

MetaValue = str | tuple[str, ...]  # a multi-valued entry is a tuple


def verdict_meta(verdict: str, reason: str) -> dict[str, str]:
    """The meta that states a verdict: the verdict, its one-line reason (``ImageComment``)
    and Gadgetron's short comment.

    Raises:
        ValueError: a verdict outside :data:`VERDICTS`.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    return {VERDICT_KEY: verdict, "ImageComment": reason, "GADGETRON_ImageComment": f"CycGuard {verdict}"}



def recon_meta(model: str, seconds: float) -> dict[str, MetaValue]:
    """The meta of a reconstruction before any check: ``unverified``, the model's tag, the
    stage's seconds and the processing history."""
    return {
        **verdict_meta("unverified", "unverified: no consistency check ran on this image"),
        MODEL_KEY: model,
        SECONDS_PREFIX + "recon": f"{seconds:.4f}",
        HISTORY_KEY: "CYCGUARD_MODL",
    }


def mitigation_meta(verdict: str, reason: str, seconds: float, mitigated_score: float | None, method: str) -> dict[str, MetaValue]:
    """The meta the mitigation stage writes on a flagged image: its reason, its seconds, the
    rewrite's score where the method measured one, and for a rewritten image its verdict,
    method, history and series description."""
    values: dict[str, MetaValue] = {"ImageComment": reason, SECONDS_PREFIX + "mitigate": f"{seconds:.4f}"}
    if mitigated_score is not None:
        values[MITIGATED_SCORE_KEY] = f"{mitigated_score:.6g}"
    if verdict == "mitigated":
        values.update({
            **verdict_meta("mitigated", reason),
            METHOD_KEY: method,
            HISTORY_KEY: ("CYCGUARD_MODL", "CYCGUARD_MITIGATION"),
            "SeriesDescriptionAdditional": "CYCGUARD_MITIGATED",
        })
    return values

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
