"""PACS push by DICOM C-STORE (pynetdicom), with a spool so that no image is dropped.

Every image is first written to the spool folder (``<SOPInstanceUID>.dcm``, atomically), then
sent; a file leaves the spool only after the PACS acknowledged it (status 0x0000 or a
warning status). When the PACS is unreachable or refuses, files stay spooled and are sent
with the next push (that run or the next one). Resending is safe: UIDs are stable
(:mod:`recon.io.dicom`), so a PACS that already holds an instance keeps one copy. Optional
TLS. A spool that cannot be written (disk full) is an error: the image would be lost.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from pynetdicom import AE

from recon.io.dicom import save_atomically

log = logging.getLogger(__name__)

_TARGET = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[A-Za-z0-9.\-:\[\]]+):(?P<port>\d{1,5})$")
SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}


class PacsError(ValueError):
    """A PACS target that cannot be used as given."""


@dataclass(frozen=True)
class PacsTarget:
    """Where images go: called AE title, host, port, our calling AE title, optional TLS."""

    ae_title: str
    host: str
    port: int
    calling_ae: str = "CYCGUARD"
    tls_ca: str = ""

    @classmethod
    def parse(cls, text: str, calling_ae: str = "CYCGUARD", tls_ca: str = "") -> PacsTarget:
        """From ``AET@host:port`` (the command line's form)."""
        match = _TARGET.match(text.strip())
        if not match:
            raise PacsError(f"PACS {text!r}: expected AET@host:port (AE title of at most 16 characters)")
        return cls.of(match["aet"], match["host"].strip("[]"), int(match["port"]), calling_ae, tls_ca)

    @classmethod
    def of(cls, ae_title: str, host: str, port: int, calling_ae: str = "CYCGUARD", tls_ca: str = "") -> PacsTarget:
        """Checked construction."""
        if not 0 < port < 65536:
            raise PacsError(f"PACS port {port}: expected AET@host:port with a port in 1..65535")
        for name, title in (("called", ae_title), ("calling", calling_ae)):
            if not 0 < len(title) <= 16:
                raise PacsError(f"{name} AE title {title!r}: 1 to 16 characters")
        if tls_ca and not Path(tls_ca).is_file():
            raise PacsError(f"TLS CA file {tls_ca} not found")
        return cls(ae_title, host, port, calling_ae, tls_ca)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls_ca else "")


class Pusher:
    """Spools and sends datasets to one PACS."""

    def __init__(self, target: PacsTarget, spool: Path, timeout: float = 10.0) -> None:
        self.target = target
        self.spool = spool
        self.timeout = timeout
        self.delivered = 0
        spool.mkdir(parents=True, exist_ok=True)

    def pending(self) -> list[Path]:
        """Spooled files not yet acknowledged by the PACS."""
        return sorted(self.spool.glob("*.dcm"))

    def push(self, ds: Dataset) -> bool:
        """Spool ``ds`` and send everything pending; whether ``ds`` was delivered now."""
        path = self._spool(ds)
        self.flush()
        return not path.exists()

    def _spool(self, ds: Dataset) -> Path:
        try:
            return save_atomically(ds, self.spool / f"{ds.SOPInstanceUID}.dcm")
        except OSError as err:
            raise OSError(f"cannot spool image {ds.SOPInstanceUID} to {self.spool}: {err.strerror or err}; it was not delivered") from err

    def flush(self) -> int:
        """Send every spooled file; returns how many the PACS acknowledged now."""
        files = self.pending()
        if not files:
            return 0
        try:  # pynetdicom leaks its socket when the connection is refused: find out first
            socket.create_connection((self.target.host, self.target.port), timeout=self.timeout).close()
        except OSError as err:
            log.warning("PACS %s unreachable (%s): %d image(s) stay spooled in %s", self.target, err, len(files), self.spool)
            return 0
        ae = AE(ae_title=self.target.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(MRImageStorage)
        tls = None
        if self.target.tls_ca:
            context = ssl.create_default_context(cafile=self.target.tls_ca)
            tls = (context, self.target.host)
        assoc = ae.associate(self.target.host, self.target.port, ae_title=self.target.ae_title, tls_args=tls)
        if not assoc.is_established:
            transport = getattr(assoc.dul, "socket", None)
            raw = getattr(transport, "socket", None)
            if transport is not None:  # pynetdicom leaves the socket open after a failed association
                transport.close()
            if raw is not None:
                raw.close()
            log.warning("PACS %s unreachable or refused the association: %d image(s) stay spooled in %s", self.target, len(files), self.spool)
            return 0
        sent = 0
        try:
            for path in files:
                status = assoc.send_c_store(dcmread(path))
                code = int(status.Status) if status and "Status" in status else None
                if code in SUCCESS_OR_WARNING:
                    path.unlink()
                    sent += 1
                else:
                    log.warning("PACS %s refused %s (status %s): kept in the spool", self.target, path.name, hex(code) if code is not None else "none")
                    if not assoc.is_established:
                        break
        finally:
            if assoc.is_established:
                assoc.release()
        self.delivered += sent
        return sent
