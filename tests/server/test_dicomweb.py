"""DICOMweb round trip against a real Orthanc: upload a CT-like series, segment it through the server, read the SEG
back over WADO-RS and compare it voxel-for-voxel with the NIfTI result of ``/v1/models/{name}/predict``."""

from __future__ import annotations

import copy
import io
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medseg.io import load_image
from medseg.io.dicom_seg import read_dicom_seg
from server.app import create_app
from server.models import ModelStore
from server.settings import PacsSettings, Settings
from tests.helpers import make_case
from tests.server.conftest import API_KEY
from tests.server.orthanc import PASSWORD, USER, OrthancProcess, free_port

pytestmark = pytest.mark.integration

OBLIQUE_IOP = (0.866025, 0.5, 0.0, -0.482963, 0.836516, -0.258819)
SHAPE = (32, 28, 16)  # X = columns, Y = rows, Z = slices: Rows != Columns catches transposes
SLOPE = 0.001


@dataclass
class CtSeries:
    folder: Path
    study_uid: str
    series_uid: str


def write_ct_series(folder: Path, volume: np.ndarray, *, seed: int = 0) -> CtSeries:
    """Write ``volume (X, Y, Z)`` as an oblique single-frame CT series derived from pydicom's CT_small.dcm.

    Pixel values are stored as int16 with RescaleSlope 0.001; files are written in shuffled order.
    """
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study_uid = generate_uid(entropy_srcs=[f"study-{seed}"])
    series_uid = generate_uid(entropy_srcs=[f"series-{seed}"])
    frame_uid = generate_uid(entropy_srcs=[f"frame-{seed}"])
    row_cos, col_cos = np.asarray(OBLIQUE_IOP[:3]), np.asarray(OBLIQUE_IOP[3:])
    normal = np.cross(row_cos, col_cos)
    origin, gap, spacing = np.array([-40.0, 12.5, 30.0]), 1.5, (1.0, 1.2)  # PixelSpacing = (row, column) spacing
    stored = np.round(volume / SLOPE).astype(np.int16)
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(volume.shape[2])
    for k in order:
        ds = copy.deepcopy(base)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in OBLIQUE_IOP]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * gap * normal]
        ds.PixelSpacing = [f"{v}" for v in spacing]
        ds.SliceThickness = f"{gap}"
        ds.RescaleSlope, ds.RescaleIntercept = f"{SLOPE}", "0"
        ds.InstanceNumber = int(k) + 1
        ds.SeriesNumber = 3
        ds.SeriesDescription = "medseg test series"
        ds.save_as(folder / f"slice-{k:03d}.dcm", enforce_file_format=True)
    return CtSeries(folder, study_uid, series_uid)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancProcess) -> CtSeries:
    image, _ = make_case(np.random.default_rng(5), SHAPE)
    series = write_ct_series(tmp_path_factory.mktemp("ct") / "series", image)
    assert orthanc.upload_folder(series.folder) == SHAPE[2]
    return series


def _settings(base: Settings, url: str, username: str = USER, password: str = PASSWORD) -> Settings:
    """``base`` with one PACS named ``main``."""
    pacs = PacsSettings(url=url, username=username, password=password, timeout_s=10.0)
    return base.model_copy(update={"pacs": {"main": pacs}})


@pytest.fixture()
def api(server_settings: Settings, tiny_models: ModelStore, orthanc: OrthancProcess) -> Iterator[TestClient]:
    settings = _settings(server_settings, orthanc.dicomweb_url)
    with TestClient(create_app(settings, models=tiny_models), headers={"X-API-Key": API_KEY}) as client:
        yield client


def _dicomweb(orthanc: OrthancProcess) -> DICOMwebClient:
    session = requests.Session()
    session.auth = orthanc.auth
    return DICOMwebClient(orthanc.dicomweb_url, session=session)


