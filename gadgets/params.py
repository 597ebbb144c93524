"""The one reader of ``<property>``s: typed settings of every CycGuard gadget.

Each gadget's settings are a frozen dataclass whose fields are its properties; a field's
metadata holds its documentation, unit and allowed values, from which the property
reference (``docs/properties.md``, :func:`reference_markdown`) is generated. Properties
come from the ``<configuration>`` element Gadgetron sends to an external node, in either
form Gadgetron accepts (``<property name= value=/>`` or ``<property><name/><value/></property>``).
Every error is a :class:`PropertyError` (a ``ValueError``) naming the gadget, the property,
its value and what is allowed. Values holding ``@`` are refused: Gadgetron treats them as
references to other gadgets' properties and silently replaces an unmatched one with "".

This module imports neither torch nor gadgetron, so ``cycguard check`` stays light.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET  # noqa: S405 - types only; parsing goes through defusedxml
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

import defusedxml.ElementTree as SafeET

from recon.settings import MitigationSettings, setting

T = TypeVar("T")

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class PropertyError(ValueError):
    """A wrong ``<property>``: names the gadget, the property, the value and what is allowed."""


prop = setting  # a property is a documented settings field (recon.settings)


# ------------------------------------------------------------------ settings per gadget


@dataclass(frozen=True)
class ReconSettings:
    """``gadgets.recon``: the physics-driven unrolled network."""

    weights: str = prop("", "network weights (.pt with its .json manifest beside it); empty: the shipped default")
    device: str = prop("auto", "compute device: auto (CUDA when present), cpu, cuda or cuda:N")
    forward_internal: bool = prop(False, "also forward the k-space buffer and coil maps for downstream CycGuard stages")
    series: int = prop(1, "image_series_index of the images", low=0, high=65535)
    account_slices: bool = prop(
        True, "report the slices the header announces that never arrived (false inside a <distributed> stream, where each worker "
        "gets some of them; gadgets.order on the main node then accounts for every slice)"
    )


@dataclass(frozen=True)
class DetectSettings:
    """``gadgets.detect``: cyclic measurement-consistency check against a calibrated threshold."""

    weights: str = prop("", "network weights; must be the model that made the images (checked by hash)")
    calibration: str = prop("", "calibration JSON from `cycguard calibrate`; empty: the one shipped with the weights")
    noise_level: str = prop(
        "estimate", "noise level of the data: estimate (from the k-space periphery) or whitened (prewhitened by NoiseAdjust; its noise level, from the header, is divided out)",
        choices=("estimate", "whitened"),
    )
    device: str = prop("auto", "compute device: auto, cpu, cuda or cuda:N")
    forward_internal: bool = prop(False, "also forward the k-space buffer and coil maps for downstream CycGuard stages")
    auto_calibrate: bool = prop(
        True, "when a protocol has no calibration (none named, not the model's own, none in the calibration cache), make one in the background "
        "by simulation from this scan's coil maps and signal level (cycguard calibrate --like); its slices stay unverified until it is ready"
    )
    auto_calibrate_slices: int = prop(300, "simulated clean slices of such a calibration (at least 100: a 1 % false-positive rate needs 99)", low=100, high=100000)


@dataclass(frozen=True)
class MitigateSettings(MitigationSettings):
    """``gadgets.mitigate``: training-free mitigation of flagged images (the data correction
    behind the prior gate, the prior-weighted re-reconstruction, or the k-space cyclic
    mitigation). Its rewrite properties are the library's mitigation settings (``recon/settings.py``)."""

    weights: str = prop("", "network weights; must be the model that made the images (checked by hash)")
    calibration: str = prop("", "calibration JSON; must be the one the detect gadget used (checked)")
    send_received: bool = prop(
        False, "also send the image as received (before its rewrite) after each rewritten one, tagged GADGETRON_DataRole=CycGuard.Received in series +100, for "
        "before/after reports; the export stage never writes it to DICOM or a PACS"
    )
    device: str = prop("auto", "compute device: auto, cpu, cuda or cuda:N")
    forward_internal: bool = prop(False, "also forward the k-space buffer and coil maps for downstream CycGuard stages")


