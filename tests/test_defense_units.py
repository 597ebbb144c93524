"""Attacks stay in budget and touch only what they say; detector and calibration behave."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from recon.attacks import (
    benign_noise,
    fgsm_image,
    fgsm_kspace,
    impulse_spikes,
    pgd_image_linf,
    pgd_kspace_l2,
    pgd_kspace_linf,
)
from recon.attacks.adaptive import adaptive_kspace_l2
from recon.data.samples import batch_inputs, make_sample
from recon.detect import CalibrationError, CyclicDetector, calibrate
from recon.detect.calibration import Calibration, DetectorKey, ProtocolKey, calibrate_combined
from recon.detect.cyclic import DetectionScores, _orthonormal, sensitive_share, start_seed
from recon.detect.defense import detector_key_from_env
from recon.mitigate import mitigate_faithful, mitigate_kspace
from recon.models.modl import MoDL, MoDLConfig
from recon.physics.masks import MaskFamily
from tests.conftest import disc_phantom

FAMILY = MaskFamily("equispaced", 4, 8)
PROTOCOL = ProtocolKey((32, 32), 4, "equispaced", 4, 8)
DETECTOR = DetectorKey("cyclic", 3, 6.0, 0)


@pytest.fixture(scope="module")
def setup() -> tuple[MoDL, object, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MoDL(MoDLConfig(channels=8, layers=3, unrolls=2, cg_iterations=3)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sample = make_sample(disc_phantom((32, 32)), FAMILY, 4, np.random.default_rng(3))
    x_zf, op, y, _ = batch_inputs([sample])
    return model, op, y, x_zf


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _off_mask(op: object, k: torch.Tensor) -> torch.Tensor:
    return k[0][:, ~op.mask[0]]  # type: ignore[attr-defined]


def test_image_attacks_stay_in_the_box(setup: tuple) -> None:
    model, op, _, x_zf = setup
    eps = 0.01 * float(x_zf.abs().max())
    for attacked in (pgd_image_linf(model, op, x_zf, eps, _gen()), fgsm_image(model, op, x_zf, eps, _gen())):
        delta = attacked - x_zf
        assert float(delta.real.abs().max()) <= eps * (1 + 1e-5)
        assert float(delta.imag.abs().max()) <= eps * (1 + 1e-5)
        assert float(delta.abs().max()) > 0.5 * eps  # it used its budget


def test_kspace_attacks_respect_budget_and_mask(setup: tuple) -> None:
    model, op, y, _ = setup
    eps = 0.05 * float(torch.linalg.vector_norm(y))
    l2 = pgd_kspace_l2(model, op, y, eps, _gen())
    assert float(torch.linalg.vector_norm(l2 - y)) <= eps * (1 + 1e-5)
    assert float(torch.linalg.vector_norm(l2 - y)) > 0.9 * eps
    fgsm = fgsm_kspace(model, op, y, eps, _gen())
    assert float(torch.linalg.vector_norm(fgsm - y)) == pytest.approx(eps, rel=1e-3)
    box = 0.01 * float(y.abs().max())
    linf = pgd_kspace_linf(model, op, y, box, _gen())
    assert float((linf - y).real.abs().max()) <= box * (1 + 1e-5)
    for attacked in (l2, fgsm, linf, benign_noise(op, y, 0.1, _gen()), impulse_spikes(op, y, 5, 3.0, _gen())):
        assert not bool(_off_mask(op, attacked).abs().any())  # nothing off the acquired lines


def test_impulse_spikes_count_and_amplitude(setup: tuple) -> None:
    _, op, y, _ = setup
    spiked = impulse_spikes(op, y, 6, 5.0, _gen(1))
    changed = (spiked - y).abs()
    assert int((changed > 0).sum()) <= 6 and int((changed > 0).sum()) >= 5  # collisions are possible
    np.testing.assert_allclose(changed[changed > 0].numpy(), 5.0, rtol=1e-5)


def test_attacks_are_seeded(setup: tuple) -> None:
    model, op, y, _ = setup
    eps = 0.05 * float(torch.linalg.vector_norm(y))
    a = pgd_kspace_l2(model, op, y, eps, _gen(5))
    b = pgd_kspace_l2(model, op, y, eps, _gen(5))
    torch.testing.assert_close(a, b)


def test_detector_is_deterministic_and_single_slice(setup: tuple) -> None:
    model, op, y, x_zf = setup
    detector = CyclicDetector(model, FAMILY)
    x1 = model(x_zf, op)
    first, second = detector.score(op, y, x1), detector.score(op, y, x1)
    assert first == second
    assert first.cyclic > 0 and first.dc > 0 and first.cycle_image > 0
    with pytest.raises(ValueError, match="one slice at a time"):
        detector.cycle(type(op)(op.maps.expand(2, -1, -1, -1), op.mask.expand(2, -1)), y, x1)
    with pytest.raises(ValueError, match="statistic 'psnr'"):
        first.get("psnr")


def test_holdout_folds_cover_each_acquired_line_outside_acs_once(setup: tuple) -> None:
    model, op, y, x_zf = setup
    detector = CyclicDetector(model, FAMILY, folds=3)
    folds = detector.holdout(op)
    omega = op.mask[0].numpy().astype(bool)
    acs = FAMILY.acs_mask(omega.shape[0])
    held = folds.held.numpy()
    assert (held.sum(axis=0) == (omega & ~acs)).all()  # every such line in exactly one fold
    assert (folds.kept.mask.numpy() == (omega & ~held)).all()  # fold f reconstructs without its lines
    with pytest.raises(ValueError, match="20 folds need at least as many acquired lines"):
        CyclicDetector(model, FAMILY, folds=20).holdout(op)


def test_holdout_sees_a_perturbation_of_the_acquired_lines(setup: tuple) -> None:
    model, op, y, x_zf = setup
    detector = CyclicDetector(model, FAMILY, folds=3)
    x1 = model(x_zf, op)
    clean = detector.score(op, y, x1, 0.01, holdout=True)
    assert detector.score(op, y, x1, 0.01).holdout_noise is None  # only when asked
    with pytest.raises(ValueError, match="was not computed"):
        detector.score(op, y, x1, 0.01).get("holdout_noise")
    held = detector.holdout(op).held.any(dim=0)
    bump = torch.zeros_like(y)
    bump[:, :, held, :] = 0.2 * float(y.abs().max())  # only on lines that some fold holds out
    perturbed = y + bump
    score = detector.score(op, perturbed, model(op.adjoint(perturbed), op), 0.01, holdout=True)
    assert clean.holdout_noise is not None and score.holdout_noise is not None
    assert score.holdout_noise > 2 * clean.holdout_noise


def test_holdout_calibrations_carry_their_folds(tmp_path: Path, setup: tuple) -> None:
    detector = CyclicDetector(setup[0], FAMILY, folds=3)
    key = DetectorKey.of("holdout_noise", detector)
    assert key.folds == 3 and DetectorKey.of("cyclic", detector) == DETECTOR  # files of other statistics unchanged
    path = calibrate(np.linspace(0, 1, 99), 0.05, "ab" * 32, PROTOCOL, key).save(tmp_path / "cal.json")
    assert json.loads(path.read_text())["detector"]["folds"] == 3
    with pytest.raises(CalibrationError, match="made with detector"):
        Calibration.load(path, "ab" * 32, PROTOCOL, DetectorKey.of("holdout_noise", CyclicDetector(setup[0], FAMILY, folds=4)))
    assert Calibration.load(path, "ab" * 32, PROTOCOL, key).detector == key


def test_sensitive_share_is_one_for_noise_and_large_along_the_directions() -> None:
    g = _gen(5)
    support = torch.zeros(1, 1, 16, 1)
    support[:, :, ::2] = 1.0
    directions = _orthonormal(torch.randn(4, 2, 16, 8, generator=g, dtype=torch.complex64) * support)
    entries = int(support.sum()) * 2 * 8
    shares = [float(sensitive_share(torch.randn(1, 2, 16, 8, generator=g, dtype=torch.complex64) * support, directions, entries)) for _ in range(200)]
    assert 0.9 < float(np.sqrt(np.mean(np.square(shares)))) < 1.1  # white residual: about 1 whatever its size
    aligned = 3.0 * directions[:1] + 0.01 * torch.randn(1, 2, 16, 8, generator=g, dtype=torch.complex64) * support
    assert float(sensitive_share(aligned, directions, entries)) > 0.9 * (entries / 4) ** 0.5  # all of it along one direction


def test_sensitive_directions_are_where_the_network_amplifies(setup: tuple) -> None:
    model, op, y, _ = setup
    detector = CyclicDetector(model, FAMILY, folds=3, directions=3, power_iterations=3)
    holdout = detector.holdout(op)
    directions = detector.sensitive(op, y, holdout)
    gram = directions.reshape(3, -1).conj() @ directions.reshape(3, -1).T
    assert torch.allclose(gram, torch.eye(3, dtype=gram.dtype), atol=1e-4)  # orthonormal
    assert float(directions[:, :, ~holdout.support[0, 0, :, 0].bool()].abs().max()) == 0.0  # on the held-out lines only
    torch.testing.assert_close(directions, detector.sensitive(op, y, holdout))  # seeded: reproducible

    def change(direction: torch.Tensor) -> float:
        step = 1e-2 * float(torch.linalg.vector_norm(y))
        return float(torch.linalg.vector_norm(model(op.adjoint(y + step * direction), op) - model(op.adjoint(y), op)))

    random = torch.randn(y.shape, generator=_gen(9), dtype=y.dtype) * holdout.support
    random = random / torch.linalg.vector_norm(random)
    assert change(directions[:1]) > 2 * change(random)


def test_a_site_key_makes_the_directions_secret_but_reproducible(setup: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    model, op, y, _ = setup
    public = CyclicDetector(model, FAMILY, folds=3, directions=2, power_iterations=1)
    keyed = replace(public, direction_key=b"site secret")
    holdout = public.holdout(op)
    assert start_seed(0, None, y) == 0  # no key: the public seed
    assert start_seed(0, b"site secret", y) == start_seed(0, b"site secret", y.clone())  # the same data, the same start
    assert len({start_seed(0, b"site secret", y), start_seed(0, b"other", y), start_seed(0, b"site secret", 1.01 * y)}) == 3
    directions = keyed.sensitive(op, y, holdout)
    torch.testing.assert_close(directions, keyed.sensitive(op, y, holdout))  # reproducible at the site
    assert not torch.allclose(directions, public.sensitive(op, y, holdout))  # not what the public seed gives
    assert DetectorKey.of("holdout_union", keyed) == DetectorKey.of("holdout_union", public)  # not in the calibration
    assert "site secret" not in repr(keyed)
    monkeypatch.setenv("CYCGUARD_DETECTOR_KEY", "")
    assert detector_key_from_env() is None
    monkeypatch.setenv("CYCGUARD_DETECTOR_KEY", "site secret")
    assert detector_key_from_env() == b"site secret"


def test_the_detector_key_can_come_from_a_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CYCGUARD_DETECTOR_KEY", raising=False)
    monkeypatch.delenv("CYCGUARD_DETECTOR_KEY_FILE", raising=False)
    assert detector_key_from_env() is None
    secret = tmp_path / "detector_key"
    secret.write_bytes(b"from a file\n")
    monkeypatch.setenv("CYCGUARD_DETECTOR_KEY_FILE", str(secret))
    assert detector_key_from_env() == b"from a file"  # the trailing newline of `echo` dropped
    monkeypatch.setenv("CYCGUARD_DETECTOR_KEY", "direct")
    assert detector_key_from_env() == b"direct"  # the variable wins
    monkeypatch.delenv("CYCGUARD_DETECTOR_KEY")
    secret.write_bytes(b"")
    with pytest.raises(ValueError, match="detector key file is empty"):
        detector_key_from_env()
    monkeypatch.setenv("CYCGUARD_DETECTOR_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read the detector key"):  # never a silent fall back to the public seed
        detector_key_from_env()


def test_holdout_sensitive_flags_a_damaging_perturbation(setup: tuple) -> None:
    model, op, y, x_zf = setup
    detector = CyclicDetector(model, FAMILY, folds=3, directions=2, power_iterations=4)
    x1 = model(x_zf, op)
    clean = detector.score(op, y, x1, 0.01, holdout=True)
    assert detector.score(op, y, x1, 0.01, holdout=True, sensitive=False).holdout_sensitive is None
    held = detector.holdout(op).support
    eps = 0.1 * float(torch.linalg.vector_norm(y))
    attacked = pgd_kspace_l2(model, op, y, eps, _gen(2)) * held + y * (1 - held)  # damaging, held-out lines only
    noisy = y + held * op.project(torch.randn(y.shape, generator=_gen(3), dtype=y.dtype))
    noisy = y + (noisy - y) * eps / torch.linalg.vector_norm(noisy - y)  # as large, spread like noise
    score = detector.score(op, attacked, model(op.adjoint(attacked), op), 0.01, holdout=True).get("holdout_sensitive")
    benign = detector.score(op, noisy, model(op.adjoint(noisy), op), 0.01, holdout=True).get("holdout_sensitive")
    # (an untrained 2-unroll network amplifies far less selectively than the shipped one: 3.8 vs 2.0 here)
    assert score > 1.5 * benign and score > 1.5 * clean.get("holdout_sensitive")


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


def test_adaptive_attack_stays_in_budget_and_on_the_sampled_lines(setup: tuple) -> None:
    model, op, y, _ = setup
    detector = CyclicDetector(model, FAMILY, folds=3, directions=2, power_iterations=1)
    eps = 0.05 * float(torch.linalg.vector_norm(y))
    scales = {"holdout_noise": 1.0, "holdout_sensitive": 1.0}
    cases = (("cyclic_noise", {}), ("holdout_union", {"scales": scales}), ("holdout_union", {"scales": scales, "resample_directions": True}))
    for statistic, extra in cases:
        attacked = adaptive_kspace_l2(model, op, y, eps, detector, statistic, 1e9, _gen(4), steps=2, noise_sigma=0.01, **extra)
        delta = attacked - y
        assert float(torch.linalg.vector_norm(delta)) <= eps * (1 + 1e-4)
        assert float(torch.linalg.vector_norm(delta)) > 0.5 * eps  # with a threshold it never reaches, it spends the budget
        assert float(_off_mask(op, delta).abs().max()) == 0.0
    with pytest.raises(ValueError, match="needs the calibration's scales"):
        adaptive_kspace_l2(model, op, y, eps, detector, "holdout_union", 1.0, _gen(4), steps=1)


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


def test_mitigations_stay_in_their_budgets(setup: tuple) -> None:
    model, op, y, x_zf = setup
    detector = CyclicDetector(model, FAMILY)
    x1 = model(x_zf, op)
    cycle = detector.cycle(op, y, x1)
    eps = 0.01 * float(x_zf.abs().max())
    faithful = mitigate_faithful(model, op, x_zf, cycle, eps, eps / 2, iterations=3)
    assert faithful.loss_best <= faithful.loss_start
    assert faithful.network_passes == 2 * 3 * 4
    ours = mitigate_kspace(model, op, y, cycle, noise_sigma=0.01, iterations=4)
    assert ours.loss_best <= ours.loss_start and ours.iterations <= 4
    assert ours.image.shape == x1.shape


def test_prior_gain_reruns_the_same_weights_with_a_heavier_prior(setup: tuple) -> None:
    model, op, y, x_zf = setup
    x1 = model(x_zf, op)
    assert torch.equal(model(x_zf, op, prior_gain=1.0), x1)  # the trained network, bit for bit
    heavy = model(x_zf, op, prior_gain=100.0)
    residual = [float(torch.linalg.vector_norm(y - op.forward(x))) for x in (x1, heavy)]
    assert residual[1] > residual[0]  # the data pull the image less
    with pytest.raises(ValueError, match="prior_gain must be > 0"):
        model(x_zf, op, prior_gain=0.0)


def test_prior_shift_measures_how_far_the_image_moves(setup: tuple) -> None:
    from recon.detect.cyclic import noise_norm

    model, op, y, x_zf = setup
    detector = CyclicDetector(model, FAMILY, folds=3, directions=2, power_iterations=1, prior_gain=4.0)
    x1 = model(x_zf, op)
    only = detector.score(op, y, x1, 0.01, shift=True)
    assert only.holdout_noise is None and only.holdout_sensitive is None  # no folds were needed
    expected = torch.linalg.vector_norm(model(x_zf, op, prior_gain=4.0) - x1) / noise_norm(op, y, 0.01)
    assert only.get("prior_shift") == pytest.approx(float(expected), rel=1e-5)
    assert detector.score(op, y, x1, 0.01, holdout=True).prior_shift == pytest.approx(only.prior_shift, rel=1e-5)  # with holdout by default
    assert detector.score(op, y, x1, 0.01, holdout=True, shift=False).prior_shift is None
    tampered = detector.score(op, y, x1 + 0.5 * x1.abs().max(), 0.01, shift=True).get("prior_shift")
    assert tampered > 10 * only.get("prior_shift")  # an image that is not f(y) moves (fail closed)
    assert detector.passes("prior_shift") == 3 + 1
    assert detector.passes("holdout_shift_union") == detector.passes("holdout_union") + 1
    key = DetectorKey.of("prior_shift", detector)
    assert (key.prior_gain, key.folds, key.directions) == (4.0, None, None)
    assert DetectorKey.of("holdout_union", detector).prior_gain is None  # files of holdout_union unchanged
    with pytest.raises(ValueError, match="needs the network's image"):
        detector.data_statistics(op, y, 0.01, folds=False, shift=True)


def test_dc_spike_sees_an_impulse_not_noise(setup: tuple) -> None:
    """``dc_spike``: one corrupted sample stands far above its neighbours' residual; noise
    of the acquisition's level spread over every sample does not; no network pass."""
    from recon.detect.cyclic import spike_ratio

    model, op, y, x_zf = setup
    detector = CyclicDetector(model, FAMILY)
    x1 = model(x_zf, op)
    clean = detector.score(op, y, x1, 0.01).get("dc_spike")
    assert clean == pytest.approx(float(spike_ratio(op, y, x1, 0.01)))
    spikes = impulse_spikes(op, y, 1, 0.2 * float(y.abs().max()), _gen(4))
    assert float(spike_ratio(op, spikes, model(op.adjoint(spikes), op), 0.01)) > 1.5 * clean
    noisy = benign_noise(op, y, 0.01, _gen(5))
    assert float(spike_ratio(op, noisy, model(op.adjoint(noisy), op), 0.01)) < 2 * clean
    assert detector.passes("holdout_shift_spike_union") == detector.passes("holdout_shift_union")  # no extra pass
    assert detector.passes("shift_spike_union") == detector.passes("prior_shift")
    from recon.pipeline import safeguard_statistic

    assert safeguard_statistic("shift_spike_union") == "cyclic_noise"  # a combination cannot judge a rewrite
    # differentiable (the adaptive attacker descends it)
    y_var = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(spike_ratio(op, y_var, x1, 0.01), y_var)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0


