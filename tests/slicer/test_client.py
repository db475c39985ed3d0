"""``MedSegLib.client`` against the real medseg server (uvicorn on 127.0.0.1): every call and every failure mode.

The server serves the tiny 3D model ``tiny`` and the tiny prompted 2D model ``sam``, with auth on (an API key and a
user for the token flow). Volumes are written by ``MedSegLib.scene.write_nrrd``, as the module uploads them, and the
returned NRRD masks are read back with ``MedSegLib.scene.read_nrrd``, as the module reads them.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from MedSegLib.client import JobStatus, MedSegClient, MedSegServerError, encode_multipart
from MedSegLib.scene import label_statistics, read_nrrd, statistics_rows, write_nrrd

from server.models import ModelStore
from server.settings import load_settings
from tests.helpers import make_case, tiny_affine
from tests.server.conftest import API_KEY
from tests.server.live import live_server

pytestmark = pytest.mark.integration

USER, PASSWORD = "radiologist", "s3cret-pw"
LABELS = ("background", "sphere", "box")
BOX = {"boxes": [[20, 14, 45, 36]]}


@pytest.fixture(scope="module")
def url(prompted_run: Path, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = tmp_path_factory.mktemp("slicer-models")
    shutil.copytree(tiny_run, models / "tiny")
    shutil.copytree(prompted_run, models / "sam")
    settings = load_settings(
        models_dir=models,
        data_dir=tmp_path_factory.mktemp("slicer-server"),
        api_keys=[API_KEY],
        users={USER: PASSWORD},
        device="cpu",
    )
    with live_server(settings, ModelStore.load(models, "cpu")) as live:
        yield live.url


@pytest.fixture(scope="module")
def client(url: str) -> MedSegClient:
    return MedSegClient(url, api_key=API_KEY, timeout_s=120)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """An oblique, anisotropic NRRD volume ``(K, J, I)`` = (36, 28, 32) as the module writes it, and its matrix."""
    image, _ = make_case(np.random.default_rng(3), (32, 28, 36))  # (I, J, K)
    path = tmp_path_factory.mktemp("slicer-volume") / "volume.nrrd"
    write_nrrd(path, image.transpose(2, 1, 0), tiny_affine())
    return path, tiny_affine()


def shape_png(shapes_2d: Path) -> Path:
    return shapes_2d / "images" / "img_00.png"


def raises(call, status: int | None, error: str) -> MedSegServerError:  # type: ignore[no-untyped-def]
    with pytest.raises(MedSegServerError) as info:
        call()
    exc = info.value
    assert (exc.status, exc.error) == (status, error), exc.message()
    assert exc.detail and exc.error in exc.message()
    return exc


def test_connection_models_and_cards(client: MedSegClient) -> None:
    models = {m.name: m for m in client.test_connection()}
    assert set(models) == {"tiny", "sam"}
    assert models["tiny"].label_names == LABELS and models["tiny"].card["architecture"] == "segformer3d"
    tiny, sam = client.get_model("tiny"), client.get_model("sam")
    assert not tiny.needs_prompts and tiny.card["spatial_dims"] == 3 and tiny.label_names == LABELS
    assert sam.needs_prompts and "needs prompts" in sam.describe()
    assert "sphere, box" in tiny.describe() and "architecture: segformer3d" in tiny.describe()
    assert "architecture: segformer3d" in models["tiny"].describe()


def test_missing_or_wrong_credentials_are_401(url: str) -> None:
    for anonymous in (MedSegClient(url), MedSegClient(url, api_key="wrong-key")):
        exc = raises(anonymous.list_models, 401, "Unauthorized")
        assert "X-API-Key" in (exc.hint or "") and exc.request_id
    assert MedSegClient(url).ready()["status"] == "ready"  # health needs no key
    raises(MedSegClient(url, api_key="wrong-key").test_connection, 401, "Unauthorized")
    assert "wrong-key" not in repr(MedSegClient(url, api_key="wrong-key"))


def test_token_login(url: str) -> None:
    client = MedSegClient(url)
    exc = raises(lambda: client.login(USER, "not-it"), 401, "Unauthorized")
    assert "user name or password" in exc.detail
    token = client.login(USER, PASSWORD)
    assert token and client.has_credentials and token not in repr(client)
    assert {m.name for m in client.list_models()} == {"tiny", "sam"}
    assert MedSegClient(url, token=token).get_model("tiny").label_names == LABELS
    raises(MedSegClient(url, token=token + "x").list_models, 401, "Unauthorized")


def test_unknown_model_suggests_the_closest(client: MedSegClient, volume: tuple[Path, np.ndarray]) -> None:
    exc = raises(lambda: client.get_model("tiyn"), 404, "NotFound")
    assert "tiny" in (exc.hint or "")
    raises(lambda: client.predict("tiyn", volume[0]), 404, "NotFound")
    raises(lambda: client.submit_job("tiyn", volume[0]), 404, "NotFound")


def test_predict_nrrd_keeps_the_volume_geometry(client: MedSegClient, volume: tuple[Path, np.ndarray]) -> None:
    path, ijk_to_ras = volume
    result = client.predict("tiny", path)
    assert result.label_names == LABELS and result.filename == "volume_seg.nrrd"
    mask = read_nrrd(result.save(path.parent / result.filename))
    assert mask.array.shape == (36, 28, 32) and mask.array.dtype.kind in "iu"
    np.testing.assert_allclose(mask.ijk_to_ras, ijk_to_ras, atol=1e-4)
    assert set(np.unique(mask.array)) <= {0, 1, 2}


def test_statistics_match_the_downloaded_mask(client: MedSegClient, volume: tuple[Path, np.ndarray]) -> None:
    """The server's ``output=json`` numbers equal those the module computes from the NRRD it downloaded."""
    stats = client.statistics("tiny", volume[0])
    assert stats["model"] == "tiny" and stats["label_names"] == list(LABELS)
    rows = statistics_rows(stats)
    assert [r[0] for r in rows] == list(LABELS[1:]) and [r[1] for r in rows] == [1, 2]
    mask = read_nrrd(client.predict("tiny", volume[0]).save(volume[0].parent / "for-stats.nrrd"))
    local = label_statistics(mask, LABELS)
    assert [r[:3] for r in local] == [r[:3] for r in rows]
    assert [r[3] for r in local] == pytest.approx([r[3] for r in rows], abs=1e-3)


