"""Training and benchmark data: the MNI slices moved through the slice plane, and the shift
that spends a budget (``benchmarks.object_shift``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.object_shift import shift_for_norm
from recon.data import mni

REF = mni.SliceRef("axial", 80)


def test_a_shifted_stack_is_one_draw_and_offset_zero_is_the_plain_slice() -> None:
    plain_rng, stack_rng = np.random.default_rng(5), np.random.default_rng(5)
    plain = mni.magnitude_slice(REF, 64, plain_rng)
    stack = mni.shifted_slices(REF, [0, 1, 3], 64, stack_rng)
    np.testing.assert_allclose(stack[0], plain, rtol=1e-6, atol=1e-7)
    assert stack_rng.random() == plain_rng.random()  # both generators advanced alike
    # the neighbours are other slices of the same head: close, not equal, on one scale
    step1, step3 = (float(np.linalg.norm(s - stack[0]) / np.linalg.norm(stack[0])) for s in stack[1:])
    assert 0.0 < step1 < step3 < 0.5
    assert all(0.8 < float(s.max()) < 1.2 for s in stack[1:])


def test_a_shifted_stack_needs_the_slice_itself() -> None:
    with pytest.raises(ValueError, match="must include 0"):
        mni.shifted_slices(REF, [1, 2], 64, np.random.default_rng(0))


def test_the_shift_for_a_norm_is_solved_on_the_piecewise_linear_path() -> None:
    zero = torch.zeros(2, dtype=torch.complex64)
    e1, e2 = torch.tensor([1, 0], dtype=torch.complex64), torch.tensor([0, 1j], dtype=torch.complex64)
    assert shift_for_norm([zero, e1, 2 * e1], 1.5) == pytest.approx(1.5)
    # the second segment turns: ||e1 + f e2|| = sqrt(1 + f^2) = 1.25 at f = 0.75
    assert shift_for_norm([zero, e1, e1 + e2], 1.25) == pytest.approx(1.75)
    assert shift_for_norm([zero, e1, e1 + e2], 2.0) is None
    with pytest.raises(ValueError, match="target must be > 0"):
        shift_for_norm([zero, e1], 0.0)


def test_the_heldout_slab_is_named_once() -> None:
    lo, hi = mni.HELDOUT_AXIAL
    assert mni.heldout_axial(3) == (lo, lo + 1, lo + 2)
    assert len(mni.heldout_axial(hi - lo)) == hi - lo
    for count in (0, hi - lo + 1):
        with pytest.raises(ValueError, match="held-out slab has"):
            mni.heldout_axial(count)
