"""A tiny network and one small slice, shared by the unit tests of the defense."""

from __future__ import annotations

import numpy as np
import torch

from recon.data.samples import batch_inputs, make_sample
from recon.detect import CyclicDetector
from recon.detect.calibration import Calibration, DetectorKey, ProtocolKey, calibrate_combined
from recon.models.modl import MoDL, MoDLConfig
from recon.physics.masks import MaskFamily
from tests.conftest import disc_phantom

FAMILY = MaskFamily("equispaced", 4, 8)
PROTOCOL = ProtocolKey((32, 32), 4, "equispaced", 4, 8)
DETECTOR = DetectorKey("cyclic", 3, 6.0, 0)


def tiny_setup() -> tuple[MoDL, object, torch.Tensor, torch.Tensor]:
    """An untrained small network, frozen, and one 32x32 4-coil slice: ``(model, op, y, x_zf)``."""
    torch.manual_seed(0)
    model = MoDL(MoDLConfig(channels=8, layers=3, unrolls=2, cg_iterations=3)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sample = make_sample(disc_phantom((32, 32)), FAMILY, 4, np.random.default_rng(3))
    x_zf, op, y, _ = batch_inputs([sample])
    return model, op, y, x_zf


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def off_mask(op: object, k: torch.Tensor) -> torch.Tensor:
    """The lines of ``k`` that ``op`` did not acquire."""
    return k[0][:, ~op.mask[0]]  # type: ignore[attr-defined]


def null_union(model: MoDL, statistic: str, seed: int) -> tuple[DetectorKey, dict[str, np.ndarray], Calibration]:
    """A 5 % calibration of a ``null_shift`` union on 199 synthetic clean slices (its key, the components, the file)."""
    detector = CyclicDetector(model, FAMILY, prior_gain=4.0)
    key = DetectorKey.of(statistic, detector)
    assert detector.passes(statistic) == detector.passes("prior_shift") == detector.passes("null_shift")
    rng = np.random.default_rng(seed)
    parts = {"null_shift": rng.gamma(9.0, 0.3, 199), "dc_spike": rng.gamma(5.0, 1.5, 199), "prior_shift": rng.gamma(3.0, 0.2, 199)}
    return key, parts, calibrate_combined(parts, 0.05, "ab" * 32, PROTOCOL, key)
