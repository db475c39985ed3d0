"""The MONAI Label protocol against a real uvicorn on 127.0.0.1, driven by a client that calls like 3D Slicer.

Two uvicorn servers start once for the module, each in a thread of the test process: one with auth on (a user for
the token flow), one with auth off and a small voxel cap. Both serve the tiny trained model of
``tests/server/conftest.py`` as ``tiny``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from server.datastore import check_id, store_suffix
from server.errors import ApiError
from server.models import ModelStore
from server.settings import load_settings
from tests.server.live import live_server
from tests.server.slicer_client import SlicerClient, SlicerClientError, parse_with_cgi

pytestmark = pytest.mark.integration

USER, PASSWORD = "radiologist", "s3cret-pass"
MAX_VOXELS = 200_000


@dataclass
class Server:
    url: str
    data_dir: Path


@pytest.fixture(scope="module")
def servers(
    models_dir: Path, tiny_models: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    root = tmp_path_factory.mktemp("monailabel")
    common = {"models_dir": models_dir, "device": "cpu"}
    auth = load_settings(
        data_dir=root / "auth", users={USER: PASSWORD}, api_keys=["unused-key"], auth_enabled=True, **common
    )
    open_ = load_settings(data_dir=root / "open", auth_enabled=False, max_voxels=MAX_VOXELS, **common)
    with live_server(auth, tiny_models) as a, live_server(open_, tiny_models) as o:
        yield {"auth": Server(a.url, auth.data_dir), "open": Server(o.url, open_.data_dir)}


@pytest.fixture()
def auth_server(servers: dict[str, Server]) -> Server:
    return servers["auth"]


@pytest.fixture()
def open_server(servers: dict[str, Server]) -> Server:
    return servers["open"]


def _oblique_image(shape_zyx: tuple[int, int, int] = (20, 24, 28), seed: int = 0) -> sitk.Image:
    """A float volume with a sphere, anisotropic spacing, a shifted origin and a rotated direction."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape_zyx], indexing="ij")
    centre = np.array(shape_zyx) / 2
    sphere = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < 36
    arr = rng.normal(0.2, 0.1, shape_zyx).astype(np.float32) + sphere.astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.1, 0.9, 2.0))
    img.SetOrigin((3.0, -4.0, 5.5))
    c, s = np.cos(0.4), np.sin(0.4)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return img


