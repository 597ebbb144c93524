"""Calibrating the detector on clean slices (``cycguard calibrate``).

Clean slices come from the user's raw files (the recommended route: clean scans of the
site's own protocol) or from simulated acquisitions of the held-out MNI152 slab (the
shipped default; needs the ``data`` extra). Every slice of a calibration must share one
protocol; the file records it with the model's hash and the detector's settings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from recon.detect.calibration import (
    Calibration,
    DetectorKey,
    ProtocolKey,
    calibrate,
    calibrate_combined,
    signal_range,
)
from recon.detect.cyclic import CyclicDetector, DetectionScores
from recon.detect.defense import (
    DEFAULT_STATISTIC,
    detector_for,
    model_protocol,
    protocol_of,
    slice_noise_sigma,
)
from recon.detect.statistics import COMBINATIONS
from recon.io.mrd import read_raw
from recon.models.modl import MoDL
from recon.models.weights import ModelManifest
from recon.physics.masks import MaskFamily
from recon.physics.sense import SenseOp
from recon.pipeline import prepare

log = logging.getLogger(__name__)

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
    if statistic in COMBINATIONS:
        components = {name: [s.get(name) for s in scores] for name in COMBINATIONS[statistic].components}
        made = calibrate_combined(components, target_fpr, manifest.sha256, protocol, key)
    else:
        made = calibrate([s.get(statistic) for s in scores], target_fpr, manifest.sha256, protocol, key)
    return replace(made, signal_range=signal_range([s.signal_level for s in scores]))
