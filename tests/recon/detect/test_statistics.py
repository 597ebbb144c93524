"""The registry of statistics and detectors: what the product ships, what each needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recon.detect.calibration import CalibrationError
from recon.detect.defense import calibration_statistic
from recon.detect.statistics import (
    COMBINATIONS,
    DATA,
    DEFAULT_STATISTIC,
    DETECTORS,
    PRODUCT_CHOICES,
    STATISTICS,
    Combination,
    judges_image,
    lookup,
    needs,
    register,
)


def test_the_product_ships_two_detectors_and_the_papers_statistic() -> None:
    assert [d.name for d in DETECTORS] == ["null_first_union", "null_noise_union"] and DEFAULT_STATISTIC == "null_first_union"
    assert PRODUCT_CHOICES == ("null_first_union", "null_noise_union", "cyclic")
    default = COMBINATIONS[DEFAULT_STATISTIC]
    assert default.components == ("null_shift", "dc_spike", "prior_shift") and default.backstops == ("dc_spike", "prior_shift")
    assert default.gates == ("prior_shift",)


def test_what_each_statistic_and_detector_needs() -> None:
    assert needs("null_first_union") == needs("prior_shift") == needs("null_shift")  # one shift pass, no folds
    assert not needs("null_first_union").folds and needs("null_first_union").shift
    assert needs("holdout_sensitive").folds and needs("holdout_sensitive").sensitive and not needs("holdout_sensitive").shift
    assert not any(any(vars(needs(name)).values()) for name in ("cyclic", "dc", "dc_spike", "noise_excess"))
    assert {name for name, s in STATISTICS.items() if s.source == DATA} == {"holdout_noise", "holdout_sensitive", "prior_shift", "null_shift"}


def test_only_one_statistic_of_the_image_judges_a_rewrite() -> None:
    assert judges_image("cyclic_noise") and judges_image("dc_spike")
    assert not judges_image("prior_shift")  # of the received data alone: the same for any rewrite
    assert not judges_image("null_first_union")  # a combination of scaled components


def test_names_outside_the_registry_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="is not one of cyclic, cycle_image"):
        lookup("made_up")
    with pytest.raises(ValueError, match="combines null_shift and dc_spike and prior_shift"):
        lookup("null_first_union")
    with pytest.raises(ValueError, match="not among the statistics"):
        Combination("bad", "an unknown component", ("null_shift", "made_up"))
    with pytest.raises(ValueError, match="already registered"):
        register(Combination("null_first_union", "another meaning", ("null_shift",)))
    with pytest.raises(ValueError, match="is a statistic"):
        register(Combination("cyclic", "a statistic's name", ("null_shift",)))


def test_a_calibration_of_a_detector_this_version_does_not_compute_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"detector": {"statistic": "made_up_union"}}))
    with pytest.raises(CalibrationError, match="statistic 'made_up_union', which this version does not compute .it ships null_first_union"):
        calibration_statistic(path)
