"""Cyclic measurement consistency (Saberi, Zhang, Akcakaya, arXiv 2501.01908) and baselines.

For a slice with measured lines ``y`` on mask Omega and the network's reconstruction
``x1 = f(E_Omega^H y; Omega)``:

1. synthesise full-grid k-space ``k = F S x1 + n``, with ``n`` a fixed jitter: circular
   complex Gaussian scaled per coil to ``jitter_scale`` times the RMS of the
   data-consistency residual ``y - P_Omega F S x1`` (estimated from the *received* data,
   as a deployed system must; the paper's code used the clean input and a 45-degree
   real-equals-imaginary draw);
2. for each of K alternative masks Delta_k of Omega's family, reconstruct
   ``x2_k = f(E_Delta^H P_Delta k; Delta_k)`` (the K passes run as one batch);
3. re-project onto the acquired lines, ``r_k = P_Omega F S x2_k``.

Every statistic is computed from those K passes and, where it needs them, a few more (the
held-out folds, the sensitive directions, the pass with a raised prior weight). The
registry (:mod:`recon.detect.statistics`) lists them with what each needs and the
detectors made of them; ``docs/STATISTICS.md`` says what each measures and how it behaved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from recon.detect.statistics import CYCLE, RESIDUAL, lookup, needs, of_source
from recon.models.modl import MoDL
from recon.physics.masks import MaskFamily
from recon.physics.noise import complex_randn
from recon.physics.sense import SenseOp

# the local window (samples along the readout) of ``dc_spike``'s robust scale
SPIKE_WINDOW = 9
# the readout samples at either end of every acquired line that ``noise_excess`` reads (a
# quarter of the readout on each side: the k-space periphery, where the data are mostly noise)
PERIPHERY = 0.25


@dataclass(frozen=True)
class DetectionScores:
    """Consistency statistics of one slice (higher means less consistent)."""

    cyclic: float
    cycle_image: float
    dc: float
    cyclic_noise: float
    dc_noise: float
    holdout_noise: float | None = None  # computed only when asked (F extra network passes)
    holdout_sensitive: float | None = None  # likewise, and 2 K iterations more
    prior_shift: float | None = None  # computed only when asked (1 extra network pass)
    dc_spike: float | None = None  # no extra pass; None only in older records
    null_shift: float | None = None  # with prior_shift (the same pass); None in older records
    noise_excess: float | None = None  # no extra pass; None in older records
    # not a consistency statistic: the RMS of the ACS lines in noise sigmas (the slice's SNR),
    # which a calibration must cover (Calibration.covers); None in older records
    signal_level: float | None = None

    def get(self, name: str) -> float:
        """The named statistic (one of :data:`recon.detect.statistics.STATISTICS`)."""
        value = getattr(self, lookup(name).name)
        if value is None:
            raise ValueError(f"statistic {name!r} was not computed (score(..., holdout=True, shift=True))")
        return float(value)


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def residual_rms_per_coil(op: SenseOp, y: Tensor, x1: Tensor) -> Tensor:
    """RMS over the sampled samples of ``y - P F S x1``, per coil: ``(1, C, 1, 1)``."""
    residual = y - op.forward(x1)
    weights = op.mask.to(residual.real.dtype)[:, None, :, None]
    count = weights.sum() * residual.shape[-1]
    power = (residual.abs() ** 2 * weights).sum(dim=(2, 3), keepdim=True) / count
    return torch.sqrt(power)


@dataclass(frozen=True, eq=False)
class Cycle:
    """The fixed parts of one slice's cycle: alternative-mask operators and the jitter.

    Attributes:
        deltas: SENSE operator with the slice's maps repeated K times and the K masks.
        omega_k: the acquisition operator repeated K times (for ``r_k``).
        noise: ``(1, C, ky, kx)`` jitter added to the synthesised k-space.
    """

    deltas: SenseOp
    omega_k: SenseOp
    noise: Tensor

    def run(self, model: MoDL, x1: Tensor) -> tuple[Tensor, Tensor]:
        """``(x2, r)``: the K second-pass images ``(K, y, x)`` and ``r_k`` ``(K, C, ky, kx)``.

        Differentiable in ``x1`` (used by the mitigation).
        """
        k_hat = self.deltas.fully_sampled().forward(x1.expand(self.deltas.batch, -1, -1)) + self.noise
        x_delta = self.deltas.adjoint(k_hat)
        x2 = model(x_delta, self.deltas)
        return x2, self.omega_k.forward(x2)


@dataclass(frozen=True, eq=False)
class Holdout:
    """The folds of one slice's cross-validation.

    Attributes:
        kept: SENSE operator with the slice's maps repeated F times; mask f is the
            acquisition without the lines of fold f.
        held: ``(F, ky)`` the lines of each fold (acquired, outside the ACS block).
    """

    kept: SenseOp
    held: Tensor

    @property
    def support(self) -> Tensor:
        """``(1, 1, ky, 1)``: 1 on the held-out lines of any fold."""
        return self.held.any(dim=0).to(torch.float32)[None, None, :, None]

    def entries(self, y: Tensor) -> int:
        """The number of held-out k-space entries of ``y`` (all coils)."""
        return int(self.held.sum()) * y.shape[1] * y.shape[-1]

    def residual(self, model: MoDL, y: Tensor) -> Tensor:
        """``(1, C, ky, kx)``: each held-out line minus its prediction from the other lines
        (zero elsewhere); differentiable in ``y``."""
        folds = self.kept.batch
        x2 = model(self.kept.adjoint(y.expand(folds, -1, -1, -1)), self.kept)
        predicted = self.kept.fully_sampled().forward(x2)
        held = self.held.to(y.real.dtype)[:, None, :, None]
        return ((y - predicted) * held).sum(dim=0, keepdim=True)

    def residual_noise(self, model: MoDL, y: Tensor, noise_sigma: float) -> Tensor:
        """Prediction error on the held-out lines over all folds, in noise norms
        (``sigma sqrt(n)``, n the held-out entries); differentiable in ``y``."""
        return noise_residual(self.residual(model, y), self.entries(y), noise_sigma)


def scaled_maximum(scores: DetectionScores, scales: Sequence[tuple[str, float]]) -> float:
    """A combined statistic: the largest component over its scale."""
    return max(scores.get(name) / scale for name, scale in scales)


def prior_shift(model: MoDL, op: SenseOp, y: Tensor, x1: Tensor, prior_gain: float, noise_sigma: float) -> Tensor:
    """``||f(E^H y; prior_gain mu) - x1|| / (sigma sqrt(n))`` with ``x1 = f(E^H y; mu)``;
    differentiable in ``y`` and ``x1``."""
    return torch.linalg.vector_norm(shift_of(model, op, y, x1, prior_gain)) / noise_norm(op, y, noise_sigma)


def shift_of(model: MoDL, op: SenseOp, y: Tensor, x1: Tensor, prior_gain: float) -> Tensor:
    """``Delta = f(E^H y; prior_gain mu) - x1``, the image's move under a heavier prior (one pass)."""
    return model(op.adjoint(y), op, prior_gain=prior_gain) - x1


