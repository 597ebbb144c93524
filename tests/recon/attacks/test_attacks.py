"""Attacks stay in their budgets and touch only what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import benchmarks.retired_detectors  # noqa: F401,E402  (registers the detectors of earlier releases)
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
from recon.detect import CyclicDetector
from tests.recon.tiny import FAMILY, gen, off_mask


def test_image_attacks_stay_in_the_box(setup: tuple) -> None:
    model, op, _, x_zf = setup
    eps = 0.01 * float(x_zf.abs().max())
    for attacked in (pgd_image_linf(model, op, x_zf, eps, gen()), fgsm_image(model, op, x_zf, eps, gen())):
        delta = attacked - x_zf
        assert float(delta.real.abs().max()) <= eps * (1 + 1e-5)
        assert float(delta.imag.abs().max()) <= eps * (1 + 1e-5)
        assert float(delta.abs().max()) > 0.5 * eps  # it used its budget

def test_kspace_attacks_respect_budget_and_mask(setup: tuple) -> None:
    model, op, y, _ = setup
    eps = 0.05 * float(torch.linalg.vector_norm(y))
    l2 = pgd_kspace_l2(model, op, y, eps, gen())
    assert float(torch.linalg.vector_norm(l2 - y)) <= eps * (1 + 1e-5)
    assert float(torch.linalg.vector_norm(l2 - y)) > 0.9 * eps
    fgsm = fgsm_kspace(model, op, y, eps, gen())
    assert float(torch.linalg.vector_norm(fgsm - y)) == pytest.approx(eps, rel=1e-3)
    box = 0.01 * float(y.abs().max())
    linf = pgd_kspace_linf(model, op, y, box, gen())
    assert float((linf - y).real.abs().max()) <= box * (1 + 1e-5)
    for attacked in (l2, fgsm, linf, benign_noise(op, y, 0.1, gen()), impulse_spikes(op, y, 5, 3.0, gen())):
        assert not bool(off_mask(op, attacked).abs().any())  # nothing off the acquired lines

def test_impulse_spikes_count_and_amplitude(setup: tuple) -> None:
    _, op, y, _ = setup
    spiked = impulse_spikes(op, y, 6, 5.0, gen(1))
    changed = (spiked - y).abs()
    assert int((changed > 0).sum()) <= 6 and int((changed > 0).sum()) >= 5  # collisions are possible
    np.testing.assert_allclose(changed[changed > 0].numpy(), 5.0, rtol=1e-5)

def test_attacks_are_seeded(setup: tuple) -> None:
    model, op, y, _ = setup
    eps = 0.05 * float(torch.linalg.vector_norm(y))
    a = pgd_kspace_l2(model, op, y, eps, gen(5))
    b = pgd_kspace_l2(model, op, y, eps, gen(5))
    torch.testing.assert_close(a, b)

def test_adaptive_attack_stays_in_budget_and_on_the_sampled_lines(setup: tuple) -> None:
    model, op, y, _ = setup
    detector = CyclicDetector(model, FAMILY, folds=3, directions=2, power_iterations=1)
    eps = 0.05 * float(torch.linalg.vector_norm(y))
    scales = {"holdout_noise": 1.0, "holdout_sensitive": 1.0}
    cases = (("cyclic_noise", {}), ("holdout_union", {"scales": scales}), ("holdout_union", {"scales": scales, "resample_directions": True}))
    for statistic, extra in cases:
        attacked = adaptive_kspace_l2(model, op, y, eps, detector, statistic, 1e9, gen(4), steps=2, noise_sigma=0.01, **extra)
        delta = attacked - y
        assert float(torch.linalg.vector_norm(delta)) <= eps * (1 + 1e-4)
        assert float(torch.linalg.vector_norm(delta)) > 0.5 * eps  # with a threshold it never reaches, it spends the budget
        assert float(off_mask(op, delta).abs().max()) == 0.0
    with pytest.raises(ValueError, match="needs the calibration's scales"):
        adaptive_kspace_l2(model, op, y, eps, detector, "holdout_union", 1.0, gen(4), steps=1)

def test_adaptive_attack_against_the_shift_union_stays_in_budget(setup: tuple) -> None:
    model, op, y, _ = setup
    detector = CyclicDetector(model, FAMILY, folds=3, directions=2, power_iterations=1)
    eps = 0.05 * float(torch.linalg.vector_norm(y))
    scales = {"holdout_noise": 1.0, "holdout_sensitive": 1.0, "prior_shift": 1.0}
    null = {"prior_shift": 1.0, "null_shift": 1.0, "dc_spike": 1.0}
    for statistic, extra in (("holdout_shift_union", {"scales": scales}), ("shift_null_spike_union", {"scales": null}), ("prior_shift", {})):
        attacked = adaptive_kspace_l2(model, op, y, eps, detector, statistic, 1e9, gen(5), steps=2, noise_sigma=0.01, **extra)
        delta = attacked - y
        assert 0.5 * eps < float(torch.linalg.vector_norm(delta)) <= eps * (1 + 1e-4)
        assert float(off_mask(op, delta).abs().max()) == 0.0
