"""Python equivalents of the C++ gadgets our pipelines use, so the runner needs no Gadgetron.

* ``NoiseAdjustGadget``: noise scans give the channel covariance (no mean removed); later
  acquisitions are prewhitened with its inverse Cholesky factor times
  ``sqrt(2 * dwell-time ratio * relative receiver noise bandwidth)``, as Gadgetron does;
  noise scans are consumed.
* ``RemoveROOversamplingGadget``: per acquisition, crop the readout to the recon matrix
  (inverse FFT, centre crop, FFT), as the C++ gadget does.
* ``AcquisitionAccumulateTriggerGadget``: collect acquisitions into a bucket and release it
  when the ``trigger_dimension`` counter changes (or every ``trigger_after_n_acquisitions``
  with ``n_acquisitions``), and at the end of the stream.
* ``BucketToBufferGadget`` (``split_slices=true``): one ``ReconData`` per 2-D slice
  (slice, contrast, repetition, set, phase): data buffer ``[RO, E1, 1, CHA, 1, 1, 1]`` of
  imaging lines at their ``kspace_encode_step_1``, reference buffer of calibration lines;
  repeated lines are averaged; navigator, phase-correction and dummy acquisitions dropped.

The maths is :mod:`recon.physics.noise`, the same code the offline reader uses, so the
chain and ``recon.pipeline`` see the same k-space, and both match a real Gadgetron 4.7
(``tests/gadgets/test_gadgetron.py`` runs the same files through both). Properties the C++ gadgets take but
these equivalents do not implement are refused by name rather than ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ismrmrd
import numpy as np
from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData, SamplingDescription

from recon.io.mrd import SKIPPED_FLAGS, MRDError, parse_header
from recon.physics.noise import noise_covariance, prewhitening_scale, remove_readout_oversampling, whitening_matrix

log = logging.getLogger("cycguard.runner.frontend")

DIMENSIONS = ("slice", "contrast", "phase", "repetition", "set", "average", "segment")

# classname -> {property: allowed values (empty: any non-negative integer)}
FRONTEND: dict[str, dict[str, tuple[str, ...]]] = {
    "NoiseAdjustGadget": {},
    "RemoveROOversamplingGadget": {},
    "AcquisitionAccumulateTriggerGadget": {
        "trigger_dimension": ("", "none", "n_acquisitions", *DIMENSIONS),
        "sorting_dimension": ("", "none", *DIMENSIONS),
        "trigger_after_n_acquisitions": (),
    },
    "BucketToBufferGadget": {"split_slices": ("true",), "N_dimension": ("",), "S_dimension": ("",), "ignore_segment": ("true", "false")},
}


GADGETRON_HEADER_VERSION = 14
"""The ISMRMRD header schema version of Gadgetron 4.7's ISMRMRD library (1.14)."""


def check_header(xml: str, source: str = "header") -> None:
    """Refuse a header that Gadgetron 4.7 refuses (:class:`MRDError` naming why).

    Its ISMRMRD library takes a header whose ``<version>`` is absent or exactly 14 and fails
    every stream on any other (files written by ISMRMRD 1.8 tools carry 8).
    """
    header = ismrmrd.xsd.CreateFromDocument(xml)
    if header.version is not None and int(header.version) != GADGETRON_HEADER_VERSION:
        raise MRDError(
            f"{source}: ISMRMRD header version {header.version}; Gadgetron 4.7 (ISMRMRD 1.14) takes only "
            f"version {GADGETRON_HEADER_VERSION} or none and fails the run with \"XML header version does not match "
            "library schema version\" (remove the <version> element, or convert the file with ISMRMRD 1.14's tools)"
        )


def check_frontend_properties(classname: str, properties: dict[str, str]) -> None:
    """Raise ``ValueError`` naming a property the runner's equivalent does not take or a bad value."""
    allowed = FRONTEND[classname]
    for name, value in properties.items():
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise ValueError(f"{classname}: property {name!r} is not supported by the CycGuard runner (supported: {known})")
        choices = allowed[name]
        if choices and value.strip() not in choices:
            raise ValueError(f"{classname}: property {name!r} = {value!r}; allowed: {', '.join(repr(c) for c in choices)}")
        if not choices and not value.strip().isdigit():
            raise ValueError(f"{classname}: property {name!r} = {value!r}; expected a non-negative integer")


def _with_data(acq: ismrmrd.Acquisition, data: np.ndarray) -> ismrmrd.Acquisition:
    head = acq.getHead()
    head.number_of_samples = data.shape[1]
    return ismrmrd.Acquisition(head, np.ascontiguousarray(data, dtype=np.complex64))


