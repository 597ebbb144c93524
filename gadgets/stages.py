"""How a CycGuard gadget runs: stages over a Gadgetron connection, failing closed.

A *stage* turns one incoming item into zero or more outgoing items (``process``) and may
emit more at the end (``close``); items it does not handle pass through unchanged. A gadget
target (``gadgets.recon:recon`` etc.) is :func:`serve` with the gadget's stages; the
composed gadget chains several stages in one process; the runner's in-process mode calls
the same stages without sockets.

On any failure the gadget logs the traceback to stderr, sends ERROR (id 8) with the message
and CLOSE (id 4) to Gadgetron, and ends with status 1. Nothing is written
to stdout: in Gadgetron it is the data pipe.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import socket
import struct
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import ismrmrd
import numpy as np
from gadgetron.types.recon_data import ReconData

from gadgets import params
from gadgets.convert import BufferSlice, ContractError, buffer_slices, image_key, is_maps, maps_of, meta_of, meta_value
from recon.detect.calibration import ProtocolKey
from recon.detect.defense import Defense, cached_calibration_path, fit_defense, model_protocol, protocol_of
from recon.models.weights import model_tag
from recon.types import SliceKey
from recon.verdict import MODEL_KEY

log = logging.getLogger("cycguard.gadget")

MESSAGE_CLOSE = 4
MESSAGE_ERROR = 8
MAX_READ_BYTES = 1 << 30  # no single wire read may ask for more than 1 GiB


@dataclass(frozen=True)
class SliceError:
    """An error for one slice, not for the stream: a gadget sends it as Gadgetron ERROR (id 8)
    and goes on with the other slices; Gadgetron (and our runner) report it to the client and
    fail the run. In process, it travels down the chain like an item and the runner collects it."""

    message: str


class Stage(Protocol):
    """One step of a gadget."""

    name: str

    def process(self, item: Any) -> Iterable[Any]:
        """Items to send downstream for one incoming item."""
        ...

    def close(self) -> Iterable[Any]:
        """Items to send at the end of the stream; raise if something is left undone."""
        ...


def launched_without_target(argv: list[str]) -> bool:
    """Whether Gadgetron started a gadget as ``python -m gadgetron PORT MODULE`` without its
    target: a Gadgetron that drops it (and the ``<configuration>``) when it forwards a
    ``<distributed>`` stream to a worker, as stock 4.7.2 does. gadgetron-python then fails
    with a bare TypeError after importing the module, so the module says why first."""
    return len(argv) == 3 and argv[0].replace("\\", "/").endswith("gadgetron/__main__.py") and argv[2].startswith("gadgets.")


if launched_without_target(sys.argv):
    log.critical("Gadgetron started %s without a target (and so without its <configuration>): this Gadgetron drops both when it "
                 "forwards a <distributed> stream to a worker, as stock 4.7.2 does; it needs the fix in docs/DISTRIBUTED.md", sys.argv[2])


# ------------------------------------------------------------------ shared resources


@dataclass
class Resources:
    """What several stages of one process share: the ISMRMRD header and the loaded networks."""

    header_xml: str
    _protocol: Any = None

    def model(self, weights: str, device: str) -> tuple[Any, Any, Any]:
        """``(model, manifest, torch_device)`` for a weights path ("" = shipped default): loaded
        once per process (a batch worker runs many files' stages in one process), again only
        when the file changes."""
        return loaded_model(weights, device)

    def protocol(self) -> Any:
        """The header's :class:`recon.io.mrd.Protocol` (parsed once)."""
        from recon.io.mrd import parse_header

        if self._protocol is None:
            self._protocol = parse_header(self.header_xml)
        return self._protocol

    def acceleration(self) -> int:
        """Nominal acceleration from the header."""
        return int(self.protocol().acceleration)

    def receiver_bandwidth(self) -> float:
        """The header's relative receiver noise bandwidth (Gadgetron's default when absent):
        it sets the noise level NoiseAdjust leaves in whitened data."""
        return float(self.protocol().receiver_bandwidth)


_LOADED: dict[tuple[str, str, int, int], tuple[Any, Any, Any]] = {}


def loaded_model(weights: str, device: str) -> tuple[Any, Any, Any]:
    """The process's copy of a network (its hash checked when it was loaded), keyed by the file's
    path, size and modification time and the device it resolves to (``auto`` and ``cpu`` share
    one on a machine without CUDA)."""
    from recon.models.weights import DEFAULT_WEIGHTS, load_model, resolve_device

    path = Path(weights) if weights else DEFAULT_WEIGHTS
    try:
        stat = path.stat()
    except OSError:
        stat = None
    torch_device = resolve_device(device)
    key = (str(path.resolve()), str(torch_device), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1)
    if key not in _LOADED or stat is None:
        model, manifest = load_model(path, torch_device)  # raises for a missing or changed file
        _LOADED[key] = (model, manifest, torch_device)
    return _LOADED[key]


# ------------------------------------------------------------------ the internal messages


@dataclass
class SliceContext:
    """What upstream computed for one slice: its k-space and (once received) coil maps."""

    part: BufferSlice
    maps: np.ndarray | None = None


class InternalStore:
    """Keeps k-space buffers and coil maps until the image of their slice arrives.

    Forwards them downstream on receipt when ``forward`` is set, so per slice the order
    buffer, maps, image is kept.
    """

    def __init__(self, stage: str, forward: bool, receiver_bandwidth: float) -> None:
        self.stage = stage
        self.forward = forward
        self.receiver_bandwidth = receiver_bandwidth
        self.slices: dict[SliceKey, SliceContext] = {}

    def offer(self, item: Any) -> list[Any] | None:
        """Take an internal item (returns what to forward), or ``None`` for other items."""
        if isinstance(item, ReconData):
            for part in buffer_slices(item, self.receiver_bandwidth):
                self.slices[part.data.key] = SliceContext(part)
            return [item] if self.forward else []
        if is_maps(item):
            key, maps = maps_of(item)
            if key not in self.slices:
                raise ContractError(f"{self.stage}: coil maps for {key} arrived before its k-space buffer")
            self.slices[key].maps = maps
            return [item] if self.forward else []
        return None

    def take(self, image: ismrmrd.Image) -> SliceContext:
        """The context of an image's slice (removed from the store)."""
        key = image_key(image)
        context = self.slices.pop(key, None)
        if context is None or context.maps is None:
            raise ContractError(
                f"{self.stage}: image of {key} arrived without its k-space buffer and coil maps; "
                "set forward_internal=true on the CycGuard gadget before this one"
            )
        return context

    def close(self) -> None:
        """Fail when a buffer never got its image (an upstream stage lost a slice)."""
        if self.slices:
            raise ContractError(f"{self.stage}: no image arrived for {sorted(self.slices)}")


def is_ours(item: Any) -> bool:
    """Whether an item is an image a CycGuard recon made (it carries ``CycGuard.Model``)."""
    return isinstance(item, ismrmrd.Image) and "CycGuard.Model" in meta_of(item)


# ------------------------------------------------------------------ stages that check CycGuard images


@dataclass(frozen=True)
class AutoCalibrate:
    """A stage's ``auto_calibrate`` settings: simulated slices per calibration (0: off), whether
    its data are prewhitened, the weights the job must use."""

    slices: int = 0
    whitened: bool = False
    weights: str = ""


class DefenseCache:
    """Defenses per protocol for one model and calibration file (shared by detect and mitigate).
    With ``auto`` on, a protocol without a calibration gets one made in the background
    (:mod:`gadgets.autocalibrate`) and is looked up again once it exists."""

    def __init__(self, stage: str, weights: str, calibration: str, device: str, resources: Resources, auto: AutoCalibrate | None = None) -> None:
        self.stage = stage
        self.model, self.manifest, self.device = resources.model(weights, device)
        self.calibration = Path(calibration) if calibration else None
        self.acceleration = resources.acceleration()
        self.cache: dict[ProtocolKey, Defense | str] = {}
        self.auto = auto or AutoCalibrate()
        self.pending: dict[ProtocolKey, tuple[Path, str]] = {}  # protocol -> (calibration to come, why it is missing)

    def check_model(self, image: ismrmrd.Image) -> None:
        tag = meta_value(meta_of(image), MODEL_KEY)
        if tag != model_tag(self.manifest):
            raise ContractError(f"{self.stage}: image made by model {tag}, but this gadget loaded {model_tag(self.manifest)}")

    def defense(self, data: Any) -> Defense | str:
        """The defense for ``data``'s protocol, or why no calibration fits it."""
        protocol = protocol_of(data, self.manifest, self.acceleration)
        if protocol in self.pending:
            target, why = self.pending[protocol]
            if not target.exists():
                return self._background(protocol, data, target, why)
            del self.pending[protocol]  # made meanwhile: looked up again
        if protocol not in self.cache:
            found = fit_defense(self.model, self.manifest, protocol, self.calibration)
            target = cached_calibration_path(self.manifest, protocol)
            auto = self.auto.slices and self.calibration is None and protocol != model_protocol(self.manifest)
            if isinstance(found, str) and auto and not target.exists():
                self.pending[protocol] = (target, found)
                return self._background(protocol, data, target, found)
            self.cache[protocol] = found
        return self.cache[protocol]

    def _background(self, protocol: ProtocolKey, data: Any, target: Path, why: str) -> str:
        """Why a slice of a protocol without calibration stays unverified, with the state of the
        background job that makes one (started here when none runs)."""
        from gadgets import autocalibrate
        from recon.calibrate import LikeSeed

        def seed() -> LikeSeed:
            return LikeSeed.of_slices([data], self.auto.whitened, self.manifest, self.acceleration, f"a {self.stage}-stage slice")

        return autocalibrate.ensure(target, seed, self.auto.weights, self.auto.slices, why)


class CheckedImageStage:
    """A stage that works on CycGuard images with the k-space and coil maps sent before them
    (detect, mitigate): keeps those in an :class:`InternalStore`, passes other items through."""

    name = "checked"

    def __init__(
        self, forward_internal: bool, weights: str, calibration: str, device: str, resources: Resources, auto: AutoCalibrate | None = None
    ) -> None:
        self.store = InternalStore(self.name, forward_internal, resources.receiver_bandwidth())
        self.defenses = DefenseCache(self.name, weights, calibration, device, resources, auto)

    def process(self, item: Any) -> Iterable[Any]:
        forwarded = self.store.offer(item)
        if forwarded is not None:
            return forwarded
        if not is_ours(item):
            return [item]
        return self.handle(item, self.store.take(item))

    def handle(self, image: ismrmrd.Image, context: SliceContext) -> list[Any]:
        """Items to send for one CycGuard image."""
        raise NotImplementedError

    def close(self) -> Iterable[Any]:
        self.store.close()
        return []


# ------------------------------------------------------------------ building and running stages

STAGE_CLASSES = {
    params.AttackSettings: "gadgets.redteam:AttackStage",
    params.ReconSettings: "gadgets.recon:ReconStage",
    params.DetectSettings: "gadgets.detect:DetectStage",
    params.MitigateSettings: "gadgets.mitigate:MitigateStage",
    params.OrderSettings: "gadgets.order:OrderStage",
    params.ExportSettings: "gadgets.export:ExportStage",
}


def build_stages(module: str, target: str, config: Any, header_xml: str) -> list[Stage]:
    """The stages of a gadget from its ``<configuration>`` (parsed once, here)."""
    settings = params.parse(module, target, config)
    resources = Resources(header_xml)
    classes = [params.STAGE_SETTINGS[name] for name in params.stage_order(settings)]
    stages: list[Stage] = []
    for position, cls in enumerate(classes):
        stage_module, stage_class = STAGE_CLASSES[cls].split(":")
        value = settings[cls]
        if position < len(classes) - 1 and hasattr(value, "forward_internal"):
            value = replace(value, forward_internal=True)  # stages inside one process always hand on
        stages.append(getattr(importlib.import_module(stage_module), stage_class)(value, resources))
    return stages


def run_stages(stages: list[Stage], items: Iterable[Any], gate: contextlib.AbstractContextManager[Any] | None = None) -> Iterator[Any]:
    """Push every item through the stages in order, then close them in order. ``gate`` is held
    while an item goes through the stages (from the first stage to the last, so a slice once
    begun is finished before the slot goes to another session) and while they close; what
    leaves the chain is sent after it is released. Collecting an acquisition that does not end
    its slice is not computing. A warm gadget server bounds with it how many of its sessions
    compute at once."""

    def push(index: int, item: Any) -> Iterator[Any]:
        if index == len(stages):
            yield item
            return
        for out in stages[index].process(item):
            yield from push(index + 1, out)

    def closing() -> Iterator[Any]:
        for index, stage in enumerate(stages):
            for out in stage.close():
                yield from push(index + 1, out)

    for item in items:
        light = isinstance(item, ismrmrd.Acquisition) and not item.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)
        if gate is None or light:
            yield from push(0, item)
            continue
        with gate:
            outs = list(push(0, item))
        yield from outs
    if gate is None:
        yield from closing()
        return
    with gate:
        outs = list(closing())
    yield from outs


