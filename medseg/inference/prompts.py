"""User prompts for promptable models: boxes and points, from the command line, JSON or Python.

A prompt set is a list of objects; each object is one box and/or some points and becomes one label value of the
output mask (object ``k`` -> label ``k + 1``). Coordinates are voxel indices ``(x, y[, z])`` of the image as loaded
(``x`` the first spatial axis, see :func:`medseg.io.load_image`) or RAS millimetres. Boxes are inclusive index
extents: ``x1`` is the last column of the object. A 2-axis prompt is only valid for single-slice images (``z = 0``).

Grouping rule (command line and JSON): every box is one object; points join the box when there is exactly one box,
form one object when there is no box, and are an error with several boxes (use the JSON ``objects`` form there).

Examples::

    >>> Prompts.from_cli(["30,40,90,110,10,25"], ["60,75,18:fg"])
    >>> Prompts.from_json({"space": "ras", "boxes": [[-20, 5, 14, 40, -10, 12]], "names": ["tumour"]})
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeGuard

import numpy as np

from medseg.core.errors import ModelInputError

__all__ = [
    "PROMPTS_JSON_EXAMPLE",
    "Box",
    "Point",
    "PromptObject",
    "Prompts",
    "parse_box",
    "parse_point",
]

Space = Literal["voxel", "ras"]
_AXES = ("x", "y", "z")
_SPACES = ("voxel", "ras")

#: A prompt file accepted by :meth:`Prompts.from_json` (quoted in error messages).
PROMPTS_JSON_EXAMPLE = (
    '{"space": "voxel", "boxes": [[30, 40, 90, 110, 10, 25]], "points": [[60, 75, 18, 1]], "names": ["tumour"]}'
)
_JSON_OBJECTS_EXAMPLE = '{"objects": [{"box": [30, 40, 90, 110, 10, 25], "points": [[60, 75, 18, 1]], "name": "a"}]}'
_BOX_FORMAT = "x0,y0,x1,y1 or x0,y0,x1,y1,z0,z1 (voxel indices or RAS mm, e.g. 30,40,90,110 or 30,40,90,110,10,25)"
_POINT_FORMAT = "x,y[,z][:label] with label 1/fg (foreground, the default) or 0/bg (background), e.g. 60,75,18:1"
_LABELS = {"1": 1, "fg": 1, "foreground": 1, "0": 0, "bg": 0, "background": 0}


def _num(v: float) -> str:
    return f"{v:g}"


def _coords(values: Sequence[float]) -> str:
    return ",".join(_num(v) for v in values)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box with inclusive corners ``lo = (x0, y0[, z0])`` and ``hi = (x1, y1[, z1])``.

    ``x0 < x1`` and ``y0 < y1`` are required; ``z0 == z1`` is one slice.
    """

    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def __post_init__(self) -> None:
        lo, hi = tuple(float(v) for v in self.lo), tuple(float(v) for v in self.hi)
        if len(lo) not in (2, 3) or len(lo) != len(hi):
            raise ModelInputError(f"box with corners {lo} and {hi}", expected=_BOX_FORMAT)
        if not all(math.isfinite(v) for v in lo + hi):
            raise ModelInputError(f"box {_coords(self.to_list())} has a non-finite coordinate", expected=_BOX_FORMAT)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        for axis, (a, b) in enumerate(zip(lo, hi, strict=True)):
            name = _AXES[axis]
            if axis < 2 and a >= b:
                raise ModelInputError(
                    f"box {name}0 >= {name}1 ({_num(a)} >= {_num(b)}): a box is x0,y0,x1,y1 with x0 < x1 and y0 < y1"
                )
            if axis == 2 and a > b:
                raise ModelInputError(
                    f"box z0 > z1 ({_num(a)} > {_num(b)}): a 3D box is x0,y0,x1,y1,z0,z1 with z0 <= z1 "
                    "(z0 = z1 is one slice)"
                )

    @property
    def ndim(self) -> int:
        """Number of axes (2 or 3)."""
        return len(self.lo)

    def to_list(self) -> list[float | int]:
        """``[x0, y0, x1, y1]`` or ``[x0, y0, x1, y1, z0, z1]`` (whole numbers as ``int``)."""
        out = [self.lo[0], self.lo[1], self.hi[0], self.hi[1]]
        return _compact(out + [self.lo[2], self.hi[2]] if self.ndim == 3 else out)

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Box:
        """Inverse of :meth:`to_list`."""
        v = [float(x) for x in values]
        if len(v) == 4:
            return cls((v[0], v[1]), (v[2], v[3]))
        if len(v) == 6:
            return cls((v[0], v[1], v[4]), (v[2], v[3], v[5]))
        raise ModelInputError(f"box has {len(v)} numbers", expected=_BOX_FORMAT)


