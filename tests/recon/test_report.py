"""The report's pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_the_before_after_montage_has_a_row_per_case(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from recon.report import before_after

    reference = np.random.default_rng(0).random((32, 32)).astype(np.complex64)
    one = before_after(tmp_path / "one.png", [("a", reference + 0.1, reference)], reference)
    three = before_after(tmp_path / "three.png", [("a", reference + 0.1, reference)] * 3, reference)
    (h1, w1), (h3, w3) = imread(one).shape[:2], imread(three).shape[:2]
    assert w1 == w3 and h3 > 1.8 * h1  # 2 rows against 4: reference on top, then one per case
