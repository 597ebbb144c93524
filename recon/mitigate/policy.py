"""The mitigation policy: which flagged images go to a rewrite, and by which method.

One entry point, :func:`mitigate_flagged`. Whatever the method, an image goes to it only
when it was flagged, mitigation is on, and (``rewrite_beyond_clean``) its score exceeds
every clean calibration score; otherwise it ships unchanged with its verdict. Each method
is one strategy, ``(prepared, image, checked, defense) -> MitigationOutcome``
(:data:`METHODS`), that answers to the same time budget and ships the original image,
``flagged``, whenever its own safeguard or gate refuses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from recon.detect.defense import Defense
from recon.mitigate.cyclic import rewrite_cyclic
from recon.mitigate.gated import rewrite_correct, rewrite_prior
from recon.mitigate.outcome import MitigationOutcome, unchanged
from recon.physics.prepared import PreparedSlice
from recon.verdict import CheckResult

Method = Callable[[PreparedSlice, np.ndarray, CheckResult, Defense], MitigationOutcome]

# one strategy per choice of the ``method`` setting (recon.settings.MITIGATION_METHODS)
METHODS: dict[str, Method] = {"correct": rewrite_correct, "prior": rewrite_prior, "cyclic": rewrite_cyclic}


def mitigate_flagged(prepared: PreparedSlice, image: np.ndarray, checked: CheckResult, defense: Defense) -> MitigationOutcome:
    """Rewrite a flagged image by the configured method, behind its safeguard.

    Images that passed the check are returned untouched. With ``rewrite_beyond_clean`` (the
    default) only an image whose score exceeds every clean calibration score goes to the
    method; one flagged inside the clean range ships unchanged, ``flagged``.
    """
    if checked.verdict != "flagged":
        return MitigationOutcome(image, checked.verdict, None, checked.reason, 0.0, 0)
    settings = defense.mitigation
    if not settings.enabled:
        return unchanged(image, checked, "mitigation off")
    calibration = defense.calibration
    if settings.rewrite_beyond_clean and not calibration.beyond_clean(checked.score):
        why = (
            f"not rewritten: the score is within the clean calibration range (largest {calibration.clean_max:.4g} "
            f"of {len(calibration.clean_scores)} clean slices): the original image ships"
        )
        return unchanged(image, checked, why)
    return METHODS[settings.method](prepared, image, checked, defense)
