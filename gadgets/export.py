"""Export gadget: the last CycGuard stage of a chain.

``<external><execute name="gadgets.export" target="export" type="python"/>``. Drops the
internal messages (k-space buffers, coil maps) so none leaves the chain, and makes sure
every image carries a verdict: an image that reaches it without one (made outside
CycGuard, or by a chain without a check) leaves tagged ``unverified`` with a warning, never
looking verified. With ``dicom_folder`` every image is written as DICOM (MR Image Storage,
:mod:`recon.io.dicom`); with ``pacs_host`` it is spooled and pushed by C-STORE
(:mod:`recon.io.pacs`), in the spool of that destination; images the PACS has not
acknowledged stay there and are resent with the next push, in this run or the next; an image
the PACS rejects is quarantined and reported as an error of the run. Images are forwarded
unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ismrmrd
from gadgetron.types.recon_data import ReconData

from gadgets.convert import is_maps, is_received, meta_of, meta_value, set_meta
from gadgets.params import ExportSettings
from gadgets.stages import Resources, SliceError, gadget_logging, serve
from recon.io.dicom import header_info, to_dicom, write_dicom
from recon.io.pacs import PacsTarget, Pusher
from recon.verdict import VERDICT_KEY, VERDICTS, verdict_meta

log = logging.getLogger("cycguard.gadget.export")


class ExportStage:
    """Drops internal messages; tags images without a valid verdict ``unverified``."""

    name = "export"

    def __init__(self, settings: ExportSettings, resources: Resources) -> None:
        self.settings = settings
        self.info = header_info(resources.header_xml) if settings.dicom_folder or settings.pacs_host else None
        self.folder = Path(settings.dicom_folder) if settings.dicom_folder else None
        self.pusher = None
        self.reported = 0
        if settings.pacs_host:
            target = PacsTarget.of(settings.pacs_aet, settings.pacs_host, settings.pacs_port, settings.calling_aet, settings.pacs_tls_ca)
            self.pusher = Pusher(target, Path(settings.spool_folder()), settings.pacs_timeout)
            sent = self.pusher.flush()  # what an earlier run left behind goes first
            if sent:
                log.info("PACS %s: delivered %d image(s) spooled by an earlier run", target, sent)

    def process(self, item: Any) -> Iterable[Any]:
        if isinstance(item, ReconData) or is_maps(item):
            return []
        if is_received(item):  # a before/after copy for the client's report, never an export
            return [item]
        if isinstance(item, ismrmrd.Image):
            verdict = meta_value(meta_of(item), VERDICT_KEY)
            if verdict not in VERDICTS:
                log.warning("image %d reached export with verdict %r: tagged unverified", item.image_index, verdict)
                set_meta(item, dict(verdict_meta("unverified", "unverified: no CycGuard check ran on this image")))
            if self.info is not None:
                ds = to_dicom(item, self.info)
                if self.folder is not None:
                    write_dicom(ds, self.folder)
                if self.pusher is not None:
                    self.pusher.push(ds)
                    return [item, *self._rejections()]
        return [item]

    def _rejections(self) -> list[SliceError]:
        """A PACS rejection is an error of the run (not an outage to wait out): reported once each."""
        assert self.pusher is not None
        out = [SliceError(message) for message in self.pusher.rejections[self.reported:]]
        self.reported = len(self.pusher.rejections)
        return out

    def close(self) -> Iterable[Any]:
        if self.pusher is None:
            return []
        self.pusher.flush()
        pending = self.pusher.pending()
        if pending:
            log.warning("PACS %s: %d image(s) pending in %s (resent on the next push)", self.pusher.target, len(pending), self.pusher.spool)
        return self._rejections()


def export(connection: Any) -> None:
    """Gadget target ``gadgets.export:export``."""
    gadget_logging()
    serve(connection, "gadgets.export", "export")
