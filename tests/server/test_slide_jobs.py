"""Jobs on a live server: a whole slide uploaded as a job (the CLI's slide path in the worker, outputs served as a
zip or one by one with ``?format=``), a classifier's job answering its JSON, and the 4xx answers of bad slide jobs."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image

from server.models import ModelStore
from server.settings import load_settings
from tests.server.live import live_server
from tests.slide_helpers import REAL_SLIDE, SKIP_REASON, tiny_run

pytestmark = pytest.mark.integration
KEY = {"X-API-Key": "slide-key"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    models = tmp_path_factory.mktemp("slide-models")
    tiny_run(models / "cls", "medvit2_tiny", ("benign", "tumor"))
    tiny_run(models / "seg", "medvit2_seg_tiny", ("background", "tumor"))
    settings = load_settings(
        models_dir=models, data_dir=tmp_path_factory.mktemp("slide-data"), api_keys=[KEY["X-API-Key"]], device="cpu"
    )
    with live_server(settings, ModelStore.load(models, "cpu")) as live:
        with httpx.Client(base_url=live.url, headers=KEY, timeout=120.0) as client:
            yield client


def _wait(client: httpx.Client, job_id: str, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not finish in {timeout} s")


def _submit(client: httpx.Client, name: str, content: bytes, **data: str) -> httpx.Response:
    return client.post("/v1/jobs", files={"file": (name, content, "application/octet-stream")}, data=data)


def test_classifier_job_answers_the_class_json(server: httpx.Client) -> None:
    ihc = Image.open(Path(skimage.data.data_dir) / "ihc.png").convert("RGB").crop((0, 0, 200, 160))
    buf = io.BytesIO()
    ihc.save(buf, format="PNG")
    r = _submit(server, "tile.png", buf.getvalue(), model="cls", output="nifti")
    assert r.status_code == 422 and "is not available" in r.json()["detail"], r.text
    r = _submit(server, "tile.png", buf.getvalue(), model="cls")
    assert r.status_code == 202, r.text
    status = _wait(server, r.json()["id"])
    assert status["state"] == "done", status
    result = server.get(f"/v1/jobs/{r.json()['id']}/result")
    assert result.status_code == 200 and result.headers["content-type"].startswith("application/json")
    body = result.json()
    assert set(body) == {"label", "label_name", "probabilities"} and list(body["probabilities"]) == ["benign", "tumor"]
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["label_name"] == ["benign", "tumor"][body["label"]]


@pytest.mark.skipif(not REAL_SLIDE.is_file(), reason=SKIP_REASON)
@pytest.mark.parametrize("model", ["cls", "seg"])
def test_slide_job_runs_the_slide_path_and_serves_its_outputs(server: httpx.Client, model: str) -> None:
    r = _submit(server, REAL_SLIDE.name, REAL_SLIDE.read_bytes(), model=model, mpp="2.0")
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    status = _wait(server, job_id)
    assert status["state"] == "done", status
    archive = server.get(f"/v1/jobs/{job_id}/result")
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    assert archive.headers["content-disposition"].endswith('cmu_small_region_slide.zip"')
    names = set(zipfile.ZipFile(io.BytesIO(archive.content)).namelist())
    summary = server.get(f"/v1/jobs/{job_id}/result", params={"format": "summary"}).json()
    assert summary["mpp"][0] == pytest.approx(2.0, rel=0.02) and summary["tiles"] >= 1
    if model == "cls":
        assert names == {"heatmap.npy", "heatmap.ome.tif", "overlay.png", "summary.json", "tiles.json"}
        tiles = server.get(f"/v1/jobs/{job_id}/result", params={"format": "tiles"}).json()
        assert len(tiles["tiles"]) == summary["tiles"] and tiles["label_names"] == ["benign", "tumor"]
        heat = server.get(f"/v1/jobs/{job_id}/result", params={"format": "heatmap"})
        assert heat.status_code == 200 and tifffile.TiffFile(io.BytesIO(heat.content)).pages[0].dtype == np.float32
        missing = server.get(f"/v1/jobs/{job_id}/result", params={"format": "geojson"})
        assert missing.status_code == 404 and "heatmap" in missing.json()["hint"]
    else:
        assert {"labels.ome.tif", "contours.geojson", "overlay.png", "summary.json"} <= names
        geo = server.get(f"/v1/jobs/{job_id}/result", params={"format": "geojson"})
        assert geo.status_code == 200 and geo.json()["type"] == "FeatureCollection"
    overlay = server.get(f"/v1/jobs/{job_id}/result", params={"format": "overlay"})
    assert Image.open(io.BytesIO(overlay.content)).mode == "RGB"
    assert server.get(f"/v1/jobs/{job_id}/result", params={"format": "bogus"}).status_code == 422


def _pyramid_without_mpp() -> bytes:
    rgb = np.full((512, 512, 3), 240, np.uint8)
    rgb[100:400, 100:400] = (150, 60, 160)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        tif.write(rgb, tile=(128, 128), photometric="rgb", subifds=1)
        tif.write(rgb[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)
    return buf.getvalue()


def test_bad_slide_jobs_are_4xx(server: httpx.Client) -> None:
    content = _pyramid_without_mpp()
    r = _submit(server, "nompp.tif", content, model="cls")
    assert r.status_code == 422 and r.json()["error"] == "SlideMppMissing" and "slide_mpp" in r.json()["hint"]
    r = _submit(server, "nompp.tif", content, model="seg", output="nifti", slide_mpp="0.5")
    assert r.status_code == 422 and "?format=" in r.json()["detail"], r.text
    r = _submit(server, "broken.svs", b"not a slide at all", model="cls")
    assert r.status_code in (415, 422) and "/tmp" not in json.dumps(r.json()), r.text
    r = _submit(server, "nompp.tif", content, model="cls", slide_mpp="0.5", mpp="1.0")
    assert r.status_code == 202, r.text
    status = _wait(server, r.json()["id"])
    assert status["state"] == "done", status