class NoiseAdjust:
    """Prewhitening from the noise scans at the start of the stream."""

    name = "NoiseAdjustGadget"

    def __init__(self, header_xml: str, properties: dict[str, str]) -> None:
        self.bandwidth = parse_header(header_xml).receiver_bandwidth
        info = ismrmrd.xsd.CreateFromDocument(header_xml).measurementInformation
        self.measurement_id = (info.measurementID or "") if info is not None else ""
        self.noise: list[np.ndarray] = []
        self.noise_dwell = 0.0
        self.whitening: np.ndarray | None = None
        self.ready = False

    def process(self, item: Any) -> Iterable[Any]:
        if not isinstance(item, ismrmrd.Acquisition):
            return [item]
        if item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            if self.ready:
                log.warning("noise scan after imaging data ignored (prewhitening already fixed)")
                return []
            if not self.measurement_id:
                raise ValueError(
                    "NoiseAdjustGadget: the data hold noise scans but the header has no measurementID; "
                    "Gadgetron stores the noise covariance under it and fails the run (\"Unknown error\") without one"
                )
            self.noise.append(np.asarray(item.data, dtype=np.complex64))
            self.noise_dwell = self.noise_dwell or float(item.sample_time_us)
            return []
        if not self.ready:
            self.ready = True
            if self.noise:
                covariance = noise_covariance(np.concatenate(self.noise, axis=1))
                scale = prewhitening_scale(float(item.sample_time_us), self.noise_dwell, self.bandwidth)
                self.whitening = whitening_matrix(covariance, scale)
            else:
                log.warning("no noise scans before the imaging data: not prewhitened")
        if self.whitening is None:
            return [item]
        return [_with_data(item, self.whitening @ np.asarray(item.data, dtype=np.complex64))]

    def close(self) -> Iterable[Any]:
        return []


class RemoveROOversampling:
    """Crop the readout to the recon matrix when the header says it is oversampled."""

    name = "RemoveROOversamplingGadget"

    def __init__(self, header_xml: str, properties: dict[str, str]) -> None:
        protocol = parse_header(header_xml)
        self.encoded, self.recon = protocol.encoded[1], protocol.recon[1]

    def process(self, item: Any) -> Iterable[Any]:
        if not isinstance(item, ismrmrd.Acquisition) or self.encoded == self.recon:
            return [item]
        if item.number_of_samples != self.encoded:
            raise ValueError(f"acquisition {item.scan_counter} has {item.number_of_samples} samples, the header's encoded x is {self.encoded}")
        out = _with_data(item, remove_readout_oversampling(np.asarray(item.data), self.recon))
        out.center_sample = int(item.center_sample) * self.recon // self.encoded
        return [out]

    def close(self) -> Iterable[Any]:
        return []


@dataclass
class Bucket:
    """Acquisitions released together by the trigger (never leaves the runner)."""

    acquisitions: list[ismrmrd.Acquisition] = field(default_factory=list)


def slice_key(acq: ismrmrd.Acquisition) -> tuple[int, ...]:
    """The 2-D slice an acquisition belongs to: (slice, contrast, repetition, set, phase)."""
    idx = acq.idx
    return (int(idx.slice), int(idx.contrast), int(idx.repetition), int(idx.set), int(idx.phase))


def _counter(acq: ismrmrd.Acquisition, dimension: str) -> int:
    return int(getattr(acq.idx, dimension))


class AccumulateTrigger:
    """Release buckets when the trigger dimension's counter changes, and at the end."""

    name = "AcquisitionAccumulateTriggerGadget"

    def __init__(self, header_xml: str, properties: dict[str, str]) -> None:
        self.trigger = properties.get("trigger_dimension", "").strip() or "none"
        self.sorting = properties.get("sorting_dimension", "").strip() or "none"
        self.every = int(properties.get("trigger_after_n_acquisitions", "0") or 0)
        if self.trigger == "n_acquisitions" and self.every <= 0:
            raise ValueError("AcquisitionAccumulateTriggerGadget: n_acquisitions needs trigger_after_n_acquisitions > 0")
        self.buckets: dict[int, Bucket] = {}
        self.last: int | None = None
        self.count = 0

    def _release(self) -> list[Any]:
        out = [self.buckets[k] for k in sorted(self.buckets)]
        self.buckets = {}
        return out

    def process(self, item: Any) -> Iterable[Any]:
        if not isinstance(item, ismrmrd.Acquisition):
            return [item]
        out: list[Any] = []
        if self.trigger in DIMENSIONS:
            value = _counter(item, self.trigger)
            if self.last is not None and value != self.last:
                out = self._release()
            self.last = value
        sort = _counter(item, self.sorting) if self.sorting in DIMENSIONS else 0
        self.buckets.setdefault(sort, Bucket()).acquisitions.append(item)
        self.count += 1
        if self.trigger == "n_acquisitions" and self.count % self.every == 0:
            out += self._release()
        return out

    def close(self) -> Iterable[Any]:
        return self._release()


