"""ISMRMRD ``.h5`` raw data -> per-slice k-space, and images back to ``.h5``.

Reading follows what Gadgetron's standard Cartesian chain does before a reconstruction:
noise scans give the channel covariance and the data are prewhitened (NoiseAdjust),
readout oversampling is removed (RemoveROOversampling), and lines are accumulated per
slice (AcquisitionAccumulateTrigger + BucketToBuffer). Output follows :mod:`recon.types`.

Flags honoured: noise measurements feed prewhitening; parallel-calibration lines feed the
ACS block (and, by default, imaging as well); navigator, phase-correction, dummy and
feedback acquisitions are skipped and counted. Repeated lines (averages) are averaged.
Anything the reader cannot represent faithfully (non-Cartesian trajectories, 3-D
encoding, phase oversampling, partial echo, inconsistent sizes) raises :class:`MRDError`
naming the file and what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import ismrmrd
import numpy as np

from recon.physics.noise import (
    GADGETRON_RECEIVER_BANDWIDTH,
    noise_covariance,
    prewhitening_scale,
    remove_readout_oversampling,
    whitened_sigma,
    whitening_matrix,
)
from recon.types import SliceGeometry, SliceKey, SliceKSpace

log = logging.getLogger(__name__)

MIN_AUTO_ACS = 8
SKIPPED_FLAGS = {
    "navigator": ismrmrd.ACQ_IS_NAVIGATION_DATA,
    "phase correction": ismrmrd.ACQ_IS_PHASECORR_DATA,
    "dummy scan": ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
    "RT feedback": ismrmrd.ACQ_IS_RTFEEDBACK_DATA,
    "HP feedback": ismrmrd.ACQ_IS_HPFEEDBACK_DATA,
}


def flag_mask(*flags: int) -> np.uint64:
    """The bits of ISMRMRD acquisition ``flags`` (1-based) as one mask of the header's flag word."""
    mask = np.uint64(0)
    for flag in flags:
        mask |= np.uint64(1) << np.uint64(flag - 1)
    return mask


NOT_IMAGING = flag_mask(ismrmrd.ACQ_IS_NOISE_MEASUREMENT, *SKIPPED_FLAGS.values())
"""Acquisitions that carry no imaging line: noise scans and the skipped kinds."""


class MRDError(ValueError):
    """A raw file that cannot be read as Cartesian 2-D multi-coil data, with the reason."""


@dataclass(frozen=True)
class Protocol:
    """What the reconstruction needs from the ISMRMRD XML header.

    Attributes:
        encoded: encoded matrix ``(ny, nx)`` (readout oversampling included).
        recon: reconstructed matrix ``(ny, nx)``.
        recon_fov_mm: reconstructed field of view ``(x, y, z)``.
        coils: receiver channels.
        center_line: k-space line index of the centre (``kspace_encoding_step_1.center``).
        acceleration: nominal acceleration along ky (1 when not stated).
        receiver_bandwidth: relative receiver noise bandwidth (Gadgetron's 0.793 when the
            header has none); it sets the noise level of prewhitened data.
        line_limits: ``kspace_encoding_step_1`` minimum and maximum of the encoding limits
            (the whole encoded matrix when not stated).
        slices: slices the encoding limits announce (0 when not stated).
    """

    encoded: tuple[int, int]
    recon: tuple[int, int]
    recon_fov_mm: tuple[float, float, float]
    coils: int
    center_line: int
    acceleration: int
    receiver_bandwidth: float = GADGETRON_RECEIVER_BANDWIDTH
    line_limits: tuple[int, int] = (0, 0)
    slices: int = 0


@dataclass(frozen=True)
class RawScan:
    """A raw file read into per-slice k-space.

    Attributes:
        path: where it came from.
        xml: the ISMRMRD XML header, verbatim.
        protocol: the parsed essentials.
        slices: complete slices in acquisition order of their keys.
        noise_covariance: ``(C, C)`` channel covariance estimated from the noise scans, or
            ``None`` when the file has none.
        problems: what was wrong with slices left out (empty unless ``strict=False``).
        skipped: counts of acquisitions skipped on purpose, by kind.
        whitened: whether the slices were prewhitened with that covariance (their noise
            standard deviation is then 1 per sample); a file read with ``prewhiten=False``
            keeps its covariance but is not whitened.
    """

    path: Path
    xml: str
    protocol: Protocol
    slices: tuple[SliceKSpace, ...]
    noise_covariance: np.ndarray | None
    problems: tuple[str, ...] = ()
    skipped: tuple[tuple[str, int], ...] = ()
    whitened: bool = False


