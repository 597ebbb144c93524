"""The CUDA path (marker ``gpu``): needs a CUDA device, so it is skipped on machines without
one (CI's included); ``benchmarks/gpu_check.sh`` runs the wider GPU checks (RESULTS.md,
section 2). Here: the defended pipeline gives on the GPU the verdicts it gives on the CPU,
the same clean images to rounding and rewrites of the same quality (the data correction's
descent accepts or refuses each step by a comparison that rounding can tip, so a rewrite
may take another path to the same evidence), and a seeded attack is the same perturbation
on either device."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from recon.attacks.kspace import benign_noise, impulse_spikes, pgd_kspace_l2
from recon.detect.cyclic import noise_norm
from recon.detect.defense import load_defense, protocol_of, slice_noise_sigma
from recon.io.mrd import read_raw
from recon.io.mrd_write import read_images
from recon.metrics import quality
from recon.models.weights import load_model
from recon.pipeline import defend, prepare
from tests import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEMO = ROOT / "recon" / "data" / "demo" / "demo_raw.h5"
REFERENCE = DEMO.with_name("demo_reference.h5")


def test_the_defended_pipeline_gives_the_cpu_verdicts_on_the_gpu() -> None:
    scan = read_raw(DEMO)
    whitened = scan.whitened
    cpu_model, manifest = load_model(None, "cpu")
    slices = [(data, slice_noise_sigma(data, whitened)) for data in scan.slices]
    first, sigma = slices[0]
    prepared = prepare(first, "cpu")
    attacked = pgd_kspace_l2(cpu_model, prepared.op, prepared.y, 3 * noise_norm(prepared.op, prepared.y, sigma), torch.Generator().manual_seed(0))
    slices.append((first.with_measured(attacked[0].numpy()), sigma))
    outcomes = {}
    for device in ("cpu", "cuda"):
        model, _ = load_model(None, device)
        defense = load_defense(model, manifest, protocol_of(first, manifest, scan.protocol.acceleration), None)
        assert defense is not None
        outcomes[device] = [defend(data, replace(defense, noise_sigma=s), device) for data, s in slices]
    verdicts = [r.verdict for r in outcomes["cpu"]]
    assert verdicts == [r.verdict for r in outcomes["cuda"]]
    assert verdicts[-1] == "mitigated" and "clean" in verdicts  # both paths exercised
    references = [image for image, _ in read_images(REFERENCE)]
    references.append(references[0])  # the attacked copy of slice 0
    for on_cpu, on_gpu, reference in zip(outcomes["cpu"], outcomes["cuda"], references, strict=True):
        assert on_gpu.score == pytest.approx(on_cpu.score, rel=1e-2)
        assert all(seconds > 0 for _, seconds in on_gpu.timings)
        if on_cpu.verdict == "clean":
            assert np.abs(on_cpu.image - on_gpu.image).max() <= 1e-2 * np.abs(on_cpu.image).max()
        else:
            assert quality(on_gpu.image, reference).psnr == pytest.approx(quality(on_cpu.image, reference).psnr, abs=1.0)


def test_a_seeded_attack_is_the_same_perturbation_on_either_device() -> None:
    scan = read_raw(DEMO)
    prepared = prepare(scan.slices[0], "cpu")
    on_gpu = prepare(scan.slices[0], "cuda")
    for attack in (lambda op, y, g: benign_noise(op, y, 1.0, g), lambda op, y, g: impulse_spikes(op, y, 10, 0.1 * float(y.abs().max()), g)):
        a = attack(prepared.op, prepared.y, torch.Generator().manual_seed(3)) - prepared.y
        b = attack(on_gpu.op, on_gpu.y, torch.Generator().manual_seed(3)) - on_gpu.y
        assert torch.allclose(a, b.cpu(), atol=1e-4 * float(a.abs().max()))
