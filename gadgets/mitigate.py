"""Mitigation gadget: rewrites flagged images (by default the data correction behind the prior
gate, :func:`recon.mitigate.prior.mitigate_correct`; ``method=prior``: the prior-weighted
re-reconstruction; ``method=cyclic``: the k-space cyclic mitigation).

``<external><execute name="gadgets.mitigate" target="mitigate" type="python"/>``, after a
detect gadget with ``forward_internal=true``. Images whose verdict is not ``flagged`` pass
unchanged. A flagged image is rewritten only when the safeguard accepts the rewrite
(:func:`recon.mitigate.policy.mitigate_flagged`); then it becomes ``mitigated``, its history and
series description say so, and its comment gives both scores. The calibration must be the
one the detect gadget used (its threshold is checked).
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields, replace
from typing import Any

from gadgets.convert import ContractError, image_pixels, meta_of, meta_value, received_copy, set_meta, with_pixels
from gadgets.params import MitigateSettings
from gadgets.stages import CheckedImageStage, Resources, SliceContext, gadget_logging, serve
from recon.mitigate.policy import mitigate_flagged
from recon.physics.prepared import prepare_with_maps
from recon.settings import MitigationSettings
from recon.verdict import VERDICT_KEY, CheckResult, mitigation_meta

log = logging.getLogger("cycguard.gadget.mitigate")


def mitigation_settings(settings: MitigateSettings) -> MitigationSettings:
    """The pipeline's mitigation settings from the gadget's properties (every field of
    :class:`recon.settings.MitigationSettings` is a property of the same name)."""
    return MitigationSettings(**{f.name: getattr(settings, f.name) for f in fields(MitigationSettings)})


class MitigateStage(CheckedImageStage):
    """Rewrites flagged CycGuard images."""

    name = "mitigate"

    def __init__(self, settings: MitigateSettings, resources: Resources) -> None:
        super().__init__(settings.forward_internal, settings.weights, settings.calibration, settings.device, resources)
        self.settings = settings
        self.mitigation = mitigation_settings(settings)

    def handle(self, item: Any, context: SliceContext) -> list[Any]:
        meta = meta_of(item)
        if meta_value(meta, VERDICT_KEY) != "flagged":
            return [item]
        self.defenses.check_model(item)
        defense = self.defenses.defense(context.part.data)
        if isinstance(defense, str):
            raise ContractError(f"mitigate: a flagged image, but no calibration fits it here: {defense}")
        checked = _checked(meta, defense.statistic)
        if not math.isclose(checked.threshold, defense.calibration.threshold, rel_tol=1e-5):
            raise ContractError(
                f"mitigate: the image was checked against threshold {checked.threshold:.6g}, this gadget's calibration "
                f"says {defense.calibration.threshold:.6g}: detect and mitigate must use the same calibration"
            )
        sigma = float(meta_value(meta, "CycGuard.NoiseSigma") or "nan")
        if not math.isfinite(sigma) or sigma <= 0:
            raise ContractError("mitigate: flagged image without a valid CycGuard.NoiseSigma")
        defense = replace(defense, noise_sigma=sigma, mitigation=self.mitigation)
        assert context.maps is not None
        prepared = prepare_with_maps(context.part.data, context.maps, self.defenses.device)
        outcome = mitigate_flagged(prepared, image_pixels(item), checked, defense)
        received = None
        if outcome.verdict == "mitigated":
            if self.settings.send_received:
                received = received_copy(item)
            item = with_pixels(item, outcome.image)
        set_meta(item, mitigation_meta(outcome.verdict, outcome.reason, outcome.seconds, outcome.mitigated_score, self.settings.method))
        log.info("mitigate %s: %s", context.part.data.key, outcome.reason)
        return [item] if received is None else [item, received]


def _checked(meta: Any, statistic: str) -> CheckResult:
    """The detect gadget's result, read back from the image meta."""
    try:
        score = float(meta_value(meta, "CycGuard.Score") or "")
        threshold = float(meta_value(meta, "CycGuard.Threshold") or "")
        p_value = float(meta_value(meta, "CycGuard.PValue") or "")
    except ValueError as err:
        raise ContractError("mitigate: flagged image without CycGuard.Score/Threshold/PValue") from err
    reason = meta_value(meta, "ImageComment") or f"flagged: {statistic} {score:.4g} > threshold {threshold:.4g}"
    return CheckResult("flagged", score, threshold, p_value, None, reason, 0.0)


def mitigate(connection: Any) -> None:
    """Gadget target ``gadgets.mitigate:mitigate``."""
    gadget_logging()
    serve(connection, "gadgets.mitigate", "mitigate")