def test_spike_repair_re_estimates_only_the_spikes(setup: tuple) -> None:
    """Samples whose residual ratio exceeds the clean limit are re-estimated from the
    network's image (no other sample moves) until none exceeds it; the image comes back
    towards the clean one. Clean data (every ratio within the limit) are left alone, with no
    network pass; a corruption of more samples than allowed is refused."""
    from recon.detect.cyclic import spike_ratio
    from recon.mitigate.spikes import repair_spikes

    model, op, y, x_zf = setup
    x1 = model(x_zf, op)
    limit = 1.5 * float(spike_ratio(op, y, x1, 0.01))
    untouched = repair_spikes(model, op, y, x1, 0.01, limit)
    assert not untouched.found and untouched.y is None and untouched.network_passes == 0
    spiked = impulse_spikes(op, y, 3, 0.5 * float(y.abs().max()), _gen(4))
    hit = (spiked - y).abs() > 0
    attacked = model(op.adjoint(spiked), op)
    repair = repair_spikes(model, op, spiked, attacked, 0.01, limit)
    assert repair.found and repair.y is not None and repair.image is not None and not repair.refused
    moved = (repair.y - spiked).abs() > 0
    assert int(moved.sum()) == repair.samples <= 3 * int(hit.sum())
    assert bool(moved[hit].all())  # every spike was re-estimated
    assert not bool(_off_mask(op, repair.y).abs().any())  # nothing off the acquired lines
    assert repair.ratio_after <= limit < repair.ratio
    assert 1 <= repair.network_passes <= 4
    error = lambda x: float(torch.linalg.vector_norm(x - x1))  # noqa: E731
    assert error(repair.image) < 0.5 * error(attacked)
    refused = repair_spikes(model, op, spiked, attacked, 0.01, limit, max_samples=1)
    assert refused.found and refused.y is None and "more than 1" in refused.refused
    with pytest.raises(ValueError, match="finite limit"):
        repair_spikes(model, op, spiked, attacked, 0.01, float("nan"))