def null_share(op: SenseOp, shift: Tensor, acs: Tensor) -> Tensor:
    """``null_shift``: the norm of ``shift`` (one slice's ``Delta``) in the coils' k-space on
    the lines not acquired, over its norm on the acquired lines outside the ACS block
    (``acs``, ``(ky,)`` bool); differentiable in ``shift``."""
    k = op.fully_sampled().forward(shift)[0]
    acquired = op.mask[0].bool()
    outer = acquired & ~acs.to(acquired.device)
    return torch.linalg.vector_norm(k[:, ~acquired]) / torch.linalg.vector_norm(k[:, outer]).clamp(min=1e-30)


def spike_ratios(op: SenseOp, y: Tensor, x1: Tensor, noise_sigma: float) -> Tensor:
    """``|r| / median_window |r|`` for every sampled entry of ``r = y - E x1`` (one slice),
    the median over :data:`SPIKE_WINDOW` samples along the readout of the same line and coil,
    floored at a tenth of the noise level: ``(C, lines, kx)``, the sampled lines of
    ``op.mask`` in order; differentiable in ``y`` and ``x1``."""
    lines = (y - op.forward(x1))[0][:, op.mask[0].bool(), :].abs()
    pad = SPIKE_WINDOW // 2
    local = torch.nn.functional.pad(lines, (pad, pad), mode="reflect").unfold(-1, SPIKE_WINDOW, 1).median(dim=-1).values
    return lines / local.clamp(min=0.1 * noise_sigma)


