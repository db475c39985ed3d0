"""Prompted models over REST: prompts as a JSON field on predict and jobs, and every bad prompt as a 422 body."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.models import ModelStore
from server.settings import load_settings
from tests.server.conftest import API_KEY

KEY = {"X-API-Key": API_KEY}
BOX = {"boxes": [[20, 14, 45, 36]]}


@pytest.fixture(scope="module")
def client(prompted_run: Path, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    models = tmp_path_factory.mktemp("prompted-models")
    shutil.copytree(prompted_run, models / "sam")
    shutil.copytree(tiny_run, models / "tiny")
    settings = load_settings(
        models_dir=models,
        data_dir=tmp_path_factory.mktemp("prompted-api"),
        api_keys=[API_KEY],
        device="cpu",
        pacs={"main": {"url": "http://127.0.0.1:9/dicom-web", "timeout_s": 2}},  # nothing listens on port 9
    )
    with TestClient(create_app(settings, models=ModelStore.load(models, "cpu")), raise_server_exceptions=False) as c:
        yield c


def png(shapes_2d: Path, name: str = "img_00.png") -> tuple[str, bytes]:
    return name, (shapes_2d / "images" / name).read_bytes()


def test_card_says_the_model_needs_prompts(client: TestClient) -> None:
    r = client.get("/v1/models/sam", headers=KEY)
    assert r.status_code == 200 and r.json()["card"]["needs_prompts"] is True


def test_predict_png_with_a_box_prompt(client: TestClient, shapes_2d: Path) -> None:
    r = client.post(
        "/v1/models/sam/predict", files={"file": png(shapes_2d)}, data={"prompts": json.dumps(BOX)}, headers=KEY
    )
    assert r.status_code == 200, r.text
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    rows, cols = np.asarray(Image.open(shapes_2d / "images" / "img_00.png")).shape
    assert mask.shape == (cols, rows, 1)
    assert json.loads(r.headers["x-label-names"]) == ["background", "object_1"]
    r = client.post(
        "/v1/models/sam/predict",
        files={"file": png(shapes_2d)},
        params={"output": "json", "prompts": json.dumps({**BOX, "names": ["lesion"]})},
        headers=KEY,
    )
    assert r.status_code == 200 and set(r.json()["labels"]) == {"lesion"}
    r = client.post(
        "/v1/models/sam/predict",
        files={"file": png(shapes_2d)},
        data={"prompts": json.dumps(BOX), "output": "png"},
        headers=KEY,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert r.headers["content-disposition"] == 'attachment; filename="img_00_seg.png"'
    assert np.asarray(Image.open(io.BytesIO(r.content))).shape == (rows, cols)


def test_png_output_of_a_volume_is_a_clear_422(client: TestClient) -> None:
    from tests.server.test_api import nifti_bytes

    r = client.post("/v1/models/tiny/predict", files={"file": ("v.nii.gz", nifti_bytes())}, data={"output": "png"},
                    headers=KEY)  # fmt: skip
    assert r.status_code == 422 and "one 2D slice" in r.json()["detail"] + r.json()["hint"], r.text


@pytest.mark.parametrize(
    ("model", "prompts", "needle"),
    [
        ("sam", None, "needs a box"),
        ("sam", "{not json", "not valid JSON"),
        ("sam", json.dumps({"boxes": [[1, 2, 3]]}), "boxes"),
        ("sam", json.dumps({"boxes": [[30, 2, 10, 9]]}), "x0 >= x1"),
        ("sam", json.dumps({"boxes": [[0, 0, 400, 9]]}), "outside the image"),
        ("tiny", json.dumps(BOX), "does not take prompts"),
    ],
)
def test_bad_prompts_answer_422(client: TestClient, shapes_2d: Path, model: str, prompts: str | None, needle: str):
    data = {"prompts": prompts} if prompts is not None else {}
    r = client.post(f"/v1/models/{model}/predict", files={"file": png(shapes_2d)}, data=data, headers=KEY)
    assert r.status_code == 422, r.text
    body = r.json()
    assert needle in body["detail"] and set(body) >= {"error", "detail", "hint", "request_id"}
    if prompts is None:
        assert "boxes" in body["hint"], "the error shows the expected shape"


def test_job_with_prompts_completes(client: TestClient, shapes_2d: Path) -> None:
    r = client.post(
        "/v1/jobs",
        files={"file": png(shapes_2d, "img_02.png")},
        data={"model": "sam", "prompts": json.dumps(BOX), "output": "json"},
        headers=KEY,
    )
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job}", headers=KEY).json()
        if status["state"] in ("done", "failed"):
            break
        time.sleep(0.2)
    assert status["state"] == "done", status
    result = client.get(f"/v1/jobs/{job}/result", headers=KEY)
    assert result.status_code == 200 and result.json()["label_names"] == ["background", "object_1"]
    missing = client.post("/v1/jobs", files={"file": png(shapes_2d)}, data={"model": "sam"}, headers=KEY)
    assert missing.status_code == 422 and "needs a box" in missing.json()["detail"]


def test_monailabel_infer_takes_slicer_clicks(client: TestClient, shapes_2d: Path) -> None:
    info = client.get("/info/", headers=KEY).json()
    assert info["models"]["sam"]["type"] == "deepgrow" and info["models"]["tiny"]["type"] == "segmentation"
    params = {"foreground": [[30, 24, 0]], "background": [[3, 3, 0]], "result_extension": ".nii.gz"}
    r = client.post("/infer/sam", files={"file": png(shapes_2d)}, data={"params": json.dumps(params)}, headers=KEY)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("multipart/form-data")
    boxed = {"prompts": BOX}
    assert client.post("/infer/sam", files={"file": png(shapes_2d)}, data={"params": json.dumps(boxed)},
                       headers=KEY).status_code == 200  # fmt: skip
    r = client.post("/infer/sam", files={"file": png(shapes_2d)}, data={"params": "{}"}, headers=KEY)
    assert r.status_code == 422 and "needs a box" in r.json()["detail"]


def test_dicomweb_checks_prompts_before_touching_the_pacs(client: TestClient) -> None:
    body = {"pacs": "main", "study_uid": "1.2.3", "series_uid": "1.2.3.4", "model": "sam", "store": False}
    r = client.post("/v1/dicomweb/segment", json=body, headers=KEY)
    assert r.status_code == 422 and "needs a box" in r.json()["detail"], r.text
    r = client.post("/v1/dicomweb/segment", json={**body, "prompts": {"boxes": [[1, 2, 3]]}}, headers=KEY)
    assert r.status_code == 422 and "boxes" in r.json()["detail"], r.text
    r = client.post("/v1/dicomweb/segment", json={**body, "prompts": BOX}, headers=KEY)
    assert r.status_code == 502 and r.json()["error"] == "PacsUnreachable", "valid prompts go on to the PACS"