def _assert_same_grid(result: sitk.Image, reference: sitk.Image) -> None:
    assert result.GetSize() == reference.GetSize()
    np.testing.assert_allclose(result.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(result.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(result.GetDirection(), reference.GetDirection(), atol=1e-6)


def _assert_error(err: SlicerClientError, status: int, error: str | None = None) -> dict:
    assert err.status == status, err.body
    body = err.json()
    assert set(body) >= {"error", "detail", "hint"}
    assert "Traceback" not in json.dumps(body)
    if error:
        assert body["error"] == error, body
    return body


def test_auth_token_flow(auth_server: Server, tmp_path: Path) -> None:
    client = SlicerClient(auth_server.url, tmp_path)
    assert client.auth_enabled() is True
    with pytest.raises(SlicerClientError) as exc:
        client.info()
    _assert_error(exc.value, 401, "Unauthorized")
    with pytest.raises(SlicerClientError) as exc:
        client.login(USER, "wrong")
    _assert_error(exc.value, 401)
    client.headers["Authorization"] = "bearer not-a-token"
    with pytest.raises(SlicerClientError) as exc:
        client.info()
    _assert_error(exc.value, 401)

    client.login(USER, PASSWORD)
    assert client.headers["Authorization"].startswith("bearer ")
    assert "tiny" in client.info()["models"]
    assert client.datastore("ids") == []


def test_auth_off(open_server: Server, tmp_path: Path) -> None:
    client = SlicerClient(open_server.url, tmp_path)
    assert client.auth_enabled() is False
    assert "tiny" in client.info()["models"]
    with pytest.raises(SlicerClientError) as exc:
        client.login(USER, PASSWORD)
    assert 400 <= exc.value.status < 500


def test_info_shape(open_server: Server, tmp_path: Path) -> None:
    info = SlicerClient(open_server.url, tmp_path).info()
    assert "config" not in info  # a top-level config makes Slicer ask for a server upgrade
    assert info["name"] == "medseg" and isinstance(info["version"], str)
    assert info["labels"] == ["sphere", "box"]
    for key in ("trainers", "strategies", "scoring", "train_stats"):
        assert info[key] == {}
    assert set(info["datastore"]) >= {"total", "completed"}
    model = info["models"]["tiny"]
    assert model["type"] == "segmentation"
    assert model["labels"] == {"sphere": 1, "box": 2}
    assert model["dimension"] == 3
    assert isinstance(model["description"], str) and model["description"]


def test_infer_uploaded_nrrd(auth_server: Server, tmp_path: Path) -> None:
    client = SlicerClient(auth_server.url, tmp_path / "slicer tmp")
    client.login(USER, PASSWORD)
    source = tmp_path / "Slicer scene" / "MR Head.nrrd"  # the part's filename is this full path, spaces included
    source.parent.mkdir()
    image = _oblique_image()
    sitk.WriteImage(image, str(source))

    result_file, params = client.infer("tiny", "MR Head", file=source)

    reply = client.last
    assert reply is not None
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert "transfer-encoding" not in reply.headers
    assert reply.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert params["label_names"] == {"sphere": 1, "box": 2}
    assert result_file.suffix == ".nrrd" and result_file.parent == tmp_path / "slicer tmp"
    mask = sitk.ReadImage(str(result_file))
    _assert_same_grid(mask, image)
    assert mask.GetPixelIDValue() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1, 2}
    try:  # the parser Slicer's client uses reads the same parts
        form, files = parse_with_cgi(reply.headers["content-type"], reply.body)
    except ImportError:
        return
    assert form == reply.form and files == reply.files


def test_upload_then_infer_by_id(open_server: Server, tmp_path: Path) -> None:
    client = SlicerClient(open_server.url, tmp_path / "out")
    source = tmp_path / "volume.nii.gz"
    affine = np.diag([1.2, 0.8, 1.5, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 2.0)
    data = np.random.default_rng(1).normal(0.2, 0.1, (24, 20, 16)).astype(np.float32)
    data[8:16, 6:14, 4:12] += 1.0
    nib.save(nib.Nifti1Image(data, affine), source)

    assert client.upload_image(source, "case 1") == {"image": "case 1"}
    assert "case 1" in client.datastore("ids")
    objects = client.datastore("all")["objects"]
    assert objects["case 1"]["image"]["ext"] == ".nii.gz"
    assert client.download_image("case 1") == source.read_bytes()

    result_file, params = client.infer("tiny", "case 1", {"result_extension": ".nii.gz"})
    assert result_file.name.endswith(".nii.gz")
    assert params["label_names"] == {"sphere": 1, "box": 2}
    _assert_same_grid(sitk.ReadImage(str(result_file)), sitk.ReadImage(str(source)))

    before = client.datastore("stats")["completed"]
    saved = client.save_label("case 1", result_file, tag="final")
    assert saved["image"] == "case 1"
    assert client.datastore("stats")["completed"] == before + 1
    assert client.info()["datastore"]["completed"] == before + 1
    assert "final" in client.datastore("all")["objects"]["case 1"]["labels"]

    # Windows-style full paths as part filenames, and the older client that sends no params field at all
    windows = tmp_path / "C:\\Users\\rad\\AppData\\Local\\Temp\\tmpab12.nii.gz"
    windows.write_bytes(source.read_bytes())
    assert client.multipart("PUT", "/datastore/?image=win", {}, {"file": windows}).status == 200
    assert client.datastore("all")["objects"]["win"]["image"]["ext"] == ".nii.gz"


def test_bad_ids_and_params(open_server: Server, tmp_path: Path) -> None:
    client = SlicerClient(open_server.url, tmp_path)
    good = tmp_path / "ok.nrrd"
    sitk.WriteImage(_oblique_image((8, 8, 8)), str(good))
    cases = [
        ("POST", "/infer/tiny?image=..%2F..%2Fetc%2Fpasswd", {"params": "{}"}, {}, 400, "BadId"),
        ("POST", "/infer/tiny?image=a%2Fb", {"params": "{}"}, {}, 400, "BadId"),
        ("POST", "/infer/tiny?image=x%00y", {"params": "{}"}, {}, 400, "BadId"),
        ("POST", "/infer/tiny?image=..", {"params": "{}"}, {"file": good}, 400, "BadId"),
        ("PUT", "/datastore/?image=..%2Fescape", {"params": "{}"}, {"file": good}, 400, "BadId"),
        ("PUT", "/datastore/label?image=a%5Cb", {"params": "{}"}, {"label": good}, 400, "BadId"),
        ("POST", "/infer/tiny?image=x", {"params": "{not json"}, {"file": good}, 400, "BadParams"),
        ("POST", "/infer/tiny?image=x", {"params": "[1, 2]"}, {"file": good}, 400, "BadParams"),
        ("POST", "/infer/tiny?image=x", {"params": '{"result_extension": ".png"}'}, {"file": good}, 422, "BadParams"),
        ("POST", "/infer/tiny?image=x", {"params": '{"result_dtype": "complex64"}'}, {"file": good}, 422, None),
        ("POST", "/infer/tiny?image=never-uploaded", {"params": "{}"}, {}, 404, "NotFound"),
        ("POST", "/infer/tinny?image=x", {"params": "{}"}, {"file": good}, 404, "NotFound"),
        ("PUT", "/datastore/label?image=never-uploaded", {"params": "{}"}, {"label": good}, 404, "NotFound"),
    ]
    for method, selector, fields, files, status, error in cases:
        reply = client.multipart(method, selector, fields, files)
        body = _assert_error(SlicerClientError(reply.status, reply.body), status, error)
        assert str(open_server.data_dir) not in json.dumps(body), selector
    for selector in ("/datastore/image?image=..%2Fx", "/datastore/?output=everything"):
        reply = client._request("GET", selector)
        assert 400 <= reply.status < 500 and "error" in json.loads(reply.body), selector


def test_bad_files(open_server: Server, tmp_path: Path) -> None:
    client = SlicerClient(open_server.url, tmp_path)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"this is not an image at all" * 10)
    gif = tmp_path / "picture.gif"
    gif.write_bytes(b"GIF89a" + b"\0" * 64)
    liar = tmp_path / "huge.nrrd"  # a header declaring 10^9 voxels over a few bytes of data
    header = b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1000 1000 1000\nendian: little\nencoding: raw\n\n"
    liar.write_bytes(header + b"\0" * 64)
    big = tmp_path / "big.nrrd"
    sitk.WriteImage(_oblique_image((40, 80, 80)), str(big))  # 256 000 voxels > MAX_VOXELS
    for path, status, error in [(junk, 422, None), (gif, 415, None), (liar, 413, "TooManyVoxels"), (big, 413, None)]:
        for method, selector in (("POST", "/infer/tiny?image=x"), ("PUT", "/datastore/?image=x")):
            reply = client.multipart(method, selector, {"params": "{}"}, {"file": path})
            _assert_error(SlicerClientError(reply.status, reply.body), status, error)
    assert "x" not in client.datastore("ids")


@pytest.mark.parametrize("bad", ["", "a/b", "a\\b", "..", "x..y", ".hidden", "nul\x00", "tab\tid", " pad", "x" * 129])
def test_check_id_refuses(bad: str) -> None:
    with pytest.raises(ApiError) as exc:
        check_id(bad)
    assert exc.value.status == 400


def test_check_id_and_suffix_accept() -> None:
    assert check_id("MR Head (1)_v2.0") == "MR Head (1)_v2.0"
    assert store_suffix("C:\\tmp\\vol.NII.GZ") == ".nii.gz"
    assert store_suffix("/tmp/slicer/x.nrrd") == ".nrrd"
    assert store_suffix("/tmp/series.zip") is None and store_suffix(".nrrd") is None
