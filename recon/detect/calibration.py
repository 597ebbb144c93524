"""Detection thresholds calibrated on clean slices, tied to a model and a protocol.

A calibration holds the sorted clean scores of one statistic, the threshold for a target
false-positive rate and what they are valid for: the weights' SHA-256, the protocol
(matrix, coils, mask family) and the detector's settings. Loading checks all three and
the file's own digest, and refuses a mismatch with an error that says which.

Threshold: the conformal quantile ``s_(ceil((n + 1)(1 - alpha)))`` of the n clean scores,
which keeps the false-positive rate at or below ``alpha`` for exchangeable clean data.
p-value of a score s: ``(1 + #{clean >= s}) / (n + 1)``.

Coverage: the calibration also records the range of signal levels (RMS of the ACS lines in
noise sigmas, :func:`recon.detect.cyclic.signal_level`) its clean slices had. A score says
nothing about a slice whose SNR lies outside that range (noise-dominated data, or far more
signal than anything calibrated), so such a slice cannot be ``clean``
(:meth:`Calibration.covers`); nor can any slice under a file without the range.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recon.detect.cyclic import scaled_maximum
from recon.detect.statistics import COMBINATIONS, needs

if TYPE_CHECKING:
    from recon.detect.cyclic import CyclicDetector, DetectionScores

FORMAT = "cycguard-calibration/1"


class CalibrationError(ValueError):
    """A calibration file that does not fit the model, protocol or detector in use."""


@dataclass(frozen=True)
class ProtocolKey:
    """What a calibration is valid for besides the model."""

    matrix: tuple[int, int]
    coils: int
    mask_kind: str
    acceleration: int
    acs_lines: int

    def describe(self) -> str:
        """One line a physicist reads, e.g. ``128x128, 8 coils, equispaced R=4, 16 ACS lines``."""
        return f"{self.matrix[0]}x{self.matrix[1]}, {self.coils} coils, {self.mask_kind} R={self.acceleration}, {self.acs_lines} ACS lines"

    def differences(self, other: ProtocolKey) -> str:
        """The fields in which ``other`` differs from this protocol, ``name this vs other``."""
        return ", ".join(f"{name} {getattr(self, name)} vs {getattr(other, name)}" for name in self.__dataclass_fields__ if getattr(self, name) != getattr(other, name))


@dataclass(frozen=True)
class DetectorKey:
    """The detector settings the scores were computed with."""

    statistic: str
    alternatives: int
    jitter_scale: float
    seed: int
    folds: int | None = None  # the statistics with folds only; absent from files of the others
    directions: int | None = None  # those with sensitive directions only
    power_iterations: int | None = None  # likewise
    prior_gain: float | None = None  # prior_shift and the unions with it only

    @classmethod
    def of(cls, statistic: str, detector: CyclicDetector) -> DetectorKey:
        """The key of a detector scoring ``statistic``."""
        need = needs(statistic)
        return cls(
            statistic, detector.alternatives, detector.jitter_scale, detector.seed,
            folds=detector.folds if need.folds else None,
            directions=detector.directions if need.sensitive else None,
            power_iterations=detector.power_iterations if need.sensitive else None,
            prior_gain=float(detector.prior_gain) if need.shift else None,
        )


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold and the clean scores behind it."""

    model_sha256: str
    protocol: ProtocolKey
    detector: DetectorKey
    target_fpr: float
    threshold: float
    clean_scores: tuple[float, ...]
    scales: tuple[tuple[str, float], ...] = ()  # a combined statistic's components and their divisors
    # clean thresholds at the same rate of components scaled as backstops
    # (a combination's ``gates``, :mod:`recon.detect.statistics`: the mitigation's gate)
    gates: tuple[tuple[str, float], ...] = ()
    # (lowest, highest) signal level of the clean slices; ``None`` (bare scores, or a file made
    # before calibrations recorded it) covers nothing
    signal_range: tuple[float, float] | None = None
    # what the clean slices were (anatomy, coils, where from): a calibration covers what it
    # was made of and nothing else; ``None`` in files that do not say
    source: str | None = None

    def covers(self, level: float | None) -> bool:
        """Whether a slice's signal level lies within the clean slices' range (an unknown or
        non-finite level, or a calibration without a range, is not covered: fail closed)."""
        if self.signal_range is None or level is None or not math.isfinite(level):
            return False
        low, high = self.signal_range
        return low <= level <= high

    def score_of(self, scores: DetectionScores) -> float:
        """The calibrated statistic of a slice's scores: the named one, or for a combined
        statistic the largest component over its scale."""
        if not self.scales:
            return scores.get(self.detector.statistic)
        return scaled_maximum(scores, self.scales)

    def flags(self, score: float) -> bool:
        """Whether ``score`` exceeds the threshold (non-finite scores are flagged: fail closed)."""
        return not math.isfinite(score) or score > self.threshold

    @property
    def clean_max(self) -> float:
        """The largest clean calibration score: a score above it has the smallest p-value a
        calibration of this size can give, ``1 / (n + 1)``."""
        return max(self.clean_scores)

    def beyond_clean(self, score: float) -> bool:
        """Whether ``score`` exceeds every clean calibration score (a non-finite score does:
        fail closed), the evidence the mitigation asks for before it rewrites."""
        return not score <= self.clean_max

    def p_value(self, score: float) -> float:
        """Conformal p-value of ``score`` among the clean calibration scores."""
        if not math.isfinite(score):
            return 0.0
        exceed = sum(1 for s in self.clean_scores if s >= score)
        return (1 + exceed) / (len(self.clean_scores) + 1)

    def _payload(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "model_sha256": self.model_sha256,
            "protocol": asdict(self.protocol),
            "detector": {k: v for k, v in asdict(self.detector).items() if v is not None},
            "target_fpr": self.target_fpr,
            "threshold": self.threshold,
            "clean_scores": list(self.clean_scores),
            **({"scales": {name: scale for name, scale in self.scales}} if self.scales else {}),
            **({"gates": {name: gate for name, gate in self.gates}} if self.gates else {}),
            **({"signal_range": list(self.signal_range)} if self.signal_range is not None else {}),
            **({"source": self.source} if self.source is not None else {}),
        }

    @property
    def sha256(self) -> str:
        """The SHA-256 of the canonical payload (the file's ``sha256``): the calibration's identity."""
        return hashlib.sha256(json.dumps(self._payload(), sort_keys=True).encode()).hexdigest()

    def save(self, path: Path) -> Path:
        """Write JSON with a SHA-256 of its canonical payload."""
        path.write_text(json.dumps({**self._payload(), "sha256": self.sha256}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path, model_sha256: str, protocol: ProtocolKey, detector: DetectorKey) -> Calibration:
        """Read a calibration and check that it belongs to this model, protocol and detector.

        Raises:
            CalibrationError: unreadable, edited (digest mismatch), or made for another
                model, protocol or detector.
        """
        try:
            raw = json.loads(Path(path).read_text())
            digest = raw.pop("sha256")
            if raw.get("format") != FORMAT:
                raise CalibrationError(f"calibration {path}: format {raw.get('format')!r}, expected {FORMAT!r}")
            calibration = cls(
                model_sha256=str(raw["model_sha256"]),
                protocol=ProtocolKey(
                    matrix=(int(raw["protocol"]["matrix"][0]), int(raw["protocol"]["matrix"][1])),
                    coils=int(raw["protocol"]["coils"]),
                    mask_kind=str(raw["protocol"]["mask_kind"]),
                    acceleration=int(raw["protocol"]["acceleration"]),
                    acs_lines=int(raw["protocol"]["acs_lines"]),
                ),
                detector=DetectorKey(**raw["detector"]),
                target_fpr=float(raw["target_fpr"]),
                threshold=float(raw["threshold"]),
                clean_scores=tuple(float(s) for s in raw["clean_scores"]),
                scales=tuple((str(name), float(scale)) for name, scale in raw.get("scales", {}).items()),
                gates=tuple((str(name), float(gate)) for name, gate in raw.get("gates", {}).items()),
                signal_range=_signal_range(raw["signal_range"]) if "signal_range" in raw else None,
                source=str(raw["source"]) if "source" in raw else None,
            )
        except CalibrationError:
            raise
        except FileNotFoundError as err:
            raise CalibrationError(f"calibration {path} not found") from err
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(f"calibration {path} is malformed: {err!r}") from err
        if calibration.sha256 != digest:
            raise CalibrationError(f"calibration {path} has been modified (SHA-256 mismatch)")
        if calibration.model_sha256 != model_sha256:
            raise CalibrationError(
                f"calibration {path} was made for model {calibration.model_sha256[:12]}, "
                f"the loaded model is {model_sha256[:12]}: recalibrate (cycguard calibrate)"
            )
        if calibration.protocol != protocol:
            raise CalibrationError(
                f"calibration {path} was made for another protocol ({calibration.protocol.describe()}); "
                f"this scan differs in {calibration.protocol.differences(protocol)}"
            )
        if calibration.detector != detector:
            raise CalibrationError(f"calibration {path} was made with detector {calibration.detector}, configured {detector}")
        combination = COMBINATIONS.get(detector.statistic)
        for kind, held in (("scales", calibration.scales), ("gates", calibration.gates)):
            names = getattr(combination, "components" if kind == "scales" else "gates", ())
            if tuple(name for name, _ in held) != names or any(not (math.isfinite(v) and v > 0) for _, v in held):
                raise CalibrationError(f"calibration {path} has {kind} {dict(held)}, statistic {detector.statistic} needs positive {kind} of {list(names)}")
        return calibration


def _signal_range(value: object) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"signal_range {value!r} is not [lowest, highest]")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise ValueError(f"signal_range {value!r} is not [lowest, highest] of finite levels")
    return low, high


