"""DICOM export and PACS push, against a real Orthanc where the tests say `pacs`."""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from pydicom import dcmread

from gadgets.runner.replay import read_header, replay
from recon.data.demo import DEMO_RAW
from recon.io.dicom import geometry_of, header_info, to_dicom, write_dicom
from recon.io.mrd_write import ScanDescription, build_header, read_images
from recon.io.mrd_write import to_ismrmrd_image as to_image
from recon.io.pacs import PacsError, PacsTarget, Pusher
from recon.types import ReconImage, SliceGeometry, SliceKey
from tests.conftest import fill_disk

XML = build_header(ScanDescription(), 4)


def _image(rng: np.random.Generator, verdict: str = "clean", slice_: int = 0, shape: tuple[int, int] = (12, 10)) -> object:
    pixels = (rng.random(shape) * 5 * np.exp(1j * rng.random(shape))).astype(np.complex64)
    angle = 0.3
    read = (np.cos(angle), np.sin(angle), 0.0)
    phase = (-np.sin(angle) * np.cos(0.2), np.cos(angle) * np.cos(0.2), np.sin(0.2))
    normal = tuple(np.cross(read, phase))
    geometry = SliceGeometry(position=(12.5, -30.25, 41.0 + slice_), read_dir=read, phase_dir=phase, slice_dir=normal, fov_mm=(200.0, 240.0, 4.0))
    meta = (("CycGuard.Verdict", verdict), ("CycGuard.Score", "1.5"), ("CycGuard.Threshold", "2.5"), ("CycGuard.PValue", "0.3"), ("CycGuard.Model", "modl_default:042d2b58abcd"))
    return to_image(ReconImage(pixels, SliceKey(slice=slice_), geometry, meta), slice_ + 1, 1)


def test_dicom_round_trip_keeps_pixels_and_geometry(tmp_path: Path, rng: np.random.Generator) -> None:
    image = _image(rng)
    info = header_info(XML)
    path = write_dicom(to_dicom(image, info), tmp_path)
    back = dcmread(path)
    magnitude = np.abs(np.asarray(image.data)[0, 0])
    slope = float(back.RescaleSlope)
    assert np.abs(back.pixel_array * slope + float(back.RescaleIntercept) - magnitude).max() <= slope / 2 + 1e-6 * magnitude.max()
    centre, read, phase = geometry_of(back)
    np.testing.assert_allclose(centre, image.position, atol=1e-4)
    np.testing.assert_allclose(read, image.read_dir, atol=1e-4)
    np.testing.assert_allclose(phase, image.phase_dir, atol=1e-4)
    assert float(back.SliceThickness) == pytest.approx(4.0)
    assert [float(v) for v in back.PixelSpacing] == pytest.approx([240 / 12, 200 / 10])
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and back.Modality == "MR"
    assert back.PatientName == "Demo^Phantom" and back.PatientID == "CYCGUARD-DEMO-001"
    assert back.ImageComments == "CycGuard clean; score 1.5 threshold 2.5; p 0.3; model modl_default:042d2b58abcd"
    assert list(back.ImageType)[:2] == ["ORIGINAL", "PRIMARY"]
    assert str(back.SOPInstanceUID).startswith("2.25.") and len(str(back.SOPInstanceUID)) <= 64
    assert to_dicom(image, info).SOPInstanceUID == back.SOPInstanceUID  # stable: a resend is not a new image