def test_4xx_bodies_are_readable(client: MedSegClient, volume: tuple[Path, np.ndarray]) -> None:
    exc = raises(lambda: client.predict("tiny", ("notes.txt", b"not an image")), 415, "UnsupportedMediaType")
    assert exc.hint
    exc = raises(lambda: client.predict("tiny", volume[0], output="dicom-seg"), 422, "DicomSegNeedsDicom")
    assert "nrrd" in (exc.hint or "") and "Hint:" in exc.message()
    exc = raises(lambda: client.predict("tiny", volume[0], prompts=BOX), 422, "ModelInputError")
    assert "does not take prompts" in exc.detail
    with pytest.raises(ValueError, match="output"):
        client.predict("tiny", volume[0], output="mp4")


def test_prompted_model_with_and_without_prompts(client: MedSegClient, shapes_2d: Path) -> None:
    exc = raises(lambda: client.predict("sam", shape_png(shapes_2d)), 422, "ModelInputError")
    assert "needs a box" in exc.detail and "boxes" in (exc.hint or "")
    raises(lambda: client.submit_job("sam", shape_png(shapes_2d)), 422, "ModelInputError")
    result = client.predict("sam", shape_png(shapes_2d), output="nifti", prompts={**BOX, "names": ["lesion"]})
    assert result.label_names == ("background", "lesion") and result.content[:2] == b"\x1f\x8b"
    stats = client.statistics("sam", shape_png(shapes_2d), prompts=BOX)
    assert stats["label_names"] == ["background", "object_1"]


