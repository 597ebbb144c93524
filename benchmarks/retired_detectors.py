"""Detectors of earlier releases, kept to compare against (``benchmarks.detect_union``).

Importing this module registers them (:func:`recon.detect.statistics.register`); the
product does not, so it refuses a calibration file made for one of them. What each
measured is in ``docs/STATISTICS.md`` and ``benchmarks/HISTORY.md``.
"""

from __future__ import annotations

from recon.detect.statistics import Combination, register

RETIRED: tuple[Combination, ...] = tuple(
    register(c)
    for c in (
        Combination("holdout_union", "held-out prediction error or its sensitive share", ("holdout_noise", "holdout_sensitive")),
        Combination("holdout_shift_union", "holdout_union with prior_shift", ("holdout_noise", "holdout_sensitive", "prior_shift")),
        Combination(
            "holdout_shift_spike_union", "holdout_shift_union with dc_spike", ("holdout_noise", "holdout_sensitive", "prior_shift", "dc_spike"),
        ),
        Combination("shift_spike_union", "prior_shift and dc_spike: one pass beyond the cycle's", ("prior_shift", "dc_spike")),
        Combination("shift_null_spike_union", "prior_shift, null_shift and dc_spike on equal shares", ("prior_shift", "null_shift", "dc_spike")),
        Combination(
            "null_spike_union", "null_shift and dc_spike share the budget; prior_shift a backstop", ("null_shift", "dc_spike", "prior_shift"),
            backstops=("prior_shift",), gates=("prior_shift",),
        ),
    )
)
