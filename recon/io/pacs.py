"""PACS push by DICOM C-STORE (pynetdicom), with a spool so that no image is dropped.

Every destination (called AE title, host, port, calling AE title, TLS CA) has a spool folder
of its own under the spool root (``destination_spool``, with a ``destination.json`` naming
it): an image spooled for one PACS is only ever sent to that PACS. Every image is first
written there (``<SOPInstanceUID>.dcm``, atomically), then sent; a file leaves the spool only
after the PACS acknowledged it (status 0x0000 or a warning status).

An outage (PACS unreachable, association rejected as transient, out of resources, no
answer) keeps files spooled for the next push (that run or the next one). A rejection (the
association rejected as permanent, e.g. an unknown called AE title; MR Image Storage not
accepted; a failure status of the C-STORE) is not an outage: the file moves to the
destination's ``rejected/`` folder with a ``.reason`` file beside it, out of the retry loop,
and the push reports it (:attr:`Pusher.rejections`). Resending is safe: UIDs are stable for
the same pixels (:mod:`recon.io.dicom`), so a PACS that already holds an instance keeps one
copy. Optional TLS. A spool that cannot be written (disk full) is an error: the image would
be lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from pynetdicom import AE

from recon.io.dicom import save_atomically

log = logging.getLogger(__name__)

_TARGET = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[A-Za-z0-9.\-:\[\]]+):(?P<port>\d{1,5})$")
SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}
DESTINATION_FILE = "destination.json"


def _transient(status: int) -> bool:
    """C-STORE failure statuses that may pass on a retry: out of resources (0xA7xx)."""
    return status >> 8 == 0xA7


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


def destination_spool(root: Path, target: PacsTarget) -> Path:
    """The spool folder of one destination under ``root`` (readable name, digest of every field)."""
    fields = json.dumps(asdict(target), sort_keys=True)
    readable = re.sub(r"[^A-Za-z0-9.\-]", "_", f"{target.ae_title}@{target.host}_{target.port}")
    return root / f"{readable}-{hashlib.sha256(fields.encode()).hexdigest()[:10]}"


def destinations(root: Path) -> list[tuple[PacsTarget, Path]]:
    """Every destination with a spool folder under ``root``."""
    out = []
    for folder in sorted(root.glob(f"*/{DESTINATION_FILE}")):
        fields = json.loads(folder.read_text())
        out.append((PacsTarget(**fields), folder.parent))
    return out


def rejected(spool: Path) -> list[tuple[Path, str]]:
    """Quarantined files of a destination's spool with their reasons."""
    folder = spool / "rejected"
    return [(path, path.with_suffix(".reason").read_text().strip() if path.with_suffix(".reason").exists() else "?")
            for path in sorted(folder.glob("*.dcm"))]


class Pusher:
    """Spools and sends datasets to one PACS."""

    def __init__(self, target: PacsTarget, spool_root: Path, timeout: float = 10.0) -> None:
        self.target = target
        self.spool = destination_spool(spool_root, target)
        self.timeout = timeout
        self.delivered = 0
        self.rejections: list[str] = []
        self.spool.mkdir(parents=True, exist_ok=True)
        description = self.spool / DESTINATION_FILE
        if not description.exists():
            description.write_text(json.dumps(asdict(self.target), sort_keys=True))

    def pending(self) -> list[Path]:
        """Spooled files not yet acknowledged by the PACS."""
        return sorted(self.spool.glob("*.dcm"))

    def _reject(self, path: Path, reason: str) -> None:
        folder = self.spool / "rejected"
        folder.mkdir(exist_ok=True)
        (folder / path.with_suffix(".reason").name).write_text(reason + "\n")
        path.replace(folder / path.name)
        message = f"PACS {self.target} rejected {path.name}: {reason}; quarantined in {folder} (not retried)"
        log.error("%s", message)
        self.rejections.append(message)

    def push(self, ds: Dataset) -> bool:
        """Spool ``ds`` and send everything pending; whether ``ds`` was delivered now."""
        path = self._spool(ds)
        self.flush()
        return not path.exists() and not (self.spool / "rejected" / path.name).exists()

    def _spool(self, ds: Dataset) -> Path:
        try:
            return save_atomically(ds, self.spool / f"{ds.SOPInstanceUID}.dcm")
        except OSError as err:
            raise OSError(f"cannot spool image {ds.SOPInstanceUID} to {self.spool}: {err.strerror or err}; it was not delivered") from err

    def _associate(self, ae: AE, tls: tuple[ssl.SSLContext, str] | None) -> tuple[Any, Any]:
        """An association with the PACS and, when it was not established, the A-ASSOCIATE answer
        that came (``None``: none came); the socket of a failed one closed."""
        assoc = ae.associate(self.target.host, self.target.port, ae_title=self.target.ae_title, tls_args=tls)
        if assoc.is_established:
            return assoc, None
        transport = getattr(assoc.dul, "socket", None)
        raw = getattr(transport, "socket", None)
        if transport is not None:  # pynetdicom leaves the socket open after a failed association
            transport.close()
        if raw is not None:
            raw.close()
        answer = getattr(assoc.acceptor, "primitive", None)  # set by the association before it reports the outcome
        return assoc, answer if getattr(answer, "result", None) is not None else None

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
        # the TCP connection is there (probed above): an association that ends with no answer lost
        # the race between the PACS's answer and its closing the connection; it is asked once more
        for _ in range(2):
            assoc, answer = self._associate(ae, tls)
            if assoc.is_established or answer is not None:
                break
        if not assoc.is_established:
            if assoc.is_rejected and answer is not None and answer.result == 0x01:
                reason = f"association rejected permanently ({answer.source_str}: {answer.reason_str})"
                for path in files:
                    self._reject(path, reason)
            elif answer is not None and answer.result == 0x00 and not assoc.accepted_contexts:
                for path in files:
                    self._reject(path, "the PACS accepts no MR Image Storage (presentation context refused)")
            else:
                log.warning("PACS %s unreachable or refused the association for now: %d image(s) stay spooled in %s", self.target, len(files), self.spool)
            return 0
        sent = 0
        try:
            for path in files:
                status = assoc.send_c_store(dcmread(path))
                code = int(status.Status) if status and "Status" in status else None
                if code in SUCCESS_OR_WARNING:
                    path.unlink()
                    sent += 1
                elif code is not None and not _transient(code):
                    self._reject(path, f"C-STORE failed with status {code:#06x}")
                else:
                    log.warning("PACS %s did not store %s (status %s): kept in the spool", self.target, path.name, hex(code) if code is not None else "none")
                    if not assoc.is_established:
                        break
        finally:
            if assoc.is_established:
                assoc.release()
        self.delivered += sent
        return sent