def test_job_lifecycle_with_progress(client: MedSegClient, volume: tuple[Path, np.ndarray]) -> None:
    seen: list[JobStatus] = []
    job_id = client.submit_job("tiny", volume[0])
    final = client.wait_job(job_id, poll_s=0.1, timeout_s=120, on_progress=seen.append)
    assert final.state == "done" and final.progress == 1.0 and final.result_url, final.raw
    assert seen[-1] == final and all(0.0 <= s.progress <= 1.0 for s in seen)
    result = client.job_result(job_id)
    assert result.label_names == LABELS
    mask = read_nrrd(result.save(volume[0].parent / "job.nrrd"))
    np.testing.assert_allclose(mask.ijk_to_ras, volume[1], atol=1e-4)
    assert client.cancel_job(job_id) == "deleted"
    raises(lambda: client.job_status(job_id), 404, "NotFound")
    raises(lambda: client.job_result("0" * 32), 404, "NotFound")


def test_job_cancelled_midway(client: MedSegClient, tmp_path: Path) -> None:
    # Constant and non-zero: the foreground box is the whole image, so every window runs.
    slow = write_nrrd(tmp_path / "slow.nrrd", np.full((128, 128, 128), 100.0, np.float32), tiny_affine())
    states: list[str] = []
    result = client.run_job(
        "tiny",
        slow,
        tta=True,
        poll_s=0.1,
        timeout_s=120,
        on_progress=lambda s: states.append(s.state),
        should_cancel=lambda: "running" in states,
    )
    assert result is None and states[-1] == "running", states  # None: the job ended as cancelled


def test_transport_failures(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    exc = raises(MedSegClient(f"http://127.0.0.1:{port}", timeout_s=5).list_models, None, "ConnectionError")
    assert "medseg serve" in (exc.hint or "")
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        raises(MedSegClient(url, timeout_s=0.5).ready, None, "Timeout")

    class Html404(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            body = b"<html>not here</html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Html404)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        exc = raises(MedSegClient(url, api_key="k").test_connection, 404, "NotMedSeg")
        assert "medseg server" in (exc.hint or "")
        exc = raises(MedSegClient(url, api_key="k").list_models, 404, "UnexpectedAnswer")
    finally:
        other.shutdown()
        other.server_close()
    with pytest.raises(ValueError, match="http"):
        MedSegClient("ftp://example.org")


def test_tls_verification_is_on_by_default(caplog: pytest.LogCaptureFixture) -> None:
    import ssl

    with caplog.at_level("WARNING"):
        MedSegClient("http://127.0.0.1:8000", api_key="secret-one")
        assert caplog.text == ""
        MedSegClient("http://10.1.2.3:8000", api_key="secret-two")
    assert "unencrypted" in caplog.text and "secret" not in caplog.text

    strict = MedSegClient("https://127.0.0.1:9")._context
    assert strict is not None and strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    loose = MedSegClient("https://127.0.0.1:9", verify_tls=False)._context
    assert loose is not None and loose.verify_mode == ssl.CERT_NONE


def test_encode_multipart_is_what_the_standard_parser_reads() -> None:
    from email.parser import BytesParser
    from email.policy import HTTP

    ctype, body = encode_multipart(
        {"output": "nrrd", "prompts": '{"a": "é"}'}, {"file": ('/home/me/my "scan".nrrd', b"\x00\r\n--x\xff")}
    )
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
    assert parts["output"].get_payload(decode=True) == b"nrrd"
    assert parts["prompts"].get_payload(decode=True) == '{"a": "é"}'.encode()
    assert parts["file"].get_filename() == 'my "scan".nrrd'
    assert parts["file"].get_payload(decode=True) == b"\x00\r\n--x\xff"
    with pytest.raises(ValueError, match="boundary"):
        encode_multipart({}, {"file": ("a", b"--b")}, boundary="b")