def test_mitigated_images_are_derived_in_their_own_series(rng: np.random.Generator) -> None:
    info = header_info(XML)
    clean, rewritten = to_dicom(_image(rng), info), to_dicom(_image(rng, "mitigated"), info)
    assert list(rewritten.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert rewritten.SeriesInstanceUID != clean.SeriesInstanceUID and rewritten.SeriesNumber == clean.SeriesNumber + 1000
    assert "MITIGATED" in rewritten.SeriesDescription and "rewritten" in rewritten.SeriesDescription
    assert rewritten.ImageComments.startswith("CycGuard mitigated")
    assert "DerivationDescription" in rewritten and "DerivationDescription" not in clean


def test_file_names_come_from_uids_only(tmp_path: Path, rng: np.random.Generator) -> None:
    hostile = XML.replace("Demo^Phantom", "../../../etc/x").replace("cycguard_demo_t1", "../../evil")
    ds = to_dicom(_image(rng), header_info(hostile))
    path = write_dicom(ds, tmp_path / "out")
    assert path == tmp_path / "out" / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [path.name]


def test_bad_images_and_targets_are_refused(rng: np.random.Generator) -> None:
    image = _image(rng)
    data = np.asarray(image.data).copy()
    data[0, 0, 0, 0] = np.nan
    image.data[:] = data
    with pytest.raises(ValueError, match="non-finite"):
        to_dicom(image, header_info(XML))
    for text in ("ORTHANC@localhost", "A_VERY_LONG_AE_TITLE_X@h:1", "ORTHANC@h:99999"):
        with pytest.raises(PacsError, match="AET@host:port"):
            PacsTarget.parse(text)


def test_an_unreachable_pacs_spools_instead_of_dropping(tmp_path: Path, rng: np.random.Generator) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    pusher = Pusher(PacsTarget.parse(f"ORTHANC@127.0.0.1:{port}"), tmp_path / "spool", timeout=2)
    assert pusher.push(to_dicom(_image(rng), header_info(XML))) is False
    assert len(pusher.pending()) == 1 and pusher.delivered == 0


def _instances(orthanc: object) -> list[dict]:
    ids = orthanc.rest("/instances")  # type: ignore[attr-defined]
    return [orthanc.rest(f"/instances/{i}/simplified-tags") for i in ids]  # type: ignore[attr-defined]


@pytest.mark.pacs
@pytest.mark.e2e
def test_defended_replay_lands_every_slice_in_orthanc(orthanc: object, tmp_path: Path) -> None:
    result = replay(
        DEMO_RAW, "defended", tmp_path / "out.h5", None, group="g", progress=False,
        dicom=tmp_path / "dicom", pacs=orthanc.target, spool=tmp_path / "spool",  # type: ignore[attr-defined]
    )
    assert result.ok, result.failures
    assert result.pacs_pending == 0 and result.dicom_files == 4
    tags = sorted(_instances(orthanc), key=lambda t: int(t["InstanceNumber"]))
    assert len(tags) == 4
    files = {dcmread(p).SOPInstanceUID: dcmread(p) for p in (tmp_path / "dicom").rglob("*.dcm")}
    for n, t in enumerate(tags):
        assert t["Modality"] == "MR" and t["PatientID"] == "CYCGUARD-DEMO-001"
        assert t["ImageComments"].startswith("CycGuard clean; score ") and "model modl_default:" in t["ImageComments"]
        local = files[t["SOPInstanceUID"]]
        np.testing.assert_allclose([float(v) for v in t["ImagePositionPatient"].split("\\")], [float(v) for v in local.ImagePositionPatient], atol=1e-4)
        assert float(t["SliceLocation"]) == pytest.approx(20.0 + 5 * n)  # the demo's slice positions
    assert len(orthanc.rest("/series")) == 1  # type: ignore[attr-defined]


@pytest.mark.pacs
def test_mitigated_images_reach_the_pacs_in_their_own_series(orthanc: object, tmp_path: Path, rng: np.random.Generator) -> None:
    pusher = Pusher(PacsTarget.parse(orthanc.target), tmp_path / "spool")  # type: ignore[attr-defined]
    info = header_info(XML)
    assert pusher.push(to_dicom(_image(rng, "clean", 0), info)) and pusher.push(to_dicom(_image(rng, "mitigated", 1), info))
    series = [orthanc.rest(f"/series/{s}") for s in orthanc.rest("/series")]  # type: ignore[attr-defined]
    descriptions = sorted(s["MainDicomTags"]["SeriesDescription"] for s in series)
    assert len(series) == 2 and "MITIGATED" in descriptions[1] and "MITIGATED" not in descriptions[0]
    derived = [t for t in _instances(orthanc) if t["ImageType"].startswith("DERIVED\\SECONDARY")]
    assert len(derived) == 1 and derived[0]["ImageComments"].startswith("CycGuard mitigated")


@pytest.mark.pacs
def test_pacs_down_mid_run_spools_and_delivers_once_back(orthanc: object, tmp_path: Path, rng: np.random.Generator) -> None:
    pusher = Pusher(PacsTarget.parse(orthanc.target), tmp_path / "spool", timeout=3)  # type: ignore[attr-defined]
    info = header_info(XML)
    datasets = [to_dicom(_image(rng, slice_=n), info) for n in range(5)]
    assert pusher.push(datasets[0]) and pusher.push(datasets[1])
    orthanc.stop()  # type: ignore[attr-defined]
    assert not pusher.push(datasets[2]) and not pusher.push(datasets[3])
    assert len(pusher.pending()) == 2
    orthanc.start()  # type: ignore[attr-defined]
    assert pusher.push(datasets[4])
    assert pusher.pending() == [] and pusher.delivered == 5
    assert pusher.push(datasets[0])  # a resend of a delivered image
    uids = sorted(t["SOPInstanceUID"] for t in _instances(orthanc))
    assert uids == sorted(str(d.SOPInstanceUID) for d in datasets)  # none lost, none duplicated


@pytest.mark.pacs
@pytest.mark.e2e
def test_images_spooled_by_one_run_are_sent_by_the_next(orthanc: object, tmp_path: Path) -> None:
    orthanc.stop()  # type: ignore[attr-defined]
    first = replay(DEMO_RAW, "defended_composed", tmp_path / "a.h5", None, group="g", progress=False, pacs=orthanc.target, spool=tmp_path / "spool")  # type: ignore[attr-defined]
    assert first.ok and first.pacs_pending == 4  # the run succeeds and says what is pending
    orthanc.start()  # type: ignore[attr-defined]
    second = replay(DEMO_RAW, "defended_composed", tmp_path / "b.h5", None, group="g", progress=False, pacs=orthanc.target, spool=tmp_path / "spool")  # type: ignore[attr-defined]
    assert second.ok and second.pacs_pending == 0
    assert len(_instances(orthanc)) == 4  # the same images again: stored once


def test_tls_push_to_a_tls_storage_scp(tmp_path: Path, rng: np.random.Generator, tls_files: tuple[Path, Path]) -> None:
    """Optional TLS: a pynetdicom storage SCP behind TLS with a throw-away certificate."""
    import socket
    import ssl

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import MRImageStorage as MRStorage  # type: ignore[attr-defined]

    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    received: list[str] = []

    def store(event: object) -> int:
        received.append(str(event.dataset.SOPInstanceUID))  # type: ignore[attr-defined]
        return 0x0000

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scp = AE(ae_title="TLS_SCP")
    scp.add_supported_context(MRStorage)
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)], ssl_context=context)
    try:
        ds = to_dicom(_image(rng), header_info(XML))
        plain = Pusher(PacsTarget.parse(f"TLS_SCP@127.0.0.1:{port}"), tmp_path / "plain", timeout=3)
        assert not plain.push(ds) and len(plain.pending()) == 1  # no TLS: refused, kept
        secure = Pusher(PacsTarget.parse(f"TLS_SCP@127.0.0.1:{port}", tls_ca=str(cert)), tmp_path / "tls", timeout=5)
        assert secure.push(ds) and secure.pending() == []
        assert received == [str(ds.SOPInstanceUID)]
    finally:
        server.shutdown()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed once the block ends: nothing listens there