@dataclass(frozen=True)
class AttackSettings:
    """``gadgets.redteam``: perturbs received k-space of chosen slices (red-team pipelines only)."""

    attack: str = prop(
        "pgd_l2",
        "attack: pgd_l2 (white-box l2 PGD on sampled k-space), pgd_linf (white-box l-inf PGD: a box on Re and Im of every sample), "
        "fgsm (one signed step), spikes (impulses), noise (benign)",
        choices=("pgd_l2", "pgd_linf", "fgsm", "spikes", "noise"),
    )
    slices: str = prop("all", "slice indices to attack, comma-separated (e.g. 1,3), or all")
    budget: float = prop(
        3.0,
        "perturbation size: l2 norm (pgd_l2, fgsm), l2 norm of the box's corners (pgd_linf: half-width budget sigma / sqrt(2) "
        "on Re and Im of each sample), spike amplitude (spikes) or noise std (noise)",
        unit="acquisition-noise norms (std for noise)", low=0.0, high=1000.0,
    )
    steps: int = prop(10, "PGD iterations", low=1, high=1000)
    seed: int = prop(0, "random seed", low=0, high=2**31 - 1)
    weights: str = prop("", "the attacked network's weights (white-box); empty: the shipped default")
    device: str = prop("auto", "compute device: auto, cpu, cuda or cuda:N")

    def slice_set(self) -> frozenset[int] | None:
        """The slices to attack, ``None`` for all."""
        if self.slices.strip() == "all":
            return None
        return frozenset(int(s) for s in self.slices.split(",") if s.strip())


@dataclass(frozen=True)
class OrderSettings:
    """``gadgets.order``: after a ``<distributed>`` block, puts the images its workers return (in
    arrival order, each numbered by its own worker) back in slice order, numbers them 1, 2, ...
    as a single node does, and reports every slice the header announces that no worker returned."""

    hold_seconds: float = prop(
        600.0, "longest an image waits for the slices before it; after that it goes on out of order (with a warning) and the "
        "late slice follows when it comes", unit="s", low=0.0, high=86400.0,
    )


@dataclass(frozen=True)
class ExportSettings:
    """``gadgets.export``: the chain's last CycGuard stage: checks every image carries a verdict,
    drops internal messages, writes DICOM to a folder and/or pushes it to a PACS, forwards
    images unchanged."""

    dicom_folder: str = prop("", "folder for DICOM files (<SeriesInstanceUID>/<SOPInstanceUID>.dcm); empty: none")
    pacs_host: str = prop("", "PACS host name or address to push to by C-STORE; empty: no PACS")
    pacs_port: int = prop(104, "PACS DICOM port", low=1, high=65535)
    pacs_aet: str = prop("ANY-SCP", "the PACS's AE title (called AE)")
    calling_aet: str = prop("CYCGUARD", "our AE title towards the PACS")
    spool: str = prop("", "spool root: one folder per PACS destination of the images it has not acknowledged (resent on every push) and of those it rejected; empty: ~/.local/state/cycguard/spool")
    pacs_tls_ca: str = prop("", "CA certificate (PEM) to reach the PACS over TLS; empty: no TLS")
    pacs_timeout: float = prop(10.0, "network timeout towards the PACS", unit="s", low=0.1, high=600.0)

    def spool_folder(self) -> str:
        """The spool folder in use."""
        import os

        return self.spool or os.path.join(os.path.expanduser("~"), ".local", "state", "cycguard", "spool")


@dataclass(frozen=True)
class ComposedSettings:
    """``gadgets.composed``: several stages in one process (saves serialisation)."""

    stages: str = prop("recon,detect,mitigate,export", "comma-separated stages in order: attack, recon, detect, mitigate, order, export")


STAGE_SETTINGS: dict[str, type] = {
    "attack": AttackSettings,
    "recon": ReconSettings,
    "detect": DetectSettings,
    "mitigate": MitigateSettings,
    "order": OrderSettings,
    "export": ExportSettings,
}

