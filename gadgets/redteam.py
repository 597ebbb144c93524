"""Red-team gadget: perturbs the received k-space of chosen slices (evaluation pipelines only).

``<external><execute name="gadgets.redteam" target="attack" type="python"/>`` between
BucketToBuffer and the recon gadget: it plays an attacker on the data path who changes the
measured lines of a ``ReconData`` buffer (white-box, against the shipped network) and sends
the buffer on. Budgets are in acquisition-noise norms ``sigma sqrt(n)`` (n sampled entries;
for ``pgd_linf`` the norm of the box's corners),
with ``sigma`` estimated from the k-space periphery. It never belongs in a clinical
pipeline: ``cycguard check`` says so when it sees one outside a red-team pipeline name.
This is the only production-side module allowed to import :mod:`recon.attacks`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from gadgetron.types.recon_data import ReconData

from gadgets.convert import buffer_slices, with_kspace
from gadgets.params import AttackSettings
from gadgets.stages import Resources, gadget_logging, serve
from recon.attacks.kspace import benign_noise, fgsm_kspace, impulse_spikes, pgd_kspace_l2, pgd_kspace_linf
from recon.detect.cyclic import noise_norm
from recon.physics.noise import estimate_noise_sigma
from recon.pipeline import prepare

log = logging.getLogger("cycguard.gadget.redteam")


class AttackStage:
    """Attacks the chosen slices of every ``ReconData``; passes everything else through."""

    name = "attack"

    def __init__(self, settings: AttackSettings, resources: Resources) -> None:
        self.settings = settings
        self.targets = settings.slice_set()
        self.model, _, self.device = resources.model(settings.weights, settings.device)
        self.bandwidth = resources.receiver_bandwidth()
        self.acceleration = resources.acceleration()
        self.generator = torch.Generator().manual_seed(settings.seed)

    def process(self, item: Any) -> Iterable[Any]:
        if not isinstance(item, ReconData):
            return [item]
        for part in buffer_slices(item, self.bandwidth):
            if self.targets is not None and part.data.key.slice not in self.targets:
                continue
            if part.problem(self.acceleration) is not None:
                continue  # the recon stage reports it
            data = part.data
            prepared = prepare(data, self.device)
            sigma = estimate_noise_sigma(data.kspace, data.mask)
            scale = noise_norm(prepared.op, prepared.y, sigma)
            attacked = self._attack(prepared.op, prepared.y, sigma, scale)
            size = float(torch.linalg.vector_norm(attacked - prepared.y)) / scale
            log.warning("red team: %s on slice %s, |delta| = %.2f noise norms", self.settings.attack, data.key.slice, size)
            item = with_kspace(item, part, data.with_measured(attacked[0].detach().cpu().numpy()).kspace)
        return [item]

    def _attack(self, op: Any, y: torch.Tensor, sigma: float, scale: float) -> torch.Tensor:
        s = self.settings
        # a CPU generator whatever the device: the attacks draw on the CPU and move the draws
        # (recon.physics.noise.complex_randn), so a seed gives the same attack on every device
        gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,), generator=self.generator)))
        if s.attack == "pgd_l2":
            return pgd_kspace_l2(self.model, op, y, s.budget * scale, gen, steps=s.steps)
        if s.attack == "pgd_linf":  # the box's corners at budget noise norms: the l2 attack's energy
            return pgd_kspace_linf(self.model, op, y, s.budget * sigma / math.sqrt(2), gen, steps=s.steps)
        if s.attack == "fgsm":
            return fgsm_kspace(self.model, op, y, s.budget * scale, gen)
        if s.attack == "spikes":
            return impulse_spikes(op, y, 8, s.budget * scale, gen)
        return benign_noise(op, y, s.budget * sigma, gen)

    def close(self) -> Iterable[Any]:
        return []


def attack(connection: Any) -> None:
    """Gadget target ``gadgets.redteam:attack``."""
    gadget_logging()
    serve(connection, "gadgets.redteam", "attack")