def spike_ratio(op: SenseOp, y: Tensor, x1: Tensor, noise_sigma: float) -> Tensor:
    """``dc_spike``: the largest of :func:`spike_ratios`."""
    return spike_ratios(op, y, x1, noise_sigma).amax()


def signal_level(y: Tensor, acs: Tensor, noise_sigma: float) -> Tensor:
    """The RMS of the received ACS lines over every coil and readout sample, in noise sigmas:
    the slice's signal-to-noise level (``y`` ``(1, C, ky, kx)``, ``acs`` ``(ky,)`` bool)."""
    lines = y[0][:, acs, :]
    return torch.linalg.vector_norm(lines) / (noise_sigma * max(lines.numel(), 1) ** 0.5)


def noise_excess(op: SenseOp, y: Tensor, x1: Tensor, noise_sigma: float) -> Tensor:
    """``noise_excess``: the RMS of ``r = y - E x1`` over the :data:`PERIPHERY` of the readout on
    every acquired line, in units of the noise sigma (one slice); differentiable in ``y``, ``x1``."""
    lines = (y - op.forward(x1))[0][:, op.mask[0].bool(), :]
    edge = max(1, int(lines.shape[-1] * PERIPHERY))
    periphery = torch.cat([lines[..., :edge], lines[..., -edge:]], dim=-1)
    return torch.linalg.vector_norm(periphery) / (noise_sigma * periphery.numel() ** 0.5)


def noise_residual(residual: Tensor, entries: int, noise_sigma: float) -> Tensor:
    """``||residual|| / (sigma sqrt(entries))``."""
    return torch.linalg.vector_norm(residual) / (noise_sigma * entries**0.5)


def sensitive_directions(
    model: MoDL, op: SenseOp, y: Tensor, support: Tensor, count: int, iterations: int, generator: torch.Generator, base: Tensor | None = None
) -> Tensor:
    """The ``count`` data directions on ``support`` along which ``f(E^H y)`` changes most.

    Block power iteration on ``J^H J``, J the Jacobian of ``y -> f(E^H y; Omega)`` at the
    received ``y`` (each product by finite difference and one backward pass, the ``count``
    vectors as one batch), from a seeded random start; ``base`` is ``f(E^H y)`` when the
    caller has it. Returns ``(count, C, ky, kx)`` orthonormal directions (not differentiable).
    """
    ops = SenseOp(op.maps.expand(count, -1, -1, -1), op.mask.expand(count, -1))
    y = y.detach()
    step = 1e-3 * float(torch.linalg.vector_norm(y)) / count**0.5
    if base is None:
        with torch.no_grad():
            base = model(op.adjoint(y), op)
    base = base.detach()
    directions = _orthonormal(complex_randn((count, *y.shape[1:]), generator, y.device) * support)
    for _ in range(iterations):
        with torch.enable_grad():
            delta = (step * directions).requires_grad_(True)
            moved = model(ops.adjoint(y + delta), ops)
            (grad,) = torch.autograd.grad(0.5 * torch.sum((moved - base).abs() ** 2), delta)
        directions = _orthonormal(grad * support)
    return directions


