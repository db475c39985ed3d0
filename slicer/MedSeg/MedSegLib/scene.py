"""Between Slicer's scene and the medseg server: volumes to NRRD files, label maps to segments, Markups to prompts.

The geometry, colour and prompt logic are pure functions over plain data (numpy arrays in Slicer's ``(K, J, I)``
order, 4x4 IJK-to-RAS matrices, lists of RAS points), testable without Slicer. The functions that touch MRML nodes
(``*_node*``) import ``slicer`` and ``vtk`` inside their bodies, so this module imports wherever numpy does.

Conventions (Slicer's): world coordinates are RAS millimetres; a volume's voxel ``(i, j, k)`` sits at
``IJKToRAS @ (i, j, k, 1)``; ``slicer.util.arrayFromVolume`` gives the voxels as an array indexed ``[k, j, i]``,
which is the order NRRD stores them in (``i`` fastest). NRRD files here are written in LPS (``space:
left-posterior-superior``), what ITK, SimpleITK and the server read and write.
"""

from __future__ import annotations

import colorsys
import gzip
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "LabelEntry",
    "NrrdVolume",
    "color_table",
    "label_color",
    "label_statistics",
    "prompts_json",
    "read_nrrd",
    "roi_box",
    "write_nrrd",
]

#: RAS <-> LPS: flip the first two world axes.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_NRRD_TYPES: dict[str, str] = {
    "int8": "i1",
    "signed char": "i1",
    "uint8": "u1",
    "unsigned char": "u1",
    "uchar": "u1",
    "int16": "i2",
    "short": "i2",
    "signed short": "i2",
    "uint16": "u2",
    "unsigned short": "u2",
    "ushort": "u2",
    "int32": "i4",
    "int": "i4",
    "signed int": "i4",
    "uint32": "u4",
    "unsigned int": "u4",
    "uint": "u4",
    "int64": "i8",
    "long long": "i8",
    "longlong": "i8",
    "signed long long": "i8",
    "uint64": "u8",
    "unsigned long long": "u8",
    "ulonglong": "u8",
    "float": "f4",
    "double": "f8",
}
_WRITE_TYPES = {"i1": "int8", "u1": "uint8", "i2": "short", "u2": "ushort", "i4": "int", "u4": "uint"}
_WRITE_TYPES.update({"i8": "longlong", "u8": "ulonglong", "f4": "float", "f8": "double"})

# The first colours of Slicer's GenericAnatomyColors table (values 1..12), then evenly spread hues.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 174, 128),
    (241, 214, 145),
    (177, 122, 101),
    (111, 184, 210),
    (216, 101, 79),
    (221, 130, 101),
    (144, 238, 144),
    (192, 104, 88),
    (220, 245, 20),
    (78, 63, 0),
    (255, 250, 220),
    (230, 220, 70),
)


class NrrdError(ValueError):
    """A NRRD file this module cannot read or write: says what was found and what was expected."""


@dataclass(frozen=True)
class NrrdVolume:
    """Voxels and geometry of a 3D NRRD file.

    Attributes:
        array: voxels indexed ``[k, j, i]`` (shape ``(K, J, I)``), Slicer's ``arrayFromVolume`` order.
        ijk_to_ras: ``(4, 4)`` matrix from voxel indices ``(i, j, k, 1)`` to RAS millimetres.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along ``i, j, k`` in mm."""
        norms = np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))


@dataclass(frozen=True)
class LabelEntry:
    """One label of a result: its value in the mask, its name and a display colour (r, g, b in 0..1)."""

    value: int
    name: str
    color: tuple[float, float, float]


# -- geometry ------------------------------------------------------------------------------------------------------


def _check_matrix(ijk_to_ras: Any) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise NrrdError(f"IJK-to-RAS matrix of shape {m.shape} (or non-finite); expected a finite 4x4 matrix")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise NrrdError("IJK-to-RAS matrix is singular; expected voxel axes with non-zero, independent directions")
    return m