@pytest.mark.pacs
def test_a_full_spool_disk_fails_loudly_and_keeps_what_was_spooled(orthanc: object, small_disk: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    info = header_info(XML)
    datasets = [to_dicom(_image(rng, slice_=n, shape=(96, 96)), info) for n in range(2)]
    size = write_dicom(datasets[0], tmp_path / "probe").stat().st_size
    orthanc.stop()  # type: ignore[attr-defined]
    pusher = Pusher(PacsTarget.parse(orthanc.target), small_disk / "spool", timeout=2)  # type: ignore[attr-defined]
    filler = fill_disk(small_disk, leave=size + size // 2)  # room for one image, not two
    assert pusher.push(datasets[0]) is False  # the PACS is down: spooled
    with pytest.raises(OSError, match=f"cannot spool image {datasets[1].SOPInstanceUID} .*No space left.*not delivered"):
        pusher.push(datasets[1])
    assert sorted(p.name for p in pusher.spool.iterdir() if p.name != "destination.json") == [f"{datasets[0].SOPInstanceUID}.dcm"]  # no partial file left
    assert dcmread(pusher.pending()[0]).SOPInstanceUID == datasets[0].SOPInstanceUID  # the spooled one is intact
    with pytest.raises(OSError, match=r"cannot write .*\.dcm: No space left on device$"):
        write_dicom(datasets[1], small_disk / "dicom")  # the DICOM folder on the same disk
    assert not [p for p in (small_disk / "dicom").rglob("*") if p.is_file()]
    filler.unlink()
    orthanc.start()  # type: ignore[attr-defined]
    assert pusher.push(datasets[1]) and pusher.pending() == []
    assert sorted(t["SOPInstanceUID"] for t in _instances(orthanc)) == sorted(str(d.SOPInstanceUID) for d in datasets)


@pytest.mark.e2e
def test_replay_onto_a_full_spool_disk_fails_loudly_and_keeps_the_images_before(small_disk: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    header = read_header(DEMO_RAW)
    matrix = ismrmrd.xsd.CreateFromDocument(header).encoding[0].reconSpace.matrixSize
    size = write_dicom(to_dicom(_image(rng, shape=(matrix.y, matrix.x)), header_info(header)), tmp_path / "probe").stat().st_size
    spool = small_disk / "spool"
    spool.mkdir()
    fill_disk(small_disk, leave=2 * size + size // 2)  # room for two of the four slices
    result = replay(DEMO_RAW, "defended_composed", tmp_path / "out.h5", None, group="g", progress=False, echo_stderr=False, pacs=f"PACS@127.0.0.1:{_closed_port()}", spool=spool)
    assert not result.ok
    assert any("cannot spool image" in f and "No space left" in f for f in result.failures), result.failures
    assert any("2 of 4 slices came out without an image" in f for f in result.failures), result.failures
    images = read_images(tmp_path / "out.h5", group="g")  # what passed export before the disk filled is kept
    assert len(images) == 2 and all(meta["CycGuard.Verdict"] in ("clean", "flagged", "mitigated") for _, meta in images)
    assert len(list(spool.glob("*/*.dcm"))) == 2 and not list(spool.glob("*/*.part"))  # in the spool of that destination


def test_each_verdict_but_clean_has_a_series_saying_what_it_holds(rng: np.random.Generator) -> None:
    info = header_info(XML)
    series = {verdict: to_dicom(_image(rng, verdict), info) for verdict in ("clean", "mitigated", "flagged", "unverified")}
    assert len({ds.SeriesInstanceUID for ds in series.values()}) == 4
    assert [series[v].SeriesNumber - series["clean"].SeriesNumber for v in ("mitigated", "flagged", "unverified")] == [1000, 2000, 3000]
    assert "FLAGGED (failed check, not rewritten)" in series["flagged"].SeriesDescription
    assert "UNVERIFIED (not checked)" in series["unverified"].SeriesDescription
    assert list(series["flagged"].ImageType)[-1] == "FLAGGED"
    long = header_info(build_header(ScanDescription(protocol_name="x" * 80), 1))
    assert to_dicom(_image(rng, "flagged"), long).SeriesDescription.endswith("CycGuard FLAGGED (failed check, not rewritten)")


def test_different_pixels_get_a_new_sop_instance_uid_and_the_same_keep_it(rng: np.random.Generator) -> None:
    info = header_info(XML)
    image = _image(rng, "mitigated")
    again = to_dicom(image, info).SOPInstanceUID
    assert to_dicom(image, info).SOPInstanceUID == again
    other = ismrmrd.Image.from_array(np.asarray(image.data) * np.complex64(1.5), transpose=False)
    other.setHead(image.getHead())
    other.attribute_string = image.attribute_string
    assert to_dicom(other, info).SOPInstanceUID != again  # rewritten another way: a new instance, not a silent overwrite


def test_the_mitigation_method_is_named_and_dates_are_never_invented(rng: np.random.Generator, caplog: pytest.LogCaptureFixture) -> None:
    info = header_info(XML)
    image = _image(rng, "mitigated")
    meta = ismrmrd.Meta.deserialize(image.attribute_string)
    meta["CycGuard.MitigationMethod"] = "prior"
    image.attribute_string = meta.serialize()
    ds = to_dicom(image, info)
    assert "prior weighted more" in ds.DerivationDescription and "cyclic mitigation" not in ds.DerivationDescription
    assert ds.StudyDate == "" and ds.StudyTime == ""  # the header has none: not the time of the export
    anonymous = build_header(ScanDescription(), 1).replace("<patientID>CYCGUARD-DEMO-001</patientID>", "")
    with caplog.at_level("WARNING"):
        nameless = to_dicom(_image(rng), header_info(anonymous))
    assert nameless.PatientID == "" and "no patientID" in caplog.text


def test_dciodvfy_finds_no_error_in_any_verdicts_file(tmp_path: Path, rng: np.random.Generator) -> None:
    import subprocess

    from tests.conftest import require_binary

    tool = require_binary("dciodvfy")
    info = header_info(XML)
    for verdict in ("clean", "mitigated", "flagged", "unverified"):
        path = write_dicom(to_dicom(_image(rng, verdict), info), tmp_path)
        report = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], (verdict, errors)


def test_a_spooled_image_only_ever_goes_to_the_destination_it_was_spooled_for(orthanc: object, tmp_path: Path, rng: np.random.Generator) -> None:
    from recon.io.pacs import destinations

    down = Pusher(PacsTarget.parse(f"OTHERPACS@127.0.0.1:{_closed_port()}"), tmp_path / "spool", timeout=2)
    ds = to_dicom(_image(rng), header_info(XML))
    assert down.push(ds) is False  # that PACS is down: spooled for it
    up = Pusher(PacsTarget.parse(orthanc.target), tmp_path / "spool")  # type: ignore[attr-defined]
    assert up.flush() == 0 and up.pending() == []  # the next run's PACS gets nothing of it
    assert _instances(orthanc) == []
    assert [str(target) for target, _ in destinations(tmp_path / "spool")] == sorted([str(down.target), str(up.target)])
    assert [p.name for p in down.pending()] == [f"{ds.SOPInstanceUID}.dcm"]


def test_a_permanent_rejection_is_quarantined_and_reported_not_retried(orthanc: object, tmp_path: Path, rng: np.random.Generator) -> None:
    from recon.io.pacs import rejected

    wrong = PacsTarget.parse(orthanc.target.replace("ORTHANC@", "NOTTHEPACS@"))  # type: ignore[attr-defined]
    pusher = Pusher(wrong, tmp_path / "spool", timeout=30)  # a loaded machine must not turn a rejection into an outage
    ds = to_dicom(_image(rng), header_info(XML))
    assert pusher.push(ds) is False
    assert pusher.pending() == [] and len(pusher.rejections) == 1 and "rejected permanently" in pusher.rejections[0]
    [(path, reason)] = rejected(pusher.spool)
    assert path.name == f"{ds.SOPInstanceUID}.dcm" and "rejected permanently" in reason, reason
    result = replay(DEMO_RAW, "defended_composed", tmp_path / "out.h5", None, group="g", progress=False, echo_stderr=False,
                    pacs=str(wrong), spool=tmp_path / "spool2")
    assert not result.ok and result.pacs_pending == 0
    assert sum("rejected" in failure and "quarantined" in failure for failure in result.failures) >= 1, result.failures


def test_a_pacs_that_accepts_no_mr_storage_is_a_rejection(tmp_path: Path, rng: np.random.Generator) -> None:
    import json

    from tests.conftest import OrthancServer, require_binary

    server = OrthancServer(tmp_path / "orthanc", require_binary("Orthanc"))
    config = json.loads(server.config.read_text())
    config["AcceptedTransferSyntaxes"] = ["1.2.840.10008.1.2.4.50"]  # JPEG baseline only: our contexts are refused
    server.config.write_text(json.dumps(config))
    server.start()
    try:
        pusher = Pusher(PacsTarget.parse(server.target), tmp_path / "spool", timeout=30)
        assert pusher.push(to_dicom(_image(rng), header_info(XML))) is False
        assert pusher.pending() == [] and "accepts no MR Image Storage" in pusher.rejections[0]
    finally:
        server.stop()


@pytest.mark.e2e
def test_pacs_status_and_push_per_destination_without_a_reconstruction(tmp_path: Path, rng: np.random.Generator) -> None:
    import subprocess
    import sys

    from tests.conftest import OrthancServer, require_binary

    def cycguard(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gadgets.cli", *args], capture_output=True, text=True, timeout=300)

    server = OrthancServer(tmp_path / "orthanc", require_binary("Orthanc"))
    spool = tmp_path / "spool"
    ds = to_dicom(_image(rng), header_info(XML))
    assert Pusher(PacsTarget.parse(server.target), spool, timeout=2).push(ds) is False  # not started yet: spooled
    wrong = Pusher(PacsTarget.parse(server.target.replace("ORTHANC@", "NOBODY@")), spool, timeout=2)
    server.start()
    try:
        assert wrong.push(to_dicom(_image(rng, slice_=1), header_info(XML))) is False  # rejected, quarantined
        status = cycguard("pacs", "status", "--spool", str(spool))
        assert status.returncode == 0, status.stderr
        assert f"{server.target}: 1 pending, 0 rejected" in status.stdout
        assert "NOBODY@" in status.stdout and "0 pending, 1 rejected" in status.stdout and "rejected permanently" in status.stdout
        push = cycguard("pacs", "push", "--spool", str(spool), "--destination", server.target)
        assert push.returncode == 0 and "1 delivered now" in push.stdout, push.stdout + push.stderr
        assert [i["SOPInstanceUID"] for i in _instances(server)] == [ds.SOPInstanceUID]
        assert cycguard("pacs", "push", "--spool", str(spool)).returncode == 1  # the rejected one is still there, listed
    finally:
        server.stop()


def test_pipelines_lists_what_is_installed_and_where() -> None:
    import subprocess
    import sys

    listing = subprocess.run([sys.executable, "-m", "gadgets.cli", "pipelines"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    names = [line.split()[0] for line in listing.stdout.splitlines() if line and not line.startswith("files:")]
    assert set(names) >= {"recon", "detect", "defended", "defended_composed", "defended_connect", "redteam"}
    assert "share/gadgetron/config/" in listing.stdout
