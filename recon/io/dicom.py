"""ISMRMRD images -> DICOM MR Image Storage objects (pydicom), with verdict provenance.

* Patient, study and series from the ISMRMRD XML header; geometry from the image header
  (ImagePositionPatient is the centre of the first pixel, ``position`` minus half the field
  of view along the read and phase directions; ISMRMRD and DICOM share the LPS patient
  system); magnitude pixels as uint16 with RescaleSlope (``max / 65535``); window from the
  pixel percentiles.
* UIDs: ``2.25.<uuid>`` (ISO/IEC 9834-8: UUID-derived UIDs need no registered root), derived
  by uuid5 from the study, series, slice counters, model, verdict and a digest of the pixels.
  The same image exported twice gets the same SOPInstanceUID, so a PACS stores it once; an
  image whose pixels differ (a reconstruction rewritten another way) gets a new one.
* Each verdict but ``clean`` has its own series, its description saying what the images are:
  ``mitigated`` (series number + 1000, ``DERIVED\\SECONDARY``, rewritten, with the method in
  DerivationDescription), ``flagged`` (+ 2000: failed the check, not rewritten) and
  ``unverified`` (+ 3000: not checked); a radiologist browsing series sees which is which.
  Every image's ImageComments states verdict, score, threshold and model.
* Conformance (``dciodvfy`` of dicom3tools, in the tests): Type 2 attributes are present,
  empty when the header does not know them (StudyDate and StudyTime too: never the time of
  the export); a header without a patient ID leaves PatientID empty, with a warning.
* File names come from UIDs only, never from free-text header fields.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import ismrmrd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, MRImageStorage

from recon.verdict import METHOD_KEY, VERDICT_KEY

log = logging.getLogger(__name__)
NAMESPACE = uuid.UUID("6f0b1c7e-3c55-4d0e-9a43-637963677561")  # CycGuard's uuid5 namespace
MITIGATED_SERIES_OFFSET = 1000
SERIES = {  # verdict -> (series number offset, description suffix, ImageType)
    "clean": (0, "CycGuard", ["ORIGINAL", "PRIMARY", "OTHER", "CYCGUARD"]),
    "mitigated": (MITIGATED_SERIES_OFFSET, "CycGuard MITIGATED (rewritten)", ["DERIVED", "SECONDARY", "OTHER", "CYCGUARD", "MITIGATED"]),
    "flagged": (2000, "CycGuard FLAGGED (failed check, not rewritten)", ["ORIGINAL", "PRIMARY", "OTHER", "CYCGUARD", "FLAGGED"]),
    "unverified": (3000, "CycGuard UNVERIFIED (not checked)", ["ORIGINAL", "PRIMARY", "OTHER", "CYCGUARD", "UNVERIFIED"]),
}
METHODS = {
    "correct": "data corrected until the network's image stopped moving, then reconstructed with a heavier prior",
    "prior": "reconstructed again with the network's prior weighted more",
    "cyclic": "cyclic mitigation (the paper's)",
}


def uid(*parts: object) -> str:
    """A stable DICOM UID under ``2.25`` from the given parts."""
    return f"2.25.{uuid.uuid5(NAMESPACE, '|'.join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class HeaderInfo:
    """What DICOM needs from the ISMRMRD XML header."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_uid: str
    study_id: str
    study_date: str
    study_time: str
    accession: str
    study_description: str
    series_description: str
    protocol: str
    manufacturer: str
    model: str
    institution: str
    station: str
    field_strength: float | None
    tr_ms: float | None
    te_ms: float | None
    flip_deg: float | None
    frequency_hz: float | None
    patient_position: str


def _first(values: object) -> float | None:
    if values is None:
        return None
    if isinstance(values, list):
        return float(values[0]) if values else None
    return float(values)  # type: ignore[arg-type]


