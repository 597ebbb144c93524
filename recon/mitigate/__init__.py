"""Training-free mitigation of flagged reconstructions, with baselines and a safeguard."""

from recon.mitigate.baselines import randomized_smoothing, range_projection
from recon.mitigate.cyclic import MitigationResult, k_from_image, mitigate_faithful, mitigate_kspace

__all__ = ["MitigationResult", "k_from_image", "mitigate_faithful", "mitigate_kspace", "randomized_smoothing", "range_projection"]
