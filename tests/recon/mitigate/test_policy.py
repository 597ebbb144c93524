"""The mitigation policy: one strategy per method, and what never reaches a method."""

from __future__ import annotations

import numpy as np

from recon.mitigate.policy import METHODS
from recon.settings import MITIGATION_METHODS, MitigationSettings


def test_every_method_a_setting_offers_has_one_strategy() -> None:
    assert set(METHODS) == set(MITIGATION_METHODS) and MitigationSettings().method in METHODS
    assert all(callable(method) for method in METHODS.values())
    assert np.unique([id(method) for method in METHODS.values()]).size == len(METHODS)