def test_null_shift_is_where_the_prior_shift_lies_in_k_space(setup: tuple) -> None:
    """``null_shift``: the shift's coil k-space on the lines not acquired over its norm on the
    acquired lines outside the ACS block; from ``prior_shift``'s pass (no extra one),
    independent of the shift's size, differentiable."""
    from recon.detect.cyclic import null_share, shift_of
    from recon.physics.fft import fft2c, ifft2c

    model, op, y, x_zf = setup
    detector = CyclicDetector(model, FAMILY, prior_gain=4.0)
    x1 = model(x_zf, op)
    scores = detector.score_for("shift_null_spike_union", op, y, x1, 0.01)
    assert scores.holdout_noise is None  # no folds
    moved = model(x_zf, op, prior_gain=4.0) - x1
    k = op.fully_sampled().forward(moved)[0]  # type: ignore[attr-defined]
    acquired = op.mask[0].bool()  # type: ignore[attr-defined]
    outer = acquired & ~torch.from_numpy(FAMILY.acs_mask(acquired.shape[0]))
    expected = torch.linalg.vector_norm(k[:, ~acquired]) / torch.linalg.vector_norm(k[:, outer])
    assert scores.get("null_shift") == pytest.approx(float(expected), rel=1e-5)
    assert detector.passes("shift_null_spike_union") == detector.passes("prior_shift") == detector.passes("null_shift")
    assert float(null_share(op, 7.0 * moved, torch.from_numpy(FAMILY.acs_mask(acquired.shape[0])))) == pytest.approx(scores.null_shift, rel=1e-5)
    # a move made only of unacquired lines is almost all "null"; one made of acquired ones is not
    spectrum = fft2c(x1)
    rows = torch.zeros_like(acquired)
    rows[~acquired] = True
    acs = torch.from_numpy(FAMILY.acs_mask(acquired.shape[0]))
    in_null = ifft2c(spectrum * rows[None, :, None])
    on_lines = ifft2c(spectrum * (acquired & ~acs)[None, :, None])
    assert float(null_share(op, in_null, acs)) > 5 * float(null_share(op, on_lines, acs))  # coil maps spread a line a little
    y_var = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(null_share(op, shift_of(model, op, y_var, model(op.adjoint(y_var), op), 4.0), acs), y_var)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0
    from recon.pipeline import prior_gate

    key = DetectorKey.of("shift_null_spike_union", detector)
    rng = np.random.default_rng(2)
    parts = {"prior_shift": rng.gamma(3.0, 0.2, 199), "null_shift": rng.gamma(9.0, 0.3, 199), "dc_spike": rng.gamma(5.0, 1.5, 199)}
    cal = calibrate_combined(parts, 0.05, "ab" * 32, PROTOCOL, key)
    assert [name for name, _ in cal.scales] == ["prior_shift", "null_shift", "dc_spike"]
    assert prior_gate(cal) == dict(cal.scales)["prior_shift"]  # the mitigation's gate stays prior_shift's clean threshold


