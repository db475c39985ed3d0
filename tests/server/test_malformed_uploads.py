"""The malformed-file corpus against a live server: every bad upload is a 4xx JSON error, never a 5xx.

Each corpus file is sent to ``POST /v1/models/tiny/predict`` (auth on, API key); the malformed ones also to
``POST /v1/jobs``, MONAI Label ``POST /infer/tiny`` and ``PUT /datastore/``. The server never opts in to external
pixel data, so even the files that load locally with ``allow_external_data=True`` must be refused. The valid 3D
volumes must be segmented (200), so the test fails both ways.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from server.models import ModelStore
from server.settings import load_settings
from tests.corpus.malformed import Case, build_corpus
from tests.server.conftest import API_KEY
from tests.server.live import Live, live_server

pytestmark = pytest.mark.integration

KEY = {"X-API-Key": API_KEY}
# A fresh connection per request: on a reused loopback connection each response waits ~40 ms for a delayed ACK.
NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return [c for c in build_corpus(tmp_path_factory.mktemp("corpus")) if c.path.is_file()]


@pytest.fixture(scope="module")
def live(models_dir: Path, tiny_models: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    settings = load_settings(
        models_dir=models_dir,
        data_dir=tmp_path_factory.mktemp("malformed-server"),
        api_keys=[API_KEY],
        device="cpu",
        zip_max_members=500,  # the corpus' zip limits (tests.corpus.dicom_zip)
        zip_max_total_bytes=16 << 20,
        max_queue=64,
    )
    with live_server(settings, tiny_models) as server:
        yield server


def _is_json_error(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except json.JSONDecodeError:
        return False
    return isinstance(body, dict) and bool(body.get("error")) and bool(body.get("detail"))


def _send(client: httpx.Client, url: str, route: str, case: Case) -> httpx.Response:
    files = {"file": (case.path.name, case.path.read_bytes(), "application/octet-stream")}
    if route == "predict":
        return client.post(f"{url}/v1/models/tiny/predict", files=files, params={"output": "json"})
    if route == "jobs":
        return client.post(f"{url}/v1/jobs", files=files, data={"model": "tiny", "output": "json"})
    if route == "infer":
        return client.post(f"{url}/infer/tiny", files=files, data={"params": "{}"})
    return client.put(f"{url}/datastore/", files=files, params={"image": "corpus-image"}, data={"params": "{}"})


def _run(live: Live, cases: list[Case], route: str) -> tuple[Counter[str], list[str]]:
    counts: Counter[str] = Counter()
    failures = []
    with httpx.Client(headers=KEY, timeout=60.0, limits=NO_KEEPALIVE) as client:
        for case in cases:
            r = _send(client, live.url, route, case)
            counts[f"{r.status_code // 100}xx"] += 1
            if case.valid and case.volume and not case.options:
                if r.status_code != 200:
                    failures.append(f"{route} {case.name}: valid volume answered {r.status_code} {r.text[:200]}")
            elif case.valid and not case.options:
                if r.status_code >= 500:
                    failures.append(f"{route} {case.name}: {r.status_code} {r.text[:200]}")
            elif not (400 <= r.status_code < 500 and _is_json_error(r)):
                failures.append(f"{route} {case.name}: {r.status_code} {r.text[:200]}")
    return counts, failures


def test_predict_refuses_every_malformed_upload_with_4xx_json(live: Live, corpus: list[Case]) -> None:
    counts, failures = _run(live, corpus, "predict")
    assert not failures, "\n".join(failures)
    assert counts["5xx"] == 0
    assert counts["4xx"] >= 150 and counts["2xx"] >= 4, counts


@pytest.mark.parametrize("route", ["jobs", "infer", "datastore"])
def test_every_other_upload_route_refuses_the_malformed_files(live: Live, corpus: list[Case], route: str) -> None:
    malformed = [c for c in corpus if not c.valid or c.options]
    counts, failures = _run(live, malformed, route)
    assert not failures, "\n".join(failures)
    assert counts["5xx"] == 0 and counts["4xx"] == len(malformed), counts


def test_datastore_label_must_share_the_image_grid(live: Live, tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image = np.random.default_rng(0).normal(size=(8, 7, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "image.nii.gz")
    shifted = affine.copy()
    shifted[0, 3] = 5.0  # same shape, other origin
    nib.save(nib.Nifti1Image(np.zeros((8, 7, 6), np.uint8), shifted), tmp_path / "moved.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 7, 6), np.uint8), affine), tmp_path / "label.nii.gz")
    with httpx.Client(headers=KEY, timeout=60.0, limits=NO_KEEPALIVE) as client:

        def put(route: str, path: Path, part: str) -> httpx.Response:
            files = {part: (path.name, path.read_bytes(), "application/octet-stream")}
            return client.put(f"{live.url}{route}", files=files, params={"image": "grid"}, data={"params": "{}"})

        assert put("/datastore/", tmp_path / "image.nii.gz", "file").status_code == 200
        moved = put("/datastore/label", tmp_path / "moved.nii.gz", "label")
        assert moved.status_code == 422 and moved.json()["error"] == "GeometryMismatch", moved.text
        assert "differ by up to 5 mm" in moved.json()["detail"]
        assert put("/datastore/label", tmp_path / "label.nii.gz", "label").status_code == 200
