"""Adversarial and benign perturbations of the network's input (evaluation and red team only).

Production code never imports this package (import-linter contract). Every attack takes an
explicit ``torch.Generator`` and an absolute budget; callers convert from the two
conventions used in reports (relative to ``max |x_zf|`` as the paper does, and in
acquisition-noise norms, :func:`recon.detect.cyclic.noise_norm`).
"""

from recon.attacks.image import fgsm_image, pgd_image_linf
from recon.attacks.kspace import benign_noise, fgsm_kspace, impulse_spikes, pgd_kspace_l2, pgd_kspace_linf

__all__ = [
    "benign_noise",
    "fgsm_image",
    "fgsm_kspace",
    "impulse_spikes",
    "pgd_image_linf",
    "pgd_kspace_l2",
    "pgd_kspace_linf",
]
