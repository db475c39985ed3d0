"""The REST API through ``TestClient``: auth, models, predict in each format, and every bad input as a 4xx JSON body.

One app (auth on, the tiny model) serves the module; a second one has small upload / voxel / time limits. No job is
submitted here, so no worker process starts (jobs run against a real uvicorn in ``test_uvicorn.py``).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from starlette.datastructures import Headers, UploadFile

from server.app import create_app
from server.errors import ApiError
from server.jobs import RESTART_REASON, Job, JobStore
from server.models import ModelStore
from server.settings import load_settings
from server.uploads import ACCEPTED_SUFFIXES, receive_upload
from tests.helpers import make_case, tiny_affine
from tests.server.conftest import API_KEY

KEY = {"X-API-Key": API_KEY}
SHAPE = (32, 28, 36)


def nifti_bytes(channels: int = 1, shape: tuple[int, int, int] = SHAPE, gz: bool = True, zeros: bool = False) -> bytes:
    image = np.zeros(shape, np.float32) if zeros else make_case(np.random.default_rng(3), shape)[0]
    data = image if channels == 1 else np.stack([image] * channels, axis=-1)
    raw = nib.Nifti1Image(data, tiny_affine()).to_bytes()
    return gzip.compress(raw) if gz else raw


@pytest.fixture(scope="module")
def client(models_dir: Path, tiny_models: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = load_settings(
        models_dir=models_dir, data_dir=tmp_path_factory.mktemp("api"), api_keys=[API_KEY], device="cpu"
    )
    with TestClient(create_app(settings, models=tiny_models), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def limited(
    models_dir: Path, tiny_models: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """Auth off, 20 kB uploads, 30,000 voxels, 1 ms synchronous time limit."""
    settings = load_settings(
        models_dir=models_dir,
        data_dir=tmp_path_factory.mktemp("api-limited"),
        auth_enabled=False,
        max_upload_bytes=20_000,
        max_voxels=30_000,
        sync_timeout_s=0.001,
        device="cpu",
    )
    with TestClient(create_app(settings, models=tiny_models), raise_server_exceptions=False) as c:
        yield c


def assert_error(response, status: int, error: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail", "hint", "request_id"}, body
    assert body["detail"] and "Traceback" not in response.text and "/tmp" not in response.text, body
    if error is not None:
        assert body["error"] == error, body
    return body


def post_predict(client: TestClient, files: dict, model: str = "tiny", **params: str):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/models/{model}/predict", files=files, params=params, headers=KEY)


# ---------------------------------------------------------------------------------------------------- auth, models


def test_auth_is_required_and_keys_work(client: TestClient) -> None:
    body = assert_error(client.get("/v1/models"), 401, "Unauthorized")
    assert "X-API-Key" in body["hint"]
    assert_error(client.get("/v1/models", headers={"X-API-Key": "wrong"}), 401)
    assert_error(client.post("/v1/jobs"), 401)
    listed = client.get("/v1/models", headers=KEY)
    assert listed.status_code == 200
    assert listed.json()["models"][0] == {
        "name": "tiny",
        "architecture": "segformer3d",
        "task": "segmentation",
        "in_channels": 1,
        "label_names": ["background", "sphere", "box"],
    }
    bearer = client.get("/v1/models/tiny", headers={"Authorization": f"Bearer {API_KEY}"})
    assert bearer.status_code == 200
    assert bearer.json()["label_names"] == ["background", "sphere", "box"]
    assert bearer.json()["card"]["in_channels"] == 1
    assert client.get("/healthz").status_code == 200


def test_unknown_model_suggests_the_closest(client: TestClient) -> None:
    body = assert_error(client.get("/v1/models/tiyn", headers=KEY), 404, "NotFound")
    assert "tiny" in body["hint"]
    body = assert_error(post_predict(client, {"file": ("a.nii.gz", nifti_bytes())}, model="tiyn"), 404)
    assert "tiny" in body["hint"]


def test_openapi_has_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/models/{name}/predict" in schema["paths"] and "/v1/jobs/{job_id}/result" in schema["paths"]
    assert schema["components"]["schemas"]["JobStatus"]["examples"]


# ---------------------------------------------------------------------------------------------------- predict


def test_predict_nifti_lands_on_the_upload_grid(client: TestClient) -> None:
    r = post_predict(client, {"file": ("/home/me/scans/case 1.nii.gz", nifti_bytes())})
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"] == 'attachment; filename="case_1_seg.nii.gz"'
    assert int(r.headers["content-length"]) == len(r.content)
    assert json.loads(r.headers["x-label-names"]) == ["background", "sphere", "box"]
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    assert mask.shape == SHAPE and np.allclose(mask.affine, tiny_affine(), atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


def test_predict_json_and_nrrd_as_form_fields(client: TestClient) -> None:
    r = client.post("/v1/models/tiny/predict", files={"file": ("c.nii", nifti_bytes(gz=False))},
                    data={"output": "json", "tta": "false"}, headers=KEY)  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["label_names"] == ["background", "sphere", "box"]
    assert set(body["labels"]) == {"sphere", "box"} and body["shape"] == list(SHAPE)
    assert r.headers["content-disposition"] == 'attachment; filename="c_stats.json"'
    r = post_predict(client, {"file": ("c.nii.gz", nifti_bytes())}, output="nrrd")
    assert r.status_code == 200 and r.content[:4] == b"NRRD"


def test_dicom_zip_gives_a_seg_equal_to_the_nifti_mask(client: TestClient, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from medseg.io.dicom_seg import read_dicom_seg

    series = tmp_path / "series"
    series.mkdir()
    (series / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    upload = {"file": ("C:\\exports\\ct.zip", _zip({"study/ct.dcm": (series / "ct.dcm").read_bytes()}))}
    nifti = post_predict(client, upload)
    seg = post_predict(client, upload, output="dicom-seg")
    assert nifti.status_code == 200 and seg.status_code == 200, (nifti.text, seg.text)
    assert seg.headers["content-disposition"] == 'attachment; filename="ct_seg.dcm"'
    assert seg.headers["content-type"] == "application/dicom"
    mask = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content)).dataobj)
    assert mask.shape == (128, 128, 1)
    ds = pydicom.dcmread(io.BytesIO(seg.content))
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["sphere", "box"]
    np.testing.assert_array_equal(read_dicom_seg(ds, series), mask)


# ---------------------------------------------------------------------------------------------------- bad input


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _huge_header_nifti() -> bytes:
    """A valid .nii header claiming 1000³ voxels followed by a few bytes of data."""
    raw = bytearray(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).to_bytes())
    raw[40:48] = np.array([3, 1000, 1000, 1000], "<i2").tobytes()
    return bytes(raw)


BAD = {
    "wrong suffix": ({"file": ("scan.gif", b"GIF89a....")}, {}, 415, "UnsupportedMediaType"),
    "corrupt png": ({"file": ("scan.png", b"\x89PNG....")}, {}, 422, "DataError"),
    "zip slip": ({"file": ("series.zip", _zip({"../evil.dcm": b"x", "ok.dcm": b"y"}))}, {}, 422, "DataError"),
    "not a zip": ({"file": ("series.zip", b"PK\x03\x04 broken")}, {}, 422, "DataError"),
    "zip without dicom": ({"file": ("series.zip", _zip({"readme.txt": b"hello"}))}, {}, 422, "DataError"),
    "corrupt nifti": ({"file": ("bad.nii.gz", nifti_bytes()[:300])}, {}, 422, "DataError"),
    "non-image bytes": ({"file": ("bad.nrrd", b"hello, not an image")}, {}, 422, "DataError"),
    "empty file": ({"file": ("empty.nii.gz", b"")}, {}, 422, "EmptyUpload"),
    "two channels": ({"file": ("two.nii.gz", nifti_bytes(channels=2))}, {}, 422, "ModelInputError"),
    "bad output": ({"file": ("a.nii.gz", nifti_bytes())}, {"output": "gif"}, 422, "ValidationError"),
    "dicom-seg for nifti": ({"file": ("a.nii.gz", nifti_bytes())}, {"output": "dicom-seg"}, 422, "DicomSegNeedsDicom"),
    "missing file field": ({"other": ("a.nii.gz", b"x")}, {}, 422, "ValidationError"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_specific_4xx(client: TestClient, case: str) -> None:
    files, params, status, error = BAD[case]
    body = assert_error(post_predict(client, files, **params), status, error)
    if case == "wrong suffix":
        assert all(s in body["hint"] for s in ACCEPTED_SUFFIXES)
    if case == "zip slip":
        assert "'..'" in body["detail"]
    if case == "missing file field":
        assert "file" in body["detail"]


def test_non_multipart_body_is_415(client: TestClient) -> None:
    r = client.post("/v1/models/tiny/predict", json={"file": "a.nii.gz"}, headers=KEY)
    assert "multipart" in assert_error(r, 415, "UnsupportedMediaType")["hint"]


def test_limits_answer_413_and_503(limited: TestClient) -> None:
    big = {"file": ("big.nii.gz", np.random.default_rng(0).bytes(40_000))}
    assert_error(limited.post("/v1/models/tiny/predict", files=big), 413, "PayloadTooLarge")
    huge = {"file": ("huge.nii", _huge_header_nifti())}
    body = assert_error(limited.post("/v1/models/tiny/predict", files=huge), 413, "TooManyVoxels")
    assert "1000000000 voxels" in body["detail"]
    ok = {"file": ("a.nii.gz", nifti_bytes(zeros=True))}  # 32,256 voxels > 30,000
    assert_error(limited.post("/v1/models/tiny/predict", files=ok), 413, "TooManyVoxels")
    small = {"file": ("s.nii.gz", nifti_bytes(shape=(16, 16, 16), zeros=True))}
    lock = limited.app.state.models.locks["tiny"]
    with lock:  # the model is busy: the 1 ms synchronous limit passes while the request waits for it
        r = limited.post("/v1/models/tiny/predict", files=small)
    assert_error(r, 503, "Timeout")
    assert r.headers["retry-after"] and "/v1/jobs" in r.json()["hint"]


def test_chunked_body_is_capped_while_it_arrives(limited: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield b"x" * 1000

    r = limited.post(
        "/v1/models/tiny/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert_error(r, 413, "PayloadTooLarge")


def test_receive_upload_stops_at_the_size_cap(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, max_upload_bytes=3 << 20)
    upload = UploadFile(io.BytesIO(b"\0" * (4 << 20)), filename="x.nii.gz", headers=Headers({}))
    with pytest.raises(ApiError) as err:
        asyncio.run(receive_upload(upload, settings))
    assert err.value.status == 413
    assert not any((tmp_path / "uploads").iterdir())  # nothing left behind


# ---------------------------------------------------------------------------------------------------- job store


def _job(job_id: str, state: str, attempts: int, created: float) -> Job:
    return Job(job_id, "tiny", "/models/tiny", state, 0.5, "nifti", None, "case", created, None, None, attempts,
               None, f"/data/jobs/{job_id}/input.nii.gz", None, None)  # fmt: skip


def test_store_recovery_requeues_once_then_fails_and_caps_the_queue(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    assert store.insert_if_room(_job("a" * 32, "running", 1, 1.0), max_active=3)
    assert store.insert_if_room(_job("b" * 32, "running", 2, 2.0), max_active=3)
    assert store.insert_if_room(_job("c" * 32, "queued", 0, 3.0), max_active=3)
    assert not store.insert_if_room(_job("d" * 32, "queued", 0, 4.0), max_active=3)  # full
    store.close()
    store = JobStore(tmp_path / "jobs.sqlite3")  # as after a kill -9: the rows are on disk
    assert store.recover() == (1, 1)
    first, second, third = (store.get(c * 32) for c in "abc")
    assert first is not None and first.state == "queued" and first.attempts == 1
    assert second is not None and second.state == "failed" and second.error == RESTART_REASON
    assert third is not None and third.state == "queued"
    assert store.next_queued() == first and store.get("d" * 32) is None
    assert not store.transition(second.id, "running", state="done")  # guarded: a failed job stays failed
    status = second.status()
    assert status["error"] == RESTART_REASON and "/data" not in json.dumps(status)
    store.close()
