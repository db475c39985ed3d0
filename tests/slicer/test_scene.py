"""``MedSegLib.scene``: NRRD geometry, label colours and Markups-to-prompt conversion as pure functions.

NRRD files written for oblique, LPS-stored, anisotropic volumes must read back with ``medseg.io.load_image`` (what
the server uses) to the same voxels and geometry, and masks the library writes must read back with ``read_nrrd``.
Prompts built from an ROI and points must mean, to the library's ``Prompts``, the voxels they were placed on.
The node functions need Slicer's MRML classes (``slicer-core``); they are tested only where that is importable.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from MedSegLib.scene import (
    NrrdError,
    NrrdVolume,
    color_table,
    label_color,
    prompts_json,
    read_nrrd,
    roi_box,
    statistics_rows,
    write_nrrd,
)
from monai.data import MetaTensor

from medseg.inference.prompts import Prompts
from medseg.io import load_image, save_image, save_mask


def oblique_lps_ijk_to_ras() -> np.ndarray:
    """Rotated about two axes, anisotropic, with ``i`` pointing left and ``j`` posterior (an LPS-stored volume)."""
    a, b = 0.4, -0.25
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag([-0.8, -1.1, 2.5])
    m[:3, 3] = (31.5, -12.25, 80.0)
    return m


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_nrrd_reads_back_with_load_image_to_the_same_geometry(tmp_path: Path, compress: bool, dtype: type) -> None:
    rng = np.random.default_rng(0)
    kji = (rng.random((9, 7, 5)) * 100).astype(dtype)  # K=9, J=7, I=5: every axis different
    m = oblique_lps_ijk_to_ras()
    path = write_nrrd(tmp_path / "vol.nrrd", kji, m, compress=compress)
    image = load_image(path)
    assert tuple(image.shape) == (1, 5, 7, 9)
    np.testing.assert_allclose(np.asarray(image.affine), m, atol=1e-6)
    np.testing.assert_array_equal(image[0].numpy(), kji.transpose(2, 1, 0).astype(np.float32))
    back = read_nrrd(path)
    assert back.array.dtype == kji.dtype and back.array.shape == kji.shape
    np.testing.assert_array_equal(back.array, kji)
    np.testing.assert_allclose(back.ijk_to_ras, m, atol=1e-12)
    np.testing.assert_allclose(back.spacing, (0.8, 1.1, 2.5), atol=1e-12)


def test_a_mask_written_by_the_library_reads_back_on_its_grid(tmp_path: Path) -> None:
    m = oblique_lps_ijk_to_ras()
    labels = np.zeros((6, 5, 4), np.uint8)  # (I, J, K) as the library holds images
    labels[1:3, 2:4, 1:3] = 2
    labels[4, 0, 3] = 1
    source = MetaTensor(torch.zeros((1, 6, 5, 4)), affine=torch.from_numpy(m))
    save_image(source, tmp_path / "src.nrrd")
    path = save_mask(
        MetaTensor(torch.from_numpy(labels)[None], affine=torch.from_numpy(m)), source, tmp_path / "m.nrrd"
    )
    mask = read_nrrd(path)
    np.testing.assert_array_equal(mask.array, labels.transpose(2, 1, 0))
    np.testing.assert_allclose(mask.ijk_to_ras, m, atol=1e-6)


def test_bad_nrrd_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    good = write_nrrd(tmp_path / "g.nrrd", np.zeros((2, 3, 4), np.uint8), np.eye(4), compress=False)
    header, _, data = good.read_bytes().partition(b"\n\n")
    cases = {
        "separate file": header + b"\ndata file: other.raw\n\n",
        "dimension 4": header.replace(b"dimension: 3", b"dimension: 4") + b"\n\n" + data,
        "header implies": header + b"\n\n" + data[:-1],
        "encoding 'bzip2'": header.replace(b"encoding: raw", b"encoding: bzip2") + b"\n\n" + data,
        "not a NRRD": b"P5\n4 3\n255\n" + data,
        "singular": header.replace(b"(-1.0,0.0,0.0)", b"(0.0,0.0,0.0)", 1) + b"\n\n" + data,
    }
    for needle, blob in cases.items():
        (tmp_path / "bad.nrrd").write_bytes(blob)
        with pytest.raises(NrrdError, match=needle):
            read_nrrd(tmp_path / "bad.nrrd")
    with pytest.raises(NrrdError, match="3D"):
        write_nrrd(tmp_path / "x.nrrd", np.zeros((2, 3)), np.eye(4))
    with pytest.raises(NrrdError, match="singular"):
        write_nrrd(tmp_path / "x.nrrd", np.zeros((2, 3, 4)), np.diag([1.0, 0.0, 1.0, 1.0]))


def test_ras_space_and_big_endian_headers(tmp_path: Path) -> None:
    data = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: right-anterior-superior\nsizes: 4 3 2\n"
        "space directions: (2,0,0) (0,3,0) (0,0,4)\nendian: big\nencoding: gzip\nspace origin: (1,2,3)\n\n"
    )
    (tmp_path / "ras.nrrd").write_bytes(header.encode() + gzip.compress(data.tobytes()))
    vol = read_nrrd(tmp_path / "ras.nrrd")
    np.testing.assert_array_equal(vol.array, data.astype(np.int16))
    np.testing.assert_allclose(vol.ijk_to_ras, [[2, 0, 0, 1], [0, 3, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]])


def test_colours_are_fixed_distinct_and_named_by_the_server() -> None:
    table = color_table(["background", "liver", "", "liver"])
    assert [(e.value, e.name) for e in table] == [(1, "liver"), (2, "label_2"), (3, "liver (3)")]
    assert table[0].color == pytest.approx((128 / 255, 174 / 255, 128 / 255))
    assert color_table(["bg", "a", "b", "c"]) == color_table(["bg", "a", "b", "c"])
    colours = [label_color(v) for v in range(1, 41)]
    assert all(0.0 <= c <= 1.0 for rgb in colours for c in rgb)
    assert min(np.abs(np.subtract(x, y)).sum() for i, x in enumerate(colours) for y in colours[i + 1 :]) > 0.05
    with pytest.raises(ValueError, match="background"):
        label_color(0)
    assert color_table(["background"]) == []


def test_roi_box_encloses_a_rotated_roi() -> None:
    assert roi_box((10, 20, 30), (4, 6, 8)) == [8.0, 17.0, 12.0, 23.0, 26.0, 34.0]
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    box = roi_box((0, 0, 0), (2, 2, 2), [[c, -s, 0], [s, c, 0], [0, 0, 1]])
    np.testing.assert_allclose(box, [-np.sqrt(2), -np.sqrt(2), np.sqrt(2), np.sqrt(2), -1, 1])
    with pytest.raises(ValueError, match="finite"):
        roi_box((0, float("nan"), 0), (1, 1, 1))


def test_prompts_from_markups_mean_the_voxels_they_were_placed_on() -> None:
    """An ROI drawn around voxels (10..20, 4..9, 3..6) of an LPS volume is that box to the library."""
    m = np.eye(4)
    m[:3, :3] = np.diag([-0.8, -1.1, 2.5])  # i left, j posterior: RAS x0 < x1 flips the voxel order
    m[:3, 3] = (31.5, -12.25, 80.0)
    lo, hi = np.array([10, 4, 3]), np.array([20, 9, 6])
    corners_ras = np.array([(m @ [*v, 1])[:3] for v in (lo, hi)])
    center, size = corners_ras.mean(axis=0), np.abs(corners_ras[1] - corners_ras[0])
    include, exclude = (m @ [15, 6, 4, 1])[:3], (m @ [11, 8, 5, 1])[:3]
    data = prompts_json([roi_box(center, size)], [(include, True), (exclude, False)], names=["tumour"])
    assert data["space"] == "ras" and [p[3] for p in data["points"]] == [1, 0]
    voxel = Prompts.from_json(data).to_voxel(m, (32, 16, 12))
    (obj,) = voxel.objects
    assert obj.name == "tumour" and obj.box is not None
    assert obj.box.lo == (10, 4, 3) and obj.box.hi == (20, 9, 6)
    assert [(p.coord, p.label) for p in obj.points] == [((15, 6, 4), 1), ((11, 8, 5), 0)]
    points_only = Prompts.from_json(prompts_json(points=[(include, True)])).to_voxel(m, (32, 16, 12))
    assert points_only.objects[0].box is None and points_only.objects[0].points[0].coord == (15, 6, 4)


def test_prompts_json_refuses_what_the_server_would() -> None:
    with pytest.raises(ValueError, match="no prompt"):
        prompts_json([], [((1, 2, 3), False)])
    with pytest.raises(ValueError, match="one box at most"):
        prompts_json([[0, 0, 1, 1, 0, 0], [2, 2, 3, 3, 0, 0]], [((1, 2, 3), True)])
    with pytest.raises(ValueError, match="x0, y0"):
        prompts_json([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="x, y, z"):
        prompts_json(points=[((1, 2), True)])


def test_statistics_rows_are_in_label_order() -> None:
    stats = {"labels": {"wm": {"value": 2, "voxels": 10, "volume_ml": 0.01}, "gm": {"value": 1, "voxels": 5,
             "volume_ml": 0.005}}}  # fmt: skip
    assert statistics_rows(stats) == [("gm", 1, 5, 0.005), ("wm", 2, 10, 0.01)]


def _slicer_core():
    try:
        import slicer

        slicer.vtkMRMLScene  # noqa: B018 (the repository's own slicer/ folder is a namespace package without it)
    except (ImportError, AttributeError):
        pytest.skip("slicer-core (Slicer's MRML classes) is not installed here; the node functions need it")
    return slicer


def test_node_functions_with_slicer_core(tmp_path: Path) -> None:
    """Volume node -> NRRD (with a parent transform), label map -> named, coloured segments, Markups -> prompts."""
    slicer = _slicer_core()
    from MedSegLib.scene import (
        _numpy_to_matrix,
        labelmap_node,
        markups_prompts,
        node_world_ijk_to_ras,
        segmentation_from_labelmap,
        volume_node_to_nrrd,
    )

    scene = slicer.vtkMRMLScene()
    m = oblique_lps_ijk_to_ras()
    kji = np.zeros((6, 5, 4), np.int16)
    kji[1:3, 1:4, 1:3] = 2
    kji[5, 0, 0] = 1
    volume = labelmap_node(scene, NrrdVolume(kji, m), "input")
    back = read_nrrd(volume_node_to_nrrd(volume, tmp_path / "v.nrrd"))
    np.testing.assert_allclose(back.ijk_to_ras, m, atol=1e-9)
    np.testing.assert_array_equal(back.array, kji)
    shift = np.eye(4)
    shift[:3, 3] = (5, 6, 7)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(_numpy_to_matrix(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(node_world_ijk_to_ras(volume), shift @ m, atol=1e-9)
    volume.SetAndObserveTransformNodeID(None)

    segments = segmentation_from_labelmap(scene, NrrdVolume(kji, m), ["background", "a", "b", "c"], volume)
    segments = segments.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())] == ["a", "b", "c"]
    assert segments.GetNthSegment(1).GetColor() == pytest.approx(label_color(2))

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetCenter(1, 2, 3)
    roi.SetSize(4, 6, 8)
    include = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    include.AddControlPoint(1.5, 2.0, 3.0)
    exclude = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    exclude.AddControlPoint(0.0, 0.5, 1.0)
    assert markups_prompts(roi, include, exclude) == {
        "space": "ras",
        "boxes": [[-1.0, -1.0, 3.0, 5.0, -1.0, 7.0]],
        "points": [[1.5, 2.0, 3.0, 1], [0.0, 0.5, 1.0, 0]],
    }
