"""ISMRMRD / Gadgetron messages <-> recon types, and the contract between our gadgets.

What flows between CycGuard gadgets (all Gadgetron-native messages, so that any stage can
run as its own ``<external>`` node, or several in one process):

* ``ReconData`` (1023): the k-space buffer from BucketToBuffer, forwarded unchanged so that
  detection and mitigation use exactly the data the network saw.
* ``ImageArray`` (1024) with meta ``GADGETRON_DataRole = CycGuard.CoilMaps``: the coil maps
  the recon estimated, data ``[x, y, 1, coil, 1, 1, 1]``; downstream never re-estimates them.
* ``Image`` (1022), complex64, ``[coil=1, z=1, y, x]``: the reconstruction with its verdict
  meta (``CycGuard.Verdict`` etc.).
* ``Image`` with meta ``GADGETRON_DataRole = CycGuard.Received`` (only when the mitigate
  stage's ``send_received`` is on): a rewritten slice's image as received, before the rewrite,
  in series ``image_series_index + RECEIVED_SERIES_OFFSET``, right after the rewritten image.
  It reaches the client for before/after reports; the export stage never writes it to DICOM
  or a PACS.

Per slice they arrive in that order (buffer, maps, image), matched by the ISMRMRD counters
``(slice, contrast, repetition, set, phase)``. A stage forwards buffer and maps only when
its ``forward_internal`` property is true; the export gadget drops them, so no internal
message leaves the chain.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import ismrmrd
import numpy as np
from gadgetron.types.image_array import ImageArray
from gadgetron.types.recon_data import ReconData

from recon.io.mrd import MIN_AUTO_ACS, acs_block, coverage_problem
from recon.physics.noise import GADGETRON_RECEIVER_BANDWIDTH, whitened_sigma
from recon.types import SliceGeometry, SliceKey, SliceKSpace

ROLE_KEY = "GADGETRON_DataRole"
ROLE_MAPS = "CycGuard.CoilMaps"
ROLE_RECEIVED = "CycGuard.Received"
RECEIVED_SERIES_OFFSET = 100


class ContractError(ValueError):
    """Messages between gadgets that break the contract above (missing, misordered, mismatched)."""


@dataclass(frozen=True)
class BufferSlice:
    """One 2-D slice of a ReconData buffer, with where its lines live in the buffer.

    Attributes:
        data: the slice as the pure pipeline takes it.
        bit: index of the ReconBit.
        nsl: ``(n, s, loc)`` position in the buffer's last three axes.
        data_lines: grid row -> E1 index in the data buffer (``-1`` where not acquired).
        ref_lines: grid row -> E1 index in the reference buffer (``-1`` where absent).
        noise_units: what the buffer's samples were divided by to put ``data`` in units of
            the noise level (Gadgetron's whitened noise sigma, :func:`whitened_sigma`).
        line_limits: the buffer's sampling limits along ky (from the header's encoding
            limits), as grid rows.
        unfinished: a line carries ``ACQ_FIRST_IN_SLICE`` but none ``ACQ_LAST_IN_SLICE``
            (a cut-off acquisition).
    """

    data: SliceKSpace
    bit: int
    nsl: tuple[int, int, int]
    data_lines: np.ndarray
    ref_lines: np.ndarray
    noise_units: float = 1.0
    line_limits: tuple[int, int] = (0, 0)
    unfinished: bool = False
    line_offset: int = 0

    def problem(self, acceleration: int) -> str | None:
        """Why this slice cannot be reconstructed as acquired (cut off, too few calibration
        lines), or ``None``: an error for this slice, not for the stream."""
        name = f"slice {self.data.key.slice} (contrast {self.data.key.contrast}, repetition {self.data.key.repetition})"
        if self.unfinished:
            return f"{name}: no ACQ_LAST_IN_SLICE acquisition: the data are truncated"
        coverage = coverage_problem(self.data.mask, self.line_limits, acceleration, self.line_offset)
        if coverage is not None:
            return f"{name}: {coverage}"
        if self.data.acs.sum() < MIN_AUTO_ACS:
            return f"{name}: {int(self.data.acs.sum())} contiguous calibration lines at the centre, {MIN_AUTO_ACS} needed"
        return None


def _key(head: ismrmrd.AcquisitionHeader | ismrmrd.ImageHeader) -> SliceKey:
    idx = head.idx if hasattr(head, "idx") else head
    return SliceKey(int(idx.slice), int(idx.contrast), int(idx.repetition), int(idx.set), int(idx.phase))


def image_key(image: ismrmrd.Image | ismrmrd.ImageHeader) -> SliceKey:
    """The slice counters of an image."""
    return SliceKey(int(image.slice), int(image.contrast), int(image.repetition), int(image.set), int(image.phase))


def _lines(headers: np.ndarray, n: int, s: int, loc: int, ny: int, center: int) -> np.ndarray:
    """Grid row of each acquired line -> its E1 index in the buffer."""
    out = np.full(ny, -1, dtype=np.int64)
    for e1 in range(headers.shape[0]):
        head = headers[e1, 0, n, s, loc]
        if head is None or int(head.number_of_samples) == 0:
            continue
        row = int(head.idx.kspace_encode_step_1) - center + ny // 2
        if not 0 <= row < ny:
            raise ContractError(f"line {head.idx.kspace_encode_step_1} lies outside the {ny}-line grid (centre {center})")
        out[row] = e1
    return out


def buffer_slices(recon_data: ReconData, receiver_bandwidth: float = GADGETRON_RECEIVER_BANDWIDTH) -> list[BufferSlice]:
    """Every 2-D slice of a ReconData message as :class:`SliceKSpace`.

    Lines are placed on the grid by their ``kspace_encode_step_1`` (centre from the
    buffer's sampling limits) whatever the buffer layout; reference (calibration) lines
    form the ACS block and, as the offline reader does, count as imaging lines too.
    Samples are divided by the noise level that Gadgetron's NoiseAdjust leaves in
    prewhitened data (``sqrt(2 * receiver_bandwidth)`` when the lines carry a dwell time),
    so a slice holds what the offline reader gives for the same file.
    """
    out = []
    for b, bit in enumerate(recon_data.bits):
        buf = bit.data
        data = np.asarray(buf.data)
        if data.ndim != 7:
            raise ContractError(f"ReconData buffer has {data.ndim} dimensions, 7 expected [RO,E1,E2,CHA,N,S,LOC]")
        ro, e1, e2, cha, nn, ss, ll = data.shape
        if e2 != 1:
            raise ContractError(f"ReconData buffer has E2 = {e2}: 3-D encoding is not supported")
        limits = buf.sampling.sampling_limits[1]
        ny = int(buf.sampling.encoded_matrix[1]) or e1
        center = int(limits.center) if int(limits.max) > 0 else ny // 2
        for n in range(nn):
            for s in range(ss):
                for loc in range(ll):
                    data_lines = _lines(buf.headers, n, s, loc, ny, center)
                    kspace = np.zeros((cha, ny, ro), np.complex64)
                    rows = np.flatnonzero(data_lines >= 0)
                    kspace[:, rows, :] = np.transpose(data[:, :, 0, :, n, s, loc][:, data_lines[rows], :], (2, 1, 0))
                    ref_lines = np.full(ny, -1, dtype=np.int64)
                    if bit.ref is not None:
                        ref = np.asarray(bit.ref.data)
                        ref_lines = _lines(bit.ref.headers, n, s, loc, ny, center)
                        ref_rows = np.flatnonzero((ref_lines >= 0) & (data_lines < 0))
                        kspace[:, ref_rows, :] = np.transpose(ref[:, :, 0, :, n, s, loc][:, ref_lines[ref_rows], :], (2, 1, 0))
                    mask = (data_lines >= 0) | (ref_lines >= 0)
                    acs = acs_block(ref_lines >= 0, ny // 2) if (ref_lines >= 0).any() else acs_block(mask, ny // 2)
                    first = int(np.flatnonzero(data_lines >= 0)[0]) if (data_lines >= 0).any() else None
                    if first is None:
                        raise ContractError("ReconData buffer holds a slice without imaging lines")
                    head = buf.headers[data_lines[first], 0, n, s, loc]
                    key = _key(head)
                    units = whitened_sigma(float(head.sample_time_us), receiver_bandwidth)
                    flags = [int(h.flags) for h in _acquired_heads(buf.headers, data_lines, n, s, loc)]
                    if bit.ref is not None:
                        flags += [int(h.flags) for h in _acquired_heads(bit.ref.headers, ref_lines, n, s, loc)]
                    unfinished = any(f & _bit(ismrmrd.ACQ_FIRST_IN_SLICE) for f in flags) and not any(f & _bit(ismrmrd.ACQ_LAST_IN_SLICE) for f in flags)
                    line_limits = (int(limits.min) - center + ny // 2, int(limits.max) - center + ny // 2) if int(limits.max) > 0 else (0, ny - 1)
                    kspace /= np.float32(units)
                    fov = tuple(float(v) for v in buf.sampling.recon_FOV)
                    geometry = SliceGeometry(
                        _vec(head.position), _vec(head.read_dir), _vec(head.phase_dir), _vec(head.slice_dir), (fov[0], fov[1], fov[2])
                    )
                    if not any(geometry.read_dir) or not any(geometry.phase_dir):
                        geometry = SliceGeometry(geometry.position, fov_mm=geometry.fov_mm)
                    out.append(BufferSlice(SliceKSpace(kspace, mask, acs, key, geometry), b, (n, s, loc), data_lines, ref_lines, units, line_limits, unfinished, center - ny // 2))
    return out


def _bit(flag: int) -> int:
    return 1 << (flag - 1)


def _acquired_heads(headers: np.ndarray, lines: np.ndarray, n: int, s: int, loc: int) -> list[ismrmrd.AcquisitionHeader]:
    return [headers[e1, 0, n, s, loc] for e1 in lines[lines >= 0]]


def _vec(values: object) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)  # type: ignore[attr-defined]
    return (a, b, c)


def with_kspace(recon_data: ReconData, part: BufferSlice, kspace: np.ndarray) -> ReconData:
    """A copy of ``recon_data`` whose lines of ``part`` hold ``kspace`` ``(coil, ky, kx)``
    (in noise units, as ``part.data``; written back in the buffer's own units)."""
    out = copy.copy(recon_data)
    out.bits = list(recon_data.bits)
    bit = copy.copy(out.bits[part.bit])
    n, s, loc = part.nsl
    for attr, lines in (("data", part.data_lines), ("ref", part.ref_lines)):
        buffer = getattr(bit, attr)
        if buffer is None or not (lines >= 0).any():
            continue
        buffer = copy.copy(buffer)
        array = np.array(buffer.data, dtype=np.complex64, order="F")  # wire arrays are read-only views
        rows = np.flatnonzero(lines >= 0)
        view = array[:, :, 0, :, n, s, loc]  # basic indexing: a view into array
        view[:, lines[rows], :] = np.transpose(kspace[:, rows, :], (2, 1, 0)) * np.float32(part.noise_units)
        buffer.data = array
        setattr(bit, attr, buffer)
    out.bits[part.bit] = bit
    return out


# ------------------------------------------------------------------ images and meta


def meta_of(item: ismrmrd.Image) -> ismrmrd.Meta:
    """The meta of an image (empty when none)."""
    text = item.attribute_string
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return ismrmrd.Meta.deserialize(text) if text else ismrmrd.Meta()


def meta_value(meta: ismrmrd.Meta, key: str) -> str | None:
    """One meta value as a string (the first of a list), ``None`` when absent."""
    if key not in meta:
        return None
    value = meta[key]
    return str(value[0]) if isinstance(value, list) else str(value)


def set_meta(image: ismrmrd.Image, values: Mapping[str, str | tuple[str, ...] | list[str]]) -> None:
    """Update an image's meta in place (a tuple or list is a multi-valued entry)."""
    meta = meta_of(image)
    for key, value in values.items():
        meta[key] = list(value) if isinstance(value, tuple) else value
    image.attribute_string = meta.serialize()


def image_pixels(image: ismrmrd.Image) -> np.ndarray:
    """The ``(y, x)`` complex64 pixels of a single-channel 2-D image."""
    data = np.asarray(image.data)
    if data.ndim != 4 or data.shape[0] != 1 or data.shape[1] != 1:
        raise ContractError(f"image data {data.shape} is not a single-channel 2-D image [1, 1, y, x]")
    return np.ascontiguousarray(data[0, 0], dtype=np.complex64)


def with_pixels(image: ismrmrd.Image, pixels: np.ndarray) -> ismrmrd.Image:
    """A copy of ``image`` (header and meta) holding new ``(y, x)`` complex pixels."""
    out = ismrmrd.Image.from_array(np.ascontiguousarray(pixels, dtype=np.complex64)[None, None], transpose=False)
    head = image.getHead()
    head.data_type = out.data_type
    out.setHead(head)
    out.attribute_string = image.attribute_string
    return out


def maps_message(maps: np.ndarray, image: ismrmrd.Image) -> ImageArray:
    """Coil maps ``(C, y, x)`` as an ImageArray ``[x, y, 1, C, 1, 1, 1]`` tagged with our role."""
    data = np.asfortranarray(np.transpose(maps, (2, 1, 0))[:, :, None, :, None, None, None].astype(np.complex64))
    header = copy.copy(image.getHead())
    header.channels = maps.shape[0]
    headers = np.empty((1, 1, 1), dtype=object)
    headers[0, 0, 0] = header
    meta = ismrmrd.Meta()
    meta[ROLE_KEY] = ROLE_MAPS
    return ImageArray(data=data, headers=headers, meta=[meta.serialize()], waveform=None, acq_headers=None)


def is_maps(item: object) -> bool:
    """Whether an item is our coil-maps ImageArray."""
    if not isinstance(item, ImageArray) or not item.meta:
        return False
    return meta_value(ismrmrd.Meta.deserialize(item.meta[0]), ROLE_KEY) == ROLE_MAPS


def received_copy(image: ismrmrd.Image) -> ismrmrd.Image:
    """A copy of a flagged image as received, tagged as such (before its rewrite)."""
    copy_ = with_pixels(image, image_pixels(image))
    copy_.image_series_index = image.image_series_index + RECEIVED_SERIES_OFFSET
    set_meta(copy_, {ROLE_KEY: ROLE_RECEIVED})
    return copy_


def is_received(item: object) -> bool:
    """Whether an item is the as-received copy of a rewritten image (:func:`received_copy`)."""
    return isinstance(item, ismrmrd.Image) and meta_value(meta_of(item), ROLE_KEY) == ROLE_RECEIVED


def maps_of(item: ImageArray) -> tuple[SliceKey, np.ndarray]:
    """The slice key and ``(C, y, x)`` maps of a coil-maps ImageArray."""
    data = np.asarray(item.data)
    if data.ndim != 7 or data.shape[2] != 1 or data.shape[4:] != (1, 1, 1):
        raise ContractError(f"coil-maps ImageArray has data {data.shape}, expected [x, y, 1, C, 1, 1, 1]")
    return image_key(item.headers[0, 0, 0]), np.ascontiguousarray(np.transpose(data[:, :, 0, :, 0, 0, 0], (2, 1, 0)), dtype=np.complex64)