def _null_union(model: MoDL, statistic: str, seed: int) -> tuple[DetectorKey, dict[str, np.ndarray], Calibration]:
    """A 5 % calibration of a ``null_shift`` union on 199 synthetic clean slices (its key, the components, the file)."""
    detector = CyclicDetector(model, FAMILY, prior_gain=4.0)
    key = DetectorKey.of(statistic, detector)
    assert detector.passes(statistic) == detector.passes("shift_null_spike_union")
    rng = np.random.default_rng(seed)
    parts = {"null_shift": rng.gamma(9.0, 0.3, 199), "dc_spike": rng.gamma(5.0, 1.5, 199), "prior_shift": rng.gamma(3.0, 0.2, 199)}
    return key, parts, calibrate_combined(parts, 0.05, "ab" * 32, PROTOCOL, key)


def test_null_spike_union_shares_the_budget_by_two_components_with_a_prior_backstop(tmp_path: Path, setup: tuple) -> None:
    """``null_spike_union``: ``null_shift`` and ``dc_spike`` are scaled by their clean
    thresholds, ``prior_shift`` (same pass) by its largest clean value (a backstop), and its
    threshold at the rate is kept as the mitigation's gate: saved, checked on load."""
    from recon.pipeline import prior_gate

    key, parts, cal = _null_union(setup[0], "null_spike_union", 3)
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
    from recon.detect.cyclic import BACKSTOPS, COMBINED_STATISTICS, GATES

    assert all(set(GATES[s]) <= set(BACKSTOPS[s]) <= set(COMBINED_STATISTICS[s]) for s in GATES)  # a gate is a backstop's threshold