def header_info(xml: str) -> HeaderInfo:
    """Parse the ISMRMRD XML header for DICOM (absent fields become empty)."""
    head = ismrmrd.xsd.CreateFromDocument(xml)
    subject, study, measurement = head.subjectInformation, head.studyInformation, head.measurementInformation
    system, seq = head.acquisitionSystemInformation, head.sequenceParameters
    digest = hashlib.sha256(xml.encode("utf-8")).hexdigest()

    def text(obj: object, name: str) -> str:
        value = getattr(obj, name, None) if obj is not None else None
        return "" if value is None else str(getattr(value, "value", value))

    def date(obj: object, name: str) -> str:
        return text(obj, name).replace("-", "")[:8]

    def time(obj: object, name: str) -> str:
        return text(obj, name).replace(":", "").split(".")[0][:6]

    if not text(subject, "patientID"):
        log.warning("the ISMRMRD header has no patientID: DICOM PatientID is left empty (the PACS may file the images as unknown)")
    return HeaderInfo(
        patient_name=text(subject, "patientName"),
        patient_id=text(subject, "patientID"),
        birth_date=date(subject, "patientBirthdate"),
        sex={"M": "M", "F": "F", "O": "O"}.get(text(subject, "patientGender"), ""),
        study_uid=text(study, "studyInstanceUID") or uid("study", digest),
        study_id=text(study, "studyID")[:16],
        study_date=date(study, "studyDate"),
        study_time=time(study, "studyTime"),
        accession=text(study, "accessionNumber")[:16],
        study_description=text(study, "studyDescription")[:64],
        series_description=(text(measurement, "seriesDescription") or text(measurement, "protocolName"))[:64],
        protocol=text(measurement, "protocolName")[:64],
        manufacturer=text(system, "systemVendor")[:64],
        model=text(system, "systemModel")[:64],
        institution=text(system, "institutionName")[:64],
        station=text(system, "stationName")[:16],
        field_strength=_first(getattr(system, "systemFieldStrength_T", None) if system else None),
        tr_ms=_first(getattr(seq, "TR", None) if seq else None),
        te_ms=_first(getattr(seq, "TE", None) if seq else None),
        flip_deg=_first(getattr(seq, "flipAngle_deg", None) if seq else None),
        frequency_hz=_first(head.experimentalConditions.H1resonanceFrequency_Hz if head.experimentalConditions else None),
        patient_position=text(measurement, "patientPosition")[:16],
    )


def _meta(image: ismrmrd.Image) -> dict[str, str]:
    text = image.attribute_string
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    meta = ismrmrd.Meta.deserialize(text) if text else ismrmrd.Meta()
    out = {}
    for key in meta.keys():
        value = meta[key]
        out[key] = str(value[0]) if isinstance(value, list) and len(value) == 1 else (",".join(map(str, value)) if isinstance(value, list) else str(value))
    return out


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6g}"


def image_comment(meta: dict[str, str]) -> str:
    """The ImageComments line: verdict, score, threshold, model."""
    verdict = meta.get(VERDICT_KEY, "unverified")
    parts = [f"CycGuard {verdict}"]
    if "CycGuard.Score" in meta:
        parts.append(f"score {meta['CycGuard.Score']} threshold {meta.get('CycGuard.Threshold', '?')}")
    if "CycGuard.PValue" in meta:
        parts.append(f"p {meta['CycGuard.PValue']}")
    parts.append(f"model {meta.get('CycGuard.Model', 'unknown')}")
    return "; ".join(parts)[:10240]


