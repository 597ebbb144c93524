"""Calibrating the detector on clean slices (``cycguard calibrate``).

Clean slices come from the user's raw files (the recommended route: clean scans of the
site's own protocol) or from simulated acquisitions of the held-out MNI152 slab (the
shipped default; needs the ``data`` extra). Every slice of a calibration must share one
protocol; the file records it with the model's hash and the detector's settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
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
from recon.types import SliceKSpace

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
            detector = detector_for(model, manifest, key)
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


@dataclass(frozen=True)
class LikeSeed:
    """What a calibration by simulation takes from a scan: its protocol, the coil maps estimated
    from each slice's ACS lines and the signal levels of its slices (in noise sigmas). No image
    of the patient: the maps are smooth coil sensitivities. ``origin`` names the scan."""

    protocol: ProtocolKey
    maps: tuple[np.ndarray, ...]
    levels: tuple[float, ...]
    origin: str

    @classmethod
    def of_slices(cls, slices: Sequence[SliceKSpace], whitened: bool, manifest: ModelManifest, acceleration: int, origin: str) -> LikeSeed:
        """The seed of a scan's slices (``whitened``: prewhitened with its noise scans)."""
        from recon.detect.cyclic import signal_level
        from recon.physics.coils import estimate_coil_maps

        if not slices:
            raise ValueError(f"{origin}: no complete slice to take the protocol from")
        protocol = protocol_of(slices[0], manifest, acceleration)
        maps, levels = [], []
        for data in slices:
            kspace = torch.from_numpy(np.array(data.kspace))
            maps.append(estimate_coil_maps(kspace, data.acs).numpy())
            sigma = slice_noise_sigma(data, whitened=whitened)
            levels.append(float(signal_level(kspace[None] / sigma, torch.from_numpy(np.array(data.acs)), 1.0)))
        return cls(protocol, tuple(maps), tuple(levels), origin)

    @classmethod
    def of_scan(cls, scan_path: Path, manifest: ModelManifest) -> LikeSeed:
        scan = read_raw(scan_path)
        return cls.of_slices(scan.slices, scan.whitened, manifest, scan.protocol.acceleration, Path(scan_path).name)

    def save(self, path: Path) -> None:
        """As ``.npz`` (written whole, then renamed into place)."""
        partial = path.with_name(path.name + ".partial.npz")
        header = {"protocol": asdict(self.protocol), "levels": list(self.levels), "origin": self.origin}
        np.savez(partial, header=np.array(json.dumps(header)), maps=np.stack(self.maps))
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> LikeSeed:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            maps = tuple(np.array(m) for m in data["maps"])
        fields = header["protocol"]
        protocol = ProtocolKey(tuple(fields["matrix"]), fields["coils"], fields["mask_kind"], fields["acceleration"], fields["acs_lines"])
        return cls(protocol, maps, tuple(header["levels"]), header["origin"])


def scores_like(
    scan: Path | LikeSeed, count: int, model: MoDL, manifest: ModelManifest, seed: int = 101, progress: bool = True,
    statistic: str | None = None, on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[DetectionScores], ProtocolKey, tuple[float, float]]:
    """Scores of ``count`` simulated clean slices in the protocol of a scan (``cycguard calibrate
    --like``; the scan's file or its :class:`LikeSeed`): its matrix, coils, acceleration and ACS
    lines, the coil maps estimated from its own ACS lines (slice after slice), unit noise as its
    prewhitened data have, and signal levels drawn log-uniformly over a third of its lowest to
    three times its highest slice's; the anatomy is the held-out MNI152 slab (augmented; for a
    rectangular matrix the square image cropped about its centre). Every
    slice goes the product's way (coil maps from its ACS, the network, the detector).
    ``on_progress(done, count)`` is called after each slice. Returns the scores, the protocol
    and the signal levels drawn between.

    Raises:
        ValueError: a scan with the model's own protocol (its calibration ships with it), or no
            complete slice.
    """
    from recon.data import mni
    from recon.data.simulate import complex_noise, simulate_kspace, smooth_phase

    like = scan if isinstance(scan, LikeSeed) else LikeSeed.of_scan(Path(scan), manifest)
    protocol = like.protocol
    if protocol == model_protocol(manifest):
        raise ValueError(f"{like.origin} has the model's own protocol ({protocol.describe()}): its calibration ships with the model")
    ny, nx = protocol.matrix
    side = max(ny, nx)  # a rectangular field of view: the square anatomy image cropped about its centre
    rows, cols = slice((side - ny) // 2, (side - ny) // 2 + ny), slice((side - nx) // 2, (side - nx) // 2 + nx)
    low, high = min(like.levels) / 3, max(like.levels) * 3
    family = MaskFamily(protocol.mask_kind, protocol.acceleration, protocol.acs_lines)
    detector = detector_for(model, manifest, protocol)
    rng = np.random.default_rng(seed)
    refs = mni.catalog("heldout")
    identity = np.eye(protocol.coils, dtype=np.complex64)
    acs = family.acs_mask(ny)
    scores = []
    for n in tqdm(range(count), desc=f"calibrate like {like.origin}", disable=not progress):
        magnitude = mni.magnitude_slice(refs[int(rng.integers(len(refs)))], side, rng)[rows, cols]
        obj = (magnitude * np.exp(1j * smooth_phase((ny, nx), rng))).astype(np.complex64)
        clean = simulate_kspace(obj, like.maps[n % len(like.maps)], 0.0, identity, rng)
        level = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        clean *= level / max(float(np.sqrt(np.mean(np.abs(clean[:, acs, :]) ** 2))), 1e-30)
        mask = family.sample(ny, rng)
        kspace = (clean + complex_noise(clean.shape, rng)) * mask[None, :, None]
        prepared = prepare(SliceKSpace(kspace.astype(np.complex64), mask, acs))
        scores.append(_score(model, detector, prepared.op, prepared.y, 1.0, statistic))
        if on_progress is not None:
            on_progress(n + 1, count)
    return scores, protocol, (low, high)


def build_calibration(
    scores: Iterable[DetectionScores],
    protocol: ProtocolKey,
    manifest: ModelManifest,
    detector: CyclicDetector,
    statistic: str = DEFAULT_STATISTIC,
    target_fpr: float = 0.01,
    source: str | None = None,
) -> Calibration:
    """Threshold one statistic of clean scores for a target false-positive rate; the
    calibration covers the signal levels (SNR) of those slices and no others, and states what
    the slices were (``source``)."""
    key = DetectorKey.of(statistic, detector)
    scores = list(scores)
    if statistic in COMBINATIONS:
        components = {name: [s.get(name) for s in scores] for name in COMBINATIONS[statistic].components}
        made = calibrate_combined(components, target_fpr, manifest.sha256, protocol, key)
    else:
        made = calibrate([s.get(statistic) for s in scores], target_fpr, manifest.sha256, protocol, key)
    return replace(made, signal_range=signal_range([s.signal_level for s in scores]), source=source)