def _vector(values: Iterable[float]) -> str:
    return "(" + ",".join(repr(float(v) + 0.0) for v in values) + ")"  # + 0.0: no "-0.0"


def write_nrrd(path: str | Path, array: np.ndarray, ijk_to_ras: Any, *, compress: bool = True) -> Path:
    """Write a 3D volume as a NRRD file in LPS space, keeping its exact geometry.

    Args:
        path: destination (``.nrrd``).
        array: voxels ``(K, J, I)`` (Slicer's ``arrayFromVolume`` order); any integer or float dtype.
        ijk_to_ras: ``(4, 4)`` IJK-to-RAS matrix (``volumeNode.GetIJKToRASMatrix``), possibly oblique.
        compress: gzip the voxels (smaller uploads).

    Returns:
        ``path``.

    Raises:
        NrrdError: the array is not 3D or the matrix is not a usable 4x4 matrix.
    """
    data = np.asarray(array)
    if data.ndim != 3:
        raise NrrdError(f"volume of {data.ndim} dimensions {data.shape}; expected a 3D (K, J, I) array")
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    kind = data.dtype.str[1:]
    if kind not in _WRITE_TYPES:
        raise NrrdError(f"voxel type {data.dtype}; expected an integer or float type")
    lps = LPS_FROM_RAS @ _check_matrix(ijk_to_ras)
    k, j, i = data.shape
    header = [
        "NRRD0004",
        "# written by the MedSeg Slicer module",
        f"type: {_WRITE_TYPES[kind]}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {i} {j} {k}",
        "space directions: " + " ".join(_vector(lps[:3, axis]) for axis in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        f"encoding: {'gzip' if compress else 'raw'}",
        "space origin: " + _vector(lps[:3, 3]),
    ]
    raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()
    payload = gzip.compress(raw, compresslevel=1) if compress else raw
    path = Path(path)
    path.write_bytes(("\n".join(header) + "\n\n").encode("ascii") + payload)
    return path


def _parse_vector(text: str, what: str) -> list[float]:
    text = text.strip()
    if text == "none":
        return []
    match = re.fullmatch(r"\(([^()]*)\)", text)
    if match is None:
        raise NrrdError(f"NRRD {what} {text!r}; expected a vector like (1,0,0)")
    return [float(v) for v in match.group(1).split(",")]


def read_nrrd(path: str | Path) -> NrrdVolume:
    """Read a 3D NRRD file (attached raw or gzip data) with its geometry, e.g. a mask from the server.

    Args:
        path: a ``.nrrd`` file whose voxels are in the file itself.

    Returns:
        The voxels ``(K, J, I)`` and the IJK-to-RAS matrix.

    Raises:
        NrrdError: not a NRRD, not 3D, detached data, an unknown type/encoding, or a byte count that does not match.
    """
    blob = Path(path).read_bytes()
    end = blob.find(b"\n\n")
    if not blob.startswith(b"NRRD") or end < 0:
        raise NrrdError(f"{path} is not a NRRD file; expected a header starting with NRRD000x and a blank line")
    fields: dict[str, str] = {}
    for line in blob[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    if "data file" in fields or "datafile" in fields:
        raise NrrdError(f"{path} keeps its voxels in a separate file; expected a single .nrrd file")
    if fields.get("dimension") != "3":
        raise NrrdError(f"{path} has dimension {fields.get('dimension')}; expected a 3D volume")
    dtype_code = _NRRD_TYPES.get(fields.get("type", "").lower())
    if dtype_code is None:
        raise NrrdError(f"{path} has voxel type {fields.get('type')!r}; expected an integer or float type")
    order = ">" if fields.get("endian", "little") == "big" else "<"
    sizes = [int(v) for v in fields.get("sizes", "").split()]
    if len(sizes) != 3:
        raise NrrdError(f"{path} has sizes {fields.get('sizes')!r}; expected three sizes")
    encoding = fields.get("encoding", "raw").lower()
    payload = blob[end + 2 :]
    if encoding in ("gzip", "gz"):
        payload = gzip.decompress(payload)
    elif encoding != "raw":
        raise NrrdError(f"{path} uses encoding {encoding!r}; expected raw or gzip")
    dtype = np.dtype(order + dtype_code)
    count = sizes[0] * sizes[1] * sizes[2]
    if len(payload) != count * dtype.itemsize:
        raise NrrdError(f"{path} holds {len(payload)} bytes of voxels; its header implies {count * dtype.itemsize}")
    array = np.frombuffer(payload, dtype=dtype).reshape(sizes[2], sizes[1], sizes[0]).astype(dtype.newbyteorder("="))
    space = fields.get("space", "left-posterior-superior").lower()
    directions = [_parse_vector(v, "space directions") for v in re.findall(r"\([^()]*\)|none", fields.get(
        "space directions", "(1,0,0) (0,1,0) (0,0,1)"))]  # fmt: skip
    origin = _parse_vector(fields.get("space origin", "(0,0,0)"), "space origin")
    if len(directions) != 3 or any(len(d) != 3 for d in directions) or len(origin) != 3:
        raise NrrdError(f"{path} has space directions/origin for other than 3 axes; expected a 3D volume in space")
    m = np.eye(4)
    m[:3, :3] = np.array(directions).T
    m[:3, 3] = origin
    if space in ("left-posterior-superior", "lps"):
        m = LPS_FROM_RAS @ m
    elif space not in ("right-anterior-superior", "ras"):
        raise NrrdError(f"{path} is in space {space!r}; expected left-posterior-superior or right-anterior-superior")
    return NrrdVolume(array, _check_matrix(m))


# -- label colours -------------------------------------------------------------------------------------------------


def label_color(value: int) -> tuple[float, float, float]:
    """A fixed colour (r, g, b in 0..1) for label value ``value`` >= 1: the same every time, for every model.

    Values 1..12 take the first colours of Slicer's GenericAnatomyColors; later values get hues spread by the golden
    ratio, so neighbouring labels always differ.
    """
    if value < 1:
        raise ValueError(f"label value {value}; expected 1 or more (0 is the background)")
    if value <= len(_PALETTE):
        r, g, b = _PALETTE[value - 1]
        return (r / 255.0, g / 255.0, b / 255.0)
    hue = ((value - len(_PALETTE)) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return (round(r, 6), round(g, 6), round(b, 6))


def color_table(label_names: Sequence[str]) -> list[LabelEntry]:
    """The segments of a result: one entry per label value ``1..n-1`` of ``label_names`` (index 0 is background).

    Empty or duplicate names are made unique (``label_3``, ``liver (2)``) so every segment has its own name.
    """
    entries: list[LabelEntry] = []
    seen: set[str] = set()
    for value in range(1, len(label_names)):
        name = str(label_names[value]).strip() or f"label_{value}"
        if name in seen:
            name = f"{name} ({value})"
        seen.add(name)
        entries.append(LabelEntry(value, name, label_color(value)))
    return entries


# -- prompts -------------------------------------------------------------------------------------------------------


def roi_box(center: Sequence[float], size: Sequence[float], axes: Any = None) -> list[float]:
    """An ROI (box markup) as the server's RAS box ``[x0, y0, x1, y1, z0, z1]`` (mm, x = R, y = A, z = S).

    Args:
        center: ROI centre in RAS mm.
        size: full edge lengths along the ROI's own axes (mm).
        axes: ``(3, 3)`` matrix whose columns are the ROI axes in RAS (a rotated ROI), or None for RAS-aligned.

    Returns:
        The axis-aligned RAS box enclosing the ROI's eight corners.
    """
    c = np.asarray(center, dtype=np.float64).reshape(3)
    half = np.abs(np.asarray(size, dtype=np.float64).reshape(3)) / 2.0
    rot = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64).reshape(3, 3)
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(half)) and np.all(np.isfinite(rot))):
        raise ValueError("ROI centre, size and axes must be finite numbers")
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners = c + (signs * half) @ rot.T
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]), float(lo[2]), float(hi[2])]


