"""STU-Net: scalable and transferable residual 3D U-Nets (S / B / L / H), loadable from the official checkpoints.

Paper: Z. Huang, H. Wang, Z. Deng, J. Ye, Y. Su, H. Sun, J. He, Y. Gu, L. Gu, S. Zhang, Y. Qiao, "STU-Net: Scalable
and Transferable Medical Image Segmentation Models Empowered by Large-Scale Supervised Pre-training",
arXiv:2304.06716 (2023). Written from the facts in ``docs/models/stunet.md``; the official code
(``uni-medical/STU-Net``, Apache-2.0, inside vendored nnU-Net 1.7.1 / 2.2) was read, not copied.

Faithful to the official network:
    * 6 resolution stages / 5 downsamplings, widths ``base x [1, 2, 4, 8, 16, 16]`` and ``depth`` residual blocks per
      stage: S (16, 1), B (32, 1), L (64, 2), H (96, 3). Parameter counts at 1 in / 105 out: 14,596,941 /
      58,262,669 / 440,302,605 / 1,457,326,221 (README: 14.6 / 58.26 / 440.30 / 1457.33 M).
    * Residual block: Conv3d k3 (bias) -> InstanceNorm3d (affine) -> LeakyReLU(0.01) -> Conv3d k3 -> InstanceNorm3d,
      plus a shortcut (identity, or a 1x1x1 Conv3d with the block's stride when channels or resolution change), then
      LeakyReLU. The first block of stages 1-5 downsamples with stride = the plan's pool kernel.
    * Decoder: weight-free nearest upsampling by the pool kernel with a 1x1x1 Conv3d (high -> low width), concat with
      the skip, a residual block (2d -> d, 1x1 shortcut) + (depth - 1) blocks, and a 1x1x1 segmentation head per
      decoder stage (5 heads = deep supervision).
    * State-dict keys are the official ones (``conv_blocks_context.{s}.{b}.{conv1,norm1,conv2,norm2,conv3}``,
      ``upsample_layers.{u}.conv``, ``conv_blocks_localization.{u}.{b}.*``, ``seg_outputs.{u}``) so official
      checkpoints load with :func:`load_stunet_checkpoint`, which follows the official fine-tuning rules
      (:meth:`STUNet.load_pretrained`: ``medseg train DATA --model stunet_b --pretrained base_ep4k.model``).
    * Defaults = the TotalSegmentator pre-training plan: 128^3 patch at 1.5 mm, pools ``[[2, 2, 2]] * 4 + [[1, 1, 2]]``
      (so inputs must be multiples of (16, 16, 32)), all kernels 3x3x3, 1 input channel, 105 outputs; He
      initialisation (nnU-Net ``InitWeights_He(1e-2)``, as the nnU-Net v1 code the released models were trained with).

Deviations and why:
    * The 1x1x1 upsampling convolution runs **before** the nearest upsampling instead of after. A pointwise linear map
      commutes with nearest-neighbour copying, so the output is the same, at a fraction of the cost (the conv sees
      up to 8x fewer voxels). Upsampling targets the skip's size rather than a scale factor (same for valid inputs).
    * Forward contract (medseg): eval mode returns the full-resolution logits ``(B, C_out, D, H, W)``; training mode
      with deep supervision returns a list of the 5 head outputs, full resolution first, the 4 auxiliary ones
      upsampled (nearest) to full resolution, as MONAI's DynUNet and medseg's ``unet`` do (nnU-Net instead
      downsamples the target). ``nnunet_outputs=True`` gives nnU-Net v2's convention for the nnU-Net integration:
      with deep supervision on (``model.decoder.deep_supervision``, the flag nnU-Net's trainer toggles), a list of
      the 5 outputs at their native resolutions in train *and* eval mode.
    * Inputs are checked first (rank, channels, divisibility by the product of the pools, a bottleneck of more than
      one voxel, which InstanceNorm needs).
    * Intensities: the card's preset is ``"zscore"``, nnU-Net's ``ZScoreNormalization`` over all voxels
      (``(x - mean) / max(std, 1e-8)`` per channel, :func:`medseg.transforms.presets.zscore`), the "nonCT" scheme of
      the TotalSegmentator plan the released weights were trained with, although the data are CT. Training from
      scratch on CT may prefer ``data.preset: ct`` (a fixed HU window).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.models.card import ModelCard
from medseg.models.checkpoint import load_state_dict_checked, read_weights_file
from medseg.models.checks import check_input
from medseg.models.registry import register_model

__all__ = [
    "DEFAULT_CONV_KERNEL_SIZES",
    "DEFAULT_POOL_OP_KERNEL_SIZES",
    "STUNET_VARIANTS",
    "STUNet",
    "load_stunet_checkpoint",
    "pools_from_nnunet_plan",
]

logger = logging.getLogger(__name__)

Kernel = tuple[int, int, int]

NUM_POOLS = 5
DEFAULT_POOL_OP_KERNEL_SIZES: tuple[Kernel, ...] = ((2, 2, 2),) * 4 + ((1, 1, 2),)
DEFAULT_CONV_KERNEL_SIZES: tuple[Kernel, ...] = ((3, 3, 3),) * (NUM_POOLS + 1)


def _widths(base: int) -> tuple[int, ...]:
    return tuple(base * m for m in (1, 2, 4, 8, 16, 16))


#: Registry name -> ``STUNet`` keyword arguments of the official variants (the nnU-Net trainers build from these).
STUNET_VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "stunet_s": {"dims": _widths(16), "depth": (1,) * 6},
    "stunet_b": {"dims": _widths(32), "depth": (1,) * 6},
    "stunet_l": {"dims": _widths(64), "depth": (2,) * 6},
    "stunet_h": {"dims": _widths(96), "depth": (3,) * 6},
}

# Exact parameter counts at 1 in / 105 out (equal to the README's 14.6 / 58.26 / 440.30 / 1457.33 M).
_REFERENCE_PARAMS = {"stunet_s": 14_596_941, "stunet_b": 58_262_669, "stunet_l": 440_302_605, "stunet_h": 1_457_326_221}


def _kernels(values: Sequence[int | Sequence[int]], count: int, what: str) -> tuple[Kernel, ...]:
    """Normalise ``count`` kernels given as ints or 3-sequences to 3-tuples; ``ConfigError`` when malformed."""
    out = []
    for v in values:
        k = (int(v),) * 3 if isinstance(v, int) else tuple(int(i) for i in v)
        if len(k) != 3 or min(k) < 1:
            raise ConfigError(f"stunet: {what} entry {v!r} is invalid", expected="a positive int or 3 positive ints")
        out.append(k)
    if len(out) != count:
        raise ConfigError(
            f"stunet: {len(out)} {what} given",
            expected=f"exactly {count} (STU-Net always has 6 stages / 5 downsamplings)",
            hint="convert an nnU-Net plan with pools_from_nnunet_plan(...)" if "pool" in what else None,
        )
    return tuple(out)  # type: ignore[return-value]


def pools_from_nnunet_plan(pool_op_kernel_sizes: Sequence[Sequence[int]], *, nnunet_v2: bool = True) -> list[list[int]]:
    """The 5 pool kernels STU-Net uses for an nnU-Net plan's ``pool_op_kernel_sizes``.

    nnU-Net v2 plans list the first stage's stride ``[1, 1, 1]`` first; it is dropped. The rest is truncated to 5 or
    padded with ``[1, 1, 1]``, as the official trainers do.

    Args:
        pool_op_kernel_sizes: the plan's list, e.g. ``configuration_manager.pool_op_kernel_sizes``.
        nnunet_v2: whether the list comes from a v2 plan (with the leading stem stride).

    Returns:
        5 pool kernels, each ``[kd, kh, kw]``.
    """
    pools = [list(map(int, p)) for p in pool_op_kernel_sizes]
    if nnunet_v2 and pools:
        pools = pools[1:]
    pools = pools[:NUM_POOLS]
    return pools + [[1, 1, 1]] * (NUM_POOLS - len(pools))


class BasicResBlock(nn.Module):
    """Residual block ``act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x))``; ``(B, C_in, *S) -> (B, C_out, *S')``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel of the two convolutions (padding keeps the size).
        stride: stride of the first convolution and of the 1x1 shortcut.
        use_1x1conv: 1x1x1 convolution shortcut (``conv3``) instead of identity.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Kernel,
        stride: Kernel = (1, 1, 1),
        use_1x1conv: bool = False,
    ) -> None:
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=padding)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act2 = nn.LeakyReLU(0.01, inplace=True)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if use_1x1conv else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + (self.conv3(x) if self.conv3 is not None else x))


