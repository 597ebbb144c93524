"""Detection gadget: the cyclic measurement-consistency check of each reconstruction.

``<external><execute name="gadgets.detect" target="detect" type="python"/>``, after a recon
gadget with ``forward_internal=true``. For each CycGuard image it takes the k-space buffer
and coil maps that came before it (nothing is recomputed), scores the image against the
received data (:func:`recon.pipeline.check`) and sets ``CycGuard.Verdict`` to ``clean`` or
``flagged`` with score, threshold and p-value. When no calibration fits the model and the
protocol the image stays ``unverified`` (and says why). Images made by another model are an
error: the check would be meaningless.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import ismrmrd

from gadgets.autocalibrate import auto_calibration_allowed
from gadgets.convert import image_pixels, set_meta
from gadgets.params import DetectSettings
from gadgets.stages import AutoCalibrate, CheckedImageStage, Resources, SliceContext, gadget_logging, serve
from recon.detect.defense import noise_level, protocol_of
from recon.pipeline import check, check_meta, prepare_with_maps
from recon.verdict import PROTOCOL_KEY, SECONDS_PREFIX, verdict_meta

log = logging.getLogger("cycguard.gadget.detect")


class DetectStage(CheckedImageStage):
    """Scores CycGuard images against the received data."""

    name = "detect"

    def __init__(self, settings: DetectSettings, resources: Resources) -> None:
        slices = settings.auto_calibrate_slices if settings.auto_calibrate and auto_calibration_allowed() else 0
        auto = AutoCalibrate(slices, settings.noise_level == "whitened", settings.weights)
        super().__init__(settings.forward_internal, settings.weights, settings.calibration, settings.device, resources, auto)
        self.settings = settings

    def handle(self, item: ismrmrd.Image, context: SliceContext) -> list[Any]:
        self.defenses.check_model(item)
        data = context.part.data
        defense = self.defenses.defense(data)
        protocol = protocol_of(data, self.defenses.manifest, self.defenses.acceleration)
        if isinstance(defense, str):
            log.warning("%s: unverified: %s", data.key, defense)
            set_meta(item, {"ImageComment": f"unverified: no consistency check ran: {defense}", PROTOCOL_KEY: protocol.describe()})
            return [item]
        sigma, doubt = noise_level(data, whitened=self.settings.noise_level == "whitened")
        defense = replace(defense, noise_sigma=sigma, noise_doubt=doubt)
        assert context.maps is not None
        prepared = prepare_with_maps(data, context.maps, self.defenses.device)
        checked = check(prepared, image_pixels(item), defense)
        if checked.verdict == "unverified":
            log.warning("%s: %s", data.key, checked.reason)
        set_meta(
            item,
            {
                **verdict_meta(checked.verdict, checked.reason),
                **check_meta(defense, checked.score, checked.threshold, checked.p_value, checked.scores),
                PROTOCOL_KEY: protocol.describe(),
                SECONDS_PREFIX + "detect": f"{checked.seconds:.4f}",
            },
        )
        log.info("detect %s: %s", data.key, checked.reason)
        return [item]


def detect(connection: Any) -> None:
    """Gadget target ``gadgets.detect:detect``."""
    gadget_logging()
    serve(connection, "gadgets.detect", "detect")
