"""The unrolled network: safe weight loading, data consistency, equivariance, training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from recon.data.demo import DEMO_RAW
from recon.data.samples import batch_inputs, make_sample
from recon.io.mrd import read_raw
from recon.models.modl import MoDL, MoDLConfig
from recon.models.weights import DEFAULT_WEIGHTS, load_model, manifest_path, sha256_file
from recon.physics.masks import MaskFamily
from recon.pipeline import prepare, reconstruct
from recon.train import loss_fn
from tests.conftest import disc_phantom

TINY = MoDLConfig(channels=8, layers=3, unrolls=2, cg_iterations=3)


def _save(model: MoDL, folder: Path, name: str = "tiny") -> Path:
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    manifest = {
        "name": name,
        "sha256": sha256_file(weights),
        "config": model.config.to_dict(),
        "mask": {"kind": "equispaced", "acceleration": 4, "acs_lines": 16},
        "matrix": [32, 32],
        "coils": 4,
    }
    manifest_path(weights).write_text(json.dumps(manifest))
    return weights


def test_shipped_weights_match_their_manifest() -> None:
    model, manifest = load_model()
    assert manifest.sha256 == sha256_file(DEFAULT_WEIGHTS)
    assert not any(p.requires_grad for p in model.parameters())
    assert 0 < float(model.mu) < 1


def test_modified_weights_are_refused(tmp_path: Path) -> None:
    weights = _save(MoDL(TINY), tmp_path)
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 .* refusing to load modified or corrupt weights"):
        load_model(weights)


def test_weights_only_refuses_pickled_code(tmp_path: Path) -> None:
    weights = tmp_path / "evil.pt"
    torch.save({"payload": Path("/etc/passwd")}, weights)  # an arbitrary class, not tensors
    manifest = json.loads(manifest_path(_save(MoDL(TINY), tmp_path)).read_text())
    manifest["sha256"] = sha256_file(weights)
    manifest_path(weights).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cannot be read as a torch state dict"):
        load_model(weights)


def test_wrong_architecture_and_bad_manifest(tmp_path: Path) -> None:
    weights = _save(MoDL(TINY), tmp_path)
    manifest = json.loads(manifest_path(weights).read_text())
    manifest["config"]["channels"] = 16
    manifest_path(weights).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not fit the architecture"):
        load_model(weights)
    manifest_path(weights).write_text("{not json")
    with pytest.raises(ValueError, match="manifest .* is malformed"):
        load_model(weights)
    manifest_path(weights).unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_model(weights)
    with pytest.raises(FileNotFoundError, match="weights file"):
        load_model(tmp_path / "absent.pt")


def test_network_is_scale_equivariant() -> None:
    torch.manual_seed(0)
    model = MoDL(TINY).eval()
    sample = make_sample(disc_phantom((32, 32)), MaskFamily("equispaced", 4, 8), 4, np.random.default_rng(1))
    x_zf, op, _, _ = batch_inputs([sample])
    with torch.no_grad():
        a = model(x_zf, op)
        b = model(7.5 * x_zf, op)
    torch.testing.assert_close(b, 7.5 * a, rtol=1e-4, atol=1e-5)


def test_network_is_consistent_with_the_sampled_lines() -> None:
    """The shipped network's output agrees with the measured lines as well as data allow.

    No image fits the measured lines better than the least-squares solution (CG-SENSE run
    to convergence without regularisation), whose residual is the noise left in the
    column space's complement. The network, which also denoises, may leave a little more,
    but must stay within 10 % of that floor; and data are prewhitened, so that floor is
    about one noise norm ``sqrt(#samples)``.
    """
    from recon.baselines import cg_sense

    model, _ = load_model()
    data = read_raw(DEMO_RAW).slices[0]
    result = reconstruct(data, model)
    prepared = result.prepared
    image = torch.from_numpy(result.image)[None]
    residual = torch.linalg.vector_norm(prepared.op.forward(image) - prepared.y).item()
    least_squares = cg_sense(prepared.op, prepared.y, iterations=100, lam=0.0)
    floor = torch.linalg.vector_norm(prepared.op.forward(least_squares) - prepared.y).item()
    assert 0.99 * floor <= residual <= 1.1 * floor
    samples = int(data.mask.sum()) * data.coils * data.shape[1]
    assert 0.8 * np.sqrt(samples) < floor < 1.2 * np.sqrt(samples)


def test_a_few_training_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    family = MaskFamily("equispaced", 4, 8)
    samples = [make_sample(disc_phantom((32, 32)), family, 4, rng) for _ in range(2)]
    x_zf, op, _, reference = batch_inputs(samples)
    model = MoDL(TINY)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(25):
        loss = loss_fn(model(x_zf, op), reference)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_prepare_builds_the_slice_operator() -> None:
    data = read_raw(DEMO_RAW).slices[1]
    prepared = prepare(data)
    assert prepared.op.image_shape == data.shape
    assert torch.equal(prepared.op.mask[0], torch.from_numpy(np.array(data.mask)))
    torch.testing.assert_close(prepared.x_zf, prepared.op.adjoint(prepared.y))


def test_shipped_weights_survive_a_copy(tmp_path: Path) -> None:
    target = tmp_path / "copy.pt"
    shutil.copy(DEFAULT_WEIGHTS, target)
    shutil.copy(manifest_path(DEFAULT_WEIGHTS), manifest_path(target))
    model, manifest = load_model(target)
    assert manifest.name == "modl_default"
