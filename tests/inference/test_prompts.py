"""Prompt parsing (command line, JSON), grouping, and the RAS/voxel conversion with its bounds checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.core.errors import ModelInputError
from medseg.inference.prompts import (
    PROMPTS_JSON_EXAMPLE,
    Box,
    Point,
    PromptObject,
    Prompts,
    parse_box,
    parse_point,
)
from tests.helpers import tiny_affine


def test_parse_box_two_and_three_axes() -> None:
    assert parse_box("30,40,90,110") == Box((30, 40), (90, 110))
    box = parse_box(" 30, 40 ,90,110, 10,25 ")
    assert box.lo == (30, 40, 10) and box.hi == (90, 110, 25) and box.ndim == 3
    assert box.to_list() == [30, 40, 90, 110, 10, 25]
    assert parse_box("1,2,3,4,7,7").hi[2] == 7  # z0 == z1: one slice


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1,2,3", "has 3 numbers; expected x0,y0,x1,y1 or x0,y0,x1,y1,z0,z1"),
        ("a,b,c,d", "cannot read box 'a,b,c,d'"),
        ("1,2,3,4,5", "has 5 numbers"),
        ("1,2,inf,4", "non-finite"),
        ("12,0,5,9", r"box x0 >= x1 \(12 >= 5\): a box is x0,y0,x1,y1 with x0 < x1 and y0 < y1"),
        ("0,9,5,9", r"box y0 >= y1 \(9 >= 9\)"),
        ("0,0,5,9,8,3", r"box z0 > z1 \(8 > 3\)"),
    ],
)
def test_parse_box_errors(text: str, match: str) -> None:
    with pytest.raises(ModelInputError, match=match):
        parse_box(text)


def test_parse_point_labels() -> None:
    assert parse_point("3,4") == Point((3, 4), 1)
    assert parse_point("3,4,5:0") == Point((3, 4, 5), 0)
    assert parse_point("3.5,4,5:bg").label == 0
    assert parse_point("3,4,5: FG").label == 1
    for bad, match in [("3:1", "1 coordinates"), ("1,2,3,4", "4 coordinates"), ("1,2:yes", "label 'yes'")]:
        with pytest.raises(ModelInputError, match=match):
            parse_point(bad)
    with pytest.raises(ModelInputError, match="x,y\\[,z\\]\\[:label\\]"):
        parse_point("x,2")


def test_cli_grouping_rules() -> None:
    one = Prompts.from_cli(["1,2,30,40"], ["5,6", "7,8:bg"])
    assert len(one) == 1 and one.objects[0].box is not None and len(one.objects[0].points) == 2
    several = Prompts.from_cli(["1,2,30,40", "3,4,10,12"], [])
    assert [o.points for o in several.objects] == [(), ()]
    points_only = Prompts.from_cli([], ["5,6,1", "9,9,1:bg"], space="ras")
    assert len(points_only) == 1 and points_only.objects[0].box is None and points_only.space == "ras"
    assert len(Prompts.from_cli([], [])) == 0
    with pytest.raises(ModelInputError, match="points can only refine a single box"):
        Prompts.from_cli(["1,2,30,40", "3,4,10,12"], ["5,6"])
    with pytest.raises(ModelInputError, match="neither a box nor a foreground point"):
        Prompts.from_cli([], ["5,6:bg"])
    with pytest.raises(ModelInputError, match="'voxel' or 'ras'"):
        Prompts.from_cli(["1,2,30,40"], [], space="lps")


def test_json_flat_form_and_round_trip() -> None:
    prompts = Prompts.from_json(PROMPTS_JSON_EXAMPLE)
    assert len(prompts) == 1 and prompts.objects[0].name == "tumour" and prompts.objects[0].points[0].label == 1
    assert Prompts.from_json(prompts.to_json()) == prompts
    data = {"space": "ras", "boxes": [[1, 2, 30, 40, 0, 3], [5.5, 6, 9, 10, 1, 1]], "names": ["a", None]}
    two = Prompts.from_json(json.dumps(data))
    assert two.space == "ras" and [o.name for o in two.objects] == ["a", None]
    assert two.to_json() == {**data, "points": []}
    points_only = Prompts.from_json({"points": [[4, 5, "fg"], [6, 7, 0]]})
    assert points_only.objects[0].box is None and [p.label for p in points_only.objects[0].points] == [1, 0]


def test_json_objects_form_for_several_objects_with_points() -> None:
    prompts = Prompts(
        (
            PromptObject(Box((1, 2, 0), (30, 40, 4)), (Point((5, 6, 2), 1),), "liver"),
            PromptObject(None, (Point((9, 9, 1), 1), Point((12, 9, 1), 0))),
        )
    )
    data = prompts.to_json()
    assert "objects" in data and data["objects"][0]["name"] == "liver"
    assert Prompts.from_json(json.loads(json.dumps(data))) == prompts


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "prompts are a JSON list"),
        ({"box": [[1, 2, 3, 4]]}, "unknown prompt field\\(s\\) 'box'"),
        ({"boxes": [1, 2, 30, 40]}, "field 'boxes\\[0\\]' is 1; expected a box \\[x0, y0, x1, y1\\]"),
        ({"boxes": "1,2,30,40"}, "field 'boxes' is a str; expected a list"),
        ({"boxes": [[1, 2, 30]]}, "field 'boxes\\[0\\]' is \\[1, 2, 30\\]"),
        ({"points": [[1, 2, 3, 4, 1]]}, "field 'points\\[0\\]'.*\\[x, y, z, label\\]"),
        ({"points": [[1, 2, 7]]}, "field 'points\\[0\\]' is \\[1, 2, 7\\]"),
        ({"points": [[1, "a", 1]]}, "field 'points\\[0\\]'"),
        ({"boxes": [[1, 2, 30, 40]], "names": ["a", "b"]}, "'names' has 2 entries for 1 object"),
        ({"boxes": [[1, 2, 30, 40]], "names": [3]}, "'names' holds a non-string"),
        ({"space": "mm", "boxes": [[1, 2, 30, 40]]}, "prompt space 'mm'"),
        ({"objects": [{"box": [1, 2, 3]}]}, "field 'objects\\[0\\].box'"),
        ({"objects": [{"bbox": [1, 2, 3, 4]}]}, "field 'objects\\[0\\]'"),
        ({"objects": [], "boxes": []}, "both 'objects' and"),
        ({"boxes": [[9, 2, 3, 4]]}, "box x0 >= x1 \\(9 >= 3\\)"),
    ],
)
def test_json_errors_name_the_field(data: object, match: str) -> None:
    with pytest.raises(ModelInputError, match=match):
        Prompts.from_json(data)


def test_ras_prompts_map_to_voxels_through_an_oblique_affine() -> None:
    affine = tiny_affine()
    shape = (32, 28, 36)
    lo, hi = np.array([4, 6, 3]), np.array([20, 15, 9])
    corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1).T
    world = (affine @ np.c_[corners, np.ones(len(corners))].T).T[:, :3]
    point_world = affine @ np.array([10, 10, 5, 1.0])
    ras = Prompts(
        (PromptObject(Box(tuple(world.min(0)), tuple(world.max(0))), (Point(tuple(point_world[:3]), 1),)),),
        space="ras",
    )
    voxel = ras.to_voxel(affine, shape)
    # the min/max box of the rotated corners contains the voxel box; the point comes back exactly
    box = voxel.objects[0].box
    assert voxel.space == "voxel" and box is not None
    assert all(b <= a for a, b in zip(lo, box.lo, strict=True)) and all(b >= a for a, b in zip(hi, box.hi, strict=True))
    assert box.lo[2] == 3 and box.hi[2] == 9  # the rotation is about z only
    assert voxel.objects[0].points[0].coord == (10, 10, 5)
    # voxel-space prompts are kept (rounded to whole voxels)
    same = Prompts.from_cli(["4.4,6,20,15.2,3,9"], []).to_voxel(affine, shape)
    assert same.objects[0].box == Box((4, 6, 3), (20, 15, 9))


def test_out_of_bounds_errors_name_the_bounds() -> None:
    with pytest.raises(ModelInputError, match=r"box x1=300 is outside the image: x in \[0, 255\], y in \[0, 255\], "):
        Prompts.from_cli(["10,10,300,20,0,5"], []).to_voxel(np.eye(4), (256, 256, 100))
    with pytest.raises(ModelInputError, match=r"z in \[0, 99\] \(voxel indices\)"):
        Prompts.from_cli(["10,10,30,20,0,100"], []).to_voxel(np.eye(4), (256, 256, 100))
    with pytest.raises(ModelInputError, match=r"point y=-1 is outside the image"):
        Prompts.from_cli([], ["3,-1,4"]).to_voxel(np.eye(4), (256, 256, 100))
    with pytest.raises(ModelInputError, match="converted from RAS"):
        Prompts.from_cli(["-50,10,30,20,0,5"], [], space="ras").to_voxel(np.eye(4), (256, 256, 100))


def test_two_axis_prompts_need_a_single_slice_image() -> None:
    with pytest.raises(ModelInputError, match="no z coordinate but the image has 100 slices.*x0,y0,x1,y1,z0,z1"):
        Prompts.from_cli(["10,10,30,20"], []).to_voxel(np.eye(4), (256, 256, 100))
    with pytest.raises(ModelInputError, match="no z coordinate"):
        Prompts.from_cli([], ["4,5"]).to_voxel(np.eye(4), (256, 256, 100))
    flat = Prompts.from_cli(["10,10,30,20"], ["12,15:1"]).to_voxel(np.eye(4), (64, 48, 1))
    assert flat.objects[0].box == Box((10, 10, 0), (30, 20, 0)) and flat.objects[0].points[0].coord == (12, 15, 0)
    affine = np.diag([0.5, 0.25, 1.0, 1.0])
    affine[:3, 3] = (5.0, -2.0, 40.0)
    ras = Prompts.from_cli(["10,3,15,7"], [], space="ras").to_voxel(affine, (64, 48, 1))
    assert ras.objects[0].box == Box((10, 20, 0), (20, 36, 0))


def test_points_must_lie_on_their_objects_slices() -> None:
    with pytest.raises(ModelInputError, match="outside its box's slices z in \\[2, 4\\]"):
        Prompts.from_cli(["1,1,20,20,2,4"], ["5,5,9"]).to_voxel(np.eye(4), (32, 32, 10))
    with pytest.raises(ModelInputError, match="background point 5,5,3 lies on slice z=3"):
        Prompts.from_cli([], ["5,5,2", "5,5,3:bg"]).to_voxel(np.eye(4), (32, 32, 10))


def test_sub_voxel_box_is_an_error_after_rounding() -> None:
    with pytest.raises(ModelInputError, match="less than two voxels"):
        Prompts.from_cli(["10.1,10,10.3,20,0,0"], []).to_voxel(np.eye(4), (32, 32, 1))