# (module, target) of every gadget we ship -> settings classes its <configuration> may hold
GADGETS: dict[tuple[str, str], tuple[type, ...]] = {
    ("gadgets.recon", "recon"): (ReconSettings,),
    ("gadgets.detect", "detect"): (DetectSettings,),
    ("gadgets.mitigate", "mitigate"): (MitigateSettings,),
    ("gadgets.redteam", "attack"): (AttackSettings,),
    ("gadgets.order", "order"): (OrderSettings,),
    ("gadgets.export", "export"): (ExportSettings,),
    ("gadgets.composed", "composed"): (ComposedSettings,),
}


# ------------------------------------------------------------------ parsing


def properties_of(config: ET.Element | bytes | str | None, gadget: str) -> dict[str, str]:
    """The ``name -> value`` pairs of a ``<configuration>`` element (or its XML text)."""
    if config is None:
        return {}
    if isinstance(config, (bytes, str)):
        text = config.decode("utf-8") if isinstance(config, bytes) else config
        if not text.strip():
            return {}
        try:
            config = SafeET.fromstring(text)
        except SafeET.ParseError as err:
            raise PropertyError(f"{gadget}: configuration is not well-formed XML: {err}") from err
    element: ET.Element = config  # type: ignore[assignment]
    out: dict[str, str] = {}
    for child in element:
        if child.tag != "property":
            raise PropertyError(f"{gadget}: unexpected element <{child.tag}> in <configuration> (only <property>)")
        attr_name, attr_value = child.get("name"), child.get("value")
        elem_name, elem_value = child.findtext("name"), child.findtext("value")
        if attr_name is not None and elem_name is not None:
            raise PropertyError(f"{gadget}: ambiguous property {attr_name!r}: both attribute and element forms")
        name = attr_name if attr_name is not None else elem_name
        value = attr_value if attr_name is not None else elem_value
        if name is None or value is None:
            raise PropertyError(f"{gadget}: a <property> needs a name and a value")
        if name in out:
            raise PropertyError(f"{gadget}: property {name!r} given twice")
        out[name] = value
    return out


def _convert(gadget: str, name: str, value: str, kind: Any, meta: Mapping[str, Any]) -> Any:
    where = f"{gadget}: property {name!r} = {value!r}"
    if "@" in value:
        raise PropertyError(f"{where}: values may not hold '@' (Gadgetron reads it as a reference to another gadget's property)")
    text = value.strip()
    if kind in (bool, "bool"):
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise PropertyError(f"{where}: expected true or false")
    if kind in (int, "int", float, "float"):
        number_type = int if kind in (int, "int") else float
        try:
            number = number_type(text)
        except ValueError as err:
            raise PropertyError(f"{where}: expected {'an integer' if number_type is int else 'a number'}") from err
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and number < low) or (high is not None and number > high) or number != number:
            raise PropertyError(f"{where}: must lie in [{low:g}, {high:g}]")
        return number
    choices = meta.get("choices") or ()
    if choices and text not in choices:
        raise PropertyError(f"{where}: allowed values are {', '.join(choices)}")
    if name == "device" and not DEVICE_PATTERN.match(text):
        raise PropertyError(f"{where}: allowed values are auto, cpu, cuda, cuda:N")
    if name == "pacs_host" and text and not re.fullmatch(r"[A-Za-z0-9.\-:]+", text):
        raise PropertyError(f"{where}: expected a host name or address")
    if name in ("calling_aet", "pacs_aet") and not re.fullmatch(r"[ -~]{1,16}", text):
        raise PropertyError(f"{where}: 1 to 16 printable ASCII characters")
    if name == "slices" and text != "all" and not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
        raise PropertyError(f"{where}: expected all or comma-separated slice indices such as 1,3")
    if name == "stages":
        parts = [p.strip() for p in text.split(",")]
        unknown = [p for p in parts if p not in STAGE_SETTINGS]
        if unknown or not parts:
            raise PropertyError(f"{where}: unknown stage {unknown[0] if unknown else ''!r}; known: {', '.join(STAGE_SETTINGS)}")
    return text


