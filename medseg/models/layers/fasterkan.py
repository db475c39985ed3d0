"""FasterKAN: a Kolmogorov-Arnold feed-forward with reflectional-switch (RSWAF) basis functions.

Each layer normalises its input with LayerNorm, expands every feature ``x`` into ``G`` basis values
``phi_g(x) = 1 - tanh((x - g) / h)^2`` on a fixed grid ``g = linspace(grid_min, grid_max, G)`` (``h`` the
denominator), and mixes the ``in * G`` values with one bias-free Linear layer. There is no base (SiLU) branch. This
is the feed-forward of MedViTV2's global blocks (``layers = [C, 2C, C]``, 8 grid points on [-2, 2], ``h = 0.33``);
the grid is a non-trainable parameter (``rbf.grid``) so it is saved in state dicts, as in the released checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["FasterKAN", "FasterKANLayer", "ReflectionalSwitchFunction", "SplineLinear"]


class SplineLinear(nn.Linear):
    """Bias-free Linear layer over the flattened basis values, Xavier-uniform initialised."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)


class ReflectionalSwitchFunction(nn.Module):
    """RSWAF basis ``1 - tanh((x - g) / h)^2`` for every grid point ``g``: ``(..., F)`` -> ``(..., F, G)``.

    Args:
        grid_min: first grid point.
        grid_max: last grid point.
        num_grids: number of grid points ``G``.
        denominator: width ``h`` of each basis function.
    """

    def __init__(self, grid_min: float = -2.0, grid_max: float = 2.0, num_grids: int = 8, denominator: float = 0.33):
        super().__init__()
        self.grid = nn.Parameter(torch.linspace(grid_min, grid_max, num_grids), requires_grad=False)
        self.inv_denominator = 1.0 / denominator

    def forward(self, x: Tensor) -> Tensor:
        t = torch.tanh((x[..., None] - self.grid) * self.inv_denominator)
        return 1.0 - t * t


class FasterKANLayer(nn.Module):
    """LayerNorm -> RSWAF basis -> bias-free Linear: ``(N, in_dim)`` -> ``(N, out_dim)``."""

    def __init__(self, in_dim: int, out_dim: int, num_grids: int = 8, grid_range: tuple[float, float] = (-2.0, 2.0)):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.rbf = ReflectionalSwitchFunction(grid_range[0], grid_range[1], num_grids)
        self.spline_linear = SplineLinear(in_dim * num_grids, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.spline_linear(self.rbf(self.layernorm(x)).flatten(-2))


class FasterKAN(nn.Module):
    """A stack of :class:`FasterKANLayer` with widths ``layers`` (e.g. ``[C, 2C, C]``).

    Args:
        layers: feature widths, input first.
        num_grids: grid points per feature.

    Examples::

        >>> FasterKAN([32, 64, 32])(torch.randn(10, 32)).shape
        torch.Size([10, 32])
    """

    def __init__(self, layers: Sequence[int], num_grids: int = 8) -> None:
        super().__init__()
        if len(layers) < 2:
            raise ValueError(f"FasterKAN needs at least an input and an output width, got {list(layers)}")
        self.layers = nn.ModuleList(
            FasterKANLayer(a, b, num_grids=num_grids) for a, b in zip(layers[:-1], layers[1:], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, layers[0])`` -> ``(N, layers[-1])``."""
        for layer in self.layers:
            x = layer(x)
        return x