class UpsampleLayer(nn.Module):
    """1x1x1 Conv3d ``(B, C_high, *s) -> (B, C_low, *s)`` then nearest upsampling to ``size`` (key ``conv``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return F.interpolate(self.conv(x), size=tuple(size), mode="nearest")


class _DeepSupervisionSwitch(nn.Module):
    """Holds the ``deep_supervision`` flag where nnU-Net's trainer sets it (``network.decoder.deep_supervision``)."""

    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self.deep_supervision = enabled


def _stage(in_ch: int, out_ch: int, depth: int, kernel: Kernel, stride: Kernel = (1, 1, 1)) -> nn.Sequential:
    first = BasicResBlock(in_ch, out_ch, kernel, stride=stride, use_1x1conv=True)
    return nn.Sequential(first, *[BasicResBlock(out_ch, out_ch, kernel) for _ in range(depth - 1)])


def _init_he(module: nn.Module) -> None:
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class STUNet(nn.Module):
    """STU-Net residual 3D U-Net with the official state-dict layout.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out`` (classes, background included; 105 for TotalSegmentator).
        dims: widths of the 6 stages (``base x [1, 2, 4, 8, 16, 16]`` for the official variants).
        depth: residual blocks per stage (6 entries).
        pool_op_kernel_sizes: the 5 downsampling kernels (per axis); see :func:`pools_from_nnunet_plan`.
        conv_kernel_sizes: the 6 per-stage conv kernels (official trainers: all 3x3x3).
        deep_supervision: return the 5 head outputs (see ``nnunet_outputs``); also ``model.decoder.deep_supervision``.
        nnunet_outputs: nnU-Net v2's output convention (deep-supervision list at native resolutions, in any mode)
            instead of medseg's (list only in training, auxiliary outputs upsampled to full resolution).

    Examples::

        >>> net = STUNet(1, 3, dims=(4, 8, 16, 32, 64, 64), depth=(1,) * 6).eval()
        >>> net(torch.zeros(1, 1, 32, 32, 64)).shape
        torch.Size([1, 3, 32, 32, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 105,
        dims: Sequence[int] = STUNET_VARIANTS["stunet_b"]["dims"],
        depth: Sequence[int] = STUNET_VARIANTS["stunet_b"]["depth"],
        pool_op_kernel_sizes: Sequence[int | Sequence[int]] = DEFAULT_POOL_OP_KERNEL_SIZES,
        conv_kernel_sizes: Sequence[int | Sequence[int]] = DEFAULT_CONV_KERNEL_SIZES,
        deep_supervision: bool = True,
        nnunet_outputs: bool = False,
    ) -> None:
        super().__init__()
        dims, depth = tuple(int(d) for d in dims), tuple(int(d) for d in depth)
        if len(dims) != NUM_POOLS + 1 or len(depth) != NUM_POOLS + 1 or min(dims + depth) < 1:
            raise ConfigError(
                f"stunet: dims={dims}, depth={depth}",
                expected="6 positive widths and 6 positive depths (one per stage)",
                hint="e.g. dims=(32, 64, 128, 256, 512, 512), depth=(1, 1, 1, 1, 1, 1) for STU-Net-B",
            )
        pools = _kernels(pool_op_kernel_sizes, NUM_POOLS, "pool_op_kernel_sizes")
        kernels = _kernels(conv_kernel_sizes, NUM_POOLS + 1, "conv_kernel_sizes")
        if any(k % 2 == 0 for kernel in kernels for k in kernel):
            raise ConfigError(f"stunet: conv_kernel_sizes={kernels}", expected="odd kernels (same-size padding)")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.dims, self.depth = dims, depth
        self.pool_op_kernel_sizes, self.conv_kernel_sizes = pools, kernels
        self.nnunet_outputs = nnunet_outputs
        self.divisible_by = tuple(math.prod(p[axis] for p in pools) for axis in range(3))

        self.conv_blocks_context = nn.ModuleList([_stage(in_channels, dims[0], depth[0], kernels[0])])
        for s in range(1, NUM_POOLS + 1):
            self.conv_blocks_context.append(_stage(dims[s - 1], dims[s], depth[s], kernels[s], stride=pools[s - 1]))
        # Decoder stage u goes from stage 5 - u to stage 4 - u (coarsest first), as the official ModuleLists.
        self.upsample_layers = nn.ModuleList(
            [UpsampleLayer(dims[NUM_POOLS - u], dims[NUM_POOLS - 1 - u]) for u in range(NUM_POOLS)]
        )
        self.conv_blocks_localization = nn.ModuleList(
            [_stage(2 * dims[s], dims[s], depth[s], kernels[s]) for s in (NUM_POOLS - 1 - u for u in range(NUM_POOLS))]
        )
        self.seg_outputs = nn.ModuleList(
            [nn.Conv3d(dims[NUM_POOLS - 1 - u], out_channels, kernel_size=1) for u in range(NUM_POOLS)]
        )
        self.decoder = _DeepSupervisionSwitch(deep_supervision)
        self.apply(_init_he)

    def load_pretrained(self, path: str | Path, sha256: str | None = None) -> None:
        """Start from official STU-Net weights with the official fine-tuning rule (``medseg train --pretrained``).

        The segmentation heads ``seg_outputs.*`` are skipped (they keep their fresh initialisation, whatever the
        number of classes), a 1-channel stem is repeated for ``N`` input channels, and every other tensor must be
        present with the same shape: see :func:`load_stunet_checkpoint` (``finetune=True``).

        Args:
            path: an nnU-Net v1 ``.model``, v2 ``.pth`` (``network_weights``) or bare state-dict file.
            sha256: expected hex digest of the file, checked before reading.

        Raises:
            WeightsError: unreadable file, digest mismatch, or missing / unexpected / mis-shaped non-head keys.
        """
        load_stunet_checkpoint(self, path, finetune=True, sha256=sha256)

    @property
    def deep_supervision(self) -> bool:
        """Whether the deep-supervision heads are returned (stored on ``self.decoder`` for nnU-Net's trainer)."""
        return bool(self.decoder.deep_supervision)

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = bool(enabled)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Segment ``x``.

        Args:
            x: ``(B, C_in, D, H, W)``, each axis a multiple of :attr:`divisible_by` (``(16, 16, 32)`` by default).

        Returns:
            Logits ``(B, C_out, D, H, W)``. With deep supervision, in training mode (or in any mode with
            ``nnunet_outputs``) a list of the 5 head outputs, full resolution first, then coarser decoder levels.

        Raises:
            ModelInputError: wrong rank, channel count, indivisible spatial size, or a 1-voxel bottleneck.
        """
        name = getattr(getattr(self, "card", None), "name", "stunet")  # the registry name once create_model built it
        check_input(x, name=name, in_channels=self.in_channels, spatial_dims=3, divisible_by=self.divisible_by)
        bottleneck = tuple(s // k for s, k in zip(x.shape[2:], self.divisible_by, strict=True))
        if math.prod(bottleneck) == 1:
            raise ModelInputError(
                f"{name}: input spatial shape {tuple(x.shape[2:])} leaves a single bottleneck voxel, "
                "and InstanceNorm needs more than one",
                expected=f"at least one axis twice its divisor {self.divisible_by}",
                hint="use a larger patch (sliding-window inference with the card's roi_size)",
            )
        all_heads = self.deep_supervision and (self.training or self.nnunet_outputs)
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        outputs = []
        for u in range(NUM_POOLS):
            skip = skips[-(u + 1)]
            x = self.conv_blocks_localization[u](torch.cat((self.upsample_layers[u](x, skip.shape[2:]), skip), dim=1))
            if all_heads or u == NUM_POOLS - 1:
                outputs.append(self.seg_outputs[u](x))
        if not all_heads:
            return outputs[-1]
        outputs.reverse()  # full resolution first
        if not self.nnunet_outputs:
            size = outputs[0].shape[2:]
            outputs = [outputs[0]] + [F.interpolate(o, size=size, mode="nearest") for o in outputs[1:]]
        return outputs


# -- official checkpoints ------------------------------------------------------------------------------------------

_STEM_KEYS = ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")


def _read_checkpoint(path: Path, sha256: str | None) -> dict[str, Tensor]:
    return read_weights_file(
        path,
        kind="STU-Net",
        sha256=sha256,
        containers=("network_weights", "state_dict"),  # nnU-Net v2 .pth, v1 .model
        expected="an nnU-Net checkpoint dict or a state dict of tensors",
        hint="pass the path of a local .model / .pth / .pt file",
        allow_numpy=True,
    )


def _describe(state: Mapping[str, Tensor]) -> str:
    """Widths, depths and in / out channels a state dict in the official layout implies (for error hints)."""
    dims, depth = [], []
    for s in range(NUM_POOLS + 1):
        w = state.get(f"conv_blocks_context.{s}.0.conv1.weight")
        dims.append(int(w.shape[0]) if w is not None else None)
        depth.append(len({k.split(".")[2] for k in state if k.startswith(f"conv_blocks_context.{s}.")}))
    stem, head = state.get(_STEM_KEYS[0]), state.get(f"seg_outputs.{NUM_POOLS - 1}.weight")
    c_in = int(stem.shape[1]) if stem is not None else "?"
    c_out = int(head.shape[0]) if head is not None else "?"
    variant = next((n for n, v in STUNET_VARIANTS.items() if v == {"dims": tuple(dims), "depth": tuple(depth)}), None)
    guess = f" = {variant}" if variant else ""
    return f"the checkpoint has dims {tuple(dims)}, depth {tuple(depth)}, {c_in} in / {c_out} out{guess}"


def _layout(model: nn.Module) -> str:
    """The official key layout, with the model's widths and depths when it is a :class:`STUNet`."""
    sizes = f" for dims {model.dims}, depth {model.depth}" if isinstance(model, STUNet) else ""
    return (
        "the official STU-Net layout conv_blocks_context.{0-5}.{block}.{conv1,norm1,conv2,norm2,conv3}, "
        "upsample_layers.{0-4}.conv, conv_blocks_localization.{0-4}.{block}.*, seg_outputs.{0-4}" + sizes
    )


def load_stunet_checkpoint(
    model: nn.Module, path: str | Path, *, finetune: bool = True, sha256: str | None = None
) -> None:
    """Load official STU-Net weights (nnU-Net v1 ``.model``, v2 ``.pth`` or a bare state dict) into ``model``.

    Follows the official fine-tuning loader: with ``finetune=True`` the segmentation heads ``seg_outputs.*`` are not
    loaded (they keep the model's fresh initialisation, whatever the number of classes), and if the model takes
    ``N > 1`` input channels while the checkpoint's stem takes 1, the stem weights
    ``conv_blocks_context.0.0.conv1.weight`` and ``.conv3.weight`` are repeated ``N`` times along the input-channel
    axis (plain repetition, no rescaling, as the official code). Every other key must be present with the same
    shape. With ``finetune=False`` the whole checkpoint is loaded as is (direct inference with the released
    105-class models). ``module.`` / ``_orig_mod.`` prefixes of wrapped networks are removed.

    Args:
        model: a :class:`STUNet` (or any module with the official layout, e.g. an nnU-Net trainer's network; DDP /
            ``torch.compile`` wrappers are unwrapped).
        path: the checkpoint file; read with ``torch.load(weights_only=True)`` (numpy scalars allowed).
        finetune: apply the fine-tuning rules above; ``False`` loads everything strictly.
        sha256: expected hex digest of the file, checked before reading.

    Raises:
        WeightsError: missing / unreadable file, digest mismatch, no state dict inside, or missing / unexpected /
            mis-shaped keys (the first 10 of each are listed, with the expected layout).

    Examples::

        >>> model = create_model("stunet_b", in_channels=2, out_channels=4)
        >>> load_stunet_checkpoint(model, "base_ep4k.model")  # fine-tune: heads fresh, stem repeated
    """
    path = Path(path)
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    raw = _read_checkpoint(path, sha256)
    state, target = dict(raw), model.state_dict()
    if finetune:
        skipped = [k for k in state if k.startswith("seg_outputs.")]
        state = {k: v for k, v in state.items() if not k.startswith("seg_outputs.")}
        state.update({k: v for k, v in target.items() if k.startswith("seg_outputs.")})
        for key in _STEM_KEYS:
            have, want = state.get(key), target.get(key)
            if have is not None and want is not None and have.shape[1] == 1 and want.shape[1] > 1:
                state[key] = have.repeat(1, want.shape[1], 1, 1, 1)
        logger.info("STU-Net fine-tuning load from %s: %d head tensors left out", path, len(skipped))
    try:
        load_state_dict_checked(model, state, source=str(path))
    except WeightsError as exc:
        raise WeightsError(
            exc.what,
            expected=_layout(model),
            hint=f"{_describe(raw)}; build the matching variant (STUNET_VARIANTS) and in_channels"
            + ("" if finetune else ", or pass finetune=True to re-initialise the heads"),
            path=path,
        ) from None


# -- registry ------------------------------------------------------------------------------------------------------

_PAPER = "Huang et al., STU-Net, arXiv:2304.06716"
_TINY = {"dims": (4, 8, 16, 32, 64, 64), "depth": (1,) * 6}


def _card(name: str) -> ModelCard:
    config: dict[str, Any] = {"dims": STUNET_VARIANTS[name]["dims"], "depth": STUNET_VARIANTS[name]["depth"]}
    return ModelCard(
        name=name,
        task="segmentation",
        spatial_dims=3,
        in_channels=1,
        out_channels=105,
        roi_size=(128, 128, 128),
        divisible_by=tuple(math.prod(p[a] for p in DEFAULT_POOL_OP_KERNEL_SIZES) for a in range(3)),
        target_spacing=(1.5, 1.5, 1.5),
        intensity_preset="zscore",  # the released weights' "nonCT" plan: z-score over all voxels
        label_names=("background", *(f"label_{i}" for i in range(1, 105))),
        paper=_PAPER,
        reference_params=_REFERENCE_PARAMS[name],
        reference_config=config,
    )


def _register(name: str) -> None:
    variant = STUNET_VARIANTS[name]

    def builder(
        in_channels: int,
        out_channels: int,
        dims: Sequence[int] = variant["dims"],
        depth: Sequence[int] = variant["depth"],
        pool_op_kernel_sizes: Sequence[int | Sequence[int]] = DEFAULT_POOL_OP_KERNEL_SIZES,
        conv_kernel_sizes: Sequence[int | Sequence[int]] = DEFAULT_CONV_KERNEL_SIZES,
        deep_supervision: bool = True,
        nnunet_outputs: bool = False,
        device: str | torch.device | None = None,
    ) -> STUNet:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return STUNet(
                in_channels,
                out_channels,
                dims=dims,
                depth=depth,
                pool_op_kernel_sizes=pool_op_kernel_sizes,
                conv_kernel_sizes=conv_kernel_sizes,
                deep_supervision=deep_supervision,
                nnunet_outputs=nnunet_outputs,
            )

    builder.__name__ = builder.__qualname__ = name
    dims, depth = variant["dims"], variant["depth"][0]
    builder.__doc__ = f"""Build STU-Net-{name[-1].upper()} (dims {dims}, depth {depth} per stage).

        Keyword arguments as :class:`STUNet`; defaults are the TotalSegmentator plan (1 in / 105 out via the card).

        ``device`` builds the module there (``"meta"``: shapes only, no memory), e.g. to count the parameters of the
        1.46 B-parameter ``stunet_h``.
        """
    register_model(_card(name), tiny=dict(_TINY))(builder)


for _name in STUNET_VARIANTS:
    _register(_name)