def signal_range(levels: Sequence[float | None]) -> tuple[float, float]:
    """The (lowest, highest) signal level of a calibration's clean slices.

    Raises:
        ValueError: a slice without a finite signal level.
    """
    finite = [float(v) for v in levels if v is not None and math.isfinite(v)]
    if not finite or len(finite) != len(levels):
        raise ValueError("every clean slice needs a finite signal level")
    return min(finite), max(finite)


def calibrate(
    scores: Sequence[float],
    target_fpr: float,
    model_sha256: str,
    protocol: ProtocolKey,
    detector: DetectorKey,
) -> Calibration:
    """Threshold for ``target_fpr`` from clean scores (conformal quantile).

    Raises:
        ValueError: too few scores for the target (need ``n + 1 >= 1 / target_fpr``), a
            target outside (0, 1), or a non-finite score.
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"target false-positive rate must be in (0, 1), got {target_fpr}")
    clean = sorted(float(s) for s in scores)
    if any(not math.isfinite(s) for s in clean):
        raise ValueError("clean calibration scores must be finite")
    n = len(clean)
    rank = math.ceil((n + 1) * (1 - target_fpr))
    if rank > n:
        raise ValueError(f"{n} clean scores cannot calibrate a {target_fpr:g} false-positive rate; need at least {math.ceil(1 / target_fpr) - 1}")
    return Calibration(model_sha256, protocol, detector, target_fpr, clean[rank - 1], tuple(clean))


def calibrate_combined(
    components: Mapping[str, Sequence[float]],
    target_fpr: float,
    model_sha256: str,
    protocol: ProtocolKey,
    detector: DetectorKey,
) -> Calibration:
    """Calibrate a combination (:data:`recon.detect.statistics.COMBINATIONS`) from its components'
    clean scores, slice by slice.

    Each component is divided by its own conformal threshold at ``target_fpr`` (a backstop,
    its ``backstops``, by its largest clean score); the combined score of a slice is the
    largest quotient, and its threshold the conformal quantile of the combined clean scores
    (so the false-positive rate of the union is ``target_fpr``, not the sum of the
    components'). The combination's ``gates`` (components whose scale is a backstop)
    keep their own conformal thresholds at ``target_fpr`` beside the scales.
    """
    combination = COMBINATIONS.get(detector.statistic)
    names = () if combination is None else combination.components
    if combination is None or set(components) != set(names):
        raise ValueError(f"statistic {detector.statistic!r} is not combined from {sorted(components)}")
    lengths = {len(components[name]) for name in names}
    if len(lengths) != 1:
        raise ValueError(f"the components need one score per clean slice each, got {lengths}")
    backstops = combination.backstops
    alone = {name: calibrate(components[name], target_fpr, model_sha256, protocol, detector) for name in names}
    scales = tuple((name, max(alone[name].clean_scores) if name in backstops else alone[name].threshold) for name in names)
    if any(scale <= 0 for _, scale in scales):
        raise ValueError(f"component thresholds must be positive to scale by, got {dict(scales)}")
    gates = tuple((name, alone[name].threshold) for name in combination.gates)
    combined = [max(float(components[name][i]) / scale for name, scale in scales) for i in range(lengths.pop())]
    single = calibrate(combined, target_fpr, model_sha256, protocol, detector)
    return Calibration(model_sha256, protocol, detector, target_fpr, single.threshold, single.clean_scores, scales, gates)