@dataclass(frozen=True)
class Point:
    """A click at ``coord = (x, y[, z])`` with ``label`` 1 (foreground) or 0 (background)."""

    coord: tuple[float, ...]
    label: int = 1

    def __post_init__(self) -> None:
        coord = tuple(float(v) for v in self.coord)
        if len(coord) not in (2, 3) or not all(math.isfinite(v) for v in coord):
            raise ModelInputError(f"point {coord}", expected=_POINT_FORMAT)
        if self.label not in (0, 1) or isinstance(self.label, bool):
            raise ModelInputError(f"point label {self.label!r}", expected="1 (foreground) or 0 (background)")
        object.__setattr__(self, "coord", coord)
        object.__setattr__(self, "label", int(self.label))


@dataclass(frozen=True)
class PromptObject:
    """One object to segment: a box, points, or both; ``name`` becomes its label name."""

    box: Box | None = None
    points: tuple[Point, ...] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", tuple(self.points))
        if self.box is None and not any(p.label == 1 for p in self.points):
            raise ModelInputError(
                "a prompt object has neither a box nor a foreground point",
                expected="a box, or at least one point with label 1",
            )


@dataclass(frozen=True)
class Prompts:
    """The objects to segment in one image and the space their coordinates are in.

    Attributes:
        objects: one entry per object; object ``k`` becomes label value ``k + 1``.
        space: ``"voxel"`` (indices of the image as loaded) or ``"ras"`` (world millimetres, RAS).
    """

    objects: tuple[PromptObject, ...] = field(default_factory=tuple)
    space: Space = "voxel"

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.space not in _SPACES:
            raise ModelInputError(f"prompt space {self.space!r}", expected="'voxel' or 'ras'")

    def __len__(self) -> int:
        return len(self.objects)

    @classmethod
    def from_cli(cls, boxes: Sequence[str], points: Sequence[str], space: str = "voxel") -> Prompts:
        """Prompts from ``--box`` and ``--point`` texts (see :func:`parse_box`, :func:`parse_point`)."""
        parsed_boxes = [parse_box(b) for b in boxes]
        parsed_points = [parse_point(p) for p in points]
        return cls(_group(parsed_boxes, parsed_points, None, cli=True), space=_space(space))

    @classmethod
    def from_json(cls, data: Any) -> Prompts:
        """Prompts from a JSON document (text or the decoded dictionary).

        Schema: ``{"space": "voxel"|"ras", "boxes": [[x0,y0,x1,y1(,z0,z1)], ...], "points": [[x, y(, z), label],
        ...], "names": [name per object]}`` with the module's grouping rule, or, for several objects with points,
        ``{"space": ..., "objects": [{"box": [...] | null, "points": [[...], ...], "name": str | null}, ...]}``.
        ``label`` is 1/0 or "fg"/"bg".

        Raises:
            ModelInputError: naming the malformed field and the expected shape.
        """
        if isinstance(data, bytes | str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ModelInputError(f"prompts are not valid JSON ({exc})", expected=PROMPTS_JSON_EXAMPLE) from exc
        if not isinstance(data, dict):
            raise ModelInputError(
                f"prompts are a JSON {type(data).__name__}", expected=f"an object {PROMPTS_JSON_EXAMPLE}"
            )
        unknown = sorted(set(data) - {"space", "boxes", "points", "names", "objects"})
        if unknown:
            raise ModelInputError(
                f"unknown prompt field(s) {', '.join(map(repr, unknown))}",
                expected=f"fields space, boxes, points, names (or objects), e.g. {PROMPTS_JSON_EXAMPLE}",
            )
        space = _space(data.get("space", "voxel"))
        if "objects" in data:
            if any(k in data for k in ("boxes", "points", "names")):
                raise ModelInputError(
                    "prompts have both 'objects' and 'boxes'/'points'/'names'",
                    expected=f"either {PROMPTS_JSON_EXAMPLE} or {_JSON_OBJECTS_EXAMPLE}",
                )
            items = _list_field(data["objects"], "objects", _JSON_OBJECTS_EXAMPLE)
            return cls(tuple(_json_object(o, i) for i, o in enumerate(items)), space=space)
        boxes = [_json_box(b, f"boxes[{i}]") for i, b in enumerate(_list_field(data.get("boxes", []), "boxes"))]
        points = [_json_point(p, f"points[{i}]") for i, p in enumerate(_list_field(data.get("points", []), "points"))]
        names = data.get("names")
        if names is not None:
            names = _list_field(names, "names")
            if not all(n is None or isinstance(n, str) for n in names):
                raise ModelInputError("field 'names' holds a non-string", expected='a list of strings, e.g. ["tumour"]')
        return cls(_group(boxes, points, names, cli=False), space=space)

    def to_json(self) -> dict[str, Any]:
        """The JSON form read by :meth:`from_json` (the ``objects`` form when the flat one cannot hold it)."""
        objs = self.objects
        out: dict[str, Any] = {"space": self.space}
        flat = len(objs) <= 1 or all(o.box is not None and not o.points for o in objs)
        if not flat:
            out["objects"] = [
                {"box": None if o.box is None else o.box.to_list(), "points": [_point_list(p) for p in o.points]}
                | ({"name": o.name} if o.name is not None else {})
                for o in objs
            ]
            return out
        out["boxes"] = [o.box.to_list() for o in objs if o.box is not None]
        out["points"] = [_point_list(p) for o in objs for p in o.points]
        if any(o.name is not None for o in objs):
            out["names"] = [o.name for o in objs]
        return out

    def to_voxel(self, affine: Any, spatial_shape: Sequence[int]) -> Prompts:
        """The same prompts as integer voxel indices of an image, checked to lie inside it.

        RAS millimetres go through the inverse affine; a box maps all its corners and takes their min/max box.
        Coordinates are rounded to the nearest voxel. 2-axis prompts get ``z = 0`` on single-slice images.

        Args:
            affine: the image's ``(4, 4)`` voxel-to-RAS affine.
            spatial_shape: ``(X, Y, Z)``.

        Returns:
            Prompts in ``"voxel"`` space whose boxes and points all have three axes.

        Raises:
            ModelInputError: a prompt lies outside the image, a 2-axis prompt is given for an image with several
                slices, a box shrinks below one voxel, or a point lies outside its box's slices.
        """
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) != 3:
            raise ModelInputError(f"spatial shape {shape}", expected="(X, Y, Z)")
        a = np.asarray(affine, dtype=np.float64)
        if a.shape != (4, 4):
            raise ModelInputError(f"affine of shape {a.shape}", expected="a (4, 4) voxel-to-RAS matrix")
        to_vox = _Converter(a, shape, self.space)
        return Prompts(tuple(to_vox.object(o) for o in self.objects), space="voxel")


