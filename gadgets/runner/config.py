"""Gadgetron 4 v2 pipeline XML: parsing, and the checks behind ``cycguard check``.

Accepted: ``<configuration><version>2</version>`` with ``<readers>``, ``<writers>`` and a
``<stream>`` of ``<gadget>`` (C++ gadgets the runner has Python equivalents for, see
:mod:`gadgets.runner.frontend`) and ``<external>`` nodes (``<execute ... type="python"/>`` or
``<connect port= address=/>``, and a ``<configuration>`` of ``<property>``s), and one
``<distributed>`` block (Gadgetron's distributed mode: its ``<stream>`` runs on worker servers,
one slice each). The runner has no workers: it runs the block's stream in line, in the same
chain, which gives what the workers give, since every CycGuard stage works slice by slice.
Everything else is refused with a message naming it. XML is parsed with defusedxml (no
entities, no DTDs).
"""

from __future__ import annotations

import difflib
import importlib.util
import xml.etree.ElementTree as ET  # noqa: S405 - serialising only; parsing goes through defusedxml
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from xml.parsers import expat  # noqa: S410 - line numbers of a document defusedxml already accepted

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from gadgets import params
from gadgets.runner.frontend import FRONTEND, check_frontend_properties

KNOWN_READERS = {
    "AcquisitionReader", "WaveformReader", "ImageReader", "GadgetIsmrmrdAcquisitionMessageReader",
    "GadgetIsmrmrdWaveformMessageReader", "MRIImageReader",
}
KNOWN_WRITERS = {"ImageWriter", "MRIImageWriter", "IsmrmrdImageArrayWriter", "WaveformWriter", "AcquisitionWriter"}
UNSUPPORTED_NODES = {"parallel", "parallelprocess", "puredistributed"}
DISTRIBUTORS = {"AcquisitionDistributor", "BufferDistributor"}


class PipelineError(ValueError):
    """A pipeline the runner (or Gadgetron) would not run, with what is wrong."""


@dataclass(frozen=True)
class CppGadget:
    """A C++ gadget node (run by its Python equivalent in the runner)."""

    name: str
    dll: str
    classname: str
    properties: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ExternalNode:
    """An ``<external>`` node.

    Attributes:
        module, target: what ``python -m gadgetron <port> <module> <target>`` runs (active mode).
        configuration: the ``<configuration>`` element, serialised (sent as CONFIG).
        properties: its ``<property>`` pairs.
        connect: ``(address, port)`` in passive mode (the gadget listens), else ``None``.
        where: file, line and position of its element, for messages.
    """

    module: str
    target: str
    configuration: bytes
    properties: tuple[tuple[str, str], ...]
    connect: tuple[str, int] | None = None
    where: str = ""

    @property
    def name(self) -> str:
        return f"{self.module}:{self.target}" if self.module else f"connect {self.connect}"

    @property
    def ours(self) -> bool:
        return (self.module, self.target) in params.GADGETS


@dataclass(frozen=True)
class Pipeline:
    """A parsed pipeline."""

    source: str
    readers: tuple[str, ...]
    writers: tuple[str, ...]
    nodes: tuple[CppGadget | ExternalNode, ...]
    distributed: str = ""  # the <distributed> block's distributor ("" when none)
    span: tuple[int, int] = (0, 0)  # nodes[start:end] are that block's stream (run in line)

    @property
    def externals(self) -> tuple[ExternalNode, ...]:
        return tuple(n for n in self.nodes if isinstance(n, ExternalNode))


def installed_pipelines() -> dict[str, Path]:
    """The pipelines shipped with CycGuard, by name (file stem)."""
    folder = resources.files("pipelines")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".xml")}


def resolve(name_or_path: str) -> Path:
    """An installed pipeline by name (``defended`` or ``defended.xml``), else a file path."""
    shipped = installed_pipelines()
    stem = name_or_path[:-4] if name_or_path.endswith(".xml") else name_or_path
    if "/" not in name_or_path and stem in shipped:
        return shipped[stem]
    path = Path(name_or_path)
    if not path.is_file():
        raise PipelineError(f"no pipeline {name_or_path!r}: not a file, and not one of the installed {', '.join(sorted(shipped))}")
    return path


