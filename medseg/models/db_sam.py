"""DB-SAM: a dual-branch adapted SAM for universal medical image segmentation with box / point prompts.

Paper: C. Qin, J. Cao, H. Fu, F. S. Khan, R. M. Anwer, "DB-SAM: Delving into High Quality Universal Medical Image
Segmentation", MICCAI 2024, arXiv:2410.04172. Written from the paper's Fig. 1 and the facts collected in
``docs/models/db_sam.md``; the upstream code (``AlfredQin/DB-SAM``) carries no licence and was not copied. Builds on the
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
      (mask token 0); :meth:`DBSAM.forward_low_res` gives the 256 x 256 low-resolution logits, :meth:`DBSAM.forward`
      upsamples them bilinearly to the 1024 x 1024 input.

Assumptions (pieces the paper does not specify and the release does not contain):
    * The FFN inside each cross-attention block is a Mix-FFN (Linear C -> 4C, depthwise 3x3 conv per level, GELU,
      Linear 4C -> C), the usual reconstruction of the release's missing ``MSMixFFN``.
    * The conv-branch layout and widths above (the figure only says "lightweight conv block"), the order inside the
      bilateral block (ViT side first), the fusion MLP width (C / 4) and the summed multi-level ``F_s``.
    * Dropout 0.1 on the attention output and in the FFN and stochastic depth 0.3 in the cross-attention blocks, the
      values of the released configuration. Adapter init as ViT-Adapter (arXiv:2205.08534): Linear trunc-normal 0.02,
      conv normal(0, sqrt(2 / fan_out)), norms 1 / 0, Deformable-DETR init for the deformable attention.
    * Decoder heads the single-mask path never reaches are loaded but frozen: the IoU head (no gradient at all with
      a mask-only loss) and the hypernetwork MLPs of the three multimask tokens (their masks are computed and
      dropped, so their gradients are exactly zero). The release trains with DDP ``find_unused_parameters=True`` and
      leaves them in the optimiser, where AdamW's weight decay alone shrinks them; freezing keeps the loaded SAM
      values, and changes nothing the loss sees. The multimask *tokens* stay trainable: they take part in the
      two-way transformer's self-attention and so shape mask token 0.

Parameters of the default build (1024 x 1024), 147,983,344 in all, 58,541,632 trainable (own count; the paper gives
none):

    ========================================  ===========  =========
    part                                      parameters   trainable
    ========================================  ===========  =========
    ViT patch/pos embedding + 12 blocks        88,883,456   no
    4 channel-attention blocks                  3,572,736   yes
    convolution branch (+ level embedding)        798,528   yes
    4 bilateral cross-attention blocks         49,283,328   yes
    fusion gate + final LayerNorm                 593,280   yes
    SAM neck                                      787,456   yes
    SAM mask decoder                            4,058,340   yes, except the IoU head (132,612) and the
                                                            multimask hypernetwork MLPs (3 x 139,808)
    SAM prompt encoder                              6,220   no
    ========================================  ===========  =========

The released ``db_sam_plus`` configuration (``docs/models/db_sam.md``) differs from the figure; this module builds the
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

Training recipe: MONAI DiceCE (sigmoid, squared_pred) (``paper_loss = "sam_dice_ce"``) on the **256 x 256
low-resolution logits** against the 256 x 256 ground truth (``loss_on_lowres=True``, the default: the trainer calls
:meth:`DBSAM.forward_low_res` and brings the label to the ``S/4`` frame by nearest-neighbour resizing of the original
slice, as MedSAM-format data store it; ``loss_on_lowres=False`` trains on the upsampled ``S x S`` logits instead),
AdamW lr 1e-4, wd 0.01, PolyLR after one epoch of linear warm-up (``paper_schedule = "poly"``), 20 epochs, one box per
image. Box prompts come from **all pixels** of the label, the bounding box of ``mask > 0`` (``box_rule =
"all_pixels"``; SAM-UNet instead boxes the largest connected component), each side then enlarged by U{0..19} px on
the 256 grid (``box_jitter = "enlarge"``) in training; evaluation uses the unjittered box.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
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
    build_sam_config,
    prompted_card,
    read_sam_checkpoint,
    resize_sam_state_dict,
    split_sam_state_dict,
)

__all__ = ["DBSAM", "DBSAMConfig", "db_sam"]

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


@dataclass(frozen=True)
class DBSAMConfig(SamConfig):
    """SAM geometry (the :class:`~medseg.models.sam.SamConfig` fields, ViT-B at 1024 by default) + DB-SAM's own sizes.

    Attributes:
        conv_channels: stem width ``c`` of the convolution branch (levels ``c, 2c, 4c``).
        deform_heads: heads of the deformable attention.
        deform_points: sampling points per head and level.
        ffn_ratio: Mix-FFN hidden width / ViT width.
        fusion_reduction: hidden width divisor of the fusion-gate MLPs.
        dropout: dropout in the cross-attention blocks.
        drop_path: stochastic depth of the cross-attention blocks.
        loss_on_lowres: train on the ``S/4`` low-resolution logits against an ``S/4`` target, as the paper (256^2 for
            a 1024 input); ``False`` trains on the upsampled ``S x S`` logits.
    """

    conv_channels: int = 64
    deform_heads: int = 12
    deform_points: int = 4
    ffn_ratio: float = 4.0
    fusion_reduction: int = 4
    dropout: float = 0.1
    drop_path: float = 0.3
    loss_on_lowres: bool = True


class DBSAM(nn.Module):
    """DB-SAM (arXiv:2410.04172): frozen SAM ViT + CABs, conv branch, bilateral deformable cross-attention, fusion.

    Args:
        config: SAM geometry and DB-SAM sizes (``img_size`` is the model input side ``S``, a multiple of 64; ``depth``
            a multiple of 4, run as 4 equal stages).

    Attributes:
        img_size: input side ``S``; the model takes ``(B, 3, S, S)``.
        paper_loss: loss registry name of the paper's objective (DiceCE with sigmoid and squared denominators).
        paper_schedule: learning-rate schedule of the paper (``"poly"``: PolyLR after one epoch of warm-up).
        box_jitter: box augmentation rule of the paper (``"enlarge"``: each side pushed out by a random margin).
        box_rule: how a box prompt is drawn from a label (``"all_pixels"``: the bounding box of every foreground
            pixel, the official rule ``bbox(mask > 0)``).
        loss_on_lowres: whether training compares :meth:`forward_low_res` with an ``S/4`` target (the paper).
    """

    in_channels = 3
    out_channels = 1
    paper_loss = "sam_dice_ce"
    paper_schedule = "poly"
    box_jitter = "enlarge"
    box_rule = "all_pixels"

    def __init__(self, config: DBSAMConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else DBSAMConfig()
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
        if dim % config.deform_heads:
            raise ConfigError(
                f"{NAME}: embed_dim={dim} is not divisible by deform_heads={config.deform_heads}",
                expected="deform_heads dividing the ViT width, e.g. 12 for 768",
            )
        self.config = config
        self.img_size = s
        self.stage_depth = config.depth // N_STAGES
        self.loss_on_lowres = bool(config.loss_on_lowres)

        core = SamCore(config)
        self.image_encoder = core.image_encoder
        self.prompt_encoder = core.prompt_encoder
        self.mask_decoder = core.mask_decoder

        self.cabs = nn.ModuleList(ChannelAttentionBlock(dim) for _ in range(N_STAGES))
        self.conv_branch = ConvBranch(dim, config.conv_channels, input_size=s // 4)
        self.interactions = nn.ModuleList(
            BilateralCrossAttention(
                dim,
                ConvBranch.n_levels,
                config.deform_heads,
                config.deform_points,
                config.ffn_ratio,
                drop=config.dropout,
                drop_path=config.drop_path,
            )
            for _ in range(N_STAGES)
        )
        self.fusion = FusionGate(dim, config.fusion_reduction)
        self.fusion_norm = nn.LayerNorm(dim)
        for name in _NEW_PARTS:
            _init_adapter(getattr(self, name))
        with torch.no_grad():
            nn.init.normal_(self.conv_branch.level_embed)

        # Frozen: the SAM ViT body and the prompt encoder (the paper), and the decoder heads the single-mask path
        # never reaches: the IoU head and the hypernetwork MLPs of the multimask tokens 1..3 (their masks are
        # computed and dropped, so they get zero gradients, which AdamW's weight decay would still act on).
        frozen = [
            self.image_encoder.patch_embed,
            self.image_encoder.blocks,
            self.prompt_encoder,
            self.mask_decoder.iou_prediction_head,
            *self.mask_decoder.output_hypernetworks_mlps[1:],
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

    def forward_low_res(
        self, x: Tensor, *, boxes: Tensor | None = None, points: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """The mask decoder's low-resolution logits ``(B, 1, S/4, S/4)`` (256 x 256 for the paper's 1024 input).

        The paper's loss compares these with the 256 x 256 ground truth; see :meth:`forward` for the arguments.
        """
        boxes, points = check_prompted_input(x, name=NAME, size=self.img_size, boxes=boxes, points=points)
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
        return low_res

    def forward(self, x: Tensor, *, boxes: Tensor | None = None, points: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Segment the prompted object of each image.

        Args:
            x: SAM-normalised images ``(B, 3, S, S)``.
            boxes: one box per image ``(B, 4)`` as ``(x0, y0, x1, y1)`` in pixels of the ``S x S`` frame.
            points: ``(coords (B, N, 2), labels (B, N))``; coordinates ``(x, y)`` in pixels (x = column), label 1
                foreground, 0 background.

        Returns:
            Mask logits ``(B, 1, S, S)`` (sigmoid > 0.5 is the mask): :meth:`forward_low_res` upsampled bilinearly,
            the same in training and evaluation mode.

        Raises:
            ModelInputError: wrong input shape or size, no prompt, or wrongly shaped prompts.
        """
        s = self.img_size
        low_res = self.forward_low_res(x, boxes=boxes, points=points)
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
_IMG_SIZE = DBSAMConfig.img_size

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
def db_sam(in_channels: int = 3, out_channels: int = 1, **kwargs: Any) -> DBSAM:
    """Build DB-SAM as drawn in the paper (148.0 M parameters, 58.5 M trainable at the defaults).

    Args:
        in_channels: must be 3.
        out_channels: must be 1.
        **kwargs: fields of :class:`DBSAMConfig`: the SAM geometry (``img_size`` = input side ``S``, 1024 in the
            paper, a multiple of 64; ``embed_dim``, ``depth``, ``num_heads``, ``window_size``,
            ``global_attn_indexes``, ``prompt_embed_dim``, ``decoder_mlp_dim``, ``decoder_heads``, ...) and DB-SAM's
            own sizes (``conv_channels``, ``deform_heads``, ``deform_points``, ``ffn_ratio``, ``fusion_reduction``,
            ``dropout``, ``drop_path``, ``loss_on_lowres``).

    Raises:
        ConfigError: ``in_channels != 3``, ``out_channels != 1``, an unknown keyword (named, with a suggestion) or an
            inconsistent geometry.
    """
    return DBSAM(build_sam_config(DBSAMConfig, NAME, in_channels, out_channels, overrides=kwargs))