def test_null_first_union_gives_null_shift_the_whole_budget(tmp_path: Path, setup: tuple) -> None:
    """``null_first_union``: ``dc_spike`` and ``prior_shift`` are both backstops (their
    largest clean values), so the union's threshold is ``null_shift``'s own quantile and it
    flags exactly the clean slices ``null_shift`` alone would; a spike past every clean
    slice still flags, one inside their range does not; the gate is kept."""
    from recon.pipeline import prior_gate

    key, parts, cal = _null_union(setup[0], "null_first_union", 4)
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


def test_noise_excess_reads_the_noise_level_at_the_readout_periphery(setup: tuple) -> None:
    """``noise_excess``: the data residual's RMS on the outer readout samples in noise sigmas:
    1 for data that are the image plus white noise of that sigma, about sqrt(2) with as much
    noise again, blind to a change of the central samples; the detector reports it with no
    network pass of its own."""
    from recon.detect.cyclic import PERIPHERY, noise_excess
    from recon.physics.noise import complex_randn

    model, op, y, x_zf = setup
    x1 = model(x_zf, op)
    sigma = 0.01
    noise = op.project(complex_randn(tuple(y.shape), _gen(6)))
    data = op.forward(x1) + sigma * noise
    assert float(noise_excess(op, data, x1, sigma)) == pytest.approx(1.0, abs=0.05)
    louder = data + sigma * op.project(complex_randn(tuple(y.shape), _gen(7)))
    assert float(noise_excess(op, louder, x1, sigma)) == pytest.approx(2**0.5, abs=0.08)
    edge = int(y.shape[-1] * PERIPHERY)
    central = torch.zeros_like(y)
    central[..., edge:-edge] = 10 * sigma
    assert float(noise_excess(op, data + op.project(central), x1, sigma)) == pytest.approx(float(noise_excess(op, data, x1, sigma)), rel=1e-6)
    detector = CyclicDetector(model, FAMILY)
    assert detector.score(op, data, x1, sigma).get("noise_excess") == pytest.approx(float(noise_excess(op, data, x1, sigma)))
    assert detector.passes("null_noise_union") == detector.passes("null_first_union")


