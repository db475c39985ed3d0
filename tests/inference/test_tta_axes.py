"""``--tta-axes``: parsing, and the mapping of medseg's voxel axes onto nnU-Net's network axes."""

from __future__ import annotations

import pytest

from medseg.core.errors import ConfigError
from medseg.inference.engine import parse_mirror_axes
from medseg.integrations.nnunet.results import _network_mirror_axes
from pipelines.predict import PredictSettings


@pytest.mark.parametrize(
    ("value", "axes"),
    [("x", (0,)), ("z, x", (0, 2)), ("0,2", (0, 2)), ([2, 0, 2], (0, 2)), ("ALL", None), (None, None)],
)
def test_parse_mirror_axes(value, axes) -> None:
    assert parse_mirror_axes(value) == axes


@pytest.mark.parametrize("value", ["w", "3", "", "x,,y", "-1", [5]])
def test_bad_mirror_axes_are_refused_with_the_accepted_forms(value) -> None:
    with pytest.raises(ConfigError, match="x, y, z"):
        parse_mirror_axes(value)
    if isinstance(value, str):
        with pytest.raises(ConfigError):
            PredictSettings(tta_axes=value)  # before any model is opened


def test_voxel_axes_map_through_nnunets_transpose() -> None:
    # medseg (X, Y, Z) voxel axis a is nnU-Net's array axis 2 - a; the network sees the array after transpose_forward
    assert _network_mirror_axes("x", (0, 1, 2), (0, 1, 2), 3) == (2,)
    assert _network_mirror_axes("x,z", (0, 1, 2), (0, 1, 2), 3) == (0, 2)
    assert _network_mirror_axes("x", (2, 0, 1), (0, 1, 2), 3) == (0,)
    assert _network_mirror_axes("y", (2, 0, 1), None, 3) == (2,)
    assert _network_mirror_axes("all", (0, 1, 2), (1, 2), 3) == (1, 2)
    # 2D configurations: the network's axes follow the slice axis (array axis 0 here)
    assert _network_mirror_axes("x", (0, 1, 2), (0, 1), 2) == (1,)
    assert _network_mirror_axes("x,y", (0, 1, 2), (0, 1), 2) == (0, 1)


@pytest.mark.parametrize(
    ("axes", "transpose", "allowed", "dims", "can"),
    [
        ("z", (0, 1, 2), (1, 2), 3, "x, y"),  # anisotropic: nnU-Net does not mirror the slice axis
        ("z", (0, 1, 2), (0, 1), 2, "x, y"),  # the slice axis of a 2D configuration
        ("x", (2, 0, 1), (1, 2), 3, "y, z"),
    ],
)
def test_axes_the_checkpoint_does_not_mirror_are_refused(axes, transpose, allowed, dims, can) -> None:
    with pytest.raises(ConfigError, match=f"does not mirror the {axes} axis.*axes among {can}"):
        _network_mirror_axes(axes, transpose, allowed, dims)
