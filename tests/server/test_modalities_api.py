"""X-ray angiography runs and ultrasound cines through the server with a 2D model: DICOM SEG from the predict
endpoint, the DICOMweb pull-segment-push against a real Orthanc, and MONAI Label ``/infer`` on a 2D+t volume."""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import torch
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom import examples

from medseg.core.config import ExperimentConfig
from medseg.inference.planar import source_mask
from medseg.inference.rundir import RunDir, save_checkpoint
from medseg.io import load_image
from medseg.io.dicom_seg import read_dicom_seg
from medseg.models import create_model, tiny_overrides
from server.app import create_app
from server.models import ModelStore
from server.settings import PacsSettings, Settings, load_settings
from tests.io.modality_files import region, write_us, write_xa, xa_frames
from tests.server.conftest import API_KEY
from tests.server.orthanc import OrthancProcess

MODEL = "frames"
LABELS = ("background", "vessel")
OPACITY = [0.0, 0.0, 0.0, 0.6, 1.0, 0.7, 0.3]


@pytest.fixture(scope="module")
def frames_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelStore]:
    """A models folder serving a randomly initialised tiny ``unet2d`` as ``frames`` (its mask is not constant)."""
    root = tmp_path_factory.mktemp("frames-models")
    torch.manual_seed(0)
    kwargs = tiny_overrides("unet2d")
    model = create_model("unet2d", label_names=LABELS, **kwargs)
    run = RunDir(root / MODEL)
    run.checkpoints.mkdir(parents=True)
    config = ExperimentConfig().updated({"model": {"name": "unet2d", "kwargs": kwargs, "roi_size": [64, 64]}})
    run.config.write_text(config.to_yaml())
    state = {"model": model.state_dict(), "card": model.card.to_dict(), "model_name": "unet2d", "model_kwargs": kwargs}
    save_checkpoint(state, run.best)
    return root, ModelStore.load(root, "cpu")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An XA run (AVG_SUB) and a US cine cropped by its region, each alone in a folder."""
    root = tmp_path_factory.mktemp("frame-sources")
    (root / "xa").mkdir()
    (root / "us").mkdir()
    xa = write_xa(
        root / "xa" / "run.dcm",
        xa_frames(40, 56, OPACITY),
        mask_items=[{"MaskOperation": "AVG_SUB", "MaskFrameNumbers": [1, 2, 3], "ApplicableFrameRange": [4, 7]}],
        extra={"PatientName": "Phantom^XA"},
    )
    rng = np.random.default_rng(3)
    frames = (rng.random((4, 48, 72)) * 60).astype(np.uint8)
    frames[:, 10:40, 20:50] += 150  # a bright block the tiny model responds to
    us = write_us(root / "us" / "cine.dcm", frames, regions=[region(8, 2, 63, 45)])
    return {"xa": xa, "us": us}


def _settings(root: Path, tmp_path: Path, **changes: object) -> Settings:
    return load_settings(models_dir=root, data_dir=tmp_path / "data", api_keys=[API_KEY], device="cpu", **changes)


def _expected(store: ModelStore, path: Path) -> np.ndarray:
    """The model's mask for ``path`` on the source's full frames ``(X, Y, N)``."""
    prediction = store.get(MODEL).predict(load_image(path), tta=None, prompts=None)
    return np.asarray(source_mask(prediction.mask, prediction.image.meta))


def _frame_refs(seg: pydicom.Dataset) -> list[tuple[str, int]]:
    out = []
    for group in seg.PerFrameFunctionalGroupsSequence:
        item = group.DerivationImageSequence[0].SourceImageSequence[0]
        out.append((str(item.ReferencedSOPInstanceUID), int(item.get("ReferencedFrameNumber", 1))))
    return out


def _zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"series/{path.name}")
    return buffer.getvalue()


def test_predict_answers_a_frame_referencing_seg(
    frames_models: tuple[Path, ModelStore], sources: dict[str, Path], tmp_path: Path
) -> None:
    root, store = frames_models
    with TestClient(create_app(_settings(root, tmp_path), models=store), headers={"X-API-Key": API_KEY}) as api:
        xa = api.post(
            f"/v1/models/{MODEL}/predict",
            files={"file": ("run.zip", _zip(sources["xa"].parent), "application/zip")},
            data={"output": "dicom-seg"},
        )
        us = api.post(
            f"/v1/models/{MODEL}/predict",
            files={"file": ("cine.dcm", sources["us"].read_bytes(), "application/dicom")},
            data={"output": "dicom-seg"},
        )
        png = api.post(
            f"/v1/models/{MODEL}/predict",
            files={"file": ("x.png", b"\x89PNG\r\n\x1a\n", "image/png")},
            data={"output": "dicom-seg"},
        )
    assert png.status_code == 422 and png.json()["error"] == "DicomSegNeedsDicom"
    for response, key, frames in ((xa, "xa", 7), (us, "us", 4)):
        assert response.status_code == 200, response.text
        seg = pydicom.dcmread(io.BytesIO(response.content))
        source = pydicom.dcmread(sources[key], stop_before_pixels=True)
        assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
        assert {uid for uid, _ in _frame_refs(seg)} == {str(source.SOPInstanceUID)}
        expected = _expected(store, sources[key])
        assert expected.shape[2] == frames and 0 < expected.mean() < 1
        back = read_dicom_seg(seg, sources[key])
        np.testing.assert_array_equal(back, expected)


def test_job_answers_a_frame_referencing_seg(
    frames_models: tuple[Path, ModelStore], sources: dict[str, Path], tmp_path: Path
) -> None:
    """The jobs route takes an XA / US ``.dcm`` with ``output=dicom-seg`` as the predict route does."""
    root, store = frames_models
    with TestClient(create_app(_settings(root, tmp_path), models=store), headers={"X-API-Key": API_KEY}) as api:
        r = api.post(
            "/v1/jobs",
            files={"file": ("cine.dcm", sources["us"].read_bytes(), "application/dicom")},
            data={"model": MODEL, "output": "dicom-seg"},
        )
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = api.get(f"/v1/jobs/{job}").json()
            if status["state"] in ("done", "failed"):
                break
            time.sleep(0.2)
        assert status["state"] == "done", status
        result = api.get(f"/v1/jobs/{job}/result")
    assert result.status_code == 200, result.text
    seg = pydicom.dcmread(io.BytesIO(result.content))
    source = pydicom.dcmread(sources["us"], stop_before_pixels=True)
    assert {uid for uid, _ in _frame_refs(seg)} == {str(source.SOPInstanceUID)}
    np.testing.assert_array_equal(read_dicom_seg(seg, sources["us"]), _expected(store, sources["us"]))


@pytest.mark.integration
def test_dicomweb_round_trip_of_an_xa_run_and_a_us_cine(
    frames_models: tuple[Path, ModelStore], sources: dict[str, Path], orthanc: OrthancProcess, tmp_path: Path
) -> None:
    root, store = frames_models
    real_us = Path(examples.get_path("ybr_color"))  # 30 frames, YBR JPEG, a region beyond the image
    pacs = PacsSettings(url=orthanc.dicomweb_url, username=orthanc.auth[0], password=orthanc.auth[1], timeout_s=20.0)
    settings = _settings(root, tmp_path).model_copy(update={"pacs": {"main": pacs}})
    session = requests.Session()
    session.auth = orthanc.auth
    client = DICOMwebClient(orthanc.dicomweb_url, session=session)
    with TestClient(create_app(settings, models=store), headers={"X-API-Key": API_KEY}) as api:
        for path, frames in ((sources["xa"], 7), (real_us, 30)):
            orthanc.upload(path.read_bytes())
            source = pydicom.dcmread(path, stop_before_pixels=True)
            study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
            body = {"pacs": "main", "study_uid": study, "series_uid": series, "model": MODEL, "store": True}
            response = api.post("/v1/dicomweb/segment", json=body)
            assert response.status_code == 200, response.text
            result = response.json()
            assert result["stored"] is True and result["label_names"] == list(LABELS)
            found = client.search_for_series(study, search_filters={"Modality": "SEG"})
            assert [s["0020000E"]["Value"][0] for s in found] == [result["seg_series_uid"]]
            seg = client.retrieve_instance(study, result["seg_series_uid"], result["seg_sop_instance_uid"])
            assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
            assert "FrameOfReferenceUID" not in seg
            refs = _frame_refs(seg)
            assert {uid for uid, _ in refs} == {str(source.SOPInstanceUID)}
            assert {f for _, f in refs} <= set(range(1, frames + 1))
            # the mask the server predicted on the instance it pulled (Orthanc may hand it back transcoded)
            pulled = tmp_path / f"pulled-{frames}"
            pulled.mkdir()
            client.retrieve_instance(study, series, str(source.SOPInstanceUID)).save_as(pulled / "source.dcm")
            expected = _expected(store, pulled / "source.dcm")
            assert expected.shape == (int(source.Columns), int(source.Rows), frames)
            back = read_dicom_seg(seg, pulled)
            np.testing.assert_array_equal(back, expected)
            used = sorted({f for _, f in refs})
            assert used == [t + 1 for t in range(frames) if expected[..., t].any()]


@pytest.mark.integration
def test_monailabel_infer_on_a_cine(
    frames_models: tuple[Path, ModelStore], sources: dict[str, Path], tmp_path: Path
) -> None:
    from tests.server.live import live_server
    from tests.server.slicer_client import SlicerClient

    root, store = frames_models
    volume = np.random.default_rng(1).normal(0, 1, (40, 30, 6)).astype(np.float32)
    volume[10:25, 5:20] += 3
    nifti = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.3, 0.3, 1.0, 1.0])), str(nifti))
    shutil.copy(sources["us"], tmp_path / "cine.dcm")
    settings = _settings(root, tmp_path, auth_enabled=False)
    with live_server(settings, store) as live:
        client = SlicerClient(live.url, tmp_path / "client")
        assert client.info()["models"][MODEL]["labels"] == {"vessel": 1}
        result, params = client.infer(MODEL, "cine", {"result_extension": ".nii.gz"}, file=nifti)
        mask = np.asarray(nib.load(str(result)).dataobj)
        assert mask.shape == volume.shape and params["shape"] == list(volume.shape)
        expected = store.get(MODEL).predict(load_image(nifti), tta=None, prompts=None).mask.numpy()
        np.testing.assert_array_equal(mask, expected)
        # a US DICOM cine: the mask comes back on the source's full frames (the crop pasted back)
        result, params = client.infer(MODEL, "us", {"result_extension": ".nii.gz"}, file=tmp_path / "cine.dcm")
        mask = np.asarray(nib.load(str(result)).dataobj)
        np.testing.assert_array_equal(mask, _expected(store, sources["us"]))
        assert mask.shape == (72, 48, 4) and params["shape"] == [72, 48, 4]
