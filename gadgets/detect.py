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
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ismrmrd

from gadgets.convert import ContractError, image_pixels, meta_of, meta_value, set_meta
from gadgets.params import DetectSettings
from gadgets.stages import InternalStore, Resources, SliceContext, gadget_logging, is_ours, serve
from recon.detect.calibration import ProtocolKey
from recon.detect.defense import Defense, fit_defense, protocol_of
from recon.models.weights import model_tag
from recon.physics.noise import estimate_noise_sigma
from recon.pipeline import check, check_meta, prepare_with_maps
from recon.verdict import PROTOCOL_KEY, SECONDS_PREFIX, verdict_meta

log = logging.getLogger("cycguard.gadget.detect")


class DefenseCache:
    """Defenses per protocol for one model and calibration file (shared by detect and mitigate)."""

    def __init__(self, stage: str, weights: str, calibration: str, device: str, resources: Resources) -> None:
        self.stage = stage
        self.model, self.manifest, self.device = resources.model(weights, device)
        self.calibration = Path(calibration) if calibration else None
        self.acceleration = resources.acceleration()
        self.cache: dict[ProtocolKey, Defense | str] = {}

    def check_model(self, image: ismrmrd.Image) -> None:
        tag = meta_value(meta_of(image), "CycGuard.Model")
        if tag != model_tag(self.manifest):
            raise ContractError(f"{self.stage}: image made by model {tag}, but this gadget loaded {model_tag(self.manifest)}")

    def defense(self, data: Any) -> Defense | str:
        """The defense for ``data``'s protocol, or why no calibration fits it."""
        protocol = protocol_of(data, self.manifest, self.acceleration)
        if protocol not in self.cache:
            self.cache[protocol] = fit_defense(self.model, self.manifest, protocol, self.calibration)
        return self.cache[protocol]


WHITENED_TOLERANCE = 0.25


def noise_sigma(data: Any, noise_level: str) -> tuple[float, str | None]:
    """Noise standard deviation per k-space sample, and a doubt about it (or ``None``).

    ``estimate``: from the k-space periphery. Note that a perturbation that reaches the
    periphery inflates this estimate and so lowers its own score; prefer ``whitened``.
    ``whitened``: 1, as NoiseAdjust makes noise white with unit variance from the noise
    scans (which an attacker of the imaging lines does not touch). When the periphery
    disagrees by more than 25 % the data may not be whitened at all: the doubt is returned
    and a clean-looking score is then not trusted (verdict ``unverified``).
    """
    estimate = estimate_noise_sigma(data.kspace, data.mask)
    if noise_level == "estimate":
        return estimate, None
    if abs(estimate - 1.0) > WHITENED_TOLERANCE:
        return 1.0, f"k-space periphery gives noise sigma {estimate:.3g}, not 1 as whitened data should"
    return 1.0, None


class CheckedImageStage:
    """A stage that works on CycGuard images with the k-space and coil maps sent before them
    (detect, mitigate): keeps those in an :class:`InternalStore`, passes other items through."""

    name = "checked"

    def __init__(self, forward_internal: bool, weights: str, calibration: str, device: str, resources: Resources) -> None:
        self.store = InternalStore(self.name, forward_internal, resources.receiver_bandwidth())
        self.defenses = DefenseCache(self.name, weights, calibration, device, resources)

    def process(self, item: Any) -> Iterable[Any]:
        forwarded = self.store.offer(item)
        if forwarded is not None:
            return forwarded
        if not is_ours(item):
            return [item]
        return self.handle(item, self.store.take(item))

    def handle(self, image: ismrmrd.Image, context: SliceContext) -> list[Any]:
        """Items to send for one CycGuard image."""
        raise NotImplementedError

    def close(self) -> Iterable[Any]:
        self.store.close()
        return []


class DetectStage(CheckedImageStage):
    """Scores CycGuard images against the received data."""

    name = "detect"

    def __init__(self, settings: DetectSettings, resources: Resources) -> None:
        super().__init__(settings.forward_internal, settings.weights, settings.calibration, settings.device, resources)
        self.settings = settings

    def handle(self, item: ismrmrd.Image, context: SliceContext) -> list[Any]:
        self.defenses.check_model(item)
        data = context.part.data
        defense = self.defenses.defense(data)
        protocol = protocol_of(data, self.defenses.manifest, self.defenses.acceleration)
        if isinstance(defense, str):
            set_meta(item, {"ImageComment": f"unverified: no consistency check ran: {defense}", PROTOCOL_KEY: protocol.describe()})
            return [item]
        sigma, doubt = noise_sigma(data, self.settings.noise_level)
        defense = replace(defense, noise_sigma=sigma)
        assert context.maps is not None
        prepared = prepare_with_maps(data, context.maps, self.defenses.device)
        checked = check(prepared, image_pixels(item), defense)
        if doubt is not None and checked.verdict == "clean":
            log.warning("%s: %s; a passing score is not trusted", data.key, doubt)
            checked = replace(checked, verdict="unverified", reason=f"unverified: {doubt}; the passing score ({checked.reason}) is not trusted")
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
