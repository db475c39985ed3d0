"""Segment Anything (ViT-B) core shared by the SAM-based networks, and the official-checkpoint reader.

Paper: A. Kirillov, E. Mintun, N. Ravi, H. Mao, C. Rolland, L. Gustafson, T. Xiao, S. Whitehead, A. C. Berg, W.-Y. Lo,
P. Dollar, R. Girshick, "Segment Anything", arXiv:2304.02643 (2023). Written from the published architecture and the
official checkpoint layout (``docs/models/sam.md``); the ``segment_anything`` package is not a dependency.

* :class:`SamCore` = image encoder (ViT-B: 768 wide, 12 blocks, 12 heads, windows of 14, global attention in blocks
  2/5/8/11, neck to 256) + prompt encoder + mask decoder (two-way transformer depth 2, 8 heads, MLP 2048, 3 multimask
  outputs + 1). Its ``state_dict()`` at :data:`VIT_B` has exactly the keys and shapes of ``sam_vit_b_01ec64.pth``:
  93,735,472 parameters (image encoder 89,670,912, prompt encoder 6,220, mask decoder 4,058,340) plus the prompt
  encoder's 256-value Gaussian matrix, a buffer, so the file holds 93,735,728 values.
* :func:`read_sam_checkpoint` reads and validates an official ViT-B file (or a fine-tune in the same layout, e.g.
  MedSAM's ``medsam_vit_b.pth``); :func:`resize_sam_state_dict` adapts it to another input size (bilinear resizing of
  the absolute position embedding and the global blocks' relative position tables, as SAMed / SAM-UNet do);
  :func:`load_sam_checkpoint` does both and loads strictly.
* Inputs are RGB images already normalised with :data:`SAM_PIXEL_MEAN` / :data:`SAM_PIXEL_STD` (0-255 scale), see
  :meth:`SamCore.normalize`; prompts are pixel coordinates of the model input frame.

This module registers no model: it is the building block of the zoo's SAM family.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.core.atomic import atomic_open
from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.core.registry import did_you_mean
from medseg.models.card import ModelCard
from medseg.models.checkpoint import load_state_dict_checked, read_weights_file
from medseg.models.checks import check_input, check_prompts
from medseg.models.layers.sam_decoder import MaskDecoder, PromptEncoder, TwoWayTransformer
from medseg.models.layers.sam_encoder import ImageEncoderViT

__all__ = [
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "VIT_B",
    "SamConfig",
    "SamCore",
    "build_sam_config",
    "load_sam_checkpoint",
    "official_sam_vit_b_shapes",
    "read_sam_checkpoint",
    "resize_sam_state_dict",
    "split_sam_state_dict",
    "validate_sam_state_dict",
    "write_synthetic_sam_checkpoint",
]

logger = logging.getLogger(__name__)

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
_PART_NAMES = {"image_encoder": "image encoder", "prompt_encoder": "prompt encoder", "mask_decoder": "mask decoder"}
# Image-encoder sizes of the released SAM checkpoints: (embed dim, blocks) -> name.
_VARIANTS = {(768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H"}
_VIT_B_HINT = "medseg's SAM models use the ViT-B checkpoint sam_vit_b_01ec64.pth (or a ViT-B fine-tune in its layout)"


@dataclass(frozen=True)
class SamConfig:
    """Sizes of a Segment Anything model. The defaults are SAM ViT-B at 1024x1024 (:data:`VIT_B`).

    Attributes:
        img_size: square input side ``S`` (a multiple of ``patch_size``); the token grid is ``S / 16``.
        embed_dim: ViT width.
        depth: ViT blocks.
        num_heads: ViT attention heads.
        global_attn_indexes: blocks with global attention (the others attend within windows).
        window_size: window side of the windowed blocks.
        prompt_embed_dim: width of the neck output, prompt tokens and decoder.
        decoder_mlp_dim: hidden width of the two-way transformer MLPs.
        decoder_heads: attention heads of the two-way transformer.
        mask_in_chans: hidden channels of the mask-prompt downscaling.
        patch_size: ViT patch side.
        mlp_ratio: ViT MLP hidden width / ``embed_dim``.
        decoder_depth: blocks of the two-way transformer.
        num_multimask_outputs: masks returned with ``multimask_output=True``.
        iou_head_depth: layers of the IoU prediction MLP.
        iou_head_hidden_dim: hidden width of the IoU MLP (``None`` = ``prompt_embed_dim``, 256 in SAM).
    """

    img_size: int = 1024
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mask_in_chans: int = 16
    patch_size: int = 16
    mlp_ratio: float = 4.0
    decoder_depth: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.img_size < self.patch_size or self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} is not a positive multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if (self.prompt_embed_dim // 2) % self.decoder_heads or self.prompt_embed_dim % 8:
            problems.append(
                f"prompt_embed_dim={self.prompt_embed_dim} must be a multiple of 8 and of 2 * decoder_heads "
                f"({2 * self.decoder_heads})"
            )
        if self.mask_in_chans % 4 or self.mask_in_chans < 4:
            problems.append(f"mask_in_chans={self.mask_in_chans} is not a positive multiple of 4")
        if self.window_size < 1:
            problems.append(f"window_size={self.window_size} is not >= 1")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            problems.append(
                f"global_attn_indexes={self.global_attn_indexes} are not block indexes of depth {self.depth}"
            )
        if problems:
            raise ConfigError("invalid SamConfig: " + "; ".join(problems), expected="SAM ViT-B sizes, e.g. VIT_B")

    @property
    def grid(self) -> int:
        """Side of the image-embedding token grid, ``img_size / patch_size``."""
        return self.img_size // self.patch_size


VIT_B = SamConfig()


def prompted_card(name: str, *, img_size: int, paper: str, reference_params: int) -> ModelCard:
    """The card of a promptable 2D zoo model: RGB in, one mask logit per prompt out, SAM intensity handling."""
    return ModelCard(
        name=name,
        task="segmentation",
        spatial_dims=2,
        in_channels=3,
        out_channels=1,
        roi_size=(img_size, img_size),
        divisible_by=(16, 16),
        target_spacing=None,
        intensity_preset="sam",
        label_names=("foreground",),
        needs_prompts=True,
        output="sigmoid",
        paper=paper,
        reference_params=reference_params,
        reference_config={},
    )


ConfigT = TypeVar("ConfigT", bound=SamConfig)


def build_sam_config(
    cls: type[ConfigT],
    name: str,
    in_channels: int,
    out_channels: int,
    defaults: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ConfigT:
    """The configuration of a promptable zoo model from its builder keywords (timm's ``cls(**dict(defaults, **kw))``).

    The geometry fields are declared once, in :class:`SamConfig`; a model adds its own fields by subclassing it
    (:class:`~medseg.models.db_sam.DBSAMConfig`, :class:`~medseg.models.sam_unet.SAMUNetConfig`). Lists (from YAML)
    become tuples.

    Args:
        cls: the configuration dataclass (:class:`SamConfig` or a subclass).
        name: registry name, used in error messages.
        in_channels: must be 3 (RGB in).
        out_channels: must be 1 (one mask per prompt out).
        defaults: the variant's values, overridden by ``overrides``.
        overrides: the builder's keyword arguments.

    Raises:
        ConfigError: other channel counts, keywords that are not fields of ``cls`` (named, with a suggestion), or an
            inconsistent geometry.
    """
    if in_channels != 3 or out_channels != 1:
        raise ConfigError(
            f"{name}: in_channels={in_channels}, out_channels={out_channels}",
            expected="in_channels=3 and out_channels=1",
            hint="SAM models take RGB-replicated input (repeat a grey channel 3 times) and return one mask per prompt",
        )
    values = {**dict(defaults or {}), **dict(overrides or {})}
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hints = [h for h in (did_you_mean(k, fields) for k in unknown) if h]
        raise ConfigError(
            f"model {name!r} does not accept the options {unknown}",
            expected=f"keywords among {sorted(fields)}",
            hint="; ".join(hints) or f"see {cls.__name__} for the keyword arguments of {name}",
        )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class SamCore(nn.Module):
    """Segment Anything: ``image_encoder`` + ``prompt_encoder`` + ``mask_decoder`` (arXiv:2304.02643).

    Args:
        config: the model sizes (default :data:`VIT_B`, the official ViT-B layout).

    Examples::

        >>> model = SamCore(SamConfig(img_size=64, embed_dim=48, num_heads=3, window_size=4, prompt_embed_dim=32,
        ...                           decoder_mlp_dim=64, decoder_heads=2))
        >>> logits, iou = model(torch.randn(2, 3, 64, 64), boxes=torch.tensor([[8.0, 8, 40, 40]] * 2))
        >>> logits.shape, iou.shape
        (torch.Size([2, 1, 16, 16]), torch.Size([2, 1]))
    """

    def __init__(self, config: SamConfig = VIT_B) -> None:
        super().__init__()
        self.config = config
        grid = config.grid
        self.image_encoder = ImageEncoderViT(
            img_size=config.img_size,
            patch_size=config.patch_size,
            in_chans=3,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            out_chans=config.prompt_embed_dim,
            window_size=config.window_size,
            global_attn_indexes=tuple(config.global_attn_indexes),
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size),
            mask_in_chans=config.mask_in_chans,
        )
        transformer = TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            num_heads=config.decoder_heads,
            mlp_dim=config.decoder_mlp_dim,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=config.prompt_embed_dim,
            transformer=transformer,
            num_multimask_outputs=config.num_multimask_outputs,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim or config.prompt_embed_dim,
        )

    def normalize(self, images: Tensor) -> Tensor:
        """SAM's input normalisation of RGB ``(B, 3, H, W)`` images on the 0-255 scale.

        The statistics are constants, not buffers, so a model built on the ``meta`` device and materialised with
        ``to_empty`` is complete once a checkpoint is loaded.
        """
        mean = torch.tensor(SAM_PIXEL_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def forward(
        self,
        x: Tensor,
        *,
        boxes: Tensor | None = None,
        points: tuple[Tensor, Tensor] | None = None,
        masks: Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Segment one prompted object per image.

        Args:
            x: normalised images ``(B, 3, S, S)`` (any ``H, W`` multiple of 16 works; the position embedding is then
                interpolated).
            boxes: ``(B, 4)`` as ``(x0, y0, x1, y1)`` pixels of the input frame.
            points: ``(coords (B, N, 2), labels (B, N))``; ``(x, y)`` pixels, labels 1 fg, 0 bg, -1 padding.
            masks: ``(B, 1, S/4, S/4)`` low-resolution mask logits from a previous prediction.
            multimask_output: return the 3 multi-mask outputs instead of the single one.

        Returns:
            ``low_res_logits (B, 1 or 3, S/4, S/4)`` and ``iou (B, 1 or 3)``.

        Raises:
            ModelInputError: wrong image shape, or prompts whose shape or batch size does not fit.
        """
        check_input(x, name="sam", in_channels=3, spatial_dims=2, divisible_by=self.config.patch_size)
        embeddings = self.image_encoder(x)
        return self.decode(
            embeddings,
            image_size=(x.shape[-2], x.shape[-1]),
            boxes=boxes,
            points=points,
            masks=masks,
            multimask_output=multimask_output,
        )

    def decode(
        self,
        image_embeddings: Tensor,
        *,
        image_size: tuple[int, int] | None = None,
        boxes: Tensor | None = None,
        points: tuple[Tensor, Tensor] | None = None,
        masks: Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Prompt encoder + mask decoder on precomputed image embeddings ``(B, C, h, w)``.

        Args:
            image_embeddings: ``(B, prompt_embed_dim, h, w)``, e.g. from ``image_encoder``.
            image_size: the input frame ``(H, W)`` the prompt coordinates refer to (default ``16 * (h, w)``).
            boxes: see :meth:`forward`.
            points: see :meth:`forward`.
            masks: see :meth:`forward`.
            multimask_output: see :meth:`forward`.

        Returns:
            ``low_res_logits (B, 1 or 3, 4h, 4w)`` and ``iou (B, 1 or 3)``.
        """
        b, _, h, w = image_embeddings.shape
        patch = self.config.patch_size
        frame = tuple(image_size) if image_size is not None else (h * patch, w * patch)
        boxes, points, masks = _check_prompts(b, (h, w), boxes, points, masks)
        sparse, dense = self.prompt_encoder(points, boxes, masks, batch_size=b, image_size=frame)
        dense_pe = self.prompt_encoder.get_dense_pe((h, w))
        dtype = image_embeddings.dtype
        return self.mask_decoder(
            image_embeddings, dense_pe.to(dtype), sparse.to(dtype), dense.to(dtype), multimask_output
        )


def _check_prompts(
    b: int,
    grid: tuple[int, int],
    boxes: Tensor | None,
    points: tuple[Tensor, Tensor] | None,
    masks: Tensor | None,
) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None, Tensor | None]:
    """Raise ``ModelInputError`` unless the prompts fit a batch of ``b`` images with an ``(h, w)`` embedding grid."""
    boxes, points = check_prompts(b, boxes, points, name="sam", required=False)
    if masks is not None:
        want = (b, 1, 4 * grid[0], 4 * grid[1])
        if not isinstance(masks, Tensor) or tuple(masks.shape) != want:
            shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ModelInputError(f"sam: mask prompt has shape {shape}", expected=f"{want}, low-resolution logits")
    return boxes, points, masks


# ------------------------------------------------------------------------------------------------ checkpoint layout
def official_sam_vit_b_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official ``sam_vit_b_01ec64.pth`` state dict (segment_anything layout).

    Written from the published ViT-B SAM architecture: 1024x1024 input, 16x16 patches (64x64 tokens of width 768),
    12 blocks with 12 heads (head width 64), MLP 3072, relative position tables of 127 rows in the global blocks
    (2, 5, 8, 11) and 27 rows in the windowed ones (window 14), neck to 256; prompt encoder with a (2, 128) Gaussian
    matrix and mask downscaling 1 -> 4 -> 16 -> 256; mask decoder with a depth-2 two-way transformer (width 256,
    cross-attention width 128, MLP 2048), 4 mask tokens, upscaling 256 -> 64 -> 32 and IoU head 256 -> 256 -> 4.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    dim, width, grid, head = 768, 256, 64, 64

    def linear(prefix: str, out_f: int, in_f: int) -> None:
        shapes[f"{prefix}.weight"] = (out_f, in_f)
        shapes[f"{prefix}.bias"] = (out_f,)

    def norm(prefix: str, n: int) -> None:
        shapes[f"{prefix}.weight"] = (n,)
        shapes[f"{prefix}.bias"] = (n,)

    enc = "image_encoder"
    shapes[f"{enc}.pos_embed"] = (1, grid, grid, dim)
    shapes[f"{enc}.patch_embed.proj.weight"] = (dim, 3, 16, 16)
    shapes[f"{enc}.patch_embed.proj.bias"] = (dim,)
    for i in range(12):
        blk = f"{enc}.blocks.{i}"
        rows = 2 * grid - 1 if i in (2, 5, 8, 11) else 2 * 14 - 1
        norm(f"{blk}.norm1", dim)
        shapes[f"{blk}.attn.rel_pos_h"] = (rows, head)
        shapes[f"{blk}.attn.rel_pos_w"] = (rows, head)
        linear(f"{blk}.attn.qkv", 3 * dim, dim)
        linear(f"{blk}.attn.proj", dim, dim)
        norm(f"{blk}.norm2", dim)
        linear(f"{blk}.mlp.lin1", 4 * dim, dim)
        linear(f"{blk}.mlp.lin2", dim, 4 * dim)
    shapes[f"{enc}.neck.0.weight"] = (width, dim, 1, 1)
    norm(f"{enc}.neck.1", width)
    shapes[f"{enc}.neck.2.weight"] = (width, width, 3, 3)
    norm(f"{enc}.neck.3", width)

    pe = "prompt_encoder"
    shapes[f"{pe}.pe_layer.positional_encoding_gaussian_matrix"] = (2, width // 2)
    for i in range(4):
        shapes[f"{pe}.point_embeddings.{i}.weight"] = (1, width)
    shapes[f"{pe}.not_a_point_embed.weight"] = (1, width)
    shapes[f"{pe}.mask_downscaling.0.weight"] = (4, 1, 2, 2)
    shapes[f"{pe}.mask_downscaling.0.bias"] = (4,)
    norm(f"{pe}.mask_downscaling.1", 4)
    shapes[f"{pe}.mask_downscaling.3.weight"] = (16, 4, 2, 2)
    shapes[f"{pe}.mask_downscaling.3.bias"] = (16,)
    norm(f"{pe}.mask_downscaling.4", 16)
    shapes[f"{pe}.mask_downscaling.6.weight"] = (width, 16, 1, 1)
    shapes[f"{pe}.mask_downscaling.6.bias"] = (width,)
    shapes[f"{pe}.no_mask_embed.weight"] = (1, width)

    dec = "mask_decoder"

    def attention(prefix: str, inner: int) -> None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(f"{prefix}.{proj}", inner, width)
        linear(f"{prefix}.out_proj", width, inner)

    for i in range(2):
        layer = f"{dec}.transformer.layers.{i}"
        attention(f"{layer}.self_attn", width)
        norm(f"{layer}.norm1", width)
        attention(f"{layer}.cross_attn_token_to_image", width // 2)
        norm(f"{layer}.norm2", width)
        linear(f"{layer}.mlp.lin1", 2048, width)
        linear(f"{layer}.mlp.lin2", width, 2048)
        norm(f"{layer}.norm3", width)
        norm(f"{layer}.norm4", width)
        attention(f"{layer}.cross_attn_image_to_token", width // 2)
    attention(f"{dec}.transformer.final_attn_token_to_image", width // 2)
    norm(f"{dec}.transformer.norm_final_attn", width)
    shapes[f"{dec}.iou_token.weight"] = (1, width)
    shapes[f"{dec}.mask_tokens.weight"] = (4, width)
    shapes[f"{dec}.output_upscaling.0.weight"] = (width, width // 4, 2, 2)  # ConvTranspose2d: (in, out, k, k)
    shapes[f"{dec}.output_upscaling.0.bias"] = (width // 4,)
    norm(f"{dec}.output_upscaling.1", width // 4)
    shapes[f"{dec}.output_upscaling.3.weight"] = (width // 4, width // 8, 2, 2)
    shapes[f"{dec}.output_upscaling.3.bias"] = (width // 8,)
    for i in range(4):
        mlp = f"{dec}.output_hypernetworks_mlps.{i}.layers"
        linear(f"{mlp}.0", width, width)
        linear(f"{mlp}.1", width, width)
        linear(f"{mlp}.2", width // 8, width)
    linear(f"{dec}.iou_prediction_head.layers.0", width, width)
    linear(f"{dec}.iou_prediction_head.layers.1", width, width)
    linear(f"{dec}.iou_prediction_head.layers.2", 4, width)
    return shapes


# ------------------------------------------------------------------------------------------------ reading / checks
def _list(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def read_sam_checkpoint(path: str | Path, sha256: str | None = None) -> dict[str, Tensor]:
    """Read and validate an official SAM ViT-B checkpoint (``sam_vit_b_01ec64.pth`` layout) on the CPU.

    Accepts the bare state dict or one wrapped as ``{"model": sd}`` / ``{"state_dict": sd}``; ``module.`` prefixes
    are stripped. The file is opened with ``torch.load(weights_only=True)``.

    Args:
        path: the ``.pth`` file.
        sha256: expected hex digest of the file, checked before reading.

    Returns:
        The flat state dict (keys ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).

    Raises:
        WeightsError: missing or unreadable file, digest mismatch, no state dict inside, a missing model part, a
            ViT-L / ViT-H checkpoint, or keys / shapes that differ from the official ViT-B layout.
    """
    path = Path(path)
    state = read_weights_file(path, kind="SAM", sha256=sha256, containers=("model", "state_dict"), hint=_VIT_B_HINT)
    validate_sam_state_dict(state, source=f"SAM checkpoint {path}", path=path)
    return state


def _encoder_size(state: Mapping[str, Tensor]) -> tuple[int | None, int]:
    """(embed dim, number of blocks) of the image encoder in ``state``."""
    embed = None
    for key in ("image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed"):
        if key in state:
            embed = int(state[key].shape[0] if key.endswith("weight") else state[key].shape[-1])
            break
    blocks = {k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.") and k.count(".") >= 3}
    return embed, len(blocks)


def validate_sam_state_dict(
    state: Mapping[str, Tensor], source: str = "SAM checkpoint", path: str | Path | None = None
) -> None:
    """Raise ``WeightsError`` unless ``state`` has exactly the keys and shapes of the official ViT-B checkpoint.

    Args:
        state: a flat state dict.
        source: how to name it in messages.
        path: the file it came from, if any (kept on the error).
    """
    absent = [part for part in SAM_PARTS if not any(k.startswith(part + ".") for k in state)]
    if absent:
        names = ", ".join(f"{_PART_NAMES[p]} ({p}.*)" for p in absent)
        raise WeightsError(
            f"{source} has no {names} weights",
            expected="the full SAM model: image_encoder.*, prompt_encoder.* and mask_decoder.* keys",
            hint="an encoder-only or decoder-only file cannot be used; " + _VIT_B_HINT,
            path=path,
        )
    embed, blocks = _encoder_size(state)
    if (embed, blocks) != (768, 12):
        variant = _VARIANTS.get((embed, blocks)) or {1024: "ViT-L", 1280: "ViT-H"}.get(embed or 0)
        variant = variant or {24: "ViT-L", 32: "ViT-H"}.get(blocks)
        what = f"a SAM {variant} image encoder" if variant else "an image encoder of unknown size"
        raise WeightsError(
            f"{source} holds {what} (embed dim {embed}, {blocks} blocks)",
            expected="SAM ViT-B (embed dim 768, 12 blocks)",
            hint=_VIT_B_HINT,
            path=path,
        )
    expected = official_sam_vit_b_shapes()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shaped = [
        f"{k} {tuple(state[k].shape)} instead of {shape}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if missing or extra or shaped:
        parts = [
            f"{len(keys)} {title}: {_list(keys)}"
            for title, keys in (("missing", missing), ("unexpected", extra), ("mis-shaped", shaped))
            if keys
        ]
        raise WeightsError(
            f"{source} does not match the official SAM ViT-B layout: " + "; ".join(parts),
            expected="the keys and shapes of sam_vit_b_01ec64.pth (e.g. image_encoder.pos_embed (1, 64, 64, 768))",
            hint=_VIT_B_HINT,
            path=path,
        )


def split_sam_state_dict(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split a flat SAM state dict into ``{"image_encoder": ..., "prompt_encoder": ..., "mask_decoder": ...}``.

    Each part keeps its keys with the ``part.`` prefix stripped (ready for the sub-module's ``load_state_dict``);
    keys of no part are left out.
    """
    parts: dict[str, dict[str, Tensor]] = {part: {} for part in SAM_PARTS}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = value
    return parts


def _resize_grid(pos_embed: Tensor, grid: int) -> Tensor:
    """``(1, G, G, C) -> (1, grid, grid, C)`` bilinear (half-pixel centres)."""
    x = pos_embed.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()


def _resize_rows(table: Tensor, rows: int) -> Tensor:
    """``(L, D) -> (rows, D)`` bilinear on the ``(L, D)`` plane with ``D`` kept (= linear along ``L``)."""
    x = F.interpolate(table[None, None].float(), size=(rows, table.shape[1]), mode="bilinear", align_corners=False)
    return x[0, 0].to(table.dtype).contiguous()


def resize_sam_state_dict(state: Mapping[str, Tensor], config: SamConfig) -> dict[str, Tensor]:
    """Adapt a 1024x1024 SAM state dict to ``config``'s input size (the SAMed / SAM-UNet rule).

    ``image_encoder.pos_embed`` ``(1, 64, 64, C)`` is resized bilinearly to ``(1, S/16, S/16, C)``; the relative
    position tables of the global blocks ``(127, D)`` bilinearly to ``(2 * S/16 - 1, D)``. Windowed blocks' tables
    ``(2 * window - 1, D)`` depend only on the window and stay as they are. Tensors that already fit are passed
    through, so at 1024 this is a no-op.

    Args:
        state: flat state dict in the official layout.
        config: the target sizes.

    Returns:
        A new dict (the unchanged tensors are shared with ``state``).
    """
    out = dict(state)
    grid = config.grid
    key = "image_encoder.pos_embed"
    if key in out and tuple(out[key].shape[1:3]) != (grid, grid):
        logger.debug("resizing %s %s to a %dx%d grid", key, tuple(out[key].shape), grid, grid)
        out[key] = _resize_grid(out[key], grid)
    for i in range(config.depth):
        rows = 2 * grid - 1 if i in config.global_attn_indexes else 2 * config.window_size - 1
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if key in out and out[key].ndim == 2 and out[key].shape[0] != rows:
                out[key] = _resize_rows(out[key], rows)
    return out


def load_sam_checkpoint(model: SamCore, path: str | Path, sha256: str | None = None) -> None:
    """Read, validate, resize to ``model.config`` and strictly load an official SAM ViT-B checkpoint.

    Args:
        model: a :class:`SamCore` (any ``img_size``; ViT-B widths).
        path: the checkpoint file.
        sha256: expected hex digest of the file, checked before reading.

    Raises:
        WeightsError: see :func:`read_sam_checkpoint`; and keys / shapes that do not fit ``model`` (listed).
    """
    state = resize_sam_state_dict(read_sam_checkpoint(path, sha256=sha256), model.config)
    load_state_dict_checked(model, state, source=f"SAM checkpoint {path}")


def write_synthetic_sam_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write random weights in the official ViT-B layout (built from :func:`official_sam_vit_b_shapes`).

    About 375 MB of float32 tensors. Norm weights are near 1, biases and position tables near 0, other weights
    ``N(0, 1/fan_in)``, the prompt encoder's Gaussian matrix ``N(0, 1)`` as in SAM, so a model loaded from the file
    gives finite outputs.

    Args:
        path: where to write (parents are created; the write is atomic).
        seed: random seed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key, shape in official_sam_vit_b_shapes().items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith("positional_encoding_gaussian_matrix"):
            value = noise
        elif key.endswith(".bias") or "pos_embed" in key or "rel_pos" in key:
            value = noise * 0.02
        elif len(shape) == 1:
            value = 1.0 + noise * 0.02
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            value = noise * fan_in**-0.5
        state[key] = value
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)
    return path
