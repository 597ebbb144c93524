"""DL-recon gadget: ``ReconData`` in, complex image out (verdict ``unverified`` until checked).

``<external><execute name="gadgets.recon" target="recon" type="python"/>``. Per 2-D slice of
each buffer: coil maps from the ACS lines, the zero-filled image and the unrolled network
(:func:`recon.pipeline.reconstruct`). With ``forward_internal`` the buffer and the coil maps
go downstream too (contract: :mod:`gadgets.convert`).

Acquisitions may come in instead of buffers (a ``<distributed>`` worker stream, which gets one
slice's acquisitions and stays open until the whole scan ends): each 2-D slice's acquisitions
are collected and become its buffer, as ``BucketToBufferGadget`` makes it, as soon as the
slice's ``ACQ_LAST_IN_SLICE`` acquisition arrives, so its image leaves while the scan goes on;
whatever is still collected when the stream ends is reconstructed then. This needs a slice's
lines to end with that flag once: a line that comes after it (another average, a separate
reference scan) is an error for that slice, not folded silently into another image; noise
scans must have been consumed by NoiseAdjust upstream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import ismrmrd
from gadgetron.types.recon_data import ReconData

from gadgets.convert import ContractError, buffer_slices, maps_message
from gadgets.params import ReconSettings
from gadgets.runner.frontend import Bucket, BucketToBuffer, slice_key
from gadgets.stages import Resources, SliceError, gadget_logging, serve
from recon.io.mrd import missing_slices
from recon.io.mrd_write import to_ismrmrd_image
from recon.models.weights import model_tag
from recon.pipeline import reconstruct
from recon.types import ReconImage
from recon.verdict import recon_meta

log = logging.getLogger("cycguard.gadget.recon")


class ReconStage:
    """Reconstructs every slice of every ``ReconData``; passes other items through."""

    name = "recon"

    def __init__(self, settings: ReconSettings, resources: Resources) -> None:
        self.settings = settings
        self.model, self.manifest, self.device = resources.model(settings.weights, settings.device)
        self.bandwidth = resources.receiver_bandwidth()
        self.protocol = resources.protocol()
        self.seen_slices: set[int] = set()
        self.count = 0
        self.header_xml = resources.header_xml
        self.to_buffer: BucketToBuffer | None = None
        self.collecting: dict[tuple[int, ...], Bucket] = {}  # acquisitions in: per 2-D slice until its last
        self.released: set[tuple[int, ...]] = set()  # slices made at their last acquisition
        self.late: set[tuple[int, ...]] = set()  # of those, the ones a line came after (reported once)

    def process(self, item: Any) -> Iterable[Any]:
        if isinstance(item, ismrmrd.Acquisition):
            return self._collect(item)
        if not isinstance(item, ReconData):
            return [item]
        parts = buffer_slices(item, self.bandwidth)
        problems = {id(part): part.problem(self.protocol.acceleration) for part in parts}
        # downstream stages keep a forwarded buffer until its image comes: forward it only when
        # every slice in it gets one
        forward = self.settings.forward_internal and not any(problems.values())
        out: list[Any] = [item] if forward else []
        for part in parts:
            self.seen_slices.add(part.data.key.slice)
            problem = problems[id(part)]
            if problem is not None:
                out.append(SliceError(f"{problem}; not reconstructed"))
                continue
            result = reconstruct(part.data, self.model, self.device)
            self.count += 1
            seconds = sum(t for _, t in result.timings)
            meta = tuple(recon_meta(model_tag(self.manifest), seconds).items())
            image = to_ismrmrd_image(ReconImage(result.image, part.data.key, part.data.geometry, meta), self.count, self.settings.series)
            if forward:
                out.append(maps_message(result.prepared.op.maps[0].cpu().numpy(), image))
            out.append(image)
            log.info("recon %s in %.3f s", part.data.key, seconds)
        return out

    def _collect(self, acq: ismrmrd.Acquisition) -> list[Any]:
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            raise ContractError("a noise scan reached gadgets.recon: put NoiseAdjustGadget before it (it consumes them and whitens the data)")
        key = slice_key(acq)
        if key in self.released:
            if key in self.late:
                return []
            self.late.add(key)
            return [SliceError(
                f"slice {key[0]}: acquisitions after its ACQ_LAST_IN_SLICE (another average or a separate reference scan?): its image "
                "was made at that acquisition, without them; such a scan needs the single-node pipeline's slice trigger"
            )]
        self.collecting.setdefault(key, Bucket()).acquisitions.append(acq)
        if not acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            return []
        self.released.add(key)
        return self._buffers([key])

    def _buffers(self, keys: Iterable[tuple[int, ...]]) -> list[Any]:
        """The collected slices ``keys`` as buffers, reconstructed."""
        self.to_buffer = self.to_buffer or BucketToBuffer(self.header_xml, {})
        out: list[Any] = []
        for key in keys:
            bucket = self.collecting.pop(key)
            try:
                buffers = list(self.to_buffer.process(bucket))
            except ValueError as err:  # e.g. only calibration lines: that slice fails, the others go on
                self.seen_slices.add(key[0])
                out.append(SliceError(f"{err}; not reconstructed"))
                continue
            for buffer in buffers:
                out += self.process(buffer)
        return out

    def close(self) -> Iterable[Any]:
        out = self._buffers(sorted(self.collecting, key=lambda k: self.collecting[k].acquisitions[0].scan_counter))
        if not self.settings.account_slices:
            return out
        return out + [
            SliceError(f"slice {n}: no data arrived, though the header's encoding limits give {self.protocol.slices} slices (truncated acquisition?)")
            for n in missing_slices(self.protocol, self.seen_slices)
        ]


def recon(connection: Any) -> None:
    """Gadget target ``gadgets.recon:recon``."""
    gadget_logging()
    serve(connection, "gadgets.recon", "recon")