def build(cls: type[T], values: Mapping[str, str], gadget: str) -> T:
    """One settings dataclass from the properties that belong to it (others ignored)."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in values:
            kwargs[f.name] = _convert(gadget, f.name, values[f.name], f.type, f.metadata)
    return cls(**kwargs)


def names_of(classes: Iterable[type]) -> set[str]:
    """Every property name the settings classes know."""
    return {f.name for cls in classes for f in fields(cls)}


def settings_classes(module: str, target: str, values: Mapping[str, str]) -> tuple[type, ...]:
    """The settings classes a gadget's configuration may hold (a composed gadget: its stages')."""
    key = (module, target)
    if key not in GADGETS:
        known = ", ".join(f"{m}:{t}" for m, t in GADGETS)
        raise PropertyError(f"unknown CycGuard gadget {module}:{target} (known: {known})")
    classes = GADGETS[key]
    if key == ("gadgets.composed", "composed"):
        composed = build(ComposedSettings, values, f"{module}:{target}")
        classes = classes + tuple(STAGE_SETTINGS[s.strip()] for s in composed.stages.split(","))
    return classes


def stage_order(settings: Mapping[type, Any]) -> list[str]:
    """The stages a parsed configuration runs, in order (a composed gadget: its ``stages``)."""
    if ComposedSettings in settings:
        return [s.strip() for s in settings[ComposedSettings].stages.split(",")]
    return [name for name, cls in STAGE_SETTINGS.items() if cls in settings]


def parse(module: str, target: str, config: ET.Element | bytes | str | None) -> dict[type, Any]:
    """Parse and check a gadget's ``<configuration>``: ``{settings class: settings}``.

    Raises:
        PropertyError: unknown property, malformed value, or ``@`` in a value.
    """
    gadget = f"{module}:{target}"
    values = properties_of(config, gadget)
    classes = settings_classes(module, target, values)
    known = names_of(classes)
    for name in values:
        if name not in known:
            raise PropertyError(f"{gadget}: unknown property {name!r} (known: {', '.join(sorted(known))})")
    return {cls: build(cls, values, gadget) for cls in classes}


# ------------------------------------------------------------------ the reference for MR physicists


def reference_markdown() -> str:
    """The property reference of every gadget, as Markdown (``docs/properties.md``)."""
    lines = [
        "# CycGuard gadget properties",
        "",
        "Generated from `gadgets/params.py` (`python -m gadgets.params > docs/properties.md`); a test keeps it current.",
        "Properties go in the `<configuration>` of an `<external>` node as `<property name=\"...\" value=\"...\"/>`.",
        "Booleans take true/false (also 1/0, yes/no, on/off). Values may not hold `@`. An unknown property or a",
        "value out of range stops the gadget (and `cycguard check`) with a message naming it.",
        "",
    ]
    for (module, target), classes in GADGETS.items():
        cls = classes[0]
        lines += [f"## `{module}` target `{target}`", "", (cls.__doc__ or "").strip(), ""]
        if module == "gadgets.composed":
            lines += ["Also takes every property of the stages it runs (same names as their own gadgets).", ""]
        lines += ["| property | type | default | unit | allowed | meaning |", "|---|---|---|---|---|---|"]
        for f in fields(cls):
            meta = f.metadata
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            allowed = ", ".join(meta["choices"]) if meta["choices"] else (
                f"[{meta['low']:g}, {meta['high']:g}]" if meta["low"] is not None else ""
            )
            if f.name == "device":
                allowed = "auto, cpu, cuda, cuda:N"
            default = f.default if f.default is not MISSING else ""
            shown = str(default).lower() if isinstance(default, bool) else (str(default) if default != "" else "(empty)")
            lines.append(f"| `{f.name}` | {kind} | {shown} | {meta['unit']} | {allowed} | {meta['doc']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.stdout.write(reference_markdown())