class _Converter:
    """World or voxel coordinates -> checked integer voxel indices of one image."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, int, int], space: Space) -> None:
        self.affine, self.shape, self.space = affine, shape, space
        self.bounds = ", ".join(f"{ax} in [0, {n - 1}]" for ax, n in zip(_AXES, shape, strict=True))

    def _to_voxel(self, coords: np.ndarray, what: str) -> np.ndarray:
        """``(N, 2|3)`` coordinates -> ``(N, 3)`` voxel (float)."""
        n_axes = coords.shape[1]
        if n_axes == 2 and self.shape[2] > 1:
            raise ModelInputError(
                f"{what} has no z coordinate but the image has {self.shape[2]} slices",
                expected="x0,y0,x1,y1,z0,z1 for a box and x,y,z for a point (a 2D prompt is only valid for "
                "single-slice images, where z = 0)",
            )
        if self.space == "voxel":
            return coords if n_axes == 3 else np.concatenate([coords, np.zeros((len(coords), 1))], axis=1)
        if n_axes == 3:
            world = np.concatenate([coords, np.ones((len(coords), 1))], axis=1)
            return (np.linalg.inv(self.affine) @ world.T).T[:, :3]
        plane = self.affine[:2, :2]  # single-slice image: solve (R, A) = M[:2, :2] (x, y) + t[:2] with z = 0
        if abs(np.linalg.det(plane)) < 1e-9:
            raise ModelInputError(
                f"{what} has 2 RAS coordinates but the image plane is not an R-A plane",
                expected="3 RAS coordinates (x, y, z in mm) or voxel indices",
            )
        xy = np.linalg.solve(plane, (coords - self.affine[:2, 3]).T).T
        return np.concatenate([xy, np.zeros((len(coords), 1))], axis=1)

    def _check(self, values: dict[str, float], what: str) -> None:
        for key, v in values.items():
            n = self.shape[_AXES.index(key[0])]
            if not 0 <= v <= n - 1:
                source = " (converted from RAS mm)" if self.space == "ras" else ""
                raise ModelInputError(
                    f"{what} {key}={_num(v)}{source} is outside the image: {self.bounds} (voxel indices)",
                    hint="check the coordinates and the prompt space (voxel or ras)",
                )

    def box(self, box: Box) -> Box:
        lo, hi = np.array(box.lo), np.array(box.hi)
        corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(len(lo), -1).T
        vox = self._to_voxel(corners, f"box {_coords(box.to_list())}")
        vlo, vhi = np.rint(vox.min(axis=0)), np.rint(vox.max(axis=0))
        what = "box" if self.space == "voxel" else f"box {_coords(box.to_list())}"
        self._check({"x0": vlo[0], "y0": vlo[1], "z0": vlo[2], "x1": vhi[0], "y1": vhi[1], "z1": vhi[2]}, what)
        if vlo[0] >= vhi[0] or vlo[1] >= vhi[1]:
            raise ModelInputError(
                f"box {_coords(box.to_list())} covers less than two voxels in x or y once rounded to voxels "
                f"({_coords([vlo[0], vlo[1], vhi[0], vhi[1]])})",
                expected="a box at least two voxels wide and high",
            )
        return Box(tuple(int(v) for v in vlo), tuple(int(v) for v in vhi))

    def point(self, point: Point) -> Point:
        vox = np.rint(self._to_voxel(np.array([point.coord]), f"point {_coords(point.coord)}")[0])
        what = "point" if self.space == "voxel" else f"point {_coords(point.coord)}"
        self._check({"x": vox[0], "y": vox[1], "z": vox[2]}, what)
        return Point(tuple(int(v) for v in vox), point.label)

    def object(self, obj: PromptObject) -> PromptObject:
        box = None if obj.box is None else self.box(obj.box)
        points = tuple(self.point(p) for p in obj.points)
        if box is not None:
            for p, original in zip(points, obj.points, strict=True):
                if not box.lo[2] <= p.coord[2] <= box.hi[2]:
                    raise ModelInputError(
                        f"point {_coords(original.coord)} lies on slice z={_num(p.coord[2])}, outside its box's "
                        f"slices z in [{_num(box.lo[2])}, {_num(box.hi[2])}]",
                        expected="points on the slices of the box they refine",
                    )
        if box is None:
            fg_slices = {p.coord[2] for p in points if p.label == 1}
            for p, original in zip(points, obj.points, strict=True):
                if p.coord[2] not in fg_slices:
                    raise ModelInputError(
                        f"background point {_coords(original.coord)} lies on slice z={_num(p.coord[2])}, where its "
                        "object has no box and no foreground point",
                        expected="background points on a slice with a box or a foreground point of the same object",
                    )
        return replace(obj, box=box, points=points)


def parse_box(text: str) -> Box:
    """A box from ``"x0,y0,x1,y1"`` or ``"x0,y0,x1,y1,z0,z1"``.

    Raises:
        ModelInputError: the text is not 4 or 6 numbers, or a box side is inverted.
    """
    values = _numbers(text, "box", _BOX_FORMAT)
    if len(values) not in (4, 6):
        raise ModelInputError(f"box {text!r} has {len(values)} numbers", expected=_BOX_FORMAT)
    return Box.from_list(values)


def parse_point(text: str) -> Point:
    """A point from ``"x,y[,z][:label]"``; label ``1``/``fg`` (default) or ``0``/``bg``.

    Raises:
        ModelInputError: the text is not 2 or 3 numbers with an optional known label.
    """
    coords, sep, label_text = str(text).partition(":")
    label = 1
    if sep:
        key = label_text.strip().lower()
        if key not in _LABELS:
            raise ModelInputError(f"point {text!r} has label {label_text.strip()!r}", expected=_POINT_FORMAT)
        label = _LABELS[key]
    values = _numbers(coords, "point", _POINT_FORMAT, original=text)
    if len(values) not in (2, 3):
        raise ModelInputError(f"point {text!r} has {len(values)} coordinates", expected=_POINT_FORMAT)
    return Point(tuple(values), label)


def _numbers(text: str, kind: str, expected: str, original: str | None = None) -> list[float]:
    parts = [p.strip() for p in str(text).strip().strip("()[]").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ModelInputError(f"cannot read {kind} {original or text!r}", expected=expected) from None
    if not all(math.isfinite(v) for v in values):
        raise ModelInputError(f"{kind} {original or text!r} has a non-finite number", expected=expected)
    return values


def _space(value: Any) -> Space:
    if value not in _SPACES:
        raise ModelInputError(f"prompt space {value!r}", expected="'voxel' or 'ras'")
    return value


def _group(
    boxes: list[Box], points: list[Point], names: list[str | None] | None, *, cli: bool
) -> tuple[PromptObject, ...]:
    if len(boxes) > 1 and points:
        raise ModelInputError(
            f"{len(points)} point(s) were given with {len(boxes)} boxes; points can only refine a single box",
            expected="one box with points, several boxes without points, or points alone",
            hint="prompt one box at a time"
            if cli
            else f"give one entry per object in the 'objects' form, e.g. {_JSON_OBJECTS_EXAMPLE}",
        )
    if boxes:
        objects = [PromptObject(box=b, points=tuple(points) if len(boxes) == 1 else ()) for b in boxes]
    else:
        objects = [PromptObject(points=tuple(points))] if points else []
    if names is not None:
        if len(names) != len(objects):
            raise ModelInputError(
                f"field 'names' has {len(names)} entries for {len(objects)} object(s)",
                expected="one name per box (or one for the points when there is no box)",
            )
        objects = [replace(o, name=n) for o, n in zip(objects, names, strict=True)]
    return tuple(objects)


def _list_field(value: Any, name: str, example: str = PROMPTS_JSON_EXAMPLE) -> list[Any]:
    if not isinstance(value, list):
        raise ModelInputError(f"field {name!r} is a {type(value).__name__}", expected=f"a list, e.g. {example}")
    return value


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _json_box(value: Any, name: str) -> Box:
    if not isinstance(value, list) or len(value) not in (4, 6) or not all(_is_number(v) for v in value):
        raise ModelInputError(
            f"field {name!r} is {_show(value)}",
            expected="a box [x0, y0, x1, y1] or [x0, y0, x1, y1, z0, z1] of numbers",
        )
    return Box.from_list(value)


def _json_point(value: Any, name: str) -> Point:
    ok = isinstance(value, list) and len(value) in (3, 4) and all(_is_number(v) for v in value[:-1])
    label = value[-1] if ok else None
    if isinstance(label, str):
        label = _LABELS.get(label.strip().lower())
    elif _is_number(label) and float(label) in (0.0, 1.0):
        label = int(label)
    else:
        label = None
    if not ok or label is None:
        raise ModelInputError(
            f"field {name!r} is {_show(value)}",
            expected='a point [x, y, label] or [x, y, z, label] with label 1/"fg" or 0/"bg"',
        )
    return Point(tuple(float(v) for v in value[:-1]), label)


def _json_object(value: Any, index: int) -> PromptObject:
    name = f"objects[{index}]"
    if not isinstance(value, dict) or set(value) - {"box", "points", "name"}:
        raise ModelInputError(
            f"field {name!r} is {_show(value)}",
            expected=f'an object with "box", "points" and "name", e.g. {_JSON_OBJECTS_EXAMPLE}',
        )
    box = value.get("box")
    points = _list_field(value.get("points", []), f"{name}.points", _JSON_OBJECTS_EXAMPLE)
    label = value.get("name")
    if label is not None and not isinstance(label, str):
        raise ModelInputError(f"field '{name}.name' is {_show(label)}", expected="a string or null")
    return PromptObject(
        box=None if box is None else _json_box(box, f"{name}.box"),
        points=tuple(_json_point(p, f"{name}.points[{i}]") for i, p in enumerate(points)),
        name=label,
    )


def _show(value: Any) -> str:
    return json.dumps(value, default=str)


def _compact(values: Sequence[float]) -> list[float | int]:
    return [int(v) if float(v).is_integer() else float(v) for v in values]


def _point_list(p: Point) -> list[float | int]:
    return [*_compact(p.coord), p.label]
