"""The synchronous predict endpoint of a classifier: JSON ``{label, label_name, probabilities}``, the task in the
model listing, and bad requests (a mask format, a volume, prompts) as 4xx JSON bodies."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import skimage.data
import torch
from fastapi.testclient import TestClient
from PIL import Image

from medseg.core.config import ExperimentConfig
from medseg.inference.rundir import RunDir, save_checkpoint
from medseg.models import create_model, tiny_overrides
from server.app import create_app
from server.models import ModelStore
from server.settings import load_settings

torch.set_num_threads(1)

KEY = {"X-API-Key": "classify-key"}
NAMES = ("benign", "malignant")


def _classifier_run(root: Path) -> Path:
    torch.manual_seed(0)
    kwargs = tiny_overrides("medvit2_tiny")
    model = create_model("medvit2_tiny", label_names=NAMES, **kwargs)
    run = RunDir(root)
    run.checkpoints.mkdir(parents=True)
    changes = {"model": {"name": "medvit2_tiny", "kwargs": kwargs, "roi_size": [128, 128]}}
    run.config.write_text(ExperimentConfig().updated(changes).to_yaml())
    state = {"model": model.state_dict(), "card": model.card.to_dict(), "model_name": "medvit2_tiny"}
    save_checkpoint({**state, "model_kwargs": kwargs}, run.best)
    return root


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    models = tmp_path_factory.mktemp("cls-models")
    _classifier_run(models / "lesions")
    settings = load_settings(
        models_dir=models, data_dir=tmp_path_factory.mktemp("cls-data"), api_keys=[KEY["X-API-Key"]], device="cpu"
    )
    store = ModelStore.load(models, "cpu")
    assert store.names() == ["lesions"]
    with TestClient(create_app(settings, models=store), raise_server_exceptions=False) as c:
        yield c


def _png_bytes() -> bytes:
    ihc = Image.open(Path(skimage.data.data_dir) / "ihc.png").convert("RGB").crop((0, 0, 200, 160))
    buf = io.BytesIO()
    ihc.save(buf, format="PNG")
    return buf.getvalue()


def test_listing_shows_the_task(client: TestClient) -> None:
    models = client.get("/v1/models", headers=KEY).json()["models"]
    assert models == [
        {
            "name": "lesions",
            "architecture": "medvit2_tiny",
            "task": "classification",
            "in_channels": 3,
            "label_names": list(NAMES),
        }
    ]


@pytest.mark.parametrize("output", [None, "json"])
def test_predict_answers_the_class_as_json(client: TestClient, output: str | None) -> None:
    data = {} if output is None else {"output": output}
    r = client.post(
        "/v1/models/lesions/predict", headers=KEY, files={"file": ("tile.png", _png_bytes(), "image/png")}, data=data
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"label", "label_name", "probabilities"}
    assert list(body["probabilities"]) == list(NAMES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["label_name"] == NAMES[body["label"]]
    assert body["label"] == int(np.argmax(list(body["probabilities"].values())))


def test_bad_requests_are_4xx_json(client: TestClient) -> None:
    png = {"file": ("tile.png", _png_bytes(), "image/png")}
    r = client.post("/v1/models/lesions/predict", headers=KEY, files=png, data={"output": "nifti"})
    assert r.status_code == 422 and "is a classifier" in r.json()["detail"]
    volume = nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 6)).astype(np.float32), np.eye(4))
    vol = {"file": ("scan.nii.gz", gzip.compress(volume.to_bytes()), "application/gzip")}
    r = client.post("/v1/models/lesions/predict", headers=KEY, files=vol)
    assert r.status_code == 422 and "classifies 2D images" in r.json()["detail"], r.text
    prompts = json.dumps({"objects": [{"box": [1, 1, 5, 5]}]})
    r = client.post("/v1/models/lesions/predict", headers=KEY, files=png, data={"prompts": prompts})
    assert r.status_code == 422 and "does not take prompts" in r.json()["detail"], r.text
    assert client.post("/v1/models/lesions/predict", files=png).status_code == 401