class BucketToBuffer:
    """One ``ReconData`` per 2-D slice of a bucket."""

    name = "BucketToBufferGadget"

    def __init__(self, header_xml: str, properties: dict[str, str]) -> None:
        header = ismrmrd.xsd.CreateFromDocument(header_xml)
        self.protocol = parse_header(header_xml)
        enc = header.encoding[0]
        self.encoded_fov = enc.encodedSpace.fieldOfView_mm
        self.recon_fov = enc.reconSpace.fieldOfView_mm
        limits = enc.encodingLimits.kspace_encoding_step_1 if enc.encodingLimits else None
        ny = self.protocol.encoded[0]
        self.e1_limits = (limits.minimum or 0, limits.center or ny // 2, limits.maximum or ny - 1) if limits else (0, ny // 2, ny - 1)

    def process(self, item: Any) -> Iterable[Any]:
        if not isinstance(item, Bucket):
            return [item]
        groups: dict[tuple[int, ...], list[ismrmrd.Acquisition]] = {}
        for acq in item.acquisitions:
            if any(acq.is_flag_set(flag) for flag in SKIPPED_FLAGS.values()):
                continue
            groups.setdefault(slice_key(acq), []).append(acq)
        return [self._buffer(acqs) for _, acqs in sorted(groups.items(), key=lambda kv: kv[1][0].scan_counter)]

    def _buffer(self, acqs: list[ismrmrd.Acquisition]) -> ReconData:
        imaging = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
        reference = [
            a for a in acqs
            if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) or a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        ]
        if not imaging:
            raise ValueError(f"slice {acqs[0].idx.slice}: only calibration lines, no imaging data")
        data = self._fill(imaging)
        ref = self._fill(reference) if reference else None
        return ReconData([ReconBit(data, ref)])

    def _fill(self, acqs: list[ismrmrd.Acquisition]) -> ReconBuffer:
        ny = self.protocol.encoded[0]
        ro = int(acqs[0].number_of_samples)
        channels = int(acqs[0].active_channels)
        sums = np.zeros((ro, ny, 1, channels, 1, 1, 1), np.complex64, order="F")
        counts = np.zeros(ny, np.int64)
        headers = np.empty((ny, 1, 1, 1, 1), dtype=object)
        for e1 in range(ny):
            headers[e1, 0, 0, 0, 0] = ismrmrd.AcquisitionHeader()
        for acq in acqs:
            e1 = int(acq.idx.kspace_encode_step_1)
            if not 0 <= e1 < ny:
                raise ValueError(f"line {e1} outside the {ny}-line encoded matrix")
            if acq.number_of_samples != ro or acq.active_channels != channels:
                raise ValueError(f"acquisition {acq.scan_counter}: {acq.active_channels}x{acq.number_of_samples}, expected {channels}x{ro}")
            sums[:, e1, 0, :, 0, 0, 0] += np.asarray(acq.data).T
            counts[e1] += 1
            headers[e1, 0, 0, 0, 0] = acq.getHead()
        sums[:, counts > 0] /= counts[counts > 0][None, :, None, None, None, None, None]
        sampling = SamplingDescription()
        sampling.encoded_FOV[:] = (self.encoded_fov.x, self.encoded_fov.y, self.encoded_fov.z)
        sampling.recon_FOV[:] = (self.recon_fov.x, self.recon_fov.y, self.recon_fov.z)
        sampling.encoded_matrix[:] = (ro, ny, 1)
        sampling.recon_matrix[:] = (self.protocol.recon[1], self.protocol.recon[0], 1)
        sampling.sampling_limits[0].min, sampling.sampling_limits[0].center, sampling.sampling_limits[0].max = 0, ro // 2, ro - 1
        sampling.sampling_limits[1].min, sampling.sampling_limits[1].center, sampling.sampling_limits[1].max = self.e1_limits
        return ReconBuffer(sums, None, None, headers, sampling)

    def close(self) -> Iterable[Any]:
        return []


CLASSES = {
    "NoiseAdjustGadget": NoiseAdjust,
    "RemoveROOversamplingGadget": RemoveROOversampling,
    "AcquisitionAccumulateTriggerGadget": AccumulateTrigger,
    "BucketToBufferGadget": BucketToBuffer,
}


def build(classname: str, header_xml: str, properties: dict[str, str]) -> Any:
    """The Python equivalent of a C++ gadget."""
    return CLASSES[classname](header_xml, properties)
