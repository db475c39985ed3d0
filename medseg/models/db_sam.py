"""DB-SAM: a dual-branch adapted SAM for universal medical image segmentation with box / point prompts.

Paper: C. Qin, J. Cao, H. Fu, F. S. Khan, R. M. Anwer, "DB-SAM: Delving into High Quality Universal Medical Image
Segmentation", MICCAI 2024, arXiv:2410.04172. Written from the paper's Fig. 1 and the facts collected in
``MODELS.md`` §3; the upstream code (``AlfredQin/DB-SAM``) carries no licence and was not copied. Builds on the
Segment Anything core (Kirillov et al., arXiv:2304.02643) in :mod:`medseg.models.sam`.

Architecture (the registry default follows the paper figure):
    * **ViT branch**: SAM ViT-B patch embedding, position embedding and 12 blocks, **frozen**, run as 4 stages of 3
      blocks ([0-2], [3-5], [6-8], [9-11]; each stage ends with a global-attention block). After every stage a
      trainable **channel-attention block** (:class:`~medseg.models.layers.db_sam_parts.ChannelAttentionBlock`:
      LayerNorm2d -> depthwise 3x3 -> GELU -> squeeze-excite (0.25) -> pointwise 1x1, residual, no bias; 893,184
      parameters at width 768).
    * **Convolution branch** (:class:`~medseg.models.layers.db_sam_parts.ConvBranch`): the input resized to 256 x 256
      (``S / 4``) -> stem of three 3x3 conv-BN-ReLU (first stride 2) + max-pool -> 64 x 64 x 64, then two stride-2
      conv-BN-ReLU -> 32 x 32 x 128 and 16 x 16 x 256; each level 1x1 conv to 768 + LayerNorm2d + a learnable level
      embedding. Three levels so the ViT tokens see shallow detail at the ViT's own resolution and coarser context.
    * **Bilateral cross-attention** after every stage (after the CAB): the 64 x 64 ViT tokens query the 3 conv levels,
      then the conv tokens query the updated ViT tokens; each direction is query-LN, value-LN, multi-scale deformable
      attention (:class:`~medseg.models.layers.ms_deform_attn.MSDeformAttn`, 12 heads, 4 points, pixel-centre
      reference points), residual, then LN + Mix-FFN (4x) residual.
    * **ViT-conv fusion**: the conv levels are resized to the ViT grid and summed (``F_s``); with the ViT tokens
      ``F_d``, ``M = sigmoid(MLP_d(F_d) + MLP_s(F_s))`` (each MLP Linear(768, 192) -> GELU -> Linear(192, 768)) and
      ``F = F_d * M + F_s * (1 - M)``; a final LayerNorm, then SAM's neck (**trainable**).
    * SAM prompt encoder (**frozen**, as drawn) and SAM mask decoder (trainable), ``multimask_output=False``
      (mask token 0); the 256 x 256 low-resolution logits are upsampled bilinearly to the 1024 x 1024 input.

Assumptions (pieces the paper does not specify and the release does not contain):
    * The FFN inside each cross-attention block is a Mix-FFN (Linear C -> 4C, depthwise 3x3 conv per level, GELU,
      Linear 4C -> C), the usual reconstruction of the release's missing ``MSMixFFN``.
    * The conv-branch layout and widths above (the figure only says "lightweight conv block"), the order inside the
      bilateral block (ViT side first), the fusion MLP width (C / 4) and the summed multi-level ``F_s``.
    * Dropout 0.1 on the attention output and in the FFN and stochastic depth 0.3 in the cross-attention blocks, the
      values of the released configuration. Adapter init as ViT-Adapter (arXiv:2205.08534): Linear trunc-normal 0.02,
      conv normal(0, sqrt(2 / fan_out)), norms 1 / 0, Deformable-DETR init for the deformable attention.
    * SAM's IoU head is loaded but frozen: with ``multimask_output=False`` and a mask-only loss it never receives a
      gradient (the release trains with DDP ``find_unused_parameters=True``), so freezing it changes no update.

Parameters of the default build (1024 x 1024), 147,983,344 in all, 58,961,056 trainable:

    ========================================  ===========  =========
    part                                      parameters   trainable
    ========================================  ===========  =========
    ViT patch/pos embedding + 12 blocks        88,883,456   no
    4 channel-attention blocks                  3,572,736   yes
    convolution branch (+ level embedding)        798,528   yes
    4 bilateral cross-attention blocks         49,283,328   yes
    fusion gate + final LayerNorm                 593,280   yes
    SAM neck                                      787,456   yes
    SAM mask decoder (of which IoU head)        4,058,340   yes (IoU head 132,612 frozen)
    SAM prompt encoder                              6,220   no
    ========================================  ===========  =========

The released ``db_sam_plus`` configuration (``MODELS.md`` §3.4) differs from the figure; this module builds the
figure:

    ====================  ==============================================  =========================================
    piece                 paper figure (this module)                      released ``db_sam_plus``
    ====================  ==============================================  =========================================
    conv branch           one light stack on the 256 x 256 image,         LFIP0: four conv stacks on the image at
                          3 levels (64, 32, 16)                           512 / 256 / 128 / 64, all to 64 x 64
    channel attention     CAB after each ViT stage                        none
    interaction           bilateral cross-attention (ViT <-> conv)        two self-attention blocks over the 5-level
                                                                          stack [ViT, 4 conv maps] per stage
    fusion                sigmoid gate of two MLPs                        MultiConvFeatsDANE (softmax over 5 sources
                                                                          + residual FFN)
    prompt encoder        frozen                                          trainable
    ====================  ==============================================  =========================================

Training recipe (§3.6): MONAI DiceCE (sigmoid, squared_pred) on the logits (``paper_loss = "sam_dice_ce"``), AdamW lr
1e-4, wd 0.01, 20 epochs, one box per image, each box side enlarged by U{0..19} px on the 256 grid
(``box_jitter = "enlarge"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.core.errors import ConfigError
from medseg.models.checkpoint import load_state_dict_checked
from medseg.models.checks import check_prompted_input
from medseg.models.layers.db_sam_parts import (
    BilateralCrossAttention,
    ChannelAttentionBlock,
    ConvBranch,
    FusionGate,
    split_levels,
)
from medseg.models.layers.ms_deform_attn import MSDeformAttn
from medseg.models.registry import register_model
from medseg.models.sam import (
    SamConfig,
    SamCore,
    prompted_card,
    prompted_sam_config,
    read_sam_checkpoint,
    resize_sam_state_dict,
    split_sam_state_dict,
)

__all__ = ["DBSAM", "db_sam"]

logger = logging.getLogger(__name__)

NAME = "db_sam"
N_STAGES = 4
# Trainable parts that the SAM checkpoint does not cover.
_NEW_PARTS = ("cabs", "conv_branch", "interactions", "fusion", "fusion_norm")


def _init_adapter(module: nn.Module) -> None:
    """ViT-Adapter initialisation of the new parts (arXiv:2205.08534)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, MSDeformAttn):
            m.reset_parameters()


