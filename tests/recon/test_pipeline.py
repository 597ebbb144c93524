"""The defended pipeline: verdicts, bit-identical clean images, safeguard, fail-closed tagging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recon.detect import CyclicDetector, calibrate
from recon.detect.calibration import Calibration, DetectorKey, ProtocolKey
from recon.detect.defense import Defense
from recon.io.mrd import read_raw
from recon.models.modl import MoDL, MoDLConfig
from recon.physics.masks import MaskFamily
from recon.pipeline import defend, reconstruct
from recon.settings import MitigationSettings

PROTOCOL = ProtocolKey((32, 32), 4, "equispaced", 2, 8)


@pytest.fixture(scope="module")
def tiny() -> MoDL:
    torch.manual_seed(0)
    model = MoDL(MoDLConfig(channels=8, layers=3, unrolls=2, cg_iterations=3)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _covering(calibration: Calibration) -> Calibration:
    """A calibration covering every signal level (the tests' slices are not the shipped SNR)."""
    from dataclasses import replace

    return replace(calibration, signal_range=(0.0, 1e9))


def _defense(model: MoDL, threshold_scores: list[float], mitigation: MitigationSettings | None = None) -> Defense:
    detector = CyclicDetector(model, MaskFamily("equispaced", 2, 8), alternatives=1)
    key = DetectorKey("cyclic", 1, detector.jitter_scale, detector.seed)
    calibration = _covering(calibrate(threshold_scores, 0.05, "00" * 32, PROTOCOL, key))
    return Defense(model, detector, calibration, "cyclic", noise_sigma=1.0, mitigation=mitigation or MitigationSettings(method="cyclic", iterations=3))


def _prior_defense(model: MoDL, gate_scores: list[float], statistic: str = "prior_shift", method: str = "correct") -> Defense:
    """A defense calibrated on ``prior_shift`` (or, with another ``statistic``, one that holds no
    prior_shift threshold), with a gated mitigation (by default the product's default)."""
    detector = CyclicDetector(model, MaskFamily("equispaced", 2, 8), alternatives=1)
    key = DetectorKey.of(statistic, detector)
    calibration = _covering(calibrate(gate_scores, 0.05, "00" * 32, PROTOCOL, key))
    return Defense(model, detector, calibration, statistic, noise_sigma=1.0, mitigation=MitigationSettings(method=method))


def _received_shift(model: MoDL, data: object) -> float:
    from recon.detect.cyclic import prior_shift
    from recon.pipeline import prepare

    prepared = prepare(data)  # type: ignore[arg-type]
    with torch.no_grad():
        return float(prior_shift(model, prepared.op, prepared.y, model(prepared.x_zf, prepared.op), 4.0, 1.0))


def test_clean_slice_passes_bit_identical(tiny: MoDL, small_raw: tuple) -> None:
    data = read_raw(small_raw[0]).slices[0]
    result = defend(data, _defense(tiny, [1e6] * 19 + [2e6]))
    assert result.verdict == "clean"
    np.testing.assert_array_equal(result.image, reconstruct(data, tiny).image)
    assert result.p_value == pytest.approx(1.0)
    assert "clean" in result.reason
    assert dict(result.network_passes) == {"recon": 1, "detect": 1}


def test_flagged_slice_is_rewritten_or_tagged_flagged(tiny: MoDL, small_raw: tuple) -> None:
    data = read_raw(small_raw[0]).slices[0]
    result = defend(data, _defense(tiny, [1e-9] * 20))
    assert result.verdict in ("mitigated", "flagged")
    assert result.score > result.threshold and result.p_value == pytest.approx(1 / 21)
    assert result.mitigated_score is not None
    if result.verdict == "mitigated":
        assert result.mitigated_score < result.score
    else:
        assert "refused by the safeguard" in result.reason
        np.testing.assert_array_equal(result.image, reconstruct(data, tiny).image)
    assert "mitigate" in dict(result.timings)


def test_flagged_without_mitigation_ships_the_original_tagged(tiny: MoDL, small_raw: tuple) -> None:
    data = read_raw(small_raw[0]).slices[1]
    result = defend(data, _defense(tiny, [1e-9] * 20, MitigationSettings(enabled=False)))
    assert result.verdict == "flagged" and "mitigation off" in result.reason
    np.testing.assert_array_equal(result.image, reconstruct(data, tiny).image)


def test_mitigation_past_its_time_budget_ships_the_original_flagged(tiny: MoDL, small_raw: tuple) -> None:
    data = read_raw(small_raw[0]).slices[0]
    original = reconstruct(data, tiny).image
    result = defend(data, _defense(tiny, [1e-9] * 20, MitigationSettings(method="cyclic", iterations=50, patience=50, time_budget=0.001)))
    assert result.verdict == "flagged" and "time budget (0.001 s)" in result.reason
    np.testing.assert_array_equal(result.image, original)  # a partial rewrite never ships
    assert dict(result.network_passes)["mitigate"] < 50  # it stopped


def test_the_default_mitigation_corrects_the_data_until_the_prior_agrees(tiny: MoDL, small_raw: tuple) -> None:
    """``prior_shift`` over its clean threshold (the gate): the measured lines are corrected
    until the shift falls to ``correct_stop`` of the gate, and the corrected data's image
    ships, ``mitigated``, with the evidence in its comment."""
    data = read_raw(small_raw[0]).slices[0]
    shift = _received_shift(tiny, data)
    result = defend(data, _prior_defense(tiny, [0.8 * shift] * 20))  # gate 0.8 x this slice's shift
    assert result.verdict == "mitigated" and "data corrected by" in result.reason, result.reason
    assert f"prior_shift {shift:.4g} > clean threshold {0.8 * shift:.4g}" in result.reason
    settings = MitigationSettings()
    after = float(result.reason.split("prior_shift -> ")[1].split(")")[0])
    assert after <= settings.correct_stop * 0.8 * shift * (1 + 1e-3)  # it went down to the stop
    passes = dict(result.network_passes)["mitigate"]
    assert passes % 4 == 0 and 8 <= passes <= 4 * (settings.correct_steps + 1)  # the detector's shift is reused
    assert np.isfinite(result.image).all() and not np.array_equal(result.image, reconstruct(data, tiny).image)


def test_a_slice_flagged_inside_the_clean_range_is_not_rewritten(tiny: MoDL, small_raw: tuple) -> None:
    """Flagged (over the 5 % threshold) but below the largest clean calibration score: the
    original ships, ``flagged``, and the comment says why; with ``rewrite_beyond_clean`` off
    the same slice is corrected."""
    from dataclasses import replace

    data = read_raw(small_raw[0]).slices[0]
    shift = _received_shift(tiny, data)
    defense = _prior_defense(tiny, [0.8 * shift] * 39 + [1.2 * shift])  # threshold 0.8 x, clean maximum 1.2 x this slice's shift
    assert defense.calibration.threshold == pytest.approx(0.8 * shift) and defense.calibration.clean_max == pytest.approx(1.2 * shift)
    kept = defend(data, defense)
    assert kept.verdict == "flagged" and kept.score > kept.threshold, kept.reason
    assert f"within the clean calibration range (largest {1.2 * shift:.4g} of 40 clean slices)" in kept.reason
    np.testing.assert_array_equal(kept.image, reconstruct(data, tiny).image)
    assert "mitigate" not in dict(kept.network_passes)
    rewritten = defend(data, replace(defense, mitigation=MitigationSettings(rewrite_beyond_clean=False)))
    assert rewritten.verdict == "mitigated" and "data corrected by" in rewritten.reason, rewritten.reason


def _null_defense(model: MoDL, shift_gate: float, null_gate: float, correct_null: bool = True, spike_scale: float = 1e9) -> Defense:
    """A ``null_first_union`` defense whose calibration flags this slice (null_shift's scale
    ``null_gate``, prior_shift's gate ``shift_gate``, dc_spike's scale ``spike_scale``)."""
    from dataclasses import replace

    from recon.detect.calibration import calibrate_combined

    detector = CyclicDetector(model, MaskFamily("equispaced", 2, 8), alternatives=1)
    key = DetectorKey.of("null_first_union", detector)
    calibration = _covering(calibrate_combined({"null_shift": [1.0] * 20, "dc_spike": [1.0] * 20, "prior_shift": [1.0] * 20}, 0.05, "00" * 32, PROTOCOL, key))
    calibration = replace(calibration, threshold=1e-9, scales=(("null_shift", null_gate), ("dc_spike", spike_scale), ("prior_shift", 1e9)), gates=(("prior_shift", shift_gate),))
    return Defense(model, detector, calibration, "null_first_union", noise_sigma=1.0, mitigation=MitigationSettings(correct_null=correct_null))


def test_the_default_correction_also_acts_on_where_the_image_moves(tiny: MoDL, small_raw: tuple) -> None:
    """With ``null_first_union`` (the deployed statistic) a slice whose ``prior_shift`` is in
    the clean range but whose ``null_shift`` is not is corrected until both are under the
    stop; with ``correct_null`` off the prior gate alone refuses it."""
    from recon.detect.cyclic import null_share, shift_of
    from recon.pipeline import prepare

    data = read_raw(small_raw[0]).slices[0]
    shift = _received_shift(tiny, data)
    prepared = prepare(data)
    with torch.no_grad():
        acs = torch.from_numpy(MaskFamily("equispaced", 2, 8).acs_mask(prepared.op.mask.shape[-1]))
        null = float(null_share(prepared.op, shift_of(tiny, prepared.op, prepared.y, tiny(prepared.x_zf, prepared.op), 4.0), acs))
    result = defend(data, _null_defense(tiny, 2 * shift, 0.9 * null))
    assert result.verdict == "mitigated", result.reason
    assert f"null_shift {null:.4g} > clean threshold {0.9 * null:.4g}" in result.reason and f"prior_shift {shift:.4g} <=" in result.reason
    prior_after = float(result.reason.split("prior_shift -> ")[1].split(",")[0])
    null_after = float(result.reason.split("null_shift -> ")[1].split(")")[0])
    assert prior_after < 2 * shift and null_after <= 0.9 * null * (1 + 1e-3)  # both under their gates
    refused = defend(data, _null_defense(tiny, 2 * shift, 0.9 * null, correct_null=False))
    assert refused.verdict == "flagged" and "does not move like an attacked one" in refused.reason
    np.testing.assert_array_equal(refused.image, reconstruct(data, tiny).image)


def test_spikes_are_re_estimated_before_the_gates(tiny: MoDL, small_raw: tuple) -> None:
    """Samples whose data residual no clean calibration slice has (``dc_spike`` over its
    scale) are re-estimated from the network's image before the gated correction; with the
    prior and null gates quiet the repaired image ships, ``mitigated``, nearer the clean
    reconstruction. Without the repair the gates refuse the same slice; a repair that would
    need more samples than allowed ships the original, ``flagged``; clean data are untouched."""
    from dataclasses import replace

    from recon.attacks import impulse_spikes
    from recon.detect.cyclic import spike_ratio
    from recon.pipeline import prepare

    data = read_raw(small_raw[0]).slices[0]
    prepared = prepare(data)
    clean_image = reconstruct(data, tiny).image
    with torch.no_grad():
        limit = 1.5 * float(spike_ratio(prepared.op, prepared.y, prepared.image_tensor(clean_image), 1.0))
        spiked = impulse_spikes(prepared.op, prepared.y, 3, 0.5 * float(prepared.y.abs().max()), torch.Generator().manual_seed(1))
    attacked = data.with_measured(spiked[0].numpy())
    defense = _null_defense(tiny, 1e9, 1e9, spike_scale=limit)
    result = defend(attacked, defense)
    assert result.verdict == "mitigated" and "samples over the clean spike limit re-estimated" in result.reason, result.reason
    assert "does not move like" not in result.reason and "data corrected" not in result.reason
    received = reconstruct(attacked, tiny).image
    assert np.linalg.norm(result.image - clean_image) < 0.5 * np.linalg.norm(received - clean_image)
    off = defend(attacked, replace(defense, mitigation=MitigationSettings(despike=False)))
    assert off.verdict == "flagged" and "does not move like an attacked one" in off.reason, off.reason
    np.testing.assert_array_equal(off.image, received)
    capped = defend(attacked, replace(defense, mitigation=MitigationSettings(despike_samples=1)))
    assert capped.verdict == "flagged" and "spike repair refused" in capped.reason, capped.reason
    np.testing.assert_array_equal(capped.image, received)
    untouched = defend(data, defense)  # flagged by the 1e-9 threshold, no sample over the limit
    assert "re-estimated" not in untouched.reason
    np.testing.assert_array_equal(untouched.image, clean_image)
    with pytest.raises(ValueError, match="despike_samples"):
        MitigationSettings(despike_samples=0)


def test_a_correction_that_cannot_reach_the_gate_ships_the_original(tiny: MoDL, small_raw: tuple) -> None:
    """A gate no correction within the budget reaches: the evidence still says attacked, so
    nothing is rewritten; the original ships, flagged, and the comment says why."""
    data = read_raw(small_raw[0]).slices[0]
    result = defend(data, _prior_defense(tiny, [1e-9] * 20))
    assert result.verdict == "flagged" and "noise norms left prior_shift at" in result.reason, result.reason
    np.testing.assert_array_equal(result.image, reconstruct(data, tiny).image)


def test_a_flagged_slice_that_moves_like_an_attacked_one_is_re_reconstructed(tiny: MoDL, small_raw: tuple) -> None:
    """``method=prior``: ``prior_shift`` over its clean threshold, so the network runs again
    with 30x its prior weight; the image says so."""
    from recon.pipeline import prepare

    data = read_raw(small_raw[0]).slices[0]
    result = defend(data, _prior_defense(tiny, [1e-9] * 20, method="prior"))
    assert result.verdict == "mitigated" and "re-reconstructed with 30x prior weight" in result.reason
    prepared = prepare(data)
    with torch.no_grad():
        expected = tiny(prepared.x_zf, prepared.op, prior_gain=30.0)[0].numpy()
    np.testing.assert_allclose(result.image, expected, rtol=1e-5, atol=1e-6)
    assert dict(result.network_passes) == {"recon": 1, "detect": 2, "mitigate": 1}  # the detector's shift is reused


def test_a_flagged_slice_that_does_not_move_ships_unchanged(tiny: MoDL, small_raw: tuple) -> None:
    """Flagged by another component of the union, but its ``prior_shift`` is under its clean
    threshold (the gate): the original ships, flagged, and the comment says why."""
    from recon.detect.calibration import calibrate_combined

    data = read_raw(small_raw[0]).slices[0]
    detector = CyclicDetector(tiny, MaskFamily("equispaced", 2, 8), alternatives=1, folds=2, directions=1, power_iterations=1)
    key = DetectorKey.of("holdout_shift_union", detector)
    parts = {"holdout_noise": [1e-9] * 20, "holdout_sensitive": [1e-9] * 20, "prior_shift": [1e6] * 20}
    union = _covering(calibrate_combined(parts, 0.05, "00" * 32, PROTOCOL, key))
    result = defend(data, Defense(tiny, detector, union, "holdout_shift_union", noise_sigma=1.0))
    assert result.verdict == "flagged" and "does not move like an attacked one" in result.reason
    np.testing.assert_array_equal(result.image, reconstruct(data, tiny).image)


def test_prior_mitigation_without_a_prior_shift_calibration_ships_the_original(tiny: MoDL, small_raw: tuple) -> None:
    data = read_raw(small_raw[0]).slices[0]
    result = defend(data, _prior_defense(tiny, [1e-9] * 20, statistic="cyclic"))
    assert result.verdict == "flagged" and "needs a calibration with prior_shift" in result.reason
    np.testing.assert_array_equal(result.image, reconstruct(data, tiny).image)


def test_mitigation_settings_are_checked() -> None:
    """The library's settings hold the bounds the gadget's properties document (one declaration)."""
    with pytest.raises(ValueError, match="method 'magic' is not one of correct, prior, cyclic"):
        MitigationSettings(method="magic")
    with pytest.raises(ValueError, match=r"prior_gain must lie in \[1.01, 10000.0\], got 0.5"):
        MitigationSettings(prior_gain=0.5)
    for name, value in (("correct_stop", 1.0), ("correct_radius", 0.0), ("correct_steps", -1), ("time_budget", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} must lie in"):
            MitigationSettings(**{name: value})  # type: ignore[arg-type]


def test_a_passing_score_outside_the_calibrated_snr_is_unverified(tiny: MoDL, small_raw: tuple) -> None:
    """Data whose signal level no clean calibration slice had cannot be ``clean``."""
    from dataclasses import replace

    data = read_raw(small_raw[0]).slices[0]
    covered = _defense(tiny, [1e6] * 19 + [2e6])
    result = defend(data, covered)
    level = result.scores.signal_level
    assert result.verdict == "clean" and level is not None and level > 0
    for signal_range in ((2 * level, 3 * level), (0.1 * level, 0.5 * level), None):
        outside = defend(data, replace(covered, calibration=replace(covered.calibration, signal_range=signal_range)))
        assert outside.verdict == "unverified", signal_range
        assert outside.reason.startswith("unverified: ") and "the passing score (clean: cyclic" in outside.reason
        assert ("records no signal range" if signal_range is None else f"signal level {level:.3g} noise sigmas") in outside.reason
        np.testing.assert_array_equal(outside.image, result.image)  # never rewritten
    flagged = defend(data, replace(covered, calibration=replace(_defense(tiny, [1e-9] * 20).calibration, signal_range=(2 * level, 3 * level))))
    assert flagged.verdict in ("flagged", "mitigated")  # a failed check stays failed whatever the SNR


def test_non_finite_score_is_flagged(tiny: MoDL) -> None:
    cal = _defense(tiny, [0.1] * 20).calibration
    assert cal.flags(float("inf")) and cal.flags(float("nan"))


def test_offline_without_calibration_tags_unverified(small_raw: tuple, tmp_path: Path) -> None:
    """A model with no calibration for the scan's protocol yields unverified images, not clean ones."""
    import json

    from recon.io.mrd_write import read_images
    from recon.models.weights import manifest_path, sha256_file
    from recon.offline import reconstruct_file

    torch.manual_seed(0)
    model = MoDL(MoDLConfig(channels=8, layers=3, unrolls=2, cg_iterations=3))
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    manifest = {"name": "tiny", "sha256": sha256_file(weights), "config": model.config.to_dict(),
                "mask": {"kind": "equispaced", "acceleration": 2, "acs_lines": 8}, "matrix": [32, 32], "coils": 4}
    manifest_path(weights).write_text(json.dumps(manifest))
    result = reconstruct_file(small_raw[0], tmp_path / "out.h5", tmp_path / "report", weights=weights, device="cpu", progress=False)
    assert [r.verdict for r in result.rows] == ["unverified", "unverified"]
    assert all(r.reason.startswith("unverified: no consistency check ran: calibration ") and r.reason.endswith("not found") for r in result.rows)
    metas = [meta for _, meta in read_images(tmp_path / "out.h5")]
    assert all(m["CycGuard.Verdict"] == "unverified" and "CycGuard.Score" not in m for m in metas)


@pytest.mark.slow
def test_a_damaging_kspace_attack_on_the_demo_is_flagged_and_mitigated() -> None:
    """Shipped model and calibration: a k-space PGD of 3 noise norms is flagged, and the
    default mitigation (the data correction) rewrites it into a better image that says it was
    rewritten."""
    from dataclasses import replace

    from recon.attacks import pgd_kspace_l2
    from recon.data.demo import DEMO_RAW, DEMO_REFERENCE
    from recon.detect.calibration import Calibration, DetectorKey
    from recon.detect.defense import calibration_statistic, default_calibration_path, detector_for, protocol_of
    from recon.io.mrd_write import read_images
    from recon.metrics import quality
    from recon.models.weights import load_model
    from recon.pipeline import prepare

    model, manifest = load_model()
    scan = read_raw(DEMO_RAW)
    data = scan.slices[0]
    reference = read_images(DEMO_REFERENCE)[0][0]
    protocol = protocol_of(data, manifest, scan.protocol.acceleration)
    detector = detector_for(model, manifest)
    path = default_calibration_path(manifest)
    statistic = calibration_statistic(path)
    assert statistic == "null_first_union"  # the deployed statistic (benchmarks/RESULTS.md section 2)
    calibration = Calibration.load(path, manifest.sha256, protocol, DetectorKey.of(statistic, detector))
    prepared = prepare(data)
    n = float(prepared.op.mask.sum()) * data.coils * data.shape[1]
    attacked_y = pgd_kspace_l2(model, prepared.op, prepared.y, 3.0 * n**0.5, torch.Generator().manual_seed(0))
    attacked = replace(data, kspace=attacked_y[0].numpy())
    before = quality(reconstruct(attacked, model).image, reference).psnr
    assert before < quality(reconstruct(data, model).image, reference).psnr - 3  # the attack does damage
    # what the rewrite gives, not how fast: a loaded machine must not trip the 60 s time budget
    settings = MitigationSettings(time_budget=3600.0)
    result = defend(attacked, Defense(model, detector, calibration, statistic, noise_sigma=1.0, mitigation=settings))
    assert result.score > calibration.threshold and result.p_value < 0.01
    assert result.verdict == "mitigated" and "data corrected by" in result.reason, result.reason
    assert quality(result.image, reference).psnr > before + 3


def test_the_site_key_reaches_the_deployed_detector(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``CYCGUARD_DETECTOR_KEY`` keys the shipped defense's sensitive directions, or says
    that it changes nothing when the shipped statistic has none (``null_first_union``,
    the shipped default); the shipped calibration still loads (the key is not part of it)."""
    from recon.data.demo import DEMO_RAW
    from recon.detect.defense import calibration_statistic, default_calibration_path, load_defense, protocol_of
    from recon.detect.statistics import needs
    from recon.models.weights import load_model

    model, manifest = load_model()
    scan = read_raw(DEMO_RAW)
    protocol = protocol_of(scan.slices[0], manifest, scan.protocol.acceleration)
    monkeypatch.setenv("CYCGUARD_DETECTOR_KEY", "site secret")
    with caplog.at_level("INFO"):
        keyed = load_defense(model, manifest, protocol, None)
    assert keyed is not None and keyed.detector.direction_key == b"site secret"
    keyed_statistic = calibration_statistic(default_calibration_path(manifest))
    said = "keyed by CYCGUARD_DETECTOR_KEY" if needs(keyed_statistic).sensitive else f"{keyed_statistic} has no sensitive directions to key"
    assert said in caplog.text and "site secret" not in caplog.text
    monkeypatch.delenv("CYCGUARD_DETECTOR_KEY")
    public = load_defense(model, manifest, protocol, None)
    assert public is not None and public.detector.direction_key is None
    assert public.calibration == keyed.calibration


def test_a_late_prior_rewrite_is_not_shipped(tiny: MoDL, small_raw: tuple) -> None:
    from dataclasses import replace

    data = read_raw(small_raw[0]).slices[0]
    defense = replace(_prior_defense(tiny, [1e-9] * 20), mitigation=MitigationSettings(time_budget=0.001))
    result = defend(data, defense)
    assert result.verdict == "flagged" and "past its time budget (0.001 s): the original image ships" in result.reason
    np.testing.assert_array_equal(result.image, reconstruct(data, tiny).image)


def test_scan_defenses_load_each_protocol_once_and_give_each_slice_its_noise(tmp_path: Path) -> None:
    """The offline path's defenses: one calibration load per protocol; noise sigma 1 for a
    prewhitened scan and the k-space estimate for one read without prewhitening; a named
    calibration for another protocol is an error, not a scan of unverified images."""
    from recon.data.demo import DEMO_RAW
    from recon.detect.calibration import CalibrationError
    from recon.detect.defense import ScanDefenses, detector_for, slice_noise_sigma
    from recon.models.weights import load_model

    model, manifest = load_model()
    scan = read_raw(DEMO_RAW)
    defenses = ScanDefenses(model, manifest, scan)
    first, second = (defenses.for_slice(data) for data in scan.slices[:2])
    assert first is not None and second is not None
    assert first.calibration is second.calibration and first.noise_sigma == second.noise_sigma == 1.0
    raw = read_raw(DEMO_RAW, prewhiten=False)
    unwhitened = ScanDefenses(model, manifest, raw).for_slice(raw.slices[0])
    assert unwhitened is not None and unwhitened.noise_sigma == slice_noise_sigma(raw.slices[0], whitened=False) != 1.0
    other = ProtocolKey((64, 64), 8, "equispaced", 4, 16)
    key = DetectorKey.of("cyclic", detector_for(model, manifest))
    path = calibrate([0.1] * 20, 0.05, manifest.sha256, other, key).save(tmp_path / "other.json")
    with pytest.raises(CalibrationError, match="was made for another protocol"):
        ScanDefenses(model, manifest, scan, path).for_slice(scan.slices[0])


@pytest.mark.parametrize(("noise", "verdicts"), [("0.05", {"clean"}), ("0.5", {"unverified"})])
def test_noise_dominated_data_outside_the_calibrated_snr_are_not_clean(tmp_path: Path, noise: str, verdicts: set[str]) -> None:
    """ISMRMRD's Shepp-Logan at the shipped protocol: at noise 0.5 (signal level about 1.2
    noise sigmas, the calibration covers about 5-71) no slice may pass as clean."""
    import subprocess

    from recon.offline import reconstruct_file
    from tests.conftest import require_binary

    raw = tmp_path / "sl.h5"
    subprocess.run(
        [require_binary("ismrmrd_generate_cartesian_shepp_logan"), "-m", "128", "-c", "8", "-a", "4", "-w", "16", "-n", noise, "-C", "-o", str(raw)],
        check=True, capture_output=True,
    )
    result = reconstruct_file(raw, tmp_path / "out.h5", tmp_path / "report", device="cpu", progress=False)
    assert {row.verdict for row in result.rows} == verdicts
    for row in result.rows:
        assert row.signal_level is not None and row.protocol == "128x128, 8 coils, equispaced R=4, 16 ACS lines"
        if row.verdict == "unverified":
            assert "noise sigmas (ACS RMS) outside the 5.22-71.3 of the calibration's clean slices" in row.reason


def test_a_noise_doubt_stands_only_when_the_networks_residual_agrees() -> None:
    from recon.detect.defense import whitening_doubt

    doubt = "k-space periphery gives noise sigma 1.43, not 1 as whitened data should"
    assert whitening_doubt(doubt, 0.97) is None and whitening_doubt(doubt, 1.2) is None  # the periphery held signal, not noise
    assert whitening_doubt(doubt, 1.4) == f"{doubt}, and the network's data residual there is 1.4 noise sigmas"
    assert whitening_doubt(doubt, 0.7) is not None and whitening_doubt(doubt, float("nan")) == doubt and whitening_doubt(None, 2.0) is None


def test_a_clean_slice_with_signal_at_the_k_space_periphery_is_checked(tmp_path: Path) -> None:
    """An object filling the field of view puts signal at the edges of k-space (the raw periphery
    reads noise sigma 1.4); the network explains it, so the slice is checked, not ``unverified``.
    The same slice with its noise 1.5 times what the header declares is not passed as clean."""
    from dataclasses import replace

    from benchmarks.periphery_signal import object_image
    from recon.data.demo import make_demo
    from recon.detect.defense import ScanDefenses
    from recon.models.weights import load_model

    raw, _ = make_demo(tmp_path, seed=2026, magnitudes=[object_image("coins")])
    model, manifest = load_model()
    scan = read_raw(raw)
    [data] = scan.slices
    defenses = ScanDefenses(model, manifest, scan)
    defense = defenses.fit(data)
    assert not isinstance(defense, str) and defense.noise_doubt is not None and "periphery" in defense.noise_doubt
    result = defend(data, defense)
    assert result.verdict == "clean", result.reason
    louder = replace(data, kspace=np.asarray(data.kspace) * 1.5)  # not whitened as the header says
    doubted = defend(louder, defenses.fit(louder))
    assert doubted.verdict != "clean", doubted.reason
    if doubted.verdict == "unverified":
        assert "the network's data residual there is" in doubted.reason