def parse_header(xml: str, source: str = "header") -> Protocol:
    """Parse and check the XML header; raises :class:`MRDError` naming what is unsupported."""
    try:
        header = ismrmrd.xsd.CreateFromDocument(xml)
    except Exception as err:  # xsdata raises parser-specific types
        raise MRDError(f"{source}: malformed ISMRMRD XML header: {err}") from err
    try:
        return _protocol(header, source)
    except MRDError:
        raise
    except (TypeError, ValueError, AttributeError) as err:  # xsdata leaves a value it cannot convert as text
        raise MRDError(f"{source}: XML header holds a value of the wrong type ({err})") from err


def _protocol(header: Any, source: str) -> Protocol:
    """The protocol of a parsed header (see :func:`parse_header`)."""
    if not header.encoding:
        raise MRDError(f"{source}: XML header has no <encoding>")
    enc = header.encoding[0]
    trajectory = getattr(enc.trajectory, "value", enc.trajectory)
    if str(trajectory).lower() != "cartesian":
        raise MRDError(f"{source}: trajectory {trajectory!r} is not supported (Cartesian only)")
    e, r = enc.encodedSpace.matrixSize, enc.reconSpace.matrixSize
    if (e.z or 1) > 1:
        raise MRDError(f"{source}: 3-D encoding (encodedSpace z = {e.z}) is not supported (2-D only)")
    if r.y != e.y:
        raise MRDError(f"{source}: phase oversampling (encoded y {e.y} != recon y {r.y}) is not supported")
    if r.x > e.x:
        raise MRDError(f"{source}: recon x {r.x} exceeds encoded x {e.x}")
    system = header.acquisitionSystemInformation
    coils = system.receiverChannels if system else None
    bandwidth = system.relativeReceiverNoiseBandwidth if system else None
    limits = enc.encodingLimits.kspace_encoding_step_1 if enc.encodingLimits else None
    center = limits.center if limits is not None and limits.center is not None else e.y // 2
    low = limits.minimum if limits is not None and limits.minimum is not None else 0
    high = limits.maximum if limits is not None and limits.maximum else e.y - 1
    slice_limits = enc.encodingLimits.slice if enc.encodingLimits else None
    slices = int(slice_limits.maximum) + 1 if slice_limits is not None and slice_limits.maximum is not None else 0
    accel = 1
    if enc.parallelImaging is not None and enc.parallelImaging.accelerationFactor is not None:
        accel = int(enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 or 1)
    fov = enc.reconSpace.fieldOfView_mm
    return Protocol(
        encoded=(int(e.y), int(e.x)),
        recon=(int(r.y), int(r.x)),
        recon_fov_mm=(float(fov.x), float(fov.y), float(fov.z)),
        coils=int(coils) if coils else 0,
        center_line=int(center),
        acceleration=accel,
        receiver_bandwidth=float(bandwidth) if bandwidth else GADGETRON_RECEIVER_BANDWIDTH,
        line_limits=(int(low), int(high)),
        slices=slices,
    )


@dataclass
class _Accumulator:
    sums: np.ndarray
    counts: np.ndarray
    imaging: np.ndarray
    calibration: np.ndarray
    geometry: SliceGeometry
    first_seen: int
    saw_last: bool = False
    uses_slice_flags: bool = False
    corrupt: bool = False


def _geometry(acq: ismrmrd.Acquisition, protocol: Protocol) -> SliceGeometry:
    def vec(v: Iterable[float]) -> tuple[float, float, float]:
        a, b, c = (float(t) for t in v)
        return (a, b, c)

    read, phase, normal = vec(acq.read_dir), vec(acq.phase_dir), vec(acq.slice_dir)
    if not any(read) or not any(phase):  # ismrmrd-tools 1.8 writes zero direction vectors
        read, phase, normal = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    return SliceGeometry(vec(acq.position), read, phase, normal, protocol.recon_fov_mm)


