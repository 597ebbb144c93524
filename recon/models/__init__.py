"""Reconstruction networks and their safe loading."""

from recon.models.modl import MoDL, MoDLConfig
from recon.models.weights import DEFAULT_WEIGHTS, ModelManifest, load_model

__all__ = ["DEFAULT_WEIGHTS", "MoDL", "MoDLConfig", "ModelManifest", "load_model"]