def _properties(elements: list[ET.Element], where: str) -> tuple[tuple[str, str], ...]:
    wrapper = ET.Element("configuration")
    wrapper.extend(elements)
    try:
        pairs = params.properties_of(wrapper, where)
    except params.PropertyError as err:
        raise PipelineError(str(err)) from err
    for name, value in pairs.items():
        if "@" in value:
            raise PipelineError(f"{where}: property {name!r} = {value!r} holds '@' (Gadgetron reads it as a reference to another gadget's property)")
    return tuple(pairs.items())


def parse_pipeline(text: str | bytes, source: str = "<pipeline>") -> Pipeline:
    """Parse pipeline XML (raises :class:`PipelineError`)."""
    try:
        root = SafeET.fromstring(text)
    except (SafeET.ParseError, DefusedXmlException) as err:
        raise PipelineError(f"{source}: not a well-formed, safe XML document: {err}") from err
    if root.tag == "gadgetronStreamConfiguration" or root.tag.endswith("}gadgetronStreamConfiguration"):
        raise PipelineError(f"{source}: legacy <gadgetronStreamConfiguration> format; write a v2 <configuration>")
    if root.tag != "configuration":
        raise PipelineError(f"{source}: root element <{root.tag}>, expected <configuration>")
    if (root.findtext("version") or "").strip() != "2":
        raise PipelineError(f"{source}: <version>2</version> missing (only Gadgetron 4 v2 pipelines are supported)")
    for child in root:
        if child.tag not in ("version", "readers", "writers", "stream"):
            raise PipelineError(f"{source}: unknown element <{child.tag}> under <configuration>")
    readers = tuple(_classes(root, "readers", "reader", KNOWN_READERS, source))
    writers = tuple(_classes(root, "writers", "writer", KNOWN_WRITERS, source))
    stream = root.find("stream")
    if stream is None:
        raise PipelineError(f"{source}: no <stream>")
    lines = _element_lines(text, root)
    found: list[tuple[str, int, int]] = []
    nodes = _stream(stream, lines, source, found)
    if not nodes:
        raise PipelineError(f"{source}: the <stream> is empty")
    if not found:
        return Pipeline(source, readers, writers, tuple(nodes))
    distributor, start, end = found[0]
    return Pipeline(source, readers, writers, tuple(nodes), distributor, (start, end))


def _stream(stream: ET.Element, lines: dict[int, int], source: str, distributed: list[tuple[str, int, int]]) -> list[CppGadget | ExternalNode]:
    """The nodes of a ``<stream>``, a ``<distributed>`` block's in line (its distributor and
    the span of its nodes go into ``distributed``)."""
    nodes: list[CppGadget | ExternalNode] = []
    for number, node in enumerate(stream, start=1):
        where = f"{source}:{lines.get(id(node), '?')}: stream node {number} <{node.tag}>"
        if node.tag == "gadget":
            nodes.append(_gadget(node, where))
        elif node.tag == "external":
            nodes.append(_external(node, where))
        elif node.tag == "distributed":
            if distributed:
                raise PipelineError(f"{where}: only one <distributed> block is supported (this one is inside or after another)")
            distributor = _distributor(node, where)
            inner = node.find("stream")
            if inner is None or not len(inner):
                raise PipelineError(f"{where}: needs a <stream> of the nodes its workers run")
            distributed.append((distributor, -1, -1))  # a nested block is refused
            start = len(nodes)
            nodes += _stream(inner, lines, source, distributed)
            distributed[0] = (distributor, start, len(nodes))
        elif node.tag in UNSUPPORTED_NODES:
            raise PipelineError(f"{where} is not supported by the CycGuard runner (gadget, external and distributed only)")
        else:
            raise PipelineError(f"{where}: unknown element (Gadgetron accepts gadget, external, parallel, distributed)")
    return nodes