COMPUTE_GATE: list[contextlib.AbstractContextManager[Any]] = []  # set by a warm gadget server's sessions (gadgets.listen)


class SafeSocket:
    """gadgetron-python's socket wrapper, plus EOF detection and a cap on every read
    (1.4.1 spins forever when the peer dies mid-message)."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def read(self, nbytes: int) -> bytes:
        if nbytes < 0 or nbytes > MAX_READ_BYTES:
            raise ConnectionError(f"refusing a {nbytes}-byte read (cap {MAX_READ_BYTES}): corrupt length field?")
        chunks, remaining = [], nbytes
        while remaining:
            chunk = self._recv(min(remaining, 1 << 20))
            if not chunk:
                raise ConnectionError(f"peer closed the connection with {remaining} of {nbytes} bytes unread")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _recv(self, nbytes: int) -> bytes:
        return self.socket.recv(nbytes)

    def write(self, data: bytes) -> None:
        self.socket.sendall(data)

    def close(self) -> None:
        try:
            self.write(struct.pack("<H", MESSAGE_CLOSE))
        except OSError:
            pass
        self.socket.close()


def error_frame(message: str) -> bytes:
    """ERROR (id 8): ``uint64`` length and the UTF-8 message."""
    data = message.encode("utf-8")
    return struct.pack("<H", MESSAGE_ERROR) + struct.pack("<Q", len(data)) + data


def send_error(connection: Any, message: str) -> None:
    """Send ERROR (id 8: ``uint64`` length, UTF-8 message) and then CLOSE (id 4).

    Gadgetron reports the message to its client; it reads the next message id after an
    ERROR, so without the CLOSE it would read a closed socket and report only "illegal
    message id".
    """
    try:
        connection.socket.write(error_frame(message) + struct.pack("<H", MESSAGE_CLOSE))
    except OSError as err:
        log.error("could not send ERROR to Gadgetron: %s", err)


def serve(connection: Any, module: str, target: str) -> None:
    """Run a gadget's stages over a ``gadgetron.external.Connection``; fail closed."""
    connection.socket = SafeSocket(connection.socket.socket)
    closed = {"seen": False}

    def on_close(_: Any) -> None:
        closed["seen"] = True
        raise StopIteration

    connection.readers[MESSAGE_CLOSE] = on_close
    name = f"{module}:{target}"
    try:
        stages = build_stages(module, target, connection.raw_bytes.config, _text(connection.raw_bytes.header))
        for item in run_stages(stages, connection, COMPUTE_GATE[0] if COMPUTE_GATE else None):
            if isinstance(item, SliceError):
                log.error("%s", item.message)
                connection.socket.write(error_frame(item.message))
                continue
            connection.send(item)
        if not closed["seen"]:
            raise ContractError("the input ended without CLOSE (unknown message id or a dead peer)")
    except Exception as err:
        log.exception("%s failed", name)
        send_error(connection, str(err))  # Gadgetron and the runner name the gadget themselves
        linger(connection.socket.socket)
        raise SystemExit(1) from err


def linger(sock: socket.socket, seconds: float = 30.0) -> None:
    """End a connection with FIN, not RST. A socket closed with input still unread resets, and
    the peer's kernel then drops what it had received but not yet read: the ERROR just sent
    and the images sent before it. So stop writing, then read and discard until the peer
    closes (at most ``seconds``)."""
    deadline = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1 << 20):
                break
    except OSError:
        pass


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def quiet_known_warnings() -> None:
    """Silence one harmless third-party warning: gadgetron-python 1.4.1 builds object arrays of
    ctypes headers, which makes numpy warn about their buffer format on every ImageArray."""
    warnings.filterwarnings("ignore", message="A builtin ctypes object gave a PEP3118", category=RuntimeWarning)


def gadget_logging() -> None:
    """Log to stderr (stdout is Gadgetron's data pipe)."""
    quiet_known_warnings()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
