"""FFT convention, SENSE operator adjoints, CG, masks, noise handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.physics.cg import conjugate_gradient
from recon.physics.fft import fft2c, fftc, ifft2c, ifftc
from recon.physics.masks import MaskFamily
from recon.physics.noise import noise_covariance, remove_readout_oversampling, whitening_matrix
from recon.physics.sense import SenseOp

# complex64 dot products over ~1e4 terms carry ~1e-6 relative rounding; 1e-3 leaves margin
RTOL = 1e-3


def _crandn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


@pytest.mark.parametrize("shape", [(5, 5), (4, 6), (7, 4)])
def test_fft_round_trip_odd_and_even(shape: tuple[int, int]) -> None:
    x = _crandn(2, *shape)
    torch.testing.assert_close(ifft2c(fft2c(x)), x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fftc(ifftc(x, dim=-1), dim=-1), x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 5), (4, 6)])
def test_fft_is_centred_and_orthonormal(shape: tuple[int, int]) -> None:
    ny, nx = shape
    impulse = torch.zeros(shape, dtype=torch.complex64)
    impulse[ny // 2, nx // 2] = 1.0
    k = fft2c(impulse)
    # an impulse at the image centre has flat, real, positive k-space of norm 1
    torch.testing.assert_close(k, torch.full(shape, 1 / np.sqrt(ny * nx), dtype=torch.complex64))
    const = torch.ones(shape, dtype=torch.complex64)
    dc = fft2c(const).abs()
    assert dc.argmax().item() == (ny // 2) * nx + nx // 2


def _op(seed: int = 0, batch: int = 2, coils: int = 3, shape: tuple[int, int] = (8, 6)) -> SenseOp:
    maps = _crandn(batch, coils, *shape, seed=seed)
    mask = torch.rand(batch, shape[0], generator=torch.Generator().manual_seed(seed)) > 0.4
    return SenseOp(maps, mask)


@pytest.mark.parametrize("shape", [(8, 6), (5, 7)])
def test_sense_adjoint(shape: tuple[int, int]) -> None:
    op = _op(shape=shape)
    x = _crandn(2, *shape, seed=1)
    y = _crandn(2, 3, *shape, seed=2)
    lhs = torch.vdot(op.forward(x).flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), op.adjoint(y).flatten())
    assert torch.allclose(lhs, rhs, rtol=RTOL)


def test_sense_normal_and_projection() -> None:
    op = _op()
    x = _crandn(2, 8, 6, seed=3)
    torch.testing.assert_close(op.normal(x), op.adjoint(op.forward(x)), rtol=1e-4, atol=1e-5)
    k = op.forward(x)
    torch.testing.assert_close(op.project(k), k)  # already on the sampled lines
    full = op.fully_sampled()
    assert bool(full.mask.all()) and full.maps is op.maps


def test_sense_with_mask_is_a_new_operator() -> None:
    op = _op()
    other = op.with_mask(torch.ones(2, 8, dtype=torch.bool))
    assert other is not op and not torch.equal(other.mask, op.mask)
    x = _crandn(2, 8, 6, seed=4)
    assert not torch.allclose(other.forward(x), op.forward(x))


def test_sense_rejects_bad_shapes() -> None:
    op = _op()
    with pytest.raises(ValueError, match=r"image must be \(B, 8, 6\)"):
        op.forward(_crandn(2, 6, 8))
    with pytest.raises(ValueError, match="k-space must be"):
        op.adjoint(_crandn(2, 4, 8, 6))
    with pytest.raises(ValueError, match=r"mask must be \(B, ky\)"):
        SenseOp(_crandn(2, 3, 8, 6), torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="complex"):
        SenseOp(torch.ones(2, 3, 8, 6), torch.ones(2, 8, dtype=torch.bool))


def test_conjugate_gradient_solves_spd_system() -> None:
    op = _op(batch=1)
    x_true = _crandn(1, 8, 6, seed=5)
    lam = 0.5
    rhs = op.normal(x_true) + lam * x_true
    x = conjugate_gradient(lambda v: op.normal(v) + lam * v, rhs, iterations=60)
    torch.testing.assert_close(x, x_true, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["equispaced", "random", "variable_density"])
def test_masks_are_seeded_and_keep_acs(kind: str) -> None:
    family = MaskFamily(kind, 4, 10)
    a = family.sample(96, np.random.default_rng(3))
    b = family.sample(96, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a[family.acs_mask(96)].all()
    equispaced = family.equispaced(96, 0)
    assert a.sum() == equispaced.sum()  # same rate across kinds


def test_equispaced_family_alternatives() -> None:
    family = MaskFamily("equispaced", 4, 8)
    omega = family.equispaced(64, 1)
    alts = family.alternatives(omega, 3, np.random.default_rng(0))
    assert len(alts) == 3
    assert all(not np.array_equal(m, omega) for m in alts)
    assert len({m.tobytes() for m in alts}) == 3
    with pytest.raises(ValueError, match="only 3 alternatives"):
        family.alternatives(omega, 4, np.random.default_rng(0))


def test_mask_family_validation() -> None:
    with pytest.raises(ValueError, match="mask kind 'poisson'"):
        MaskFamily("poisson")
    with pytest.raises(ValueError, match="acceleration must be an integer"):
        MaskFamily("random", 0)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        MaskFamily().sample(32, 0)  # type: ignore[arg-type]


def test_prewhitening_makes_identity_covariance(rng: np.random.Generator) -> None:
    mix = rng.standard_normal((4, 4)) + 1j * rng.standard_normal((4, 4))
    noise = mix @ ((rng.standard_normal((4, 20000)) + 1j * rng.standard_normal((4, 20000))) / np.sqrt(2))
    w = whitening_matrix(noise_covariance(noise))
    whitened = noise_covariance(w @ noise)
    np.testing.assert_allclose(whitened, np.eye(4), atol=1e-4)
    with pytest.raises(ValueError, match="not positive definite"):
        whitening_matrix(np.zeros((2, 2)))


def test_readout_oversampling_removal_keeps_the_central_fov() -> None:
    image = np.zeros((3, 16), np.complex64)
    image[:, 4:12] = np.arange(8) + 1j
    kspace = fftc(torch.from_numpy(image), dim=-1).numpy()
    cropped = remove_readout_oversampling(kspace, 8)
    back = ifftc(torch.from_numpy(cropped), dim=-1).numpy()
    np.testing.assert_allclose(back, image[:, 4:12], atol=1e-5)
    with pytest.raises(ValueError, match="cannot crop 16"):
        remove_readout_oversampling(kspace, 32)


@pytest.mark.parametrize("n", [5, 6])
def test_numpy_and_torch_1d_transforms_agree(n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((3, n)) + 1j * rng.standard_normal((3, n))).astype(np.complex64)
    for transform in (fftc, ifftc):
        out = transform(x, dim=-1)
        assert out.dtype == np.complex64
        np.testing.assert_allclose(out, transform(torch.from_numpy(x), dim=-1).numpy(), rtol=1e-5, atol=1e-6)
