"""Export gadget: the last CycGuard stage of a chain.

``<external><execute name="gadgets.export" target="export" type="python"/>``. Drops the
internal messages (k-space buffers, coil maps) so none leaves the chain, and makes sure
every image carries a verdict: an image that reaches it without one (made outside
CycGuard, or by a chain without a check) leaves tagged ``unverified`` with a warning, never
looking verified. Images are forwarded otherwise unchanged. The DICOM/PACS export of the
DICOM issue plugs in here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import ismrmrd
from gadgetron.types.recon_data import ReconData

from gadgets.convert import is_maps, meta_of, meta_value, set_meta
from gadgets.params import ExportSettings
from gadgets.stages import Resources, gadget_logging, serve
from recon.pipeline import VERDICTS

log = logging.getLogger("cycguard.gadget.export")


class ExportStage:
    """Drops internal messages; tags images without a valid verdict ``unverified``."""

    name = "export"

    def __init__(self, settings: ExportSettings, resources: Resources) -> None:
        self.settings = settings

    def process(self, item: Any) -> Iterable[Any]:
        if isinstance(item, ReconData) or is_maps(item):
            return []
        if isinstance(item, ismrmrd.Image):
            verdict = meta_value(meta_of(item), "CycGuard.Verdict")
            if verdict not in VERDICTS:
                log.warning("image %d reached export with verdict %r: tagged unverified", item.image_index, verdict)
                set_meta(
                    item,
                    {
                        "CycGuard.Verdict": "unverified",
                        "ImageComment": "unverified: no CycGuard check ran on this image",
                        "GADGETRON_ImageComment": "CycGuard unverified",
                    },
                )
        return [item]

    def close(self) -> Iterable[Any]:
        return []


def export(connection: Any) -> None:
    """Gadget target ``gadgets.export:export``."""
    gadget_logging()
    serve(connection, "gadgets.export", "export")
