"""DL-recon gadget: ``ReconData`` in, complex image out (verdict ``unverified`` until checked).

``<external><execute name="gadgets.recon" target="recon" type="python"/>``. Per 2-D slice of
each buffer: coil maps from the ACS lines, the zero-filled image and the unrolled network
(:func:`recon.pipeline.reconstruct`). With ``forward_internal`` the buffer and the coil maps
go downstream too (contract: :mod:`gadgets.convert`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from gadgetron.types.recon_data import ReconData

from gadgets.convert import buffer_slices, maps_message
from gadgets.params import ReconSettings
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

    def process(self, item: Any) -> Iterable[Any]:
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

    def close(self) -> Iterable[Any]:
        if not self.settings.account_slices:
            return []
        return [
            SliceError(f"slice {n}: no data arrived, though the header's encoding limits give {self.protocol.slices} slices (truncated acquisition?)")
            for n in missing_slices(self.protocol, self.seen_slices)
        ]


def recon(connection: Any) -> None:
    """Gadget target ``gadgets.recon:recon``."""
    gadget_logging()
    serve(connection, "gadgets.recon", "recon")
