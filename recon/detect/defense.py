"""The runtime defense: the detector, calibration and mitigation settings that judge a
slice, and how they are found for a slice's protocol.

A :class:`Defense` is built once per protocol (:func:`fit_defense`): the detector with the
project's settings for the model, the calibration that fits the model, protocol and
detector (the shipped one beside the weights, or one the caller names), the statistic the
calibration was made for. :class:`ScanDefenses` gives each slice of a raw scan its defense
and noise level, as the in-process path and the benchmarks apply them; the detect and
mitigate gadgets do the same per protocol.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from recon.detect.calibration import Calibration, CalibrationError, DetectorKey, ProtocolKey
from recon.detect.cyclic import CyclicDetector
from recon.detect.statistics import COMBINATIONS, DEFAULT_STATISTIC, PRODUCT_CHOICES, STATISTICS, needs
from recon.models.modl import MoDL
from recon.models.weights import WEIGHTS_DIR, ModelManifest
from recon.physics.masks import MaskFamily
from recon.physics.noise import estimate_noise_sigma
from recon.settings import MitigationSettings
from recon.types import SliceKSpace

if TYPE_CHECKING:
    from recon.io.mrd import RawScan

log = logging.getLogger(__name__)

CALIBRATION_DIR = WEIGHTS_DIR
# environment variable holding a site's secret for the sensitive directions' start
DETECTOR_KEY_ENV = "CYCGUARD_DETECTOR_KEY"


def default_calibration_path(manifest: ModelManifest) -> Path:
    """Where the shipped calibration of a model lives (beside its weights)."""
    return CALIBRATION_DIR / f"{manifest.name}.calibration.json"


# how far the k-space periphery of prewhitened data may put the noise level from 1
WHITENED_TOLERANCE = 0.25


def noise_level(data: SliceKSpace, whitened: bool) -> tuple[float, str | None]:
    """Noise standard deviation per k-space sample, and a doubt about it (or ``None``).

    Prewhitened data (NoiseAdjust, or the reader, from the noise scans, which an attacker of
    the imaging lines does not touch): 1. When the k-space periphery disagrees by more than
    :data:`WHITENED_TOLERANCE`, the data may not be whitened as the header says: the doubt is
    returned, and a passing score is then not trusted (:func:`recon.pipeline.check`). Data
    not prewhitened: estimated from the periphery (a perturbation that reaches the periphery
    inflates the estimate and so lowers its own score; prefer prewhitened data). The check
    weighs the doubt against the network's residual at the periphery (:func:`whitening_doubt`).
    """
    estimate = estimate_noise_sigma(np.asarray(data.kspace), np.asarray(data.mask))
    if not whitened:
        return estimate, None
    if abs(estimate - 1.0) > WHITENED_TOLERANCE:
        return 1.0, f"k-space periphery gives noise sigma {estimate:.3g}, not 1 as whitened data should"
    return 1.0, None


def whitening_doubt(doubt: str | None, noise_excess: float | None) -> str | None:
    """The noise-level doubt of :func:`noise_level` once the network has fitted the slice.

    The raw periphery also holds the object's signal where the object reaches the edges of
    k-space (body images, anything filling the field of view). The data residual there after
    the network's fit (``noise_excess``, in noise sigmas: about 0.96 when the data are noise of
    the declared level) does not: within :data:`WHITENED_TOLERANCE` of 1 the doubt is dismissed;
    otherwise it stands, with the residual named.
    """
    if doubt is None or noise_excess is None or not math.isfinite(noise_excess):
        return doubt
    if abs(noise_excess - 1.0) <= WHITENED_TOLERANCE:
        return None
    return f"{doubt}, and the network's data residual there is {noise_excess:.3g} noise sigmas"


def slice_noise_sigma(data: SliceKSpace, whitened: bool) -> float:
    """The noise standard deviation :func:`noise_level` gives (without its doubt)."""
    return noise_level(data, whitened)[0]


def protocol_of(data: SliceKSpace, manifest: ModelManifest, acceleration: int) -> ProtocolKey:
    """The protocol key of a slice (mask kind from the model's training family)."""
    return ProtocolKey(data.shape, data.coils, manifest.mask_kind, acceleration, int(data.acs.sum()))


def detector_key_from_env() -> bytes | None:
    """The site's detector key: ``CYCGUARD_DETECTOR_KEY``, or the contents of the file named by
    ``CYCGUARD_DETECTOR_KEY_FILE`` (a container secret; one trailing newline dropped), or
    ``None`` when neither is set. A key file that is named but unreadable or empty is an
    error: the site asked for a secret key and must not silently get the public seed."""
    value = os.environ.get(DETECTOR_KEY_ENV, "")
    if value:
        return value.encode()
    path = os.environ.get(DETECTOR_KEY_ENV + "_FILE", "")
    if not path:
        return None
    try:
        key = Path(path).read_bytes().removesuffix(b"\n")
    except OSError as err:
        raise ValueError(f"{DETECTOR_KEY_ENV}_FILE={path}: cannot read the detector key ({err.strerror})") from err
    if not key:
        raise ValueError(f"{DETECTOR_KEY_ENV}_FILE={path}: the detector key file is empty")
    return key


def model_protocol(manifest: ModelManifest) -> ProtocolKey:
    """The protocol a model was trained for (its simulated calibration's)."""
    return ProtocolKey(manifest.matrix, manifest.coils, manifest.mask_kind, manifest.acceleration, manifest.acs_lines)


def detector_for(model: MoDL, manifest: ModelManifest, protocol: ProtocolKey | None = None, direction_key: bytes | None = None) -> CyclicDetector:
    """The detector with the project's default settings for a model and a protocol (its
    sampling family: the model's own by default; ``direction_key``: a site's secret for the
    sensitive directions, :func:`recon.detect.cyclic.start_seed`)."""
    protocol = protocol or model_protocol(manifest)
    family = MaskFamily(protocol.mask_kind, protocol.acceleration, protocol.acs_lines)
    alternatives = family.max_alternatives(CyclicDetector.alternatives)  # equispaced R = 2, 3: the other offsets only
    return CyclicDetector(model, family, alternatives=alternatives, direction_key=direction_key)


def calibration_cache() -> Path:
    """Where calibrations made for a site's protocols are kept: ``CYCGUARD_CALIBRATIONS``, or
    ``~/.cache/cycguard/calibrations``."""
    return Path(os.environ.get("CYCGUARD_CALIBRATIONS") or Path.home() / ".cache" / "cycguard" / "calibrations")


def cached_calibration_path(manifest: ModelManifest, protocol: ProtocolKey) -> Path:
    """The cache file of a protocol's calibration for a model (``cycguard calibrate --like``)."""
    slug = f"{protocol.matrix[0]}x{protocol.matrix[1]}_{protocol.coils}ch_{protocol.mask_kind}_R{protocol.acceleration}_acs{protocol.acs_lines}"
    return calibration_cache() / f"{manifest.name}-{manifest.sha256[:12]}" / f"{slug}.json"


@dataclass(frozen=True, eq=False)
class Defense:
    """Everything the defended pipeline needs, built once per protocol."""

    model: MoDL
    detector: CyclicDetector
    calibration: Calibration
    statistic: str
    noise_sigma: float = 1.0
    mitigation: MitigationSettings = MitigationSettings()
    noise_doubt: str | None = None  # why the noise level may be wrong (a passing score is then not trusted)


def load_defense(model: MoDL, manifest: ModelManifest, protocol: ProtocolKey, calibration: Path | None) -> Defense | None:
    """The defense for a protocol, or ``None`` (with a warning) when the default calibration
    does not fit; a calibration the caller named must fit (:class:`CalibrationError` otherwise)."""
    defense = fit_defense(model, manifest, protocol, calibration)
    return None if isinstance(defense, str) else defense


def fit_defense(model: MoDL, manifest: ModelManifest, protocol: ProtocolKey, calibration: Path | None) -> Defense | str:
    """The defense for a protocol, or why the default calibration does not fit it (logged as
    a warning; the slices stay ``unverified``); a calibration the caller named must fit
    (:class:`CalibrationError` otherwise).

    The detector's sensitive directions are keyed by ``CYCGUARD_DETECTOR_KEY`` when the site
    sets it (the calibration, made with the public seed, holds either way)."""
    path = calibration if calibration is not None else default_calibration_path(manifest)
    if calibration is None and protocol != model_protocol(manifest):  # a site's protocol: its own calibration, when made
        path = cached_calibration_path(manifest, protocol)
        if not path.exists():
            why = (
                f"no calibration for protocol {protocol.describe()} (the shipped one is for {model_protocol(manifest).describe()}; "
                f"this scan differs in {model_protocol(manifest).differences(protocol)}): "
                f"make one with `cycguard calibrate --like SCAN.h5` (simulated from the scan's own protocol and coil maps; "
                f"kept in {path.parent}) or from clean scans (`cycguard calibrate CLEAN.h5 ...`)"
            )
            log.warning("%s; images will be tagged unverified", why)
            return why
    direction_key = detector_key_from_env()
    detector = detector_for(model, manifest, protocol, direction_key)
    try:
        statistic = calibration_statistic(path) if path.exists() else DEFAULT_STATISTIC
        loaded = Calibration.load(path, manifest.sha256, protocol, DetectorKey.of(statistic, detector))
    except CalibrationError as err:
        if calibration is not None:
            raise
        log.warning("%s; images will be tagged unverified", err)
        return str(err)
    if needs(statistic).sensitive:
        log.info("sensitive directions %s", f"keyed by {DETECTOR_KEY_ENV}" if direction_key else f"from the public seed ({DETECTOR_KEY_ENV} unset)")
    elif direction_key:
        log.warning("%s is set but %s has no sensitive directions to key: the key changes nothing", DETECTOR_KEY_ENV, statistic)
    return Defense(model, detector, loaded, statistic)


class ScanDefenses:
    """The defense for each slice of one raw scan, as the offline path and the benchmarks apply it.

    A scan may mix protocols (matrix, coils, ACS lines): each protocol's calibration is
    loaded once (:func:`load_defense`, so a named calibration that does not fit is an error
    and a default one that does not fit leaves that protocol's slices ``unverified``), and
    every slice gets its own noise level (:func:`noise_level`: 1 for a scan that was
    prewhitened with its noise scans, with a doubt when its periphery disagrees).
    """

    def __init__(self, model: MoDL, manifest: ModelManifest, scan: RawScan, calibration: Path | None = None) -> None:
        self.model, self.manifest, self.scan, self.calibration = model, manifest, scan, calibration
        self._loaded: dict[ProtocolKey, Defense | str] = {}

    def for_slice(self, data: SliceKSpace) -> Defense | None:
        """``data``'s defense with its noise sigma, or ``None`` when no calibration fits its protocol."""
        defense = self.fit(data)
        return None if isinstance(defense, str) else defense

    def fit(self, data: SliceKSpace) -> Defense | str:
        """``data``'s defense with its noise sigma, or why no calibration fits its protocol."""
        protocol = protocol_of(data, self.manifest, self.scan.protocol.acceleration)
        if protocol not in self._loaded:
            self._loaded[protocol] = fit_defense(self.model, self.manifest, protocol, self.calibration)
        defense = self._loaded[protocol]
        if isinstance(defense, str):
            return defense
        sigma, doubt = noise_level(data, self.scan.whitened)
        return replace(defense, noise_sigma=sigma, noise_doubt=doubt)


def calibration_statistic(path: Path) -> str:
    """The statistic a calibration file was made for (read before full validation; a file
    without one is left to :meth:`Calibration.load` to refuse).

    Raises:
        CalibrationError: a statistic or combination this version does not compute.
    """
    try:
        statistic = str(json.loads(path.read_text())["detector"]["statistic"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_STATISTIC
    if statistic not in STATISTICS and statistic not in COMBINATIONS:
        raise CalibrationError(
            f"calibration {path} is for statistic {statistic!r}, which this version does not compute "
            f"(it ships {', '.join(PRODUCT_CHOICES)}): recalibrate (cycguard calibrate)"
        )
    return statistic
