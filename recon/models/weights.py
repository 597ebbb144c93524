"""Loading network weights safely: SHA-256 check, then ``torch.load(weights_only=True)``.

A weights file ``NAME.pt`` ships with a manifest ``NAME.json`` holding its SHA-256, the
architecture (:class:`~recon.models.modl.MoDLConfig`) and the protocol it was trained for.
A file whose hash differs from the manifest is refused before torch reads a byte of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from recon.models.modl import MoDL, MoDLConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "modl_default.pt"


@dataclass(frozen=True)
class ModelManifest:
    """What a weights file is and what it was trained for.

    Attributes:
        name: short model name (goes into image meta).
        sha256: hex digest of the weights file.
        config: network architecture.
        mask_kind: mask family kind used in training.
        acceleration: family acceleration R.
        acs_lines: ACS block width used in training.
        matrix: training image matrix ``(y, x)``.
        coils: coils simulated in training.
    """

    name: str
    sha256: str
    config: MoDLConfig
    mask_kind: str
    acceleration: int
    acs_lines: int
    matrix: tuple[int, int]
    coils: int

    @classmethod
    def read(cls, path: Path) -> ModelManifest:
        """Parse a manifest JSON file, naming the file and the field on any error."""
        try:
            raw = json.loads(path.read_text())
            return cls(
                name=str(raw["name"]),
                sha256=str(raw["sha256"]).lower(),
                config=MoDLConfig(**raw["config"]),
                mask_kind=str(raw["mask"]["kind"]),
                acceleration=int(raw["mask"]["acceleration"]),
                acs_lines=int(raw["mask"]["acs_lines"]),
                matrix=(int(raw["matrix"][0]), int(raw["matrix"][1])),
                coils=int(raw["coils"]),
            )
        except FileNotFoundError as err:
            raise FileNotFoundError(f"weights manifest {path} not found") from err
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"weights manifest {path} is malformed: {err!r}") from err


def model_tag(manifest: ModelManifest) -> str:
    """A model's identity as images carry it (``CycGuard.Model``): ``name:sha256-prefix``."""
    return f"{manifest.name}:{manifest.sha256[:12]}"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(weights: Path) -> Path:
    """The manifest that belongs to a weights file (same stem, ``.json``)."""
    return weights.with_suffix(".json")


def load_model(weights: Path | str | None = None, device: str | torch.device = "cpu") -> tuple[MoDL, ModelManifest]:
    """Load a network and its manifest, refusing weights whose hash does not match.

    Args:
        weights: path of a ``.pt`` file with a ``.json`` manifest beside it; the shipped
            default model when ``None``.
        device: torch device to place the network on.

    Returns:
        ``(model, manifest)``, the model in eval mode with gradients disabled on its
        parameters.

    Raises:
        FileNotFoundError: the weights or the manifest is missing.
        ValueError: the hash differs, or the file is not a valid state dict for the
            manifest's architecture.
    """
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    manifest = ModelManifest.read(manifest_path(path))
    actual = sha256_file(path)
    if actual != manifest.sha256:
        raise ValueError(
            f"weights file {path} has SHA-256 {actual}, but its manifest expects {manifest.sha256}: "
            "refusing to load modified or corrupt weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad pickle
        raise ValueError(f"weights file {path} cannot be read as a torch state dict: {err}") from err
    model = MoDL(manifest.config)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"weights file {path} does not fit the architecture {manifest.config}: {err}") from err
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.to(device), manifest


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a torch device (use auto, cpu or cuda[:N])") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device