def test_null_noise_union_adds_noise_excess_as_a_third_backstop(setup: tuple) -> None:
    """``null_noise_union``: ``null_first_union`` plus ``noise_excess`` scaled by its largest
    clean value; the threshold stays ``null_shift``'s own quantile; a slice noisier than every
    clean one flags."""
    from recon.pipeline import prior_gate

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


def test_adaptive_attack_against_the_shift_union_stays_in_budget(setup: tuple) -> None:
    model, op, y, _ = setup
    detector = CyclicDetector(model, FAMILY, folds=3, directions=2, power_iterations=1)
    eps = 0.05 * float(torch.linalg.vector_norm(y))
    scales = {"holdout_noise": 1.0, "holdout_sensitive": 1.0, "prior_shift": 1.0}
    null = {"prior_shift": 1.0, "null_shift": 1.0, "dc_spike": 1.0}
    for statistic, extra in (("holdout_shift_union", {"scales": scales}), ("shift_null_spike_union", {"scales": null}), ("prior_shift", {})):
        attacked = adaptive_kspace_l2(model, op, y, eps, detector, statistic, 1e9, _gen(5), steps=2, noise_sigma=0.01, **extra)
        delta = attacked - y
        assert 0.5 * eps < float(torch.linalg.vector_norm(delta)) <= eps * (1 + 1e-4)
        assert float(_off_mask(op, delta).abs().max()) == 0.0