class DBSAM(nn.Module):
    """DB-SAM (arXiv:2410.04172): frozen SAM ViT + CABs, conv branch, bilateral deformable cross-attention, fusion.

    Args:
        config: SAM geometry (``img_size`` is the model input side ``S``, a multiple of 64; ``depth`` a multiple of
            4, run as 4 equal stages).
        conv_channels: stem width ``c`` of the convolution branch (levels ``c, 2c, 4c``).
        deform_heads: heads of the deformable attention.
        deform_points: sampling points per head and level.
        ffn_ratio: Mix-FFN hidden width / ViT width.
        fusion_reduction: hidden width divisor of the fusion-gate MLPs.
        dropout: dropout in the cross-attention blocks.
        drop_path: stochastic depth of the cross-attention blocks.

    Attributes:
        img_size: input side ``S``; the model takes ``(B, 3, S, S)``.
        paper_loss: loss registry name of the paper's objective (DiceCE with sigmoid and squared denominators).
        box_jitter: box augmentation rule of the paper (``"enlarge"``: each side pushed out by a random margin).
    """

    in_channels = 3
    out_channels = 1
    paper_loss = "sam_dice_ce"
    box_jitter = "enlarge"

    def __init__(
        self,
        config: SamConfig,
        conv_channels: int = 64,
        deform_heads: int = 12,
        deform_points: int = 4,
        ffn_ratio: float = 4.0,
        fusion_reduction: int = 4,
        dropout: float = 0.1,
        drop_path: float = 0.3,
    ) -> None:
        super().__init__()
        s = int(config.img_size)
        if s < 64 or s % 64:
            raise ConfigError(
                f"{NAME}: img_size={s}",
                expected="a multiple of 64 (ViT grid S/16 and conv levels S/32, S/64)",
                hint="use img_size=1024 as in the paper",
            )
        if config.depth % N_STAGES:
            raise ConfigError(f"{NAME}: depth={config.depth}", expected=f"a multiple of {N_STAGES} (4 equal stages)")
        dim = config.embed_dim
        if dim % deform_heads:
            raise ConfigError(
                f"{NAME}: embed_dim={dim} is not divisible by deform_heads={deform_heads}",
                expected="deform_heads dividing the ViT width, e.g. 12 for 768",
            )
        self.config = config
        self.img_size = s
        self.stage_depth = config.depth // N_STAGES

        core = SamCore(config)
        self.image_encoder = core.image_encoder
        self.prompt_encoder = core.prompt_encoder
        self.mask_decoder = core.mask_decoder

        self.cabs = nn.ModuleList(ChannelAttentionBlock(dim) for _ in range(N_STAGES))
        self.conv_branch = ConvBranch(dim, conv_channels, input_size=s // 4)
        self.interactions = nn.ModuleList(
            BilateralCrossAttention(
                dim, ConvBranch.n_levels, deform_heads, deform_points, ffn_ratio, drop=dropout, drop_path=drop_path
            )
            for _ in range(N_STAGES)
        )
        self.fusion = FusionGate(dim, fusion_reduction)
        self.fusion_norm = nn.LayerNorm(dim)
        for name in _NEW_PARTS:
            _init_adapter(getattr(self, name))
        with torch.no_grad():
            nn.init.normal_(self.conv_branch.level_embed)

        frozen = [
            self.image_encoder.patch_embed,
            self.image_encoder.blocks,
            self.prompt_encoder,
            self.mask_decoder.iou_prediction_head,
        ]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad = False
        if self.image_encoder.pos_embed is not None:
            self.image_encoder.pos_embed.requires_grad = False

    # ----------------------------------------------------------------------------------------------- forward
    def encode(self, x: Tensor) -> Tensor:
        """Image embeddings ``(B, prompt_embed_dim, S/16, S/16)`` of SAM-normalised images ``x`` ``(B, 3, S, S)``."""
        conv_maps = self.conv_branch(x)
        conv_shapes = [(m.shape[2], m.shape[3]) for m in conv_maps]
        conv = torch.cat([m.flatten(2).transpose(1, 2) for m in conv_maps], dim=1)
        enc = self.image_encoder
        t = enc.embed(x)  # (B, h, w, C)
        for stage in range(N_STAGES):
            for block in enc.blocks[stage * self.stage_depth : (stage + 1) * self.stage_depth]:
                t = block(t)
            t = self.cabs[stage](t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            t, conv = self.interactions[stage](t, conv, conv_shapes)
        h, w = t.shape[1:3]
        shallow = sum(
            m if m.shape[2:] == (h, w) else F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            for m in split_levels(conv, conv_shapes)
        )
        fused = self.fusion_norm(self.fusion(t, shallow.permute(0, 2, 3, 1)))
        return enc.neck(fused.permute(0, 3, 1, 2))

    def forward(self, x: Tensor, *, boxes: Tensor | None = None, points: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Segment the prompted object of each image.

        Args:
            x: SAM-normalised images ``(B, 3, S, S)``.
            boxes: one box per image ``(B, 4)`` as ``(x0, y0, x1, y1)`` in pixels of the ``S x S`` frame.
            points: ``(coords (B, N, 2), labels (B, N))``; coordinates ``(x, y)`` in pixels (x = column), label 1
                foreground, 0 background.

        Returns:
            Mask logits ``(B, 1, S, S)`` (sigmoid > 0.5 is the mask), the same in training and evaluation mode.

        Raises:
            ModelInputError: wrong input shape or size, no prompt, or wrongly shaped prompts.
        """
        s = self.img_size
        boxes, points = check_prompted_input(x, name=NAME, size=s, boxes=boxes, points=points)
        embeddings = self.encode(x)
        sparse, dense = self.prompt_encoder(points, boxes, None)
        dtype = embeddings.dtype
        low_res, _ = self.mask_decoder(
            embeddings,
            self.prompt_encoder.get_dense_pe().to(dtype),
            sparse.to(dtype),
            dense.to(dtype),
            multimask_output=False,
        )
        return F.interpolate(low_res, size=(s, s), mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------------------------- weights
    def load_pretrained(self, path: str | Path, sha256: str | None = None) -> None:
        """Load the official SAM ViT-B checkpoint (``sam_vit_b_01ec64.pth``) with the paper's mapping.

        ``image_encoder.*`` fills the ViT (patch embedding, position embedding, blocks, neck), ``prompt_encoder.*``
        and ``mask_decoder.*`` their modules, all strictly (position tables resized when ``img_size != 1024``). The
        channel-attention blocks, conv branch, cross-attention blocks and fusion stay at their initialisation;
        frozen parameters stay frozen.

        Args:
            path: the checkpoint file.
            sha256: expected hex digest of the file, checked before reading.

        Raises:
            WeightsError: unreadable file, digest mismatch, a non-ViT-B checkpoint, or keys / shapes that do not fit
                the model (listed).
        """
        state = resize_sam_state_dict(read_sam_checkpoint(path, sha256=sha256), self.config)
        parts = split_sam_state_dict(state)
        source = f"SAM checkpoint {path}"
        for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
            load_state_dict_checked(getattr(self, part), parts[part], source=source)
        logger.info(
            "%s: loaded SAM image encoder (%d tensors), prompt encoder (%d) and mask decoder (%d) from %s; "
            "left at initialisation: %s",
            NAME,
            len(parts["image_encoder"]),
            len(parts["prompt_encoder"]),
            len(parts["mask_decoder"]),
            path,
            ", ".join(_NEW_PARTS),
        )


# --------------------------------------------------------------------------------------------------- registry
_PAPER = (
    "Qin, Cao, Fu, Khan, Anwer, DB-SAM: Delving into High Quality Universal Medical Image Segmentation, "
    "MICCAI 2024, arXiv:2410.04172"
)
_IMG_SIZE = 1024

_TINY: dict[str, Any] = {
    "img_size": 64,
    "embed_dim": 48,
    "depth": 12,
    "num_heads": 3,
    "window_size": 4,
    "prompt_embed_dim": 32,
    "decoder_mlp_dim": 64,
    "decoder_heads": 2,
    "conv_channels": 8,
    "deform_heads": 3,
}

_CARD = prompted_card(NAME, img_size=_IMG_SIZE, paper=_PAPER, reference_params=147_983_344)


@register_model(_CARD, tiny=_TINY)
def db_sam(
    in_channels: int = 3,
    out_channels: int = 1,
    img_size: int = _IMG_SIZE,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    window_size: int = 14,
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    prompt_embed_dim: int = 256,
    decoder_mlp_dim: int = 2048,
    decoder_heads: int = 8,
    conv_channels: int = 64,
    deform_heads: int = 12,
    deform_points: int = 4,
    ffn_ratio: float = 4.0,
    fusion_reduction: int = 4,
    dropout: float = 0.1,
    drop_path: float = 0.3,
) -> DBSAM:
    """Build DB-SAM as drawn in the paper (148.0 M parameters, 59.0 M trainable at the defaults).

    Args:
        in_channels: must be 3.
        out_channels: must be 1.
        img_size: input side ``S`` (1024 in the paper; a multiple of 64).
        embed_dim: ViT width.
        depth: ViT blocks (4 equal stages).
        num_heads: ViT attention heads.
        window_size: ViT window-attention size.
        global_attn_indexes: ViT blocks with global attention.
        prompt_embed_dim: neck output / prompt encoder / decoder width.
        decoder_mlp_dim: two-way transformer MLP width.
        decoder_heads: two-way transformer heads.
        conv_channels: stem width of the convolution branch.
        deform_heads: heads of the deformable cross-attention.
        deform_points: sampling points per head and level.
        ffn_ratio: Mix-FFN hidden width / ViT width.
        fusion_reduction: hidden width divisor of the fusion-gate MLPs.
        dropout: dropout in the cross-attention blocks.
        drop_path: stochastic depth of the cross-attention blocks.

    Raises:
        ConfigError: ``in_channels != 3``, ``out_channels != 1`` or an inconsistent geometry.
    """
    config = prompted_sam_config(
        NAME,
        in_channels,
        out_channels,
        img_size=img_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        global_attn_indexes=global_attn_indexes,
        window_size=window_size,
        prompt_embed_dim=prompt_embed_dim,
        decoder_mlp_dim=decoder_mlp_dim,
        decoder_heads=decoder_heads,
    )
    return DBSAM(
        config,
        conv_channels=int(conv_channels),
        deform_heads=int(deform_heads),
        deform_points=int(deform_points),
        ffn_ratio=float(ffn_ratio),
        fusion_reduction=int(fusion_reduction),
        dropout=float(dropout),
        drop_path=float(drop_path),
    )
