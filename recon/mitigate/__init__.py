"""Training-free mitigation of flagged reconstructions, with baselines and a safeguard.

The product's default is :func:`mitigate_correct` (the measured lines corrected until the
network's prior agrees, behind a calibrated gate); :func:`mitigate_prior` (the same network
with a heavier prior, behind the same gate); :func:`mitigate_kspace` (ours) and :func:`mitigate_faithful`
(the paper's) are the cyclic ones.
"""

from recon.mitigate.baselines import randomized_smoothing, range_projection
from recon.mitigate.cyclic import MitigationResult, k_from_image, mitigate_faithful, mitigate_kspace
from recon.mitigate.prior import PriorRewrite, mitigate_correct, mitigate_prior

__all__ = [
    "MitigationResult",
    "PriorRewrite",
    "k_from_image",
    "mitigate_faithful",
    "mitigate_correct",
    "mitigate_kspace",
    "mitigate_prior",
    "randomized_smoothing",
    "range_projection",
]