def test_prior_mitigation_rewrites_only_behind_its_gate(setup: tuple) -> None:
    from recon.mitigate.prior import mitigate_prior

    model, op, y, x_zf = setup
    x1 = model(x_zf, op)
    refused = mitigate_prior(model, op, y, x1, 0.01, gate=1e9, gate_gain=4.0)
    assert not refused.accepted and refused.network_passes == 1 and refused.shift > 0
    rewritten = mitigate_prior(model, op, y, x1, 0.01, gate=1e-9, gate_gain=4.0, gain=30.0)
    assert rewritten.accepted and rewritten.network_passes == 2
    assert rewritten.image is not None and torch.equal(rewritten.image, model(x_zf, op, prior_gain=30.0))
    assert rewritten.residual_after > rewritten.residual_before
    known = mitigate_prior(model, op, y, x1, 0.01, gate=1e-9, gate_gain=4.0, shift=5.0)
    assert known.network_passes == 1 and known.shift == 5.0  # the detector's shift saves the gate's pass
    assert not mitigate_prior(model, op, y, x1, 0.01, gate=1.0, gate_gain=4.0, shift=float("nan")).accepted  # fail closed
    with pytest.raises(ValueError, match="prior gain must be > 1"):
        mitigate_prior(model, op, y, x1, 0.01, gate=1.0, gate_gain=4.0, gain=1.0)
    with pytest.raises(ValueError, match="positive clean threshold"):
        mitigate_prior(model, op, y, x1, 0.01, gate=0.0, gate_gain=4.0)


def test_data_correction_rewrites_only_behind_its_gate_and_within_its_budget(setup: tuple) -> None:
    from recon.detect.cyclic import prior_shift
    from recon.mitigate.prior import correct_data, mitigate_correct

    model, op, y, x_zf = setup
    x1 = model(x_zf, op)
    shift = float(prior_shift(model, op, y, x1, 4.0, 0.01))
    refused = mitigate_correct(model, op, y, x1, 0.01, gate=1e9, gate_gain=4.0, stop=0.0)
    assert not refused.accepted and refused.network_passes == 1 and refused.shift == pytest.approx(shift)
    # a stop the received data already meet: no step, the image at the detector's gain
    correction, value, image, passes, _ = correct_data(model, op, y, 0.01, 4.0, stop=2 * shift, radius=3.0, steps=5)
    assert correction == 0.0 and passes == 4 and value == pytest.approx(shift, rel=1e-4)
    assert torch.allclose(image, model(x_zf, op, prior_gain=4.0))
    # the descent lowers the shift below the gate, within its radius
    gated = mitigate_correct(model, op, y, x1, 0.01, gate=0.9 * shift, gate_gain=4.0, stop=0.5 * shift, radius=3.0, steps=30, shift=shift)
    assert gated.accepted and gated.image is not None and torch.isfinite(gated.image).all()
    assert gated.shift_after < 0.9 * shift and 0 < gated.correction <= 3.0 * (1 + 1e-4)
    assert gated.network_passes % 4 == 0 and gated.network_passes <= 4 * 31
    # a budget too small to reach the gate: refused, though the shift went down
    tight = mitigate_correct(model, op, y, x1, 0.01, gate=0.5 * shift, gate_gain=4.0, stop=0.0, radius=1e-6, steps=3, shift=shift)
    assert not tight.accepted and tight.shift_after >= 0.5 * shift and tight.network_passes == 16
    assert not mitigate_correct(model, op, y, x1, 0.01, gate=1.0, gate_gain=4.0, stop=0.5, shift=float("nan")).accepted  # fail closed
    with pytest.raises(ValueError, match="stop must be a finite shift"):
        mitigate_correct(model, op, y, x1, 0.01, gate=1.0, gate_gain=4.0, stop=float("nan"))
    with pytest.raises(ValueError, match="positive clean threshold"):
        mitigate_correct(model, op, y, x1, 0.01, gate=0.0, gate_gain=4.0, stop=0.0)


