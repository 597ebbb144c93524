"""Calibrations: thresholds, scales, what they are valid for, what they refuse."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import benchmarks.retired_detectors  # noqa: F401,E402  (registers the detectors of earlier releases)
from recon.detect import CalibrationError, CyclicDetector, calibrate
from recon.detect.calibration import Calibration, DetectorKey, ProtocolKey, calibrate_combined
from recon.detect.cyclic import DetectionScores
from tests.recon.tiny import DETECTOR, FAMILY, PROTOCOL, null_union


def test_holdout_calibrations_carry_their_folds(tmp_path: Path, setup: tuple) -> None:
    detector = CyclicDetector(setup[0], FAMILY, folds=3)
    key = DetectorKey.of("holdout_noise", detector)
    assert key.folds == 3 and DetectorKey.of("cyclic", detector) == DETECTOR  # files of other statistics unchanged
    path = calibrate(np.linspace(0, 1, 99), 0.05, "ab" * 32, PROTOCOL, key).save(tmp_path / "cal.json")
    assert json.loads(path.read_text())["detector"]["folds"] == 3
    with pytest.raises(CalibrationError, match="made with detector"):
        Calibration.load(path, "ab" * 32, PROTOCOL, DetectorKey.of("holdout_noise", CyclicDetector(setup[0], FAMILY, folds=4)))
    assert Calibration.load(path, "ab" * 32, PROTOCOL, key).detector == key

def test_sensitive_calibrations_carry_their_directions(tmp_path: Path, setup: tuple) -> None:
    detector = CyclicDetector(setup[0], FAMILY, folds=3, directions=2, power_iterations=1)
    key = DetectorKey.of("holdout_sensitive", detector)
    assert (key.folds, key.directions, key.power_iterations) == (3, 2, 1)
    assert DetectorKey.of("holdout_noise", detector).directions is None  # files of holdout_noise unchanged
    path = calibrate(np.linspace(0, 1, 99), 0.05, "ab" * 32, PROTOCOL, key).save(tmp_path / "cal.json")
    assert json.loads(path.read_text())["detector"]["directions"] == 2
    other = DetectorKey.of("holdout_sensitive", CyclicDetector(setup[0], FAMILY, folds=3, directions=4, power_iterations=1))
    with pytest.raises(CalibrationError, match="made with detector"):
        Calibration.load(path, "ab" * 32, PROTOCOL, other)

def test_calibration_threshold_and_p_values(tmp_path: Path) -> None:
    scores = np.linspace(0.0, 1.0, 199)
    cal = calibrate(scores, 0.05, "ab" * 32, PROTOCOL, DETECTOR)
    # conformal rank ceil(200 * 0.95) = 190 -> the 190th smallest score
    assert cal.threshold == pytest.approx(scores[189])
    assert np.mean([cal.flags(s) for s in scores]) <= 0.05
    assert cal.p_value(2.0) == pytest.approx(1 / 200)
    assert cal.p_value(-1.0) == pytest.approx(1.0)
    assert cal.flags(float("nan")) and cal.p_value(float("nan")) == 0.0
    with pytest.raises(ValueError, match="cannot calibrate a 0.001 false-positive rate"):
        calibrate(scores, 0.001, "ab" * 32, PROTOCOL, DETECTOR)
    path = cal.save(tmp_path / "cal.json")
    assert Calibration.load(path, "ab" * 32, PROTOCOL, DETECTOR) == cal

def test_calibration_refuses_other_model_protocol_detector_or_edits(tmp_path: Path) -> None:
    path = calibrate(np.linspace(0, 1, 99), 0.05, "ab" * 32, PROTOCOL, DETECTOR).save(tmp_path / "cal.json")
    with pytest.raises(CalibrationError, match="made for model abababababab"):
        Calibration.load(path, "cd" * 32, PROTOCOL, DETECTOR)
    with pytest.raises(CalibrationError, match="made for another protocol"):
        Calibration.load(path, "ab" * 32, ProtocolKey((64, 64), 4, "equispaced", 4, 8), DETECTOR)
    with pytest.raises(CalibrationError, match="made with detector"):
        Calibration.load(path, "ab" * 32, PROTOCOL, DetectorKey("dc", 3, 6.0, 0))
    raw = json.loads(path.read_text())
    raw["threshold"] = 99.0
    path.write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="has been modified"):
        Calibration.load(path, "ab" * 32, PROTOCOL, DETECTOR)
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path / "absent.json", "ab" * 32, PROTOCOL, DETECTOR)

def test_null_first_union_gives_null_shift_the_whole_budget(tmp_path: Path, setup: tuple) -> None:
    """``null_first_union``: ``dc_spike`` and ``prior_shift`` are both backstops (their
    largest clean values), so the union's threshold is ``null_shift``'s own quantile and it
    flags exactly the clean slices ``null_shift`` alone would; a spike past every clean
    slice still flags, one inside their range does not; the gate is kept."""
    from recon.mitigate.gated import prior_gate

    key, parts, cal = null_union(setup[0], "null_first_union", 4)
    scales = dict(cal.scales)
    alone = calibrate(parts["null_shift"], 0.05, "ab" * 32, PROTOCOL, key)
    assert scales == {"null_shift": alone.threshold, "dc_spike": pytest.approx(float(parts["dc_spike"].max())), "prior_shift": pytest.approx(float(parts["prior_shift"].max()))}
    assert cal.threshold == pytest.approx(1.0)  # null_shift's quantile over itself: the backstops take no share
    flagged = [cal.flags(max(n / scales["null_shift"], d / scales["dc_spike"], p / scales["prior_shift"])) for n, d, p in zip(*parts.values(), strict=True)]
    assert flagged == [alone.flags(n) for n in parts["null_shift"]]
    assert prior_gate(cal) == calibrate(parts["prior_shift"], 0.05, "ab" * 32, PROTOCOL, key).threshold

    def spiked(value: float) -> DetectionScores:
        return DetectionScores(0.0, 0.0, 0.0, 0.0, 0.0, prior_shift=0.0, dc_spike=value, null_shift=0.0)

    spike_quantile = calibrate(parts["dc_spike"], 0.05, "ab" * 32, PROTOCOL, key).threshold
    assert not cal.flags(cal.score_of(spiked(1.01 * spike_quantile)))  # inside the clean range
    assert cal.flags(cal.score_of(spiked(1.5 * scales["dc_spike"])))  # past every clean slice
    path = cal.save(tmp_path / "null_first.json")
    assert Calibration.load(path, "ab" * 32, PROTOCOL, key) == cal
    with pytest.raises(CalibrationError, match="made with detector"):
        Calibration.load(path, "ab" * 32, PROTOCOL, DetectorKey.of("null_spike_union", CyclicDetector(setup[0], FAMILY, prior_gain=4.0)))

def test_null_noise_union_adds_noise_excess_as_a_third_backstop(setup: tuple) -> None:
    """``null_noise_union``: ``null_first_union`` plus ``noise_excess`` scaled by its largest
    clean value; the threshold stays ``null_shift``'s own quantile; a slice noisier than every
    clean one flags."""
    from recon.mitigate.gated import prior_gate

    detector = CyclicDetector(setup[0], FAMILY, prior_gain=4.0)
    key = DetectorKey.of("null_noise_union", detector)
    rng = np.random.default_rng(8)
    parts = {
        "null_shift": rng.gamma(9.0, 0.3, 199), "dc_spike": rng.gamma(5.0, 1.5, 199), "prior_shift": rng.gamma(3.0, 0.2, 199),
        "noise_excess": rng.normal(0.96, 0.005, 199),
    }
    cal = calibrate_combined(parts, 0.05, "ab" * 32, PROTOCOL, key)
    scales = dict(cal.scales)
    assert list(scales) == ["null_shift", "dc_spike", "prior_shift", "noise_excess"]
    assert scales["noise_excess"] == pytest.approx(float(parts["noise_excess"].max()))
    assert cal.threshold == pytest.approx(1.0)
    assert prior_gate(cal) == calibrate(parts["prior_shift"], 0.05, "ab" * 32, PROTOCOL, key).threshold

    def noisy(value: float) -> DetectionScores:
        return DetectionScores(0.0, 0.0, 0.0, 0.0, 0.0, prior_shift=0.0, dc_spike=0.0, null_shift=0.0, noise_excess=value)

    assert not cal.flags(cal.score_of(noisy(float(np.median(parts["noise_excess"])))))
    assert cal.flags(cal.score_of(noisy(1.05 * scales["noise_excess"])))

def test_a_calibration_covers_the_signal_levels_of_its_clean_slices_only(tmp_path: Path) -> None:
    from recon.detect.calibration import signal_range

    assert signal_range([3.0, 1.5, 7.25]) == (1.5, 7.25)
    for bad in ([], [1.0, None], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="finite signal level"):
            signal_range(bad)
    cal = replace(calibrate(np.linspace(0, 1, 99), 0.05, "ab" * 32, PROTOCOL, DETECTOR), signal_range=(1.5, 7.25))
    assert [cal.covers(v) for v in (1.5, 4.0, 7.25)] == [True] * 3
    assert not any(cal.covers(v) for v in (1.49, 7.26, None, float("nan"), float("inf")))
    assert not replace(cal, signal_range=None).covers(4.0)  # no range covers nothing
    path = cal.save(tmp_path / "cal.json")
    assert json.loads(path.read_text())["signal_range"] == [1.5, 7.25]
    assert Calibration.load(path, "ab" * 32, PROTOCOL, DETECTOR) == cal
    raw = json.loads(path.read_text())
    raw["signal_range"] = [7.25, 1.5]
    raw.pop("sha256")
    path.write_text(json.dumps({**raw, "sha256": hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()}))
    with pytest.raises(CalibrationError, match="signal_range"):
        Calibration.load(path, "ab" * 32, PROTOCOL, DETECTOR)

def test_a_protocol_mismatch_names_the_fields_that_differ(tmp_path: Path) -> None:
    path = calibrate(np.linspace(0, 1, 99), 0.05, "ab" * 32, PROTOCOL, DETECTOR).save(tmp_path / "cal.json")
    with pytest.raises(CalibrationError, match=r"32x32, 4 coils, equispaced R=4, 8 ACS lines\); this scan differs in coils 4 vs 12, acs_lines 8 vs 20$"):
        Calibration.load(path, "ab" * 32, ProtocolKey((32, 32), 12, "equispaced", 4, 20), DETECTOR)


def test_a_calibration_states_what_its_clean_slices_were(tmp_path: Path) -> None:
    from dataclasses import replace

    plain = calibrate([0.1 * i for i in range(1, 200)], 0.05, "ab" * 32, PROTOCOL, DETECTOR)
    stated = replace(plain, source="clean scans: a.h5 (199 slices)")
    assert stated.sha256 != plain.sha256 and "source" not in json.loads(plain.save(tmp_path / "plain.json").read_text())
    path = stated.save(tmp_path / "stated.json")
    assert Calibration.load(path, "ab" * 32, PROTOCOL, DETECTOR).source == "clean scans: a.h5 (199 slices)"
    raw = json.loads(path.read_text())
    raw["source"] = "clean scans: b.h5 (199 slices)"
    path.write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="modified"):
        Calibration.load(path, "ab" * 32, PROTOCOL, DETECTOR)