def to_dicom(image: ismrmrd.Image, info: HeaderInfo) -> Dataset:
    """One MR Image Storage dataset for a single-channel 2-D ISMRMRD image."""
    data = np.asarray(image.data)
    if data.ndim != 4 or data.shape[0] != 1 or data.shape[1] != 1:
        raise ValueError(f"DICOM export takes single-channel 2-D images [1, 1, y, x], got {data.shape}")
    magnitude = np.abs(data[0, 0]).astype(np.float64)
    if not np.isfinite(magnitude).all():
        raise ValueError(f"image {image.image_index} holds non-finite pixels: not exported")
    meta = _meta(image)
    verdict = meta.get(VERDICT_KEY, "unverified")
    peak = float(magnitude.max())
    slope = peak / 65535.0 if peak > 0 else 1.0
    pixels = np.round(magnitude / slope).astype(np.uint16)
    ny, nx = pixels.shape
    fov = [float(v) for v in image.field_of_view]
    dx, dy = fov[0] / nx, fov[1] / ny
    read, phase = np.array(image.read_dir, float), np.array(image.phase_dir, float)
    position = np.array(image.position, float)
    corner = position - (nx / 2) * dx * read - (ny / 2) * dy * phase
    offset, suffix, image_type = SERIES.get(verdict, SERIES["unverified"])
    series_number = int(image.image_series_index) + offset
    model = meta.get("CycGuard.Model", "unknown")
    series_uid = uid("series", info.study_uid, series_number, model)
    slice_key = (image.slice, image.contrast, image.repetition, image.set, image.phase, image.average)
    content = hashlib.sha256(pixels.tobytes() + _ds(slope).encode()).hexdigest()[:32]
    sop_uid = uid("image", series_uid, slice_key, image.image_index, verdict, content)

    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MR"
    ds.ImageType = image_type
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = info.patient_name, info.patient_id, info.birth_date, info.sex
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = info.study_uid, info.study_id, info.accession
    ds.StudyDate, ds.StudyTime, ds.StudyDescription = info.study_date, info.study_time, info.study_description
    ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, series_number
    description = info.series_description[: 63 - len(suffix)]  # the verdict's words are never cut
    ds.SeriesDescription = f"{description} {suffix}".strip()
    ds.ReferringPhysicianName = ""
    ds.Laterality = ""
    ds.PositionReferenceIndicator = ""
    ds.EchoTrainLength = 1
    ds.ProtocolName = info.protocol
    ds.FrameOfReferenceUID = uid("frame", info.study_uid)
    ds.Manufacturer, ds.ManufacturerModelName = info.manufacturer, info.model
    ds.InstitutionName, ds.StationName = info.institution, info.station
    if info.field_strength is not None:
        ds.MagneticFieldStrength = _ds(info.field_strength)
    if info.tr_ms is not None:
        ds.RepetitionTime = _ds(info.tr_ms)
    if info.te_ms is not None:
        ds.EchoTime = _ds(info.te_ms)
    if info.flip_deg is not None:
        ds.FlipAngle = _ds(info.flip_deg)
    if info.frequency_hz is not None:
        ds.ImagingFrequency = _ds(info.frequency_hz / 1e6)
    if info.patient_position:
        ds.PatientPosition = info.patient_position
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "2D"
    ds.InstanceNumber = int(image.image_index)
    ds.ImagePositionPatient = [_ds(v) for v in corner]
    ds.ImageOrientationPatient = [_ds(v) for v in (*read, *phase)]
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.SliceThickness = _ds(fov[2])
    ds.SliceLocation = _ds(float(np.dot(position, np.cross(read, phase))))
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", _ds(slope), "US"
    low, high = np.percentile(pixels, [1, 99.5]) * slope
    ds.WindowCenter, ds.WindowWidth = _ds((low + high) / 2), _ds(max(high - low, slope))
    ds.ImageComments = image_comment(meta)
    if verdict == "mitigated":
        method = meta.get(METHOD_KEY, "")
        how = METHODS.get(method, f"method {method or 'not recorded'}")
        ds.DerivationDescription = (f"Rewritten by CycGuard ({how}) after failing the cyclic consistency check: " + meta.get("ImageComment", ""))[:1024]
    ds.PixelData = pixels.tobytes()
    now = datetime.now()
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def write_dicom(ds: Dataset, folder: Path) -> Path:
    """Save under ``folder/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (names from UIDs only)."""
    target = folder / str(ds.SeriesInstanceUID)
    target.mkdir(parents=True, exist_ok=True)
    return save_atomically(ds, target / f"{ds.SOPInstanceUID}.dcm")


def save_atomically(ds: Dataset, path: Path) -> Path:
    """Save ``ds`` as ``path`` through a ``.part`` file renamed once complete: a failed write
    (a full disk) leaves no partial file and raises ``OSError`` with the system's reason."""
    partial = path.with_suffix(".part")
    try:
        ds.save_as(partial, enforce_file_format=True)
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        root: BaseException = err
        while root.__cause__ is not None:  # pydicom re-raises with the tag and a traceback in the text
            root = root.__cause__
        reason = root.strerror if isinstance(root, OSError) and root.strerror else str(err).splitlines()[0]
        number = getattr(root, "errno", None)
        message = f"cannot write {path.name}: {reason}"
        raise (OSError(number, message) if number else OSError(message)) from err
    return path


def geometry_of(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centre position, read_dir, phase_dir)`` back from a dataset (the inverse of :func:`to_dicom`)."""
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    read, phase = orientation[:3], orientation[3:]
    dy, dx = (float(v) for v in ds.PixelSpacing)
    corner = np.array([float(v) for v in ds.ImagePositionPatient])
    centre = corner + (int(ds.Columns) / 2) * dx * read + (int(ds.Rows) / 2) * dy * phase
    return centre, read, phase