def _distributor(node: ET.Element, where: str) -> str:
    """Check a ``<distributed>`` block's own elements; its distributor's class name."""
    for child in node:
        if child.tag not in ("readers", "writers", "distributor", "stream"):
            raise PipelineError(f"{where}: unknown element <{child.tag}> (readers, writers, distributor, stream)")
    for group, item, known in (("readers", "reader", KNOWN_READERS), ("writers", "writer", KNOWN_WRITERS)):
        classes = _classes(node, group, item, known, where)
        if not {f"Image{item.title()}", f"MRIImage{item.title()}"} & set(classes):
            raise PipelineError(f"{where}: its <{group}> need the Image{item.title()}: the workers' images come back through them")
    distributor = node.find("distributor")
    classname = (distributor.findtext("classname") or "").strip() if distributor is not None else ""
    if classname not in DISTRIBUTORS:
        raise PipelineError(f"{where}: <distributor> {classname or '(none)'!r} is not supported (known: {', '.join(sorted(DISTRIBUTORS))})")
    assert distributor is not None
    props = dict(_properties(distributor.findall("property"), f"{where} {classname}"))
    unknown = set(props) - ({"parallel_dimension"} if classname == "AcquisitionDistributor" else set())
    if unknown:
        raise PipelineError(f"{where}: {classname} has no property {sorted(unknown)[0]!r}")
    dimension = props.get("parallel_dimension", "slice")
    if classname == "AcquisitionDistributor" and dimension != "slice":
        raise PipelineError(f"{where}: {classname} parallel_dimension {dimension!r}: CycGuard's stages need whole slices (use slice)")
    return classname


def _element_lines(text: str | bytes, root: ET.Element) -> dict[int, int]:
    """Line of every element (by ``id``): expat's start events come in the document order of
    ``root.iter()``."""
    found: list[int] = []
    parser = expat.ParserCreate()
    parser.StartElementHandler = lambda *_: found.append(parser.CurrentLineNumber)
    try:
        parser.Parse(text, True)
    except expat.ExpatError:
        return {}
    return {id(element): line for element, line in zip(root.iter(), found, strict=False)}


def _classes(root: ET.Element, group: str, item: str, known: set[str], source: str) -> list[str]:
    out = []
    holder = root.find(group)
    for element in holder if holder is not None else []:
        if element.tag != item:
            raise PipelineError(f"{source}: unknown element <{element.tag}> in <{group}>")
        classname = (element.findtext("classname") or "").strip()
        if classname not in known:
            raise PipelineError(f"{source}: {item} {classname!r} is not supported (known: {', '.join(sorted(known))})")
        out.append(classname)
    return out


def _gadget(node: ET.Element, where: str) -> CppGadget:
    classname = (node.findtext("classname") or "").strip()
    dll = (node.findtext("dll") or "").strip()
    if classname not in FRONTEND:
        raise PipelineError(
            f"{where}: C++ gadget {classname!r} has no Python equivalent in the CycGuard runner (available: {', '.join(FRONTEND)})"
        )
    props = _properties(node.findall("property"), f"{where} {classname}")
    try:
        check_frontend_properties(classname, dict(props))
    except ValueError as err:
        raise PipelineError(f"{where}: {err}") from err
    return CppGadget((node.findtext("name") or classname).strip(), dll, classname, props)


def _external(node: ET.Element, where: str) -> ExternalNode:
    execute, connect, configuration = node.find("execute"), node.find("connect"), node.find("configuration")
    for child in node:
        if child.tag not in ("execute", "connect", "configuration"):
            raise PipelineError(f"{where}: unknown element <{child.tag}> (execute, connect, configuration)")
    if (execute is None) == (connect is None):
        raise PipelineError(f"{where}: needs exactly one of <execute> and <connect>")
    if configuration is None:
        configuration = ET.Element("configuration")
    props = _properties(list(configuration), where)
    config_bytes = ET.tostring(configuration, encoding="utf-8")
    if execute is not None:
        kind = (execute.get("type") or "").lower()
        if kind != "python":
            raise PipelineError(f"{where}: execute type {kind!r} is not supported (python only)")
        module, target = execute.get("name") or "", execute.get("target") or ""
        if not module or not target:
            raise PipelineError(f"{where}: <execute> needs name (module) and target")
        external = ExternalNode(module, target, config_bytes, props, where=where)
    else:
        assert connect is not None
        try:
            port = int(connect.get("port") or "")
        except ValueError as err:
            raise PipelineError(f"{where}: <connect> needs an integer port") from err
        external = ExternalNode("", "", config_bytes, props, (connect.get("address") or "localhost", port), where=where)
    return external


