"""Calibrating the detector on clean slices (``cycguard calibrate``).

Clean slices come from the user's raw files (the recommended route: clean scans of the
site's own protocol) or from simulated acquisitions of the held-out MNI152 slab (the
shipped default; needs the ``data`` extra). Every slice of a calibration must share one
protocol; the file records it with the model's hash and the detector's settings.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recon.detect.calibration import (
    Calibration,
    CalibrationError,
    DetectorKey,
    ProtocolKey,
    calibrate,
    calibrate_combined,
    signal_range,
)
from recon.detect.cyclic import COMBINED_STATISTICS, SENSITIVE_STATISTICS, CyclicDetector, DetectionScores
from recon.io.mrd import RawScan, read_raw
from recon.models.modl import MoDL
from recon.models.weights import WEIGHTS_DIR, ModelManifest
from recon.physics.masks import MaskFamily
from recon.physics.noise import estimate_noise_sigma
from recon.physics.sense import SenseOp
from recon.pipeline import Defense, prepare
from recon.types import SliceKSpace

log = logging.getLogger(__name__)

DEFAULT_STATISTIC = "null_first_union"
CALIBRATION_DIR = WEIGHTS_DIR
# environment variable holding a site's secret for the sensitive directions' start
DETECTOR_KEY_ENV = "CYCGUARD_DETECTOR_KEY"


def default_calibration_path(manifest: ModelManifest) -> Path:
    """Where the shipped calibration of a model lives (beside its weights)."""
    return CALIBRATION_DIR / f"{manifest.name}.calibration.json"


def slice_noise_sigma(data: SliceKSpace, whitened: bool) -> float:
    """Noise standard deviation per sample: 1 for prewhitened data, else estimated from the
    k-space periphery (:func:`recon.physics.noise.estimate_noise_sigma`)."""
    if whitened:
        return 1.0
    return estimate_noise_sigma(np.asarray(data.kspace), np.asarray(data.mask))


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


def detector_for(model: MoDL, manifest: ModelManifest, acs_lines: int | None = None, direction_key: bytes | None = None) -> CyclicDetector:
    """The detector with the project's default settings for a model (``direction_key``: a
    site's secret for the sensitive directions, :func:`recon.detect.cyclic.start_seed`)."""
    family = MaskFamily(manifest.mask_kind, manifest.acceleration, manifest.acs_lines if acs_lines is None else acs_lines)
    return CyclicDetector(model, family, direction_key=direction_key)


@torch.no_grad()
def _score(model: MoDL, detector: CyclicDetector, op: SenseOp, y: torch.Tensor, noise_sigma: float, statistic: str | None) -> DetectionScores:
    """A clean slice's scores: every statistic (``statistic`` None, to calibrate any), or only
    what ``statistic`` needs (4 passes instead of 28 for the deployed one)."""
    x1 = model(op.adjoint(y), op)
    if statistic is None:
        return detector.score(op, y, x1, noise_sigma, holdout=True)
    return detector.score_for(statistic, op, y, x1, noise_sigma)


def scores_from_raw(
    paths: Sequence[Path], model: MoDL, manifest: ModelManifest, progress: bool = True, statistic: str | None = None
) -> tuple[list[DetectionScores], ProtocolKey]:
    """Scores of every slice of clean raw files (every statistic, or what ``statistic``
    needs), and their common protocol."""
    scores: list[DetectionScores] = []
    protocol: ProtocolKey | None = None
    for path in paths:
        scan = read_raw(path)
        for data in tqdm(scan.slices, desc=f"calibrate {Path(path).name}", disable=not progress):
            key = protocol_of(data, manifest, scan.protocol.acceleration)
            if protocol is not None and key != protocol:
                raise ValueError(f"{path}: slice protocol {key} differs from the calibration's {protocol}")
            protocol = key
            prepared = prepare(data)
            detector = detector_for(model, manifest, int(data.acs.sum()))
            sigma = slice_noise_sigma(data, whitened=scan.whitened)
            scores.append(_score(model, detector, prepared.op, prepared.y, sigma, statistic))
    if protocol is None:
        raise ValueError("no clean slice to calibrate on")
    return scores, protocol


def scores_from_simulation(
    count: int, model: MoDL, manifest: ModelManifest, seed: int = 101, progress: bool = True, statistic: str | None = None
) -> tuple[list[DetectionScores], ProtocolKey]:
    """Scores of ``count`` simulated clean held-out slices in the model's own protocol (every
    statistic, or what ``statistic`` needs)."""
    from recon.data.samples import simulated_slices

    family = MaskFamily(manifest.mask_kind, manifest.acceleration, manifest.acs_lines)
    detector = detector_for(model, manifest)
    scores = []
    for sample in tqdm(simulated_slices("heldout", count, family, manifest.coils, seed), desc="calibrate (simulated)", disable=not progress):
        op = SenseOp(sample.maps[None], sample.mask[None])
        scores.append(_score(model, detector, op, op.project(sample.kspace_full[None]), sample.noise_std, statistic))
    return scores, model_protocol(manifest)


def build_calibration(
    scores: Iterable[DetectionScores],
    protocol: ProtocolKey,
    manifest: ModelManifest,
    detector: CyclicDetector,
    statistic: str = DEFAULT_STATISTIC,
    target_fpr: float = 0.01,
) -> Calibration:
    """Threshold one statistic of clean scores for a target false-positive rate; the
    calibration covers the signal levels (SNR) of those slices and no others."""
    key = DetectorKey.of(statistic, detector)
    scores = list(scores)
    if statistic in COMBINED_STATISTICS:
        components = {name: [s.get(name) for s in scores] for name in COMBINED_STATISTICS[statistic]}
        made = calibrate_combined(components, target_fpr, manifest.sha256, protocol, key)
    else:
        made = calibrate([s.get(statistic) for s in scores], target_fpr, manifest.sha256, protocol, key)
    return replace(made, signal_range=signal_range([s.signal_level for s in scores]))


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
    direction_key = detector_key_from_env()
    detector = detector_for(model, manifest, protocol.acs_lines, direction_key)
    statistic = calibration_statistic(path) if path.exists() else DEFAULT_STATISTIC
    if statistic in SENSITIVE_STATISTICS:
        log.info("sensitive directions %s", f"keyed by {DETECTOR_KEY_ENV}" if direction_key else f"from the public seed ({DETECTOR_KEY_ENV} unset)")
    elif direction_key:
        log.warning("%s is set but %s has no sensitive directions to key: the key changes nothing", DETECTOR_KEY_ENV, statistic)
    key = DetectorKey.of(statistic, detector)
    try:
        loaded = Calibration.load(path, manifest.sha256, protocol, key)
    except CalibrationError as err:
        if calibration is not None:
            raise
        log.warning("%s; images will be tagged unverified", err)
        return str(err)
    return Defense(model, detector, loaded, statistic)


class ScanDefenses:
    """The defense for each slice of one raw scan, as the offline path and the benchmarks apply it.

    A scan may mix protocols (matrix, coils, ACS lines): each protocol's calibration is
    loaded once (:func:`load_defense`, so a named calibration that does not fit is an error
    and a default one that does not fit leaves that protocol's slices ``unverified``), and
    every slice gets its own noise sigma (:func:`slice_noise_sigma`: 1 for a scan that was
    prewhitened with its noise scans).
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
        return defense if isinstance(defense, str) else replace(defense, noise_sigma=slice_noise_sigma(data, self.scan.whitened))


def calibration_statistic(path: Path) -> str:
    """The statistic a calibration file was made for (read before full validation)."""
    try:
        return str(json.loads(path.read_text())["detector"]["statistic"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_STATISTIC
