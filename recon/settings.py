"""Documented settings: a field's default, meaning, unit and allowed values, declared once.

The library's settings (:class:`MitigationSettings`) and the gadgets' properties
(``gadgets/params.py``, which builds on them) are frozen dataclasses whose fields carry
their documentation and bounds in their metadata (:func:`setting`); the property reference
``docs/properties.md`` is generated from it, and :func:`check_settings` enforces the same
bounds on values given in code. Imports nothing heavy (``cycguard check`` reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


def setting(default: Any, doc: str, unit: str = "", choices: tuple[str, ...] = (), low: float | None = None, high: float | None = None) -> Any:
    """A documented settings field (``low``/``high`` bound numbers inclusively)."""
    return field(default=default, metadata={"doc": doc, "unit": unit, "choices": choices, "low": low, "high": high})


def check_settings(settings: Any) -> None:
    """Check every documented field of a settings dataclass against its choices and bounds.

    Raises:
        ValueError: naming the field, its value and what is allowed.
    """
    for f in fields(settings):
        meta = f.metadata
        if not meta:
            continue
        value = getattr(settings, f.name)
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{f.name} {value!r} is not one of {', '.join(meta['choices'])}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = meta.get("low"), meta.get("high")
            if math.isnan(value) or (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"{f.name} must lie in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}], got {value}")


MITIGATION_METHODS = ("correct", "prior", "cyclic")


@dataclass(frozen=True)
class MitigationSettings:
    """How flagged slices are rewritten (each field's meaning is its ``doc``, also in
    ``docs/properties.md`` under ``gadgets.mitigate``).

    ``correct`` (the default, :func:`recon.mitigate.prior.mitigate_correct`): when the
    received image's ``prior_shift`` (or ``null_shift``) exceeds its calibrated clean threshold
    (the gate), correct the measured lines by at most ``correct_radius`` noise norms until the
    shift falls to ``correct_stop`` times the gate, and ship the corrected data's image;
    refused when the shift stays above the gate. ``prior``
    (:func:`recon.mitigate.prior.mitigate_prior`): behind the same gate, the same network with
    ``prior_gain`` times its data-consistency weight. ``cyclic``
    (:func:`recon.mitigate.mitigate_kspace`): the k-space cyclic mitigation behind the cyclic
    safeguard (``recon.mitigate.cyclic.safeguard``); the fields from ``radius`` to ``max_dc_increase``
    are its.

    Whatever the method, a flagged slice is rewritten only when its score exceeds every
    clean calibration slice's (``rewrite_beyond_clean``): a slice flagged inside the clean
    range ships ``flagged``, unchanged. A flag costs the reader a warning; a rewrite of a
    clean slice costs it detail (the data correction took 3.2-8.2 dB, 5.0 on average, off
    the 17 of 1200 clean test slices past its gates: benchmarks/HISTORY.md, section 2), and
    at the flag threshold the evidence cannot tell those from an attack.
    """

    enabled: bool = setting(True, "rewrite flagged images at all (off: they leave flagged, unchanged)")
    rewrite_beyond_clean: bool = setting(
        True, "rewrite only a flagged image whose score exceeds every clean calibration slice's (p-value at its floor); one flagged "
        "inside the clean range leaves flagged, unchanged (off: every flagged image goes to the method)"
    )
    method: str = setting(
        "correct", "correct (when the image moves like an attacked one, correct the measured lines until the network's prior "
        "agrees, and reconstruct them; needs a calibration with prior_shift), prior (the network with its prior weighted "
        "prior_gain times more, behind the same gate) or cyclic (k-space cyclic mitigation; the properties from radius on are its)",
        choices=MITIGATION_METHODS,
    )
    correct_radius: float = setting(3.0, "correct method: budget of the data correction", unit="acquisition-noise norms", low=0.01, high=100.0)
    correct_steps: int = setting(30, "correct method: descent steps at most (4 network passes each)", low=0, high=1000)
    correct_stop: float = setting(0.7, "correct method: stop when prior_shift falls to this fraction of its clean threshold", low=0.0, high=0.99)
    correct_null: bool = setting(
        True, "correct method: also weigh null_shift (where the image moves in k-space) over its clean threshold, as evidence and in the descent, when the calibration holds one"
    )
    despike: bool = setting(
        True, "correct and prior methods: first re-estimate the measured samples whose data residual exceeds every clean calibration "
        "slice's (dc_spike over its scale: spikes), from the network's own image, then judge the repaired data"
    )
    despike_samples: int = setting(256, "spike repair: at most this many samples (more: the original leaves flagged)", low=1, high=1_000_000)
    prior_gain: float = setting(30.0, "prior method: factor on the network's data-consistency weight mu", low=1.01, high=1e4)
    radius: float = setting(1.0, "correction budget", unit="acquisition-noise norms", low=0.0, high=100.0)
    iterations: int = setting(20, "at most this many optimisation steps", low=1, high=1000)
    fidelity: float = setting(1.0, "weight of the fidelity-to-received-data term", low=0.0, high=1e6)
    lr: float = setting(0.1, "step size", unit="noise standard deviations", low=1e-6, high=10.0)
    patience: int = setting(5, "stop after this many steps without improvement", low=1, high=1000)
    max_dc_increase: float = setting(
        0.25, "safeguard: a rewrite may not move further from the received data than this", unit="noise norms", low=0.0, high=100.0
    )
    time_budget: float = setting(60.0, "per-slice time for a rewrite; past it the original image leaves flagged", unit="s", low=0.001, high=3600.0)

    def __post_init__(self) -> None:
        check_settings(self)