def load_pipeline(name_or_path: str | Path) -> Pipeline:
    """Read and parse a pipeline by installed name or path."""
    path = resolve(str(name_or_path))
    return parse_pipeline(path.read_bytes(), str(path))


def check_pipeline(pipeline: Pipeline, allow_foreign: bool = True, connect_stages: str | None = None) -> list[str]:
    """Check a pipeline as the runner would run it; returns warnings, raises on errors.

    Checks our gadgets' properties, that every detect/mitigate stage receives the internal
    messages it needs, that no internal message leaves the chain, and the order of the
    C++ front end (accumulate before bucket-to-buffer, bucket-to-buffer before our gadgets;
    inside a ``<distributed>`` block the recon stage takes the acquisitions itself).
    ``connect_stages`` names the stages behind a passive ``<connect>`` node when known.
    """
    warnings: list[str] = []
    stages: list[tuple[str, bool]] = []  # (stage, forwards internal)
    seen_buffer = False
    front = [n.classname for n in pipeline.nodes if isinstance(n, CppGadget)]
    if "AcquisitionAccumulateTriggerGadget" in front and "BucketToBufferGadget" not in front:
        raise PipelineError(f"{pipeline.source}: AcquisitionAccumulateTriggerGadget must be followed by BucketToBufferGadget")
    for number, node in enumerate(pipeline.nodes):
        in_block = bool(pipeline.distributed) and pipeline.span[0] <= number < pipeline.span[1]
        if isinstance(node, CppGadget):
            if stages:
                raise PipelineError(f"{pipeline.source}: C++ gadget {node.classname} after an external node is not supported")
            if node.classname == "BucketToBufferGadget":
                if "AcquisitionAccumulateTriggerGadget" not in front[: front.index(node.classname)]:
                    raise PipelineError(f"{pipeline.source}: BucketToBufferGadget needs AcquisitionAccumulateTriggerGadget before it")
                seen_buffer = True
            continue
        if node.connect is not None:
            names = [s.strip() for s in (connect_stages or "").split(",") if s.strip()]
            if not names:
                warnings.append(f"{node.name}: passive node, its gadget and properties are checked only when it runs")
                continue
            values = dict(node.properties)
            settings = params.parse("gadgets.composed", "composed", _config_with(values, "stages", ",".join(names)))
        elif not node.ours:
            if not allow_foreign:
                raise PipelineError(f"{node.where or pipeline.source}: {node.name}: not a CycGuard gadget; this server runs CycGuard gadgets only")
            _check_foreign(node, pipeline.source)
            warnings.append(f"{node.name}: not a CycGuard gadget; its properties are not checked")
            continue
        else:
            try:
                settings = params.parse(node.module, node.target, node.configuration)
            except params.PropertyError as err:
                raise PipelineError(f"{node.where or pipeline.source}: {err}") from err
            _check_files(settings, node.where or pipeline.source)
        order = params.stage_order(settings)
        for position, name in enumerate(order):
            forwards = position < len(order) - 1 or bool(getattr(settings[params.STAGE_SETTINGS[name]], "forward_internal", False))
            if name in ("detect", "mitigate") and not (stages and stages[-1][1]):
                raise PipelineError(
                    f"{pipeline.source}: the {name} stage of {node.name} needs the k-space buffer and coil maps: "
                    "set forward_internal=true on the CycGuard gadget before it"
                )
            # in a <distributed> worker stream recon takes the slice's acquisitions, a slice at its last one
            if not seen_buffer and (name == "attack" or (name == "recon" and not in_block)):
                raise PipelineError(f"{pipeline.source}: the {name} stage of {node.name} needs BucketToBufferGadget before it")
            if name == "recon" and in_block and "NoiseAdjustGadget" not in front:
                raise PipelineError(f"{pipeline.source}: the recon stage of {node.name} takes the slices' acquisitions: "
                                    "NoiseAdjustGadget must come before the <distributed> block")
            if name == "attack":
                warnings.append(f"{node.name}: the red-team attack gadget perturbs k-space: for evaluation only, never clinical use")
                if any(s == "recon" for s, _ in stages):
                    raise PipelineError(f"{pipeline.source}: the attack stage must come before recon")
            stages.append((name, forwards))
    if stages and stages[-1][1]:
        raise PipelineError(
            f"{pipeline.source}: the last CycGuard stage ({stages[-1][0]}) forwards internal messages out of the chain: "
            "set its forward_internal=false or end with gadgets.export"
        )
    if not any(s == "detect" for s, _ in stages) and any(s == "recon" for s, _ in stages):
        warnings.append("no detect stage: images leave tagged unverified")
    if pipeline.distributed:
        warnings += _check_distributed(pipeline)
    return warnings