def prompts_json(
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[tuple[Sequence[float], bool]] = (),
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The server's prompt JSON in RAS mm (``Prompts.from_json`` with ``space: "ras"``).

    Args:
        boxes: RAS boxes ``[x0, y0, x1, y1, z0, z1]`` (e.g. from :func:`roi_box`); each is one object.
        points: ``(ras_xyz, positive)`` clicks; positive (include) points are label 1, negative (exclude) label 0.
            With one box the points refine it; with no box the points form one object.
        names: optional label names, one per object.

    Returns:
        e.g. ``{"space": "ras", "boxes": [[...]], "points": [[x, y, z, 1], [x, y, z, 0]]}``.

    Raises:
        ValueError: nothing to segment (no box and no positive point), or points with several boxes.
    """
    box_list = [[float(v) for v in b] for b in boxes]
    for b in box_list:
        if len(b) != 6:
            raise ValueError(f"box {b} has {len(b)} numbers; expected x0, y0, x1, y1, z0, z1 (RAS mm)")
    point_list = []
    for xyz, positive in points:
        coord = [float(v) for v in xyz]
        if len(coord) != 3:
            raise ValueError(f"point {coord} has {len(coord)} coordinates; expected x, y, z (RAS mm)")
        point_list.append([*coord, 1 if positive else 0])
    if not box_list and not any(p[3] == 1 for p in point_list):
        raise ValueError("no prompt: place a box (ROI) or at least one include point")
    if len(box_list) > 1 and point_list:
        raise ValueError("points go with one box at most; remove the points or keep a single box")
    out: dict[str, Any] = {"space": "ras"}
    if box_list:
        out["boxes"] = box_list
    if point_list:
        out["points"] = point_list
    if names:
        out["names"] = [str(n) for n in names]
    return out


# -- Slicer nodes (need Slicer or slicer-core) -----------------------------------------------------------------------


def _matrix_to_numpy(vtk_matrix: Any) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _numpy_to_matrix(m: np.ndarray) -> Any:
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def node_world_ijk_to_ras(volume_node: Any) -> np.ndarray:
    """A volume node's IJK-to-world matrix, with any linear parent transform applied.

    Raises:
        ValueError: the volume sits under a non-linear transform (harden it first).
    """
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _matrix_to_numpy(matrix)
    transform = volume_node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise ValueError(
                f"volume {volume_node.GetName()!r} is under a non-linear transform; harden the transform first"
            )
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _matrix_to_numpy(to_world) @ ijk_to_ras
    return ijk_to_ras


def volume_array(volume_node: Any) -> np.ndarray:
    """The voxels of a scalar volume node as ``(K, J, I)`` (a copy), without ``slicer.util``."""
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume {volume_node.GetName()!r} has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume {volume_node.GetName()!r} has several components; expected a scalar volume")
    i, j, k = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(k, j, i).copy()


def volume_node_to_nrrd(volume_node: Any, path: str | Path) -> Path:
    """Write a scalar volume node to a NRRD file with its world geometry (for upload to the server)."""
    return write_nrrd(path, volume_array(volume_node), node_world_ijk_to_ras(volume_node))


def labelmap_node(scene: Any, volume: NrrdVolume, name: str) -> Any:
    """A ``vtkMRMLLabelMapVolumeNode`` in ``scene`` holding ``volume``'s voxels and geometry."""
    import vtk
    from vtk.util import numpy_support

    k, j, i = volume.array.shape
    labels = np.ascontiguousarray(volume.array.astype(np.int32 if volume.array.max(initial=0) > 255 else np.uint8))
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(labels.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(volume.ijk_to_ras))
    node.SetAndObserveImageData(image)
    return node


def segmentation_from_labelmap(
    scene: Any,
    volume: NrrdVolume,
    label_names: Sequence[str],
    reference_volume: Any = None,
    name: str = "MedSeg segmentation",
) -> Any:
    """A segmentation node with one segment per label of ``label_names``, named and coloured by :func:`color_table`.

    Labels absent from the mask still get an (empty) segment, so the segment list always matches the model's
    labels. The segmentation's reference geometry is the input volume's (needed for DICOM SEG export).

    Args:
        scene: the MRML scene (``slicer.mrmlScene``).
        volume: the returned mask (:func:`read_nrrd`).
        label_names: from the server (``X-Label-Names``); index = label value.
        reference_volume: the input volume node, or None.
        name: the new node's name.
    """
    from slicer import vtkSlicerSegmentationsModuleLogic

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    if reference_volume is not None:
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    entries = color_table(label_names)
    present = {int(v) for v in np.unique(volume.array)} - {0}
    for entry in entries:
        if entry.value not in present:
            segmentation.GetSegmentation().AddEmptySegment(entry.name, entry.name, entry.color)
            continue
        # One binary label map per label, so each segment is created under the label's own name and colour.
        before = set(segmentation.GetSegmentation().GetSegmentIDs())
        part = labelmap_node(scene, NrrdVolume((volume.array == entry.value).astype(np.uint8), volume.ijk_to_ras), name)
        try:
            vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(part, segmentation, "")
        finally:
            scene.RemoveNode(part)
        for segment_id in segmentation.GetSegmentation().GetSegmentIDs():
            if segment_id not in before:
                segment = segmentation.GetSegmentation().GetSegment(segment_id)
                segment.SetName(entry.name)
                segment.SetColor(*entry.color)
    unknown = sorted(present - {e.value for e in entries})
    if unknown:
        logger.warning("the mask holds label values %s that have no name", unknown)
    return segmentation


def markups_prompts(
    roi_node: Any = None,
    include_node: Any = None,
    exclude_node: Any = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The prompt JSON from a Markups ROI (box) and include / exclude point lists (all in world RAS mm)."""
    boxes = []
    if roi_node is not None:
        center = [0.0, 0.0, 0.0]
        roi_node.GetCenterWorld(center)
        size = [0.0, 0.0, 0.0]
        roi_node.GetSizeWorld(size)
        axes = np.eye(3)
        to_world = roi_node.GetObjectToWorldMatrix()
        if to_world is not None:
            axes = _matrix_to_numpy(to_world)[:3, :3]
            axes = axes / np.linalg.norm(axes, axis=0)
        boxes.append(roi_box(center, size, axes))
    points: list[tuple[Sequence[float], bool]] = []
    for node, positive in ((include_node, True), (exclude_node, False)):
        if node is None:
            continue
        for index in range(node.GetNumberOfControlPoints()):
            xyz = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(index, xyz)
            points.append((list(xyz), positive))
    return prompts_json(boxes, points, names)


def label_statistics(volume: NrrdVolume, label_names: Sequence[str]) -> list[tuple[str, int, int, float]]:
    """Rows ``(name, value, voxels, volume_ml)`` of a mask, one per named label (empty ones included).

    The same numbers as the server's ``output=json`` answer, computed from the mask already downloaded (so the
    statistics need no second inference).
    """
    voxel_ml = float(abs(np.linalg.det(volume.ijk_to_ras[:3, :3]))) / 1000.0
    counts = np.bincount(volume.array.astype(np.int64).ravel(), minlength=len(label_names))
    return [(e.name, e.value, int(counts[e.value]), int(counts[e.value]) * voxel_ml) for e in color_table(label_names)]


def statistics_rows(stats: Mapping[str, Any]) -> list[tuple[str, int, int, float]]:
    """Rows ``(name, value, voxels, volume_ml)`` of the server's ``output=json`` body, in label-value order."""
    labels: Mapping[str, Mapping[str, Any]] = stats.get("labels", {})
    rows = [(str(n), int(v["value"]), int(v["voxels"]), float(v["volume_ml"])) for n, v in labels.items()]
    return sorted(rows, key=lambda row: row[1])
