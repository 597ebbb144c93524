"""The detector's statistics measure what they say."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks.retired_detectors  # noqa: F401,E402  (registers the detectors of earlier releases)
from recon.attacks import (
    benign_noise,
    impulse_spikes,
    pgd_kspace_l2,
)
from recon.detect import CyclicDetector
from recon.detect.calibration import DetectorKey, calibrate_combined
from recon.detect.cyclic import _orthonormal, sensitive_share, start_seed
from recon.detect.defense import detector_key_from_env
from tests.recon.tiny import FAMILY, PROTOCOL, gen


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

def test_sensitive_share_is_one_for_noise_and_large_along_the_directions() -> None:
    g = gen(5)
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

    random = torch.randn(y.shape, generator=gen(9), dtype=y.dtype) * holdout.support
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
    attacked = pgd_kspace_l2(model, op, y, eps, gen(2)) * held + y * (1 - held)  # damaging, held-out lines only
    noisy = y + held * op.project(torch.randn(y.shape, generator=gen(3), dtype=y.dtype))
    noisy = y + (noisy - y) * eps / torch.linalg.vector_norm(noisy - y)  # as large, spread like noise
    score = detector.score(op, attacked, model(op.adjoint(attacked), op), 0.01, holdout=True).get("holdout_sensitive")
    benign = detector.score(op, noisy, model(op.adjoint(noisy), op), 0.01, holdout=True).get("holdout_sensitive")
    # (an untrained 2-unroll network amplifies far less selectively than the shipped one: 3.8 vs 2.0 here)
    assert score > 1.5 * benign and score > 1.5 * clean.get("holdout_sensitive")

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
    spikes = impulse_spikes(op, y, 1, 0.2 * float(y.abs().max()), gen(4))
    assert float(spike_ratio(op, spikes, model(op.adjoint(spikes), op), 0.01)) > 1.5 * clean
    noisy = benign_noise(op, y, 0.01, gen(5))
    assert float(spike_ratio(op, noisy, model(op.adjoint(noisy), op), 0.01)) < 2 * clean
    assert detector.passes("holdout_shift_spike_union") == detector.passes("holdout_shift_union")  # no extra pass
    assert detector.passes("shift_spike_union") == detector.passes("prior_shift")
    from recon.mitigate.cyclic import safeguard_statistic

    assert safeguard_statistic("shift_spike_union") == "cyclic_noise"  # a combination cannot judge a rewrite
    # differentiable (the adaptive attacker descends it)
    y_var = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(spike_ratio(op, y_var, x1, 0.01), y_var)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0

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
    from recon.mitigate.gated import prior_gate

    key = DetectorKey.of("shift_null_spike_union", detector)
    rng = np.random.default_rng(2)
    parts = {"prior_shift": rng.gamma(3.0, 0.2, 199), "null_shift": rng.gamma(9.0, 0.3, 199), "dc_spike": rng.gamma(5.0, 1.5, 199)}
    cal = calibrate_combined(parts, 0.05, "ab" * 32, PROTOCOL, key)
    assert [name for name, _ in cal.scales] == ["prior_shift", "null_shift", "dc_spike"]
    assert prior_gate(cal) == dict(cal.scales)["prior_shift"]  # the mitigation's gate stays prior_shift's clean threshold

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
    noise = op.project(complex_randn(tuple(y.shape), gen(6)))
    data = op.forward(x1) + sigma * noise
    assert float(noise_excess(op, data, x1, sigma)) == pytest.approx(1.0, abs=0.05)
    louder = data + sigma * op.project(complex_randn(tuple(y.shape), gen(7)))
    assert float(noise_excess(op, louder, x1, sigma)) == pytest.approx(2**0.5, abs=0.08)
    edge = int(y.shape[-1] * PERIPHERY)
    central = torch.zeros_like(y)
    central[..., edge:-edge] = 10 * sigma
    assert float(noise_excess(op, data + op.project(central), x1, sigma)) == pytest.approx(float(noise_excess(op, data, x1, sigma)), rel=1e-6)
    detector = CyclicDetector(model, FAMILY)
    assert detector.score(op, data, x1, sigma).get("noise_excess") == pytest.approx(float(noise_excess(op, data, x1, sigma)))
    assert detector.passes("null_noise_union") == detector.passes("null_first_union")
