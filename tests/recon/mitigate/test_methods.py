"""The mitigation methods stay in their budgets and rewrite only behind their gates."""

from __future__ import annotations

import pytest
import torch

from recon.attacks import (
    impulse_spikes,
)
from recon.detect import CyclicDetector
from recon.mitigate import mitigate_faithful, mitigate_kspace
from tests.recon.tiny import FAMILY, gen, off_mask


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
    spiked = impulse_spikes(op, y, 3, 0.5 * float(y.abs().max()), gen(4))
    hit = (spiked - y).abs() > 0
    attacked = model(op.adjoint(spiked), op)
    repair = repair_spikes(model, op, spiked, attacked, 0.01, limit)
    assert repair.found and repair.y is not None and repair.image is not None and not repair.refused
    moved = (repair.y - spiked).abs() > 0
    assert int(moved.sum()) == repair.samples <= 3 * int(hit.sum())
    assert bool(moved[hit].all())  # every spike was re-estimated
    assert not bool(off_mask(op, repair.y).abs().any())  # nothing off the acquired lines
    assert repair.ratio_after <= limit < repair.ratio
    assert 1 <= repair.network_passes <= 4
    error = lambda x: float(torch.linalg.vector_norm(x - x1))  # noqa: E731
    assert error(repair.image) < 0.5 * error(attacked)
    refused = repair_spikes(model, op, spiked, attacked, 0.01, limit, max_samples=1)
    assert refused.found and refused.y is None and "more than 1" in refused.refused
    with pytest.raises(ValueError, match="finite limit"):
        repair_spikes(model, op, spiked, attacked, 0.01, float("nan"))

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