def _orthonormal(vectors: Tensor) -> Tensor:
    """Orthonormalise a batch of k-space vectors (QR of the flattened batch)."""
    flat = vectors.reshape(vectors.shape[0], -1)
    q, _ = torch.linalg.qr(flat.T)
    return q.T.reshape(vectors.shape)


def start_seed(seed: int, key: bytes | None, y: Tensor) -> int:
    """Seed of the power iteration's random start for the received data ``y``.

    Without a key, the public ``seed`` (the same start for every slice). With a site's
    secret ``key``, a keyed hash (BLAKE2b) of the data: the same data always get the same
    directions there (reproducible verdicts), and an attacker without the key cannot
    predict them.
    """
    if key is None:
        return seed
    data = y.detach().cpu().contiguous().numpy().tobytes()
    digest = hashlib.blake2b(data, key=hashlib.sha256(key).digest(), digest_size=8, person=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch generator seed


def sensitive_share(residual: Tensor, directions: Tensor, entries: int) -> Tensor:
    """RMS of ``residual`` along ``directions`` over its RMS per direction overall
    (``holdout_sensitive``; about 1 for a residual spread like white noise)."""
    coefficients = (directions.conj() * residual).reshape(directions.shape[0], -1).sum(dim=1)
    along = torch.linalg.vector_norm(coefficients) / directions.shape[0] ** 0.5
    overall = torch.linalg.vector_norm(residual) / entries**0.5
    return along / overall.clamp(min=1e-30)


def cyclic_loss(y: Tensor, r: Tensor) -> Tensor:
    """The paper's ``mean_k ||y - r_k|| / ||r_k||`` (differentiable), ``y`` ``(1, C, ky, kx)``."""
    return torch.mean(_norm(y - r) / _norm(r).clamp(min=1e-30))


def noise_norm(op: SenseOp, y: Tensor, noise_sigma: float) -> float:
    """``sigma sqrt(n)``: the expected norm of the acquisition noise on the n sampled entries."""
    n = float(op.mask[0].sum()) * y.shape[1] * y.shape[-1]
    return noise_sigma * n**0.5


def statistic_tensor(name: str, op: SenseOp, y: Tensor, x1: Tensor, x2: Tensor | None, r: Tensor | None, noise_sigma: float) -> Tensor:
    """One statistic as a differentiable tensor (``x2``, ``r`` needed for the cyclic ones)."""
    if name == "dc_spike":
        return spike_ratio(op, y, x1, noise_sigma)
    if name == "noise_excess":
        return noise_excess(op, y, x1, noise_sigma)
    if name in ("dc", "dc_noise"):
        residual = _norm(y - op.forward(x1))[0]
        return residual / (_norm(y)[0].clamp(min=1e-30) if name == "dc" else noise_norm(op, y, noise_sigma))
    if x2 is None or r is None:
        raise ValueError(f"statistic {name!r} needs the cycle's outputs")
    if name == "cyclic":
        return cyclic_loss(y, r)
    if name == "cyclic_noise":
        return torch.mean(_norm(y - r)) / noise_norm(op, y, noise_sigma)
    if name == "cycle_image":
        return torch.mean(_norm(x2 - x1) / _norm(x1).clamp(min=1e-30))
    raise ValueError(f"statistic {name!r} is not one of the cycle's ({', '.join((*of_source(CYCLE), *of_source(RESIDUAL)))})")


@dataclass(frozen=True, eq=False)
class CyclicDetector:
    """Scores a slice's reconstruction for cyclic measurement consistency.

    Attributes:
        model: the reconstruction network (the same weights as the recon stage).
        family: the sampling-mask family of the protocol (alternatives are drawn from it).
        alternatives: K, the number of alternative masks.
        jitter_scale: jitter amplitude in units of the per-coil DC-residual RMS (paper: 6).
        seed: seed of the alternative masks and the jitter (a slice is always scored the
            same way, so scores are reproducible and calibrations meaningful).
        folds: F, the folds of ``holdout_noise`` and ``holdout_sensitive``.
        directions: K, the sensitive directions of ``holdout_sensitive``.
        power_iterations: block power iterations that find them.
        prior_gain: the factor on mu of ``prior_shift``'s second pass.
        direction_key: a site's secret that keys the directions' start to the data
            (:func:`start_seed`); ``None``: the public ``seed``. Kept out of ``repr`` and
            out of calibration files (a calibration made without it holds with it: the
            start is a random draw either way).
    """

    model: MoDL
    family: MaskFamily
    alternatives: int = 3
    jitter_scale: float = 6.0
    seed: int = 0
    folds: int = 8
    directions: int = 4
    power_iterations: int = 2
    prior_gain: float = 4.0
    direction_key: bytes | None = field(default=None, repr=False)

    def holdout(self, op: SenseOp) -> Holdout:
        """The folds for a slice (batch of 1): acquired lines outside the ACS block, dealt in turn."""
        omega = op.mask[0].cpu().numpy().astype(bool)
        lines = np.flatnonzero(omega & ~self.family.acs_mask(omega.shape[0]))
        if self.folds < 2 or len(lines) < self.folds:
            raise ValueError(f"{self.folds} folds need at least as many acquired lines outside the ACS block ({len(lines)} here), and 2")
        held = np.zeros((self.folds, omega.shape[0]), dtype=bool)
        for fold in range(self.folds):
            held[fold, lines[fold :: self.folds]] = True
        held_t = torch.from_numpy(held).to(op.maps.device)
        kept = SenseOp(op.maps.expand(self.folds, -1, -1, -1), torch.from_numpy(omega[None] & ~held).to(op.maps.device))
        return Holdout(kept=kept, held=held_t)

    def acs(self, op: SenseOp) -> Tensor:
        """``(ky,)`` bool: the ACS lines of ``op``'s sampling (left out of ``null_shift``'s denominator)."""
        return torch.from_numpy(self.family.acs_mask(op.mask.shape[-1])).to(op.mask.device)

    def cycle(self, op: SenseOp, y: Tensor, x1: Tensor) -> Cycle:
        """Build the cycle's fixed parts for a slice (batch of 1)."""
        if op.batch != 1:
            raise ValueError(f"the detector scores one slice at a time, got a batch of {op.batch}")
        omega = op.mask[0].cpu().numpy().astype(bool)
        rng = np.random.default_rng(self.seed)
        masks = self.family.alternatives(omega, self.alternatives, rng)
        k = len(masks)
        maps = op.maps.expand(k, -1, -1, -1)
        deltas = SenseOp(maps, torch.from_numpy(np.stack(masks)).to(op.maps.device))
        omega_k = SenseOp(maps, op.mask.expand(k, -1))
        sigma = residual_rms_per_coil(op, y, x1).detach()
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        white = complex_randn((1, *y.shape[1:]), generator, y.device)
        noise = self.jitter_scale * sigma * white
        return Cycle(deltas=deltas, omega_k=omega_k, noise=noise)

    def sensitive(self, op: SenseOp, y: Tensor, holdout: Holdout, x1: Tensor | None = None) -> Tensor:
        """The slice's K sensitive directions on the held-out lines (seeded, or keyed to the
        data with ``direction_key``: reproducible either way); ``x1``, the network's image of
        ``y``, saves a pass when given."""
        generator = torch.Generator(device="cpu").manual_seed(start_seed(self.seed, self.direction_key, y))
        return sensitive_directions(self.model, op, y, holdout.support.to(y.device), self.directions, self.power_iterations, generator, x1)

    def data_statistics(
        self, op: SenseOp, y: Tensor, noise_sigma: float, sensitive: bool = True, x1: Tensor | None = None,
        folds: bool = True, shift: bool = False,
    ) -> dict[str, Tensor | None]:
        """The data-only statistics: ``holdout_noise`` and (with ``sensitive``)
        ``holdout_sensitive`` from one set of fold predictions (with ``folds``), and
        ``prior_shift`` and ``null_shift`` from one pass (with ``shift``; needs ``x1``). Differentiable in ``y`` and ``x1``
        (the directions are held fixed). ``x1``, the network's image of ``y``, saves the
        directions a pass."""
        values: dict[str, Tensor | None] = {"holdout_noise": None, "holdout_sensitive": None, "prior_shift": None, "null_shift": None}
        if folds:
            holdout = self.holdout(op)
            residual = holdout.residual(self.model, y)
            entries = holdout.entries(y)
            values["holdout_noise"] = noise_residual(residual, entries, noise_sigma)
            if sensitive:
                values["holdout_sensitive"] = sensitive_share(residual, self.sensitive(op, y, holdout, x1), entries)
        if shift:
            if x1 is None:
                raise ValueError("prior_shift needs the network's image x1 of y")
            moved = shift_of(self.model, op, y, x1, self.prior_gain)
            values["prior_shift"] = torch.linalg.vector_norm(moved) / noise_norm(op, y, noise_sigma)
            values["null_shift"] = null_share(op, moved, self.acs(op))
        return values

    def data_statistics_for(self, statistic: str, op: SenseOp, y: Tensor, x1: Tensor, noise_sigma: float) -> dict[str, Tensor | None]:
        """:meth:`data_statistics` with exactly the folds, directions and shift pass that
        ``statistic`` (or a combination) needs; differentiable (the adaptive attacker's)."""
        need = needs(statistic)
        return self.data_statistics(op, y, noise_sigma, sensitive=need.sensitive, x1=x1, folds=need.folds, shift=need.shift)

    def passes(self, statistic: str) -> int:
        """Single-slice network evaluations (forward and backward alike) to score ``statistic``."""
        need = needs(statistic)
        return self.alternatives + need.folds * self.folds + need.sensitive * 2 * self.directions * self.power_iterations + need.shift

    @torch.no_grad()
    def score(
        self, op: SenseOp, y: Tensor, x1: Tensor, noise_sigma: float = 1.0, holdout: bool = False, sensitive: bool = True,
        shift: bool | None = None,
    ) -> DetectionScores:
        """All statistics for one slice (the data-only ones only when asked).

        Args:
            op: the acquisition operator (batch 1).
            y: ``(1, C, ky, kx)`` measured k-space (zero off the mask).
            x1: ``(1, y, x)`` the network's reconstruction ``f(E^H y; Omega)``.
            noise_sigma: acquisition noise standard deviation per sample (1 when prewhitened).
            holdout: also compute ``holdout_noise`` (F more network passes) and, unless
                ``sensitive`` is false, ``holdout_sensitive`` (2 K iterations more).
            shift: also compute ``prior_shift`` (1 more pass); by default with ``holdout``.
        """
        cycle = self.cycle(op, y, x1)
        x2, r = cycle.run(self.model, x1)
        values: dict[str, float | None] = {name: float(statistic_tensor(name, op, y, x1, x2, r, noise_sigma)) for name in (*of_source(CYCLE), *of_source(RESIDUAL))}
        values["signal_level"] = float(signal_level(y, self.acs(op), noise_sigma))
        shift = holdout if shift is None else shift
        if holdout or shift:
            for name, value in self.data_statistics(op, y, noise_sigma, sensitive, x1, folds=holdout, shift=shift).items():
                values[name] = None if value is None else float(value)
        return DetectionScores(**values)  # type: ignore[arg-type]

    def score_for(self, statistic: str, op: SenseOp, y: Tensor, x1: Tensor, noise_sigma: float = 1.0) -> DetectionScores:
        """:meth:`score` with exactly the extra passes ``statistic`` (or a combination) needs."""
        need = needs(statistic)
        return self.score(op, y, x1, noise_sigma, holdout=need.folds, sensitive=need.sensitive, shift=need.shift)