def _check_distributed(pipeline: Pipeline) -> list[str]:
    """A ``<distributed>`` block: each worker gets some slices, so the recon stage there must
    not count the others as missing, and ordering and export belong on the main node."""
    start, end = pipeline.span
    inside = [n for n in pipeline.nodes[start:end] if isinstance(n, ExternalNode) and n.ours]
    after = [name for n in pipeline.nodes[end:] if isinstance(n, ExternalNode) for name in stage_names(n)]
    for node in inside:
        names = stage_names(node)
        for name in ("order", "export"):
            if name in names:
                raise PipelineError(f"{pipeline.source}: {node.name} runs the {name} stage inside the <distributed> block; "
                                    "it belongs after the block, on the main node")
        if "recon" in names and params.parse(node.module, node.target, node.configuration)[params.ReconSettings].account_slices:
            raise PipelineError(f"{pipeline.source}: the recon stage of {node.name} inside the <distributed> block would report every "
                                "slice another worker gets as missing: set its account_slices=false (gadgets.order after the block "
                                "accounts for every slice)")
    if "order" not in after:
        return ["images come back from the <distributed> workers in arrival order, each numbered by its worker: "
                "put gadgets.order after the block"]
    return []


def _check_foreign(node: ExternalNode, source: str) -> None:
    """A module in CycGuard's own package that is not one of its gadgets is a typo; any other
    module must at least be installed (found without importing it)."""
    where = node.where or source
    if node.module == "gadgets" or node.module.startswith("gadgets."):
        known = [f"{module}:{target}" for module, target in params.GADGETS]
        close = difflib.get_close_matches(node.name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else f" (CycGuard's gadgets: {', '.join(sorted(known))})"
        raise PipelineError(f"{where}: {node.name} is not a CycGuard gadget{hint}")
    if importlib.util.find_spec(node.module.split(".")[0]) is None:
        raise PipelineError(f"{where}: module {node.module!r} is not installed in this Python ({node.name})")


def _check_files(settings: dict[type, object], where: str) -> None:
    """The weights and calibration files a gadget names must exist."""
    for value in settings.values():
        for name in ("weights", "calibration"):
            path = str(getattr(value, name, "") or "")
            if path and not Path(path).is_file():
                raise PipelineError(f"{where}: property {name!r} names {path}, which does not exist")


def _config_with(values: dict[str, str], name: str, value: str) -> bytes:
    element = ET.Element("configuration")
    for key, val in ({**values, name: value} if name else values).items():
        ET.SubElement(element, "property", name=key, value=val)
    return ET.tostring(element, encoding="utf-8")


def stage_names(node: ExternalNode) -> list[str]:
    """The CycGuard stages an external node runs, in order (empty for foreign or passive nodes)."""
    if not node.ours:
        return []
    return params.stage_order(params.parse(node.module, node.target, node.configuration))


def with_stage_properties(pipeline: Pipeline, stage: str, values: dict[str, str]) -> Pipeline:
    """A copy of ``pipeline`` whose CycGuard nodes running ``stage`` get ``values`` as properties
    (replacing same-named ones); raises when no node runs that stage."""
    nodes: list[CppGadget | ExternalNode] = []
    found = False
    for node in pipeline.nodes:
        if isinstance(node, ExternalNode) and node.ours:
            if stage in stage_names(node):
                found = True
                merged = {**dict(node.properties), **values}
                node = ExternalNode(node.module, node.target, _config_with(merged, "", ""), tuple(merged.items()), node.connect, node.where)
        nodes.append(node)
    if not found:
        raise PipelineError(f"{pipeline.source}: no {stage} stage (gadgets.{stage}) to take {', '.join(values)}")
    return replace(pipeline, nodes=tuple(nodes))
