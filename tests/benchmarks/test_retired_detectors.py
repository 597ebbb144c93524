"""The detectors of earlier releases, as the benchmarks register them, still calibrate as they did."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import benchmarks.retired_detectors  # noqa: F401,E402  (registers the detectors of earlier releases)
from recon.detect import CalibrationError, CyclicDetector, calibrate
from recon.detect.calibration import Calibration, DetectorKey, calibrate_combined
from recon.detect.cyclic import DetectionScores
from tests.recon.tiny import FAMILY, PROTOCOL, null_union


def test_union_calibration_scales_each_component_by_its_threshold(tmp_path: Path, setup: tuple) -> None:
    detector = CyclicDetector(setup[0], FAMILY, folds=3, directions=2, power_iterations=1)
    key = DetectorKey.of("holdout_union", detector)
    rng = np.random.default_rng(0)
    noise, sensitive = rng.gamma(4.0, 0.3, 199), rng.gamma(2.0, 1.5, 199)
    cal = calibrate_combined({"holdout_noise": noise, "holdout_sensitive": sensitive}, 0.05, "ab" * 32, PROTOCOL, key)
    scales = dict(cal.scales)
    assert scales["holdout_noise"] == calibrate(noise, 0.05, "ab" * 32, PROTOCOL, key).threshold
    assert scales["holdout_sensitive"] == calibrate(sensitive, 0.05, "ab" * 32, PROTOCOL, key).threshold
    union = np.maximum(noise / scales["holdout_noise"], sensitive / scales["holdout_sensitive"])
    assert np.mean(union > cal.threshold) <= 0.05  # the union's rate, not the sum of the components'
    assert np.mean(union > 1.0) > 0.05  # flagging on either component's own threshold would exceed it

    def scores(noise_value: float, sensitive_value: float) -> DetectionScores:
        return DetectionScores(0.0, 0.0, 0.0, 0.0, 0.0, noise_value, sensitive_value)

    assert cal.score_of(scores(2 * scales["holdout_noise"], 0.0)) == pytest.approx(2.0)  # either component can flag
    assert cal.flags(cal.score_of(scores(0.0, 2 * scales["holdout_sensitive"])))
    assert not cal.flags(cal.score_of(scores(0.5 * scales["holdout_noise"], 0.5 * scales["holdout_sensitive"])))
    with pytest.raises(ValueError, match="combines holdout_noise and holdout_sensitive"):
        scores(1.0, 1.0).get("holdout_union")
    path = cal.save(tmp_path / "union.json")
    assert Calibration.load(path, "ab" * 32, PROTOCOL, key) == cal  # the scales round-trip (and are in the digest)
    stripped = Calibration(cal.model_sha256, cal.protocol, key, cal.target_fpr, cal.threshold, cal.clean_scores)
    with pytest.raises(CalibrationError, match="needs positive scales of"):
        Calibration.load(stripped.save(tmp_path / "stripped.json"), "ab" * 32, PROTOCOL, key)
    with pytest.raises(ValueError, match="is not combined from"):
        calibrate_combined({"holdout_noise": noise}, 0.05, "ab" * 32, PROTOCOL, key)

def test_null_spike_union_shares_the_budget_by_two_components_with_a_prior_backstop(tmp_path: Path, setup: tuple) -> None:
    """``null_spike_union``: ``null_shift`` and ``dc_spike`` are scaled by their clean
    thresholds, ``prior_shift`` (same pass) by its largest clean value (a backstop), and its
    threshold at the rate is kept as the mitigation's gate: saved, checked on load."""
    from recon.mitigate.gated import prior_gate

    key, parts, cal = null_union(setup[0], "null_spike_union", 3)
    scales = dict(cal.scales)
    assert list(scales) == ["null_shift", "dc_spike", "prior_shift"]
    assert scales["null_shift"] == calibrate(parts["null_shift"], 0.05, "ab" * 32, PROTOCOL, key).threshold
    assert scales["prior_shift"] == pytest.approx(float(parts["prior_shift"].max()))  # the backstop
    gate = calibrate(parts["prior_shift"], 0.05, "ab" * 32, PROTOCOL, key).threshold
    assert prior_gate(cal) == gate < scales["prior_shift"]
    # the union's threshold is set by the two components: no clean slice's prior_shift exceeds its backstop
    two = calibrate([max(n / scales["null_shift"], d / scales["dc_spike"]) for n, d in zip(parts["null_shift"], parts["dc_spike"], strict=True)], 0.05, "ab" * 32, PROTOCOL, key)
    assert cal.threshold == pytest.approx(two.threshold)

    def shifted(value: float) -> DetectionScores:
        return DetectionScores(0.0, 0.0, 0.0, 0.0, 0.0, prior_shift=value, dc_spike=0.0, null_shift=0.0)

    assert not cal.flags(cal.score_of(shifted(1.01 * gate)))  # past the gate, not past any clean slice: the gate, not a flag
    assert cal.flags(cal.score_of(shifted(2 * cal.threshold * scales["prior_shift"])))  # a gross move flags
    path = cal.save(tmp_path / "null_spike.json")
    assert json.loads(path.read_text())["gates"] == {"prior_shift": gate}
    assert Calibration.load(path, "ab" * 32, PROTOCOL, key) == cal
    raw = json.loads(path.read_text())
    del raw["gates"]
    raw["sha256"] = hashlib.sha256(json.dumps({k: v for k, v in raw.items() if k != "sha256"}, sort_keys=True).encode()).hexdigest()
    (tmp_path / "gateless.json").write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="needs positive gates of \\['prior_shift'\\]"):
        Calibration.load(tmp_path / "gateless.json", "ab" * 32, PROTOCOL, key)
    from recon.detect.statistics import Combination

    with pytest.raises(ValueError, match="gates must be backstops"):  # a gate is a backstop's threshold
        Combination("bad", "a gate that is no backstop", ("null_shift", "prior_shift"), gates=("prior_shift",))

def test_shift_union_calibration_has_three_components(tmp_path: Path, setup: tuple) -> None:
    detector = CyclicDetector(setup[0], FAMILY, folds=3, directions=2, power_iterations=1)
    key = DetectorKey.of("holdout_shift_union", detector)
    rng = np.random.default_rng(1)
    parts = {"holdout_noise": rng.gamma(4.0, 0.3, 199), "holdout_sensitive": rng.gamma(2.0, 1.5, 199), "prior_shift": rng.gamma(3.0, 0.2, 199)}
    cal = calibrate_combined(parts, 0.05, "ab" * 32, PROTOCOL, key)
    scales = dict(cal.scales)
    assert list(scales) == ["holdout_noise", "holdout_sensitive", "prior_shift"]
    shifted = DetectionScores(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3 * scales["prior_shift"])
    assert cal.score_of(shifted) == pytest.approx(3.0) and cal.flags(cal.score_of(shifted))
    path = cal.save(tmp_path / "shift.json")
    assert json.loads(path.read_text())["detector"]["prior_gain"] == 4.0
    assert Calibration.load(path, "ab" * 32, PROTOCOL, key) == cal
    other = DetectorKey.of("holdout_shift_union", replace(detector, prior_gain=10.0))
    with pytest.raises(CalibrationError, match="made with detector"):
        Calibration.load(path, "ab" * 32, PROTOCOL, other)
    with pytest.raises(ValueError, match="is not combined from"):
        calibrate_combined({k: parts[k] for k in ("holdout_noise", "holdout_sensitive")}, 0.05, "ab" * 32, PROTOCOL, key)