def test_segment_round_trip_matches_nifti_predict(
    api: TestClient, orthanc: OrthancProcess, ct_series: CtSeries, tiny_models: ModelStore, tmp_path: Path
) -> None:
    body = {"pacs": "main", "study_uid": ct_series.study_uid, "series_uid": ct_series.series_uid, "model": "tiny"}
    response = api.post("/v1/dicomweb/segment", json={**body, "store": True})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["stored"] is True and result["study_uid"] == ct_series.study_uid
    assert result["label_names"] == ["background", "sphere", "box"]
    assert set(result["stats"]["labels"]) == {"sphere", "box"}

    # The SEG is on the PACS: find it with QIDO, fetch it with WADO-RS, map it onto the source grid.
    client = _dicomweb(orthanc)
    found = client.search_for_series(ct_series.study_uid, search_filters={"Modality": "SEG"})
    assert [s["0020000E"]["Value"][0] for s in found] == [result["seg_series_uid"]]
    seg = client.retrieve_instance(ct_series.study_uid, result["seg_series_uid"], result["seg_sop_instance_uid"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["sphere", "box"]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "tiny"
    from_seg = read_dicom_seg(seg, ct_series.folder)
    assert from_seg.shape == SHAPE

    # The same series as a zip through the synchronous predict endpoint, NIfTI out.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(ct_series.folder.iterdir()):
            archive.write(path, f"series/{path.name}")
    predicted = api.post(
        "/v1/models/tiny/predict",
        files={"file": ("series.zip", buffer.getvalue(), "application/zip")},
        data={"output": "nifti"},
    )
    assert predicted.status_code == 200, predicted.text
    nifti_path = tmp_path / "mask.nii.gz"
    nifti_path.write_bytes(predicted.content)
    nifti = nib.load(str(nifti_path))
    mask = np.asarray(nifti.dataobj).astype(np.int64)
    assert mask.shape == SHAPE
    np.testing.assert_allclose(nifti.affine, load_image(ct_series.folder).affine.numpy(), atol=1e-3)
    np.testing.assert_array_equal(from_seg, mask)
    counts = {name: int((mask == value).sum()) for value, name in enumerate(result["label_names"]) if value}
    assert counts == {name: stat["voxels"] for name, stat in result["stats"]["labels"].items()}
    logging.getLogger(__name__).info("round trip compared %s voxels per label", counts)


def test_segment_without_store(api: TestClient, orthanc: OrthancProcess, ct_series: CtSeries) -> None:
    before = len(_dicomweb(orthanc).search_for_series(ct_series.study_uid, search_filters={"Modality": "SEG"}))
    body = {"pacs": "main", "study_uid": ct_series.study_uid, "series_uid": ct_series.series_uid, "model": "tiny"}
    response = api.post("/v1/dicomweb/segment", json={**body, "store": False})
    assert response.status_code == 200, response.text
    assert response.json()["stored"] is False
    after = _dicomweb(orthanc).search_for_series(ct_series.study_uid, search_filters={"Modality": "SEG"})
    assert len(after) == before


def test_refusals(api: TestClient, ct_series: CtSeries) -> None:
    body = {"pacs": "main", "study_uid": ct_series.study_uid, "series_uid": ct_series.series_uid, "model": "tiny"}
    unknown = api.post("/v1/dicomweb/segment", json={**body, "pacs": "mian"})
    assert unknown.status_code == 404 and unknown.json()["error"] == "UnknownPacs"
    assert "main" in (unknown.json()["hint"] or "")
    for extra in ({"pacs_url": "http://evil.example/dicom-web"}, {"username": "a", "password": "b"}):
        refused = api.post("/v1/dicomweb/segment", json={**body, **extra})
        assert refused.status_code == 422, refused.text
    assert api.post("/v1/dicomweb/segment", json={**body, "series_uid": "1.2/../x"}).status_code == 422
    missing = api.post("/v1/dicomweb/segment", json={**body, "series_uid": "1.2.3.4"})
    assert missing.status_code == 404 and "1.2.3.4" in missing.json()["detail"]
    assert api.post("/v1/dicomweb/segment", json={**body, "model": "nope"}).status_code == 404
    anonymous = api.post("/v1/dicomweb/segment", json=body, headers={"X-API-Key": "wrong"})
    assert anonymous.status_code == 401


def test_pacs_failures_do_not_leak_credentials(
    server_settings: Settings,
    tiny_models: ModelStore,
    orthanc: OrthancProcess,
    ct_series: CtSeries,
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = {"pacs": "main", "study_uid": ct_series.study_uid, "series_uid": ct_series.series_uid, "model": "tiny"}
    cases = [
        (_settings(server_settings, f"http://127.0.0.1:{free_port()}/dicom-web"), "PacsUnreachable"),
        (_settings(server_settings, orthanc.dicomweb_url, password="not-the-password-91"), "PacsAuthFailed"),
    ]
    caplog.set_level(logging.DEBUG)
    for settings, error in cases:
        with TestClient(create_app(settings, models=tiny_models), headers={"X-API-Key": API_KEY}) as client:
            response = client.post("/v1/dicomweb/segment", json=body)
        assert response.status_code == 502, response.text
        assert response.json()["error"] == error and response.json()["hint"]
        for secret in (PASSWORD, "not-the-password-91", "127.0.0.1"):
            assert secret not in response.text
    assert PASSWORD not in caplog.text and "not-the-password-91" not in caplog.text
