"""Writing ISMRMRD ``.h5``: realistic raw files (full header, noise scans, flagged ACS,
only acquired lines) and reconstructed images with their meta.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from recon.types import ReconImage, SliceGeometry

TICK_MS = 2.5  # ISMRMRD/Siemens time-stamp tick


@dataclass(frozen=True)
class ScanDescription:
    """What a simulated scan looks like to a scanner's raw-data writer.

    Attributes:
        matrix: reconstructed matrix ``(ny, nx)``.
        readout_oversampling: encoded readout samples per reconstructed pixel.
        fov_mm: reconstructed field of view ``(x, y)`` in mm.
        slice_thickness_mm: slice thickness.
        coils: receiver channels.
        acceleration: nominal acceleration along ky.
        tr_ms: repetition time (one line per TR), for time stamps.
        sample_time_us: readout dwell time per (oversampled) sample, noise scans included.
        receiver_bandwidth: the relative receiver noise bandwidth the header states.
        patient_id, patient_name, study_description, protocol_name: header text.
        measurement_id: the header's ``measurementID`` (Gadgetron's NoiseAdjust stores the
            noise covariance under it).
    """

    matrix: tuple[int, int] = (128, 128)
    readout_oversampling: int = 2
    fov_mm: tuple[float, float] = (240.0, 240.0)
    slice_thickness_mm: float = 5.0
    coils: int = 8
    acceleration: int = 4
    tr_ms: float = 10.0
    sample_time_us: float = 5.0
    receiver_bandwidth: float = 0.793
    patient_id: str = "CYCGUARD-DEMO-001"
    patient_name: str = "Demo^Phantom"
    study_description: str = "CycGuard demo (simulated from MNI152)"
    protocol_name: str = "cycguard_demo_t1"
    measurement_id: str = "CYCGUARD_SIM_00001"


def build_header(desc: ScanDescription, slices: int) -> str:
    """The ISMRMRD XML header for a Cartesian 2-D multi-slice scan.

    It carries no ``<version>``: Gadgetron takes a header without one, or with exactly its
    ISMRMRD library's schema version, and rejects every other.
    """
    ny, nx = desc.matrix
    fx, fy = desc.fov_mm
    enc = xsd.encodingType(
        encodedSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=nx * desc.readout_oversampling, y=ny, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fx * desc.readout_oversampling, y=fy, z=desc.slice_thickness_mm),
        ),
        reconSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=nx, y=ny, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fx, y=fy, z=desc.slice_thickness_mm),
        ),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_0=xsd.limitType(minimum=0, maximum=nx * desc.readout_oversampling - 1, center=nx * desc.readout_oversampling // 2),
            kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=ny - 1, center=ny // 2),
            kspace_encoding_step_2=xsd.limitType(minimum=0, maximum=0, center=0),
            slice=xsd.limitType(minimum=0, maximum=slices - 1, center=0),
            repetition=xsd.limitType(minimum=0, maximum=0, center=0),
            contrast=xsd.limitType(minimum=0, maximum=0, center=0),
        ),
        trajectory=xsd.trajectoryType.CARTESIAN,
        parallelImaging=xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=desc.acceleration, kspace_encoding_step_2=1),
            calibrationMode=xsd.calibrationModeType.EMBEDDED,
        ),
    )
    header = xsd.ismrmrdHeader(
        subjectInformation=xsd.subjectInformationType(patientName=desc.patient_name, patientID=desc.patient_id),
        studyInformation=xsd.studyInformationType(studyDescription=desc.study_description),
        measurementInformation=xsd.measurementInformationType(
            measurementID=desc.measurement_id,
            protocolName=desc.protocol_name,
            patientPosition=xsd.patientPositionType.HFS,
            seriesDescription=desc.protocol_name,
        ),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="CycGuard simulator",
            systemFieldStrength_T=3.0,
            receiverChannels=desc.coils,
            relativeReceiverNoiseBandwidth=desc.receiver_bandwidth,
        ),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=127_700_000),
        encoding=[enc],
        sequenceParameters=xsd.sequenceParametersType(TR=[desc.tr_ms], TE=[4.0], flipAngle_deg=[15.0]),
    )
    return header.toXML("utf-8")


def _set_geometry(acq: ismrmrd.Acquisition, geometry: SliceGeometry) -> None:
    acq.position[:] = geometry.position
    acq.read_dir[:] = geometry.read_dir
    acq.phase_dir[:] = geometry.phase_dir
    acq.slice_dir[:] = geometry.slice_dir


def write_raw(
    path: str | Path,
    desc: ScanDescription,
    kspaces: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    acs: np.ndarray,
    geometries: Sequence[SliceGeometry],
    noise: np.ndarray | None,
) -> Path:
    """Write a raw file holding only the acquired lines.

    Args:
        path: output ``.h5`` (overwritten).
        desc: scan description for the header.
        kspaces: per slice, ``(C, ny, nx * oversampling)`` complex k-space on the full grid.
        masks: per slice, ``(ny,)`` bool lines to store.
        acs: ``(ny,)`` bool calibration block (flagged ``PARALLEL_CALIBRATION_AND_IMAGING``).
        geometries: per slice position and orientation.
        noise: ``(C, N)`` noise-scan samples (written as ``N // samples`` acquisitions) or ``None``.
    """
    path = Path(path)
    path.unlink(missing_ok=True)
    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    ds.write_xml_header(build_header(desc, len(kspaces)))
    samples = desc.matrix[1] * desc.readout_oversampling
    tick = 0.0
    if noise is not None:
        for start in range(0, noise.shape[1] - samples + 1, samples):
            acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(noise[:, start : start + samples], dtype=np.complex64))
            acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            acq.sample_time_us = desc.sample_time_us
            acq.acquisition_time_stamp = int(tick)
            ds.append_acquisition(acq)
            tick += desc.tr_ms / TICK_MS
    scan_counter = 0
    for index, (kspace, mask, geometry) in enumerate(zip(kspaces, masks, geometries, strict=True)):
        lines = np.flatnonzero(mask | acs)
        for n, line in enumerate(lines):
            acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(kspace[:, line, :], dtype=np.complex64))
            acq.idx.kspace_encode_step_1 = int(line)
            acq.idx.slice = index
            acq.center_sample = samples // 2
            acq.sample_time_us = desc.sample_time_us
            acq.scan_counter = scan_counter
            acq.acquisition_time_stamp = int(tick)
            _set_geometry(acq, geometry)
            if n == 0:
                acq.set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
            if n == len(lines) - 1:
                acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            if index == len(kspaces) - 1 and n == len(lines) - 1:
                acq.set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
            if acs[line]:
                acq.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
            ds.append_acquisition(acq)
            scan_counter += 1
            tick += desc.tr_ms / TICK_MS
    ds.close()
    return path


def to_ismrmrd_image(item: ReconImage, index: int, series: int, magnitude: bool = False) -> ismrmrd.Image:
    """An ISMRMRD image ``[1, 1, y, x]`` with the geometry, counters and meta of ``item``:
    complex64 (``IMTYPE_COMPLEX``) or float32 magnitude (``IMTYPE_MAGNITUDE``)."""
    data = np.abs(item.image).astype(np.float32) if magnitude else np.ascontiguousarray(item.image, dtype=np.complex64)
    image = ismrmrd.Image.from_array(data[None, None], transpose=False)  # (cha, z, y, x)
    image.image_type = ismrmrd.IMTYPE_MAGNITUDE if magnitude else ismrmrd.IMTYPE_COMPLEX
    image.image_index = index
    image.image_series_index = series
    key = item.key
    image.slice, image.contrast, image.repetition, image.set, image.phase = key.slice, key.contrast, key.repetition, key.set, key.phase
    image.field_of_view[:] = item.geometry.fov_mm
    image.position[:] = item.geometry.position
    image.read_dir[:] = item.geometry.read_dir
    image.phase_dir[:] = item.geometry.phase_dir
    image.slice_dir[:] = item.geometry.slice_dir
    meta = ismrmrd.Meta()
    for name, value in item.meta:
        meta[name] = list(value) if isinstance(value, tuple) else value
    image.attribute_string = meta.serialize()
    return image


def write_images(
    path: str | Path,
    images: Sequence[ReconImage],
    group: str = "images",
    xml: str | None = None,
    series_index: int = 1,
    magnitude: bool = True,
) -> Path:
    """Append reconstructed images to an ISMRMRD file as ``gadgetron_ismrmrd_client`` does.

    Images go to ``/<group>/image_<series_index>`` (header, attributes with the meta,
    data); the XML header is stored beside them when given. Magnitude images are float32
    (``IMTYPE_MAGNITUDE``); otherwise complex64 (``IMTYPE_COMPLEX``).
    """
    path = Path(path)
    ds = ismrmrd.Dataset(str(path), group, create_if_needed=True)
    if xml is not None:
        ds.write_xml_header(xml)
    for number, item in enumerate(images):
        image = to_ismrmrd_image(item, number + 1, series_index, magnitude)
        ds.append_image(f"image_{series_index}", image)
    ds.close()
    return path


def read_images(path: str | Path, group: str = "images", series_index: int = 1) -> list[tuple[np.ndarray, dict[str, str]]]:
    """Read back images written by :func:`write_images`: ``(y, x)`` arrays and meta dicts.

    Reads with h5py in read-only mode (``ismrmrd.Dataset`` opens files for writing, and
    ``ismrmrd.File`` 1.15 cannot decode complex images).
    """
    name = f"{group}/image_{series_index}"
    with h5py.File(path, "r") as handle:
        if name not in handle:
            raise ValueError(f"{path}: no image series '/{name}'")
        data = handle[name]["data"][()]
        attributes = handle[name]["attributes"][()] if "attributes" in handle[name] else [b""] * len(data)
    if data.dtype.names:
        data = data["real"] + 1j * data["imag"]
    out = []
    for array, attribute in zip(data, attributes, strict=True):
        text = attribute.decode("utf-8") if isinstance(attribute, bytes) else str(attribute)
        meta = ismrmrd.Meta.deserialize(text) if text else ismrmrd.Meta()
        out.append((np.asarray(array)[0, 0], {k: str(meta[k]) for k in meta.keys()}))
    return out


def check_output(output: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an output path that would write into the user's data (``ValueError`` naming why).

    An output that is one of the inputs (the same file, also through a link or another path)
    or an existing file that holds raw data (an ISMRMRD group with acquisitions) is refused:
    image writers replace or add to their output, and raw data are never to be touched. An
    existing output must be an HDF5 file.
    """
    output = Path(output)
    for source in map(Path, inputs):
        same = output.resolve() == source.resolve()
        if not same and output.exists() and source.exists():
            same = os.path.samefile(output, source)
        if same:
            raise ValueError(f"output {output} is the input {source}: CycGuard never writes into its input; choose another output file")
    if not output.exists():
        return
    try:
        with h5py.File(output, "r") as handle:
            raw = [
                name for name, group in handle.items()
                if isinstance(group, h5py.Group) and isinstance(group.get("data"), h5py.Dataset) and "head" in (group["data"].dtype.names or ())
            ]
    except OSError as err:
        raise ValueError(f"output {output} exists and is not an HDF5 file ({err}); choose another output file") from err
    if raw:
        raise ValueError(f"output {output} holds raw data (/{raw[0]}/data); CycGuard writes images only into files without raw data")