def coverage_problem(rows: np.ndarray, limits: tuple[int, int], acceleration: int, offset: int = 0) -> str | None:
    """Why a slice's acquired lines cannot be all it should have, or ``None``.

    Args:
        rows: ``(ny,)`` bool, the acquired lines on the grid.
        limits: the encoding limits' first and last line, on the grid.
        acceleration: the header's nominal acceleration.
        offset: grid row -> ``kspace_encode_step_1`` (for the message).

    An equispaced pattern (every line outside the central block one spacing from the next)
    must reach within one spacing of both encoding limits. Random and variable-density
    patterns leave the edges sparser: their acquired lines must reach within 40 % of the
    encoded lines (or twice the acceleration, if more) of both limits. Lines that stop
    further short are a cut-off acquisition.
    """
    rows = np.asarray(rows, dtype=bool)
    acquired = np.flatnonzero(rows)
    if acquired.size == 0:
        return "no lines acquired"
    low, high = limits
    block = np.flatnonzero(acs_block(rows, int(np.clip((low + high + 1) // 2, 0, rows.size - 1))))
    outer = np.setdiff1d(acquired, block)
    below, above = (outer[outer < block[0]], outer[outer > block[-1]]) if block.size else (outer, outer[:0])
    steps = set(np.diff(below).tolist()) | set(np.diff(above).tolist())
    if len(steps) == 1 and below.size + above.size >= 4:
        margin = steps.pop()
        pattern = f"an equispaced pattern of spacing {margin}"
    else:
        margin = max(2 * max(acceleration, 1), (2 * (high - low + 1)) // 5)
        pattern = f"a pattern at acceleration {acceleration}"
    if acquired[0] - low >= margin or high - acquired[-1] >= margin:
        return (
            f"lines {acquired[0] + offset}-{acquired[-1] + offset} acquired of the encoding limits "
            f"{low + offset}-{high + offset} ({pattern}): the data are truncated"
        )
    return None


def missing_slices(protocol: Protocol, present: Iterable[int]) -> list[int]:
    """Slices the header's encoding limits announce that have no data."""
    seen = set(present)
    return [n for n in range(protocol.slices) if n not in seen]


def acs_block(rows: np.ndarray, center: int) -> np.ndarray:
    """The contiguous run of ``rows`` (bool) around ``center``."""
    acs = np.zeros_like(rows)
    if not rows[center]:
        return acs
    lo = hi = center
    while lo > 0 and rows[lo - 1]:
        lo -= 1
    while hi < rows.size - 1 and rows[hi + 1]:
        hi += 1
    acs[lo : hi + 1] = True
    return acs


def read_header_text(path: str | Path, dataset: str = "dataset") -> str:
    """The ISMRMRD XML header of a raw file, verbatim (not yet parsed).

    Raises:
        MRDError: the file is missing, not readable HDF5, lacks the header or the
            acquisitions, or its header is not UTF-8 text.
    """
    path = Path(path)
    if not path.is_file():
        raise MRDError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as handle:
            if dataset not in handle:
                raise MRDError(f"{path}: no group '/{dataset}' (groups: {sorted(handle.keys())})")
            group = handle[dataset]
            if "xml" not in group:
                raise MRDError(f"{path}: no ISMRMRD XML header ('/{dataset}/xml')")
            if "data" not in group:
                raise MRDError(f"{path}: no acquisitions ('/{dataset}/data')")
            raw_xml = group["xml"][()]
            raw_xml = raw_xml[0] if isinstance(raw_xml, np.ndarray) else raw_xml
            xml = raw_xml.decode("utf-8") if isinstance(raw_xml, bytes) else str(raw_xml)
    except UnicodeDecodeError as err:
        raise MRDError(f"{path}: the XML header is not UTF-8 text (corrupt file?): {err}") from err
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:  # h5py's errors for corrupt metadata (a bad string encoding: TypeError)
        if isinstance(err, MRDError):
            raise
        raise MRDError(f"{path}: not a readable HDF5 file (truncated or corrupt): {err}") from err
    return xml


MAX_LINE_RATIO = 32
"""A header may claim at most this many encoded lines per line a slice holds (acceleration,
partial Fourier and a margin): memory follows what a file holds, not what its header says."""


VLEN_DESCRIPTOR = 16  # on disk: a 4-byte element count, then the global heap ID (8-byte address, 4-byte index)


def check_variable_lengths(data: h5py.Dataset, path: Path) -> None:
    """Refuse acquisitions whose variable-length fields (trajectory, samples) claim more bytes
    than the whole file holds, before HDF5 reads them: a corrupt length makes it allocate that
    much (gigabytes) before it fails. Read from the raw chunks of an unfiltered chunked data
    set (as ISMRMRD writes it); other layouts are read as they are."""
    if data.chunks is None or data.id.get_create_plist().get_nfilters() > 0:
        return
    ftype = data.id.get_type()
    row = ftype.get_size()
    members = [ftype.get_member_name(i).decode() for i in range(ftype.get_nmembers())]
    vlen = [(name, ftype.get_member_offset(i)) for i, name in enumerate(members) if isinstance(ftype.get_member_type(i), h5py.h5t.TypeVlenID)]
    if not vlen:
        return
    limit = path.stat().st_size
    chunks: list[Any] = []
    if hasattr(data.id, "chunk_iter"):  # one pass over the chunk index (HDF5 1.14 and later)
        data.id.chunk_iter(chunks.append)
    else:
        chunks = [data.id.get_chunk_info(i) for i in range(data.id.get_num_chunks())]
    with path.open("rb") as handle:
        for chunk in chunks:
            if chunk.byte_offset is None or chunk.byte_offset + chunk.size > limit:
                raise MRDError(f"{path}: acquisitions {chunk.chunk_offset[0]}... lie past the end of the file (truncated or corrupt)")
            handle.seek(chunk.byte_offset)
            raw = handle.read(chunk.size)
            for index in range(len(raw) // row):
                for name, offset in vlen:
                    at = index * row + offset
                    count = int.from_bytes(raw[at : at + 4], "little")
                    if count * 4 > limit:  # float32 elements
                        raise MRDError(
                            f"{path}: acquisition {chunk.chunk_offset[0] + index} claims {count} {name} values, more than the "
                            f"{limit}-byte file holds (corrupt data)"
                        )


def survey(path: str | Path, protocol: Protocol, dataset: str = "dataset") -> list[str]:
    """Check a raw file's acquisition headers against its XML header before any k-space is read.

    Raises :class:`MRDError` for what makes the whole file unreadable: acquisitions whose
    sizes contradict the header, or a header whose matrix would need far more memory than
    the file holds (a claim of 8192 lines for a file of 64). Returns the problems of single
    slices (too few calibration lines at the centre) for the caller to weigh.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            check_variable_lengths(handle[f"{dataset}/data"], path)
            heads = handle[f"{dataset}/data"].fields("head")[()]
    except (OSError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, MRDError):
            raise
        raise MRDError(f"{path}: cannot read acquisition headers (truncated or corrupt data?): {err}") from err
    keep = (heads["flags"].astype(np.uint64) & NOT_IMAGING) == 0
    imaging = heads[keep]
    if imaging.size == 0:
        raise MRDError(f"{path}: no imaging acquisitions (the data set holds {heads.size} acquisitions, none of them imaging data)")
    ny, nx = protocol.encoded
    numbers = np.flatnonzero(keep)
    wrong = np.flatnonzero(imaging["number_of_samples"] != nx)
    if wrong.size:
        raise MRDError(
            f"{path}: acquisition {numbers[wrong[0]]} has {imaging['number_of_samples'][wrong[0]]} readout samples, "
            f"the header's encoded x is {nx} (partial echo is not supported)"
        )
    wrong = np.flatnonzero(imaging["active_channels"] != protocol.coils) if protocol.coils else np.array([], int)
    if wrong.size:
        raise MRDError(f"{path}: acquisition {numbers[wrong[0]]} has {imaging['active_channels'][wrong[0]]} channels, the header says {protocol.coils}")
    problems = []
    calibration = flag_mask(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    keys = imaging["idx"]
    for number in np.unique(keys["slice"]):
        mine = imaging[keys["slice"] == number]
        lines = np.unique(mine["idx"]["kspace_encode_step_1"])
        if ny > MAX_LINE_RATIO * lines.size:
            raise MRDError(
                f"{path}: the header's encoded matrix has {ny} lines but slice {number} holds {lines.size}: "
                f"refusing a claim over {MAX_LINE_RATIO} times what the file holds (corrupt or hostile header?)"
            )
        rows = np.zeros(ny, bool)
        flagged = mine[(mine["flags"].astype(np.uint64) & calibration) != 0]
        chosen = np.unique(flagged["idx"]["kspace_encode_step_1"]) if flagged.size else lines
        rows[np.clip(chosen.astype(np.int64) - protocol.center_line + ny // 2, 0, ny - 1)] = True
        acs = int(acs_block(rows, ny // 2).sum())
        if acs < MIN_AUTO_ACS:
            problems.append(f"{path}: slice {number} has {acs} contiguous calibration lines at the centre, {MIN_AUTO_ACS} needed")
    return problems


def read_raw(
    path: str | Path,
    dataset: str = "dataset",
    prewhiten: bool = True,
    calibration_for_imaging: bool = True,
    strict: bool = True,
) -> RawScan:
    """Read an ISMRMRD raw file into per-slice k-space.

    Args:
        path: the ``.h5`` file.
        dataset: HDF5 group holding ``xml`` and ``data``.
        prewhiten: apply the noise-scan whitening (when the file has noise scans).
        calibration_for_imaging: use calibration-only lines as imaging data as well (same
            contrast assumed, as for embedded/interleaved ACS).
        strict: raise on an incomplete slice; otherwise leave it out and list it in
            ``problems``.

    Raises:
        MRDError: the file is missing, not HDF5, truncated, lacks the header or data, or
            holds data this reader cannot represent.
    """
    path = Path(path)
    xml = read_header_text(path, dataset)
    protocol = parse_header(xml, str(path))
    survey(path, protocol, dataset)  # before any k-space buffer is sized by the header
    try:
        with ismrmrd.File(str(path), "r") as handle:
            acquisitions = handle[dataset].acquisitions
            return _assemble(path, xml, protocol, iter(acquisitions), prewhiten, calibration_for_imaging, strict)
    except MRDError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        raise MRDError(f"{path}: cannot read acquisitions (truncated or corrupt data?): {err}") from err


def _assemble(
    path: Path,
    xml: str,
    protocol: Protocol,
    acquisitions: Iterable[ismrmrd.Acquisition],
    prewhiten: bool,
    calibration_for_imaging: bool,
    strict: bool,
) -> RawScan:
    ny, nx = protocol.encoded
    noise: list[np.ndarray] = []
    noise_dwell: float | None = None
    data_dwell: float | None = None
    coils = protocol.coils
    slices: dict[SliceKey, _Accumulator] = {}
    skipped: dict[str, int] = {}
    for number, acq in enumerate(acquisitions):
        where = f"{path}: acquisition {number}"
        data = acq.data
        if coils == 0:
            coils = data.shape[0]
        if data.shape[0] != coils:
            raise MRDError(f"{where} has {data.shape[0]} channels, the header says {coils}")
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            noise.append(np.asarray(data, dtype=np.complex64))
            noise_dwell = noise_dwell or float(acq.sample_time_us) or None  # the first, as Gadgetron
            continue
        data_dwell = data_dwell or float(acq.sample_time_us) or None  # the first non-noise one, as Gadgetron
        kind = next((k for k, flag in SKIPPED_FLAGS.items() if acq.is_flag_set(flag)), None)
        if kind is not None:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        if acq.trajectory_dimensions:
            raise MRDError(f"{where} carries a {acq.trajectory_dimensions}-D trajectory (Cartesian only)")
        if data.shape[1] != nx:
            raise MRDError(
                f"{where} has {data.shape[1]} readout samples, the header's encoded x is {nx} "
                "(partial echo is not supported)"
            )
        if acq.idx.kspace_encode_step_2 != 0:
            raise MRDError(f"{where} has kspace_encode_step_2 = {acq.idx.kspace_encode_step_2} (2-D only)")
        row = int(acq.idx.kspace_encode_step_1) - protocol.center_line + ny // 2
        if not 0 <= row < ny:
            raise MRDError(
                f"{where}: line {acq.idx.kspace_encode_step_1} is outside the {ny}-line grid "
                f"(centre {protocol.center_line})"
            )
        idx = acq.idx
        key = SliceKey(int(idx.slice), int(idx.contrast), int(idx.repetition), int(idx.set), int(idx.phase))
        if key not in slices:
            slices[key] = _Accumulator(
                sums=np.zeros((coils, ny, nx), np.complex64),
                counts=np.zeros(ny, np.int32),
                imaging=np.zeros(ny, bool),
                calibration=np.zeros(ny, bool),
                geometry=_geometry(acq, protocol),
                first_seen=number,
            )
        acc = slices[key]
        if not np.isfinite(data).all():
            acc.corrupt = True  # reported with the slice below; never averaged into good lines
            continue
        acc.sums[:, row] += data
        acc.counts[row] += 1
        pure_calibration = acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        both = acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        if pure_calibration or both:
            acc.calibration[row] = True
        if not pure_calibration or calibration_for_imaging:
            acc.imaging[row] = True
        if acq.is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE) or acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            acc.uses_slice_flags = True
        if acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            acc.saw_last = True
    if not slices:
        raise MRDError(f"{path}: no imaging acquisitions")
    whitening, covariance = None, None
    if noise:
        samples = np.concatenate(noise, axis=1)
        with np.errstate(over="ignore", invalid="ignore"):
            covariance = noise_covariance(samples) if np.isfinite(samples).all() else np.full((coils, coils), np.nan)
        if not np.isfinite(covariance).all():
            raise MRDError(f"{path}: the noise scans hold non-finite or absurdly large samples (corrupt data)")
        if prewhiten:
            # Gadgetron's NoiseAdjust, then its noise level divided out (k-space in noise units)
            scale = prewhitening_scale(data_dwell or 0.0, noise_dwell or 0.0, protocol.receiver_bandwidth)
            try:
                whitening = whitening_matrix(covariance, scale / whitened_sigma(data_dwell or 0.0, protocol.receiver_bandwidth))
            except ValueError as err:
                raise MRDError(f"{path}: {err} (corrupt noise scans?)") from err
    out: list[SliceKSpace] = []
    problems: list[str] = []
    for key, acc in sorted(slices.items(), key=lambda item: item[1].first_seen):
        name = f"{path}: slice {key.slice} (contrast {key.contrast}, repetition {key.repetition})"
        if acc.corrupt:
            problems.append(f"{name} holds non-finite samples (NaN or infinity): corrupt data")
            continue
        if acc.uses_slice_flags and not acc.saw_last:
            problems.append(f"{name} has no ACQ_LAST_IN_SLICE acquisition: the data are truncated")
            continue
        offset = protocol.center_line - ny // 2
        coverage = coverage_problem(acc.counts > 0, (protocol.line_limits[0] - offset, protocol.line_limits[1] - offset), protocol.acceleration, offset)
        if coverage is not None:
            problems.append(f"{name}: {coverage}")
            continue
        acs = acs_block(acc.calibration, ny // 2) if acc.calibration.any() else acs_block(acc.counts > 0, ny // 2)
        if acs.sum() < MIN_AUTO_ACS:
            problems.append(f"{name} has {int(acs.sum())} contiguous calibration lines at the centre, {MIN_AUTO_ACS} needed")
            continue
        kspace = acc.sums / np.maximum(acc.counts, 1)[None, :, None]
        with np.errstate(over="ignore", invalid="ignore"):
            if whitening is not None:
                kspace = np.einsum("ij,jyx->iyx", whitening, kspace)
            kspace = remove_readout_oversampling(kspace, protocol.recon[1]) if np.isfinite(kspace).all() else kspace
        if not np.isfinite(kspace).all():
            problems.append(f"{name} holds non-finite or absurdly large samples: corrupt data")
            continue
        out.append(SliceKSpace(kspace, acc.imaging, acs, key, acc.geometry))
    for number in missing_slices(protocol, (key.slice for key in slices)):
        problems.append(f"{path}: slice {number} has no acquisitions, though the header's encoding limits give {protocol.slices} slices (truncated file?)")
    if problems and strict:
        raise MRDError("; ".join(problems))
    for problem in problems:
        log.warning("%s (left out)", problem)
    for kind, n in skipped.items():
        log.info("%s: skipped %d %s acquisitions", path, n, kind)
    return RawScan(path, xml, protocol, tuple(out), covariance, tuple(problems), tuple(sorted(skipped.items())), whitened=whitening is not None)