def test_data_correction_with_null_gate_acts_on_where_the_image_moves(setup: tuple) -> None:
    """With a :class:`NullGate` the evidence is the larger of ``prior_shift`` and
    ``null_shift`` over their gates: a slice whose shift is in the clean range but whose
    ``null_shift`` is not is corrected, until both are under the stop; one under both gates
    is left alone; the received values come from one pass."""
    from recon.detect.cyclic import noise_norm, null_share, shift_of
    from recon.mitigate.prior import NullGate, correct_data, mitigate_correct

    model, op, y, x_zf = setup
    x1 = model(x_zf, op)
    acs = torch.from_numpy(FAMILY.acs_mask(op.mask.shape[-1]))
    moved = shift_of(model, op, y, x1, 4.0)
    shift = float(torch.linalg.vector_norm(moved)) / noise_norm(op, y, 0.01)
    null = float(null_share(op, moved, acs))
    quiet = mitigate_correct(model, op, y, x1, 0.01, gate=2 * shift, gate_gain=4.0, stop=1.4 * shift, null=NullGate(2 * null, acs))
    assert not quiet.accepted and quiet.network_passes == 1 and quiet.null_shift == pytest.approx(null, rel=1e-4)
    assert quiet.shift == pytest.approx(shift, rel=1e-3)
    # prior_shift within its gate, null_shift above its own: the prior gate alone refuses, the pair corrects
    gate, stop = 2 * shift, 1.4 * shift
    assert not mitigate_correct(model, op, y, x1, 0.01, gate=gate, gate_gain=4.0, stop=stop, shift=shift).accepted
    nulled = mitigate_correct(
        model, op, y, x1, 0.01, gate=gate, gate_gain=4.0, stop=stop, radius=3.0, steps=30, shift=shift, null=NullGate(0.9 * null, acs), null_shift=null
    )
    assert nulled.accepted and nulled.image is not None and torch.isfinite(nulled.image).all()
    assert nulled.shift_after < gate and nulled.null_after < 0.9 * null and nulled.null_shift == null
    assert 0 < nulled.correction <= 3.0 * (1 + 1e-4) and nulled.network_passes % 4 == 0
    again = correct_data(model, op, y, 0.01, 4.0, stop, 3.0, 30, NullGate(0.9 * null, acs))
    assert again.null_shift == pytest.approx(nulled.null_after) and torch.equal(again.image, nulled.image)
    assert correct_data(model, op, y, 0.01, 4.0, stop, 3.0, 30).null_shift != again.null_shift  # nan without the gate
    with pytest.raises(ValueError, match="null_shift's gate must be a positive"):
        NullGate(0.0, acs)


def test_the_calibrate_command_offers_every_statistic_and_defaults_to_the_deployed_one() -> None:
    from gadgets.cli import build_parser
    from recon.detect.cyclic import COMBINED_STATISTICS, STATISTICS
    from recon.detect.defense import DEFAULT_STATISTIC

    parser = build_parser()
    args = parser.parse_args(["calibrate", "--simulate", "1"])
    assert args.statistic == DEFAULT_STATISTIC
    action = next(a for a in parser._subparsers._group_actions[0].choices["calibrate"]._actions if a.dest == "statistic")  # type: ignore[union-attr]
    assert set(action.choices) == set(STATISTICS) | set(COMBINED_STATISTICS)


def test_the_before_after_montage_has_a_row_per_case(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from recon.report import before_after

    reference = np.random.default_rng(0).random((32, 32)).astype(np.complex64)
    one = before_after(tmp_path / "one.png", [("a", reference + 0.1, reference)], reference)
    three = before_after(tmp_path / "three.png", [("a", reference + 0.1, reference)] * 3, reference)
    (h1, w1), (h3, w3) = imread(one).shape[:2], imread(three).shape[:2]
    assert w1 == w3 and h3 > 1.8 * h1  # 2 rows against 4: reference on top, then one per case


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
