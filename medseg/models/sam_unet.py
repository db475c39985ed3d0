"""SAM-UNet: SAM's ViT-B image encoder with a parallel convolutional U-Net branch, for promptable 2D segmentation.

Paper: S. Yang, H. Bi, H. Zhang, J. Sun, "SAM-UNet: Enhancing Zero-Shot Segmentation of SAM for Universal Medical
Images", arXiv:2408.09886. Written from the paper and the official code's facts in ``docs/models/sam_unet.md``; the
upstream code (``Hhankyangg/sam-unet``) carries no licence and was not copied. Builds on the Segment Anything core
(Kirillov et al., arXiv:2304.02643) in :mod:`medseg.models.sam`.

Faithful to the released model:
    * SAM ViT-B image encoder built for 256 x 256 inputs (16 x 16 tokens, window 14 padded to 28, global attention
      in blocks 2 / 5 / 8 / 11, neck 768 -> 256), **frozen**.
    * A parallel, trainable ResNet-50 (``sam_unet_r50``) or ResNet-34 (``sam_unet_r34``) on the same normalised
      image; its stage outputs f1..f4 (strides 4 / 8 / 16 / 32) are brought to the 16 x 16 x 768 token grid by
      ``adapters_in`` (:class:`Reshaper`: {Conv 3x3 s2 C -> 2C, LayerNorm2d, GELU} per halving, or
      {ConvTranspose 2x2 s2 C -> C/2, LayerNorm2d, GELU} per doubling, then Conv 1x1 to 768; Kaiming-normal fan-out
      init) and added to the tokens before each global-attention block.
    * Multi-scale bridge: the token maps after global blocks 2, 5 and 8 go through ``adapters_bridge[2]``,
      ``[1]``, ``[0]`` (ConvT 768 -> 256, LayerNorm2d, GELU, ConvT 256 -> 32: 16 x 16 -> 64 x 64); their sum with
      ``embedding_encoder`` of the neck output is the multi-scale feature ``(B, 32, 64, 64)``.
    * Decoder: one learned ``med_token`` followed by the sparse prompt embeddings (no IoU or multimask tokens), SAM's
      two-way transformer and ``output_upscaling``, ``embedding_maskfeature`` (Conv 3x3 32 -> 64, LayerNorm2d, GELU,
      Conv 3x3 64 -> 32) plus the multi-scale feature, a 3-layer hypernetwork MLP on the med-token output, mask =
      hyper-weights . features ``(B, 1, 64, 64)``, bilinear x4 to ``(B, 1, 256, 256)``. No IoU head.
    * Prompt encoder and decoder are trainable; 138.4 M parameters / 51.8 M trainable (R50), 116.0 M / 29.4 M (R34).
    * :meth:`SAMUNet.load_pretrained` maps the official ``sam_vit_b_01ec64.pth`` like the release: the 64 x 64
      position embedding and the global blocks' relative positions (127 -> 31) are bilinearly resized; mask tokens,
      IoU token / head and the hypernetwork MLPs of SAM's decoder are dropped.

Deviations and why:
    * The ResNet is MONAI's :class:`monai.networks.nets.ResNet` (torchvision-equivalent layout: 7x7 stride-2 stem,
      max-pool, stride on the 3x3 convolution, bias-free 1x1 projection shortcuts); ImageNet weights in torchvision's
      naming are loaded with :meth:`SAMUNet.load_resnet_weights`.
    * ``forward`` takes the already resized (longest side 256, padded) and SAM-normalised image; the resize and
      normalisation live in the data pipeline instead of inside the model.
    * One prompt (a box and / or points) per image; several objects of one image are separate batch items.
    * Mask prompts are not accepted (the paper uses none), so the prompt encoder's ``mask_downscaling`` layers,
      which could never receive a gradient, are frozen.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import Tensor, nn

from medseg.core.errors import ConfigError, WeightsError
from medseg.models.card import ModelCard
from medseg.models.checkpoint import (
    load_state_dict_checked,
    read_weights_file,
    strip_wrapper_prefixes,
    unwrap_state_dict,
)
from medseg.models.checks import check_prompted_input
from medseg.models.layers.sam_decoder import MLP
from medseg.models.layers.sam_encoder import LayerNorm2d
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

__all__ = ["Reshaper", "SAMUNet", "SAMUNetConfig", "sam_unet_r34", "sam_unet_r50"]

logger = logging.getLogger(__name__)

# Keys of SAM's mask decoder that SAM-UNet has no counterpart for (IoU / multimask heads).
_DROPPED_DECODER_PREFIXES = ("iou_token.", "mask_tokens.", "output_hypernetworks_mlps.", "iou_prediction_head.")
_LOADED_DECODER_PARTS = ("transformer", "output_upscaling")
_NEW_PARTS = (
    "resnet.",
    "adapters_in.",
    "adapters_bridge.",
    "embedding_encoder.",
    "mask_decoder.med_token.",
    "mask_decoder.hf_mlp.",
    "mask_decoder.embedding_maskfeature.",
)
_RESNET_BLOCKS = {"bottleneck": 4, "basic": 1}  # block type -> channel expansion
# torchvision ResNet parameter / buffer names (stem, stage blocks, projection shortcut); the classifier ``fc`` is
# not part of the feature branch.
_TV_KEY = re.compile(
    r"^(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.(?:conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.[01]\.\w+))$"
)
_TV_IGNORED = re.compile(r"^fc\.(weight|bias)$")


def _ints(value: Sequence[int], name: str, length: int) -> tuple[int, ...]:
    out = tuple(int(v) for v in value)
    if len(out) != length or any(v < 1 for v in out):
        raise ConfigError(f"sam_unet: {name}={tuple(value)}", expected=f"{length} positive integers")
    return out


class Reshaper(nn.Module):
    """Bring a CNN feature map ``(B, C_in, s_in, s_in)`` to the token grid ``(B, C_out, s_out, s_out)``.

    ``s_in > s_out``: ``log2(s_in / s_out)`` x {Conv2d 3x3 stride 2 (C -> 2C), LayerNorm2d, GELU}; ``s_in < s_out``:
    ``log2(s_out / s_in)`` x {ConvTranspose2d 2x2 stride 2 (C -> C/2), LayerNorm2d, GELU}; then a 1x1 convolution
    to ``C_out``. Convolutions use Kaiming-normal (fan-out) weights and zero biases (arXiv:2408.09886).

    Args:
        size_in: side of the input map.
        channels_in: input channels ``C_in``.
        size_out: side of the output map (the token grid).
        channels_out: output channels ``C_out`` (the ViT width).
    """

    def __init__(self, size_in: int, channels_in: int, size_out: int, channels_out: int) -> None:
        super().__init__()
        ratio = max(size_in, size_out) / min(size_in, size_out)
        steps = round(math.log2(ratio))
        if size_in < 1 or size_out < 1 or 2**steps != ratio:
            raise ConfigError(
                f"sam_unet: cannot reshape a {size_in}x{size_in} feature map to {size_out}x{size_out}",
                expected="sides whose ratio is a power of 2",
                hint="use an img_size that is a power of 2 times 32",
            )
        layers: list[nn.Module] = []
        c = channels_in
        for _ in range(steps):
            if size_in > size_out:
                layers += [nn.Conv2d(c, 2 * c, kernel_size=3, stride=2, padding=1), LayerNorm2d(2 * c), nn.GELU()]
                c *= 2
            else:
                layers += [nn.ConvTranspose2d(c, c // 2, kernel_size=2, stride=2), LayerNorm2d(c // 2), nn.GELU()]
                c //= 2
        layers.append(nn.Conv2d(c, channels_out, kernel_size=1))
        self.reshaper = nn.Sequential(*layers)
        for m in self.reshaper:
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, s_in, s_in)`` -> ``(B, C_out, s_out, s_out)``."""
        return self.reshaper(x)


def _upsample_x4(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """ConvT 2x2 s2 -> LayerNorm2d -> GELU -> ConvT 2x2 s2: ``(B, C_in, s, s)`` -> ``(B, C_out, 4s, 4s)``."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, mid_channels, kernel_size=2, stride=2),
        LayerNorm2d(mid_channels),
        nn.GELU(),
        nn.ConvTranspose2d(mid_channels, out_channels, kernel_size=2, stride=2),
    )


class MedMaskDecoder(nn.Module):
    """SAM-UNet's single-mask decoder on top of SAM's two-way transformer (arXiv:2408.09886).

    Tokens are one learned ``med_token`` followed by the sparse prompt embeddings. After the transformer, SAM's
    ``output_upscaling`` gives ``(B, D/8, 4h, 4w)`` features, refined by ``embedding_maskfeature`` and summed with the
    encoder's multi-scale feature; the hypernetwork ``hf_mlp`` turns the med-token output into per-channel weights.

    Args:
        transformer_dim: decoder width ``D`` (256 for SAM).
        transformer: SAM's :class:`TwoWayTransformer`.
        output_upscaling: SAM's ``output_upscaling`` (``(B, D, h, w)`` -> ``(B, D/8, 4h, 4w)``).
    """

    def __init__(self, transformer_dim: int, transformer: nn.Module, output_upscaling: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.output_upscaling = output_upscaling
        self.med_token = nn.Embedding(1, transformer_dim)
        self.hf_mlp = MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(transformer_dim // 8, transformer_dim // 4, kernel_size=3, padding=1),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.Conv2d(transformer_dim // 4, transformer_dim // 8, kernel_size=3, padding=1),
        )

    def forward(
        self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor, multi_scale: Tensor
    ) -> Tensor:
        """Predict one low-resolution mask per image.

        Args:
            image_embeddings: neck output ``(B, D, h, w)``.
            image_pe: dense positional encoding ``(1, D, h, w)``.
            sparse: prompt tokens ``(B, T, D)``.
            dense: dense prompt embedding ``(B, D, h, w)``.
            multi_scale: multi-scale feature ``(B, D/8, 4h, 4w)``.

        Returns:
            Mask logits ``(B, 1, 4h, 4w)``.
        """
        b, c, h, w = image_embeddings.shape
        tokens = torch.cat((self.med_token.weight.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        pos = image_pe.expand(b, -1, -1, -1)
        hs, src = self.transformer(image_embeddings + dense, pos, tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        features = self.embedding_maskfeature(upscaled) + multi_scale
        hyper = self.hf_mlp(hs[:, 0, :]).unsqueeze(1)  # (B, 1, D/8)
        return (hyper @ features.flatten(2)).view(b, 1, *features.shape[2:])


@dataclass(frozen=True)
class SAMUNetConfig(SamConfig):
    """SAM geometry (the :class:`~medseg.models.sam.SamConfig` fields, built for 256 x 256 inputs) + the ResNet branch.

    Attributes:
        resnet_block: ``"bottleneck"`` (ResNet-50) or ``"basic"`` (ResNet-34).
        resnet_layers: blocks per ResNet stage, ``(3, 4, 6, 3)`` for both.
        resnet_inplanes: ResNet stage widths before block expansion, ``(64, 128, 256, 512)``.
    """

    img_size: int = 256
    resnet_block: str = "bottleneck"
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)
    resnet_inplanes: tuple[int, ...] = (64, 128, 256, 512)


class SAMUNet(nn.Module):
    """SAM-UNet (arXiv:2408.09886): frozen SAM ViT encoder + trainable ResNet branch + single-mask SAM decoder.

    Args:
        name: registry name, used in error messages.
        config: SAM geometry and ResNet branch (``img_size`` is the model input side ``S``; 4 global-attention
            blocks).

    Attributes:
        img_size: input side ``S``; the model takes ``(B, 3, S, S)``.
        paper_loss: loss registry name of the paper's objective (focal + 20 x Dice pooled over the batch).
        box_jitter: box augmentation rule of the paper (``"shift"``: one random offset per axis).
        box_rule: how a box prompt is drawn from a label (``"largest_component"``: the bounding box of the largest
            8-connected component, SAM-Med2D's rule that the release uses).
    """

    in_channels = 3
    out_channels = 1
    paper_loss = "sam_focal_dice"
    box_jitter = "shift"
    box_rule = "largest_component"

    def __init__(self, name: str = "sam_unet_r50", config: SAMUNetConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else SAMUNetConfig()
        resnet_block = config.resnet_block
        self.name = name
        self.config = config
        s = int(config.img_size)
        if s < 32 or s % 32:
            raise ConfigError(f"{name}: img_size={s}", expected="a multiple of 32 (ResNet stride)")
        globals_ = tuple(int(i) for i in config.global_attn_indexes)
        if len(globals_) != 4 or list(globals_) != sorted(set(globals_)) or globals_[-1] >= config.depth:
            raise ConfigError(
                f"{name}: global_attn_indexes={globals_} for depth {config.depth}",
                expected="4 increasing block indexes (one per ResNet stage), e.g. (2, 5, 8, 11)",
            )
        if resnet_block not in _RESNET_BLOCKS:
            raise ConfigError(f"{name}: resnet_block={resnet_block!r}", expected="'bottleneck' or 'basic'")
        layers = _ints(config.resnet_layers, "resnet_layers", 4)
        inplanes = _ints(config.resnet_inplanes, "resnet_inplanes", 4)
        self.img_size = s
        self.global_attn_indexes = globals_
        grid = config.grid
        dim, width = config.embed_dim, config.prompt_embed_dim

        core = SamCore(config)
        self.image_encoder = core.image_encoder
        self.prompt_encoder = core.prompt_encoder
        # Of SAM's mask decoder only the two-way transformer and the output upscaling are kept; its IoU and
        # multimask heads have no counterpart in SAM-UNet.
        self.mask_decoder = MedMaskDecoder(width, core.mask_decoder.transformer, core.mask_decoder.output_upscaling)

        self.resnet = ResNet(
            block=resnet_block,
            layers=list(layers),
            block_inplanes=list(inplanes),
            spatial_dims=2,
            n_input_channels=3,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
            bias_downsample=False,
        )
        channels = [c * _RESNET_BLOCKS[resnet_block] for c in inplanes]
        self.feature_channels = tuple(channels)
        self.adapters_in = nn.ModuleList(
            Reshaper(s // stride, c, grid, dim) for stride, c in zip((4, 8, 16, 32), channels, strict=True)
        )
        # adapters_bridge[2] follows the first global block, [0] the third (shallow to deep = top to bottom).
        self.adapters_bridge = nn.ModuleList(_upsample_x4(dim, width, width // 8) for _ in range(3))
        self.embedding_encoder = _upsample_x4(width, width // 4, width // 8)

        for p in self.image_encoder.parameters():
            p.requires_grad = False
        for p in self.prompt_encoder.mask_downscaling.parameters():
            p.requires_grad = False

    # ----------------------------------------------------------------------------------------------- forward
    def _resnet_features(self, x: Tensor) -> list[Tensor]:
        """ResNet stage outputs f1..f4 at strides 4 / 8 / 16 / 32."""
        r = self.resnet
        h = r.maxpool(r.act(r.bn1(r.conv1(x))))
        feats = []
        for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
            h = layer(h)
            feats.append(h)
        return feats

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image embeddings ``(B, D, S/16, S/16)`` and multi-scale feature ``(B, D/8, S/4, S/4)`` of ``x``."""
        feats = self._resnet_features(x)
        enc = self.image_encoder
        t = enc.embed(x)  # (B, h, w, C)
        bridged: list[Tensor] = []
        start = 0
        for stage, g in enumerate(self.global_attn_indexes):
            for i in range(start, g):
                t = enc.blocks[i](t)
            t = t + self.adapters_in[stage](feats[stage]).permute(0, 2, 3, 1)
            t = enc.blocks[g](t)
            start = g + 1
            if stage < 3:
                bridged.append(self.adapters_bridge[2 - stage](t.permute(0, 3, 1, 2)))
        for i in range(start, len(enc.blocks)):
            t = enc.blocks[i](t)
        embeddings = enc.neck(t.permute(0, 3, 1, 2))
        multi_scale = self.embedding_encoder(embeddings) + bridged[0] + bridged[1] + bridged[2]
        return embeddings, multi_scale

    def forward(self, x: Tensor, *, boxes: Tensor | None = None, points: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Segment the prompted object of each image.

        Args:
            x: SAM-normalised images ``(B, 3, S, S)``.
            boxes: one box per image ``(B, 4)`` as ``(x0, y0, x1, y1)`` in pixels of the ``S x S`` frame.
            points: ``(coords (B, N, 2), labels (B, N))``; coordinates ``(x, y)`` in pixels, label 1 foreground,
                0 background.

        Returns:
            Mask logits ``(B, 1, S, S)`` (sigmoid > 0.5 is the mask), the same in training and evaluation mode.

        Raises:
            ModelInputError: wrong input shape or size, no prompt, or wrongly shaped prompts.
        """
        s = self.img_size
        boxes, points = check_prompted_input(x, name=self.name, size=s, boxes=boxes, points=points)
        embeddings, multi_scale = self.encode(x)
        sparse, dense = self.prompt_encoder(points, boxes, None)
        low_res = self.mask_decoder(embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multi_scale)
        return F.interpolate(low_res, size=(s, s), mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------------------------- weights
    def load_pretrained(self, path: str | Path, sha256: str | None = None) -> None:
        """Load the official SAM ViT-B checkpoint (``sam_vit_b_01ec64.pth``) with the paper's mapping, or ImageNet
        ResNet weights in torchvision's naming (recognised by their keys, see :meth:`load_resnet_weights`): the
        paper's initialisation is both, e.g. ``medseg train DATA --model sam_unet_r50 --pretrained
        sam_vit_b_01ec64.pth --pretrained resnet50.pth``.

        The position embedding and the global blocks' relative positions are bilinearly resized to the model's
        token grid; image encoder, prompt encoder, decoder transformer and output upscaling are loaded strictly.
        SAM's mask tokens, IoU token, IoU head and hypernetwork MLPs are dropped; the ResNet branch, adapters,
        bridges and SAM-UNet's decoder additions stay at their initialisation. Frozen parts stay frozen.

        Args:
            path: the checkpoint file.
            sha256: expected hex digest of the file, checked before reading.

        Raises:
            WeightsError: unreadable file, digest mismatch, or keys / shapes that do not fit the model.
        """
        if _holds_resnet_weights(Path(path)):
            self.load_resnet_weights(path, sha256=sha256)
            return
        state = resize_sam_state_dict(read_sam_checkpoint(path, sha256=sha256), self.config)
        parts = split_sam_state_dict(state)
        source = f"SAM checkpoint {path}"
        load_state_dict_checked(self.image_encoder, parts["image_encoder"], source=source)
        load_state_dict_checked(self.prompt_encoder, parts["prompt_encoder"], source=source)
        decoder = dict(parts["mask_decoder"])
        dropped = sorted(k for k in decoder if k.startswith(_DROPPED_DECODER_PREFIXES))
        for part in _LOADED_DECODER_PARTS:
            prefix = part + "."
            sub = {k[len(prefix) :]: v for k, v in decoder.items() if k.startswith(prefix)}
            load_state_dict_checked(getattr(self.mask_decoder, part), sub, source=source)
        unused = [k for k in decoder if not k.startswith(_DROPPED_DECODER_PREFIXES + _LOADED_DECODER_PARTS)]
        if unused:
            raise WeightsError(
                f"{source} has mask-decoder keys {self.name} cannot place: {', '.join(sorted(unused)[:10])}",
                expected="the official SAM ViT-B layout (transformer, output_upscaling, iou / mask tokens and heads)",
                path=path,
            )
        logger.info(
            "%s: loaded SAM image encoder, prompt encoder, decoder transformer and output upscaling from %s; "
            "dropped %d decoder tensors (%s); left at initialisation: %s",
            self.name,
            path,
            len(dropped),
            ", ".join(p.rstrip(".") for p in _DROPPED_DECODER_PREFIXES),
            ", ".join(p.rstrip(".") for p in _NEW_PARTS),
        )

    def load_resnet_weights(self, path: str | Path, sha256: str | None = None) -> None:
        """Load ImageNet ResNet weights saved in torchvision's naming into the ResNet branch.

        torchvision's ``conv1``, ``bn1``, ``layer{1..4}.{j}.{conv1, bn1, conv2, bn2[, conv3, bn3]}`` and
        ``layer{i}.0.downsample.{0,1}`` map one to one onto :class:`monai.networks.nets.ResNet`; the classifier
        ``fc.*`` is ignored. Every parameter and buffer of the branch must be covered (``num_batches_tracked``, absent
        from some older files, keeps its value).

        Args:
            path: a ``.pth`` file holding a state dict (optionally under ``"state_dict"``, keys optionally prefixed
                ``module.``).
            sha256: expected hex digest of the file, checked before reading.

        Raises:
            WeightsError: unreadable file, digest mismatch, keys outside the torchvision layout, or parameters of the
                branch that the file does not cover / covers with another shape.
        """
        raw = read_weights_file(path, kind="ResNet", sha256=sha256, expected="a torchvision ResNet state dict")
        expected = self.resnet.state_dict()
        mapped: dict[str, Tensor] = {}
        foreign = []
        for key, value in raw.items():
            if _TV_IGNORED.match(key):
                continue
            if not _TV_KEY.match(key):
                foreign.append(key)
                continue
            mapped[key] = value  # torchvision and MONAI share these names
        missing = [k for k in expected if k not in mapped and not k.endswith("num_batches_tracked")]
        extra = [k for k in mapped if k not in expected]
        shaped = [
            f"{k} {tuple(mapped[k].shape)}≠{tuple(v.shape)}"
            for k, v in expected.items()
            if k in mapped and mapped[k].shape != v.shape
        ]
        if foreign or missing or extra or shaped:
            parts = []
            for title, keys in (
                ("not in torchvision's ResNet layout", foreign),
                ("missing", missing),
                ("unexpected", extra),
                ("mis-shaped", shaped),
            ):
                if keys:
                    parts.append(f"{len(keys)} {title}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")
            raise WeightsError(
                f"ResNet weights {path} do not fit the ResNet branch of {self.name}: " + "; ".join(parts),
                expected="a torchvision ImageNet state dict of the same depth (resnet50 for sam_unet_r50, resnet34 "
                "for sam_unet_r34)",
                path=path,
            )
        for key, value in expected.items():
            if key not in mapped:
                mapped[key] = value
        self.resnet.load_state_dict(mapped, strict=True)
        logger.info("%s: loaded %d ResNet tensors from %s", self.name, len(raw), path)


# --------------------------------------------------------------------------------------------------- registry
_PAPER = (
    "Yang, Bi, Zhang, Sun, SAM-UNet: Enhancing Zero-Shot Segmentation of SAM for Universal Medical Images, "
    "arXiv:2408.09886"
)
_IMG_SIZE = SAMUNetConfig.img_size


def _card(name: str, reference_params: int) -> ModelCard:
    return prompted_card(name, img_size=_IMG_SIZE, paper=_PAPER, reference_params=reference_params)


_TINY: dict[str, Any] = {
    "img_size": 64,
    "embed_dim": 48,
    "depth": 12,
    "num_heads": 3,
    "window_size": 4,
    "prompt_embed_dim": 32,
    "decoder_mlp_dim": 64,
    "decoder_heads": 2,
    "resnet_layers": (1, 1, 1, 1),
    "resnet_inplanes": (4, 8, 16, 32),
}


def _holds_resnet_weights(path: Path) -> bool:
    """Whether ``path`` looks like a torchvision ResNet state dict (``conv1.weight``, ``layer1.*``, no SAM keys).

    Memory-maps the file, so the check costs no full read; anything unreadable answers False and is reported by the
    SAM checkpoint reader.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the SAM reader raises the user-facing error for bad files
        return False
    state = unwrap_state_dict(state, ("state_dict",))
    if not isinstance(state, Mapping):
        return False
    keys = {strip_wrapper_prefixes(str(k)) for k in state}
    return "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys)


# Variant -> the SAMUNetConfig values that make it (the rest are the paper's defaults).
_VARIANTS: dict[str, dict[str, Any]] = {
    "sam_unet_r50": {"resnet_block": "bottleneck"},
    "sam_unet_r34": {"resnet_block": "basic"},
}


def _create(name: str, in_channels: int, out_channels: int, **kwargs: Any) -> SAMUNet:
    config = build_sam_config(SAMUNetConfig, name, in_channels, out_channels, _VARIANTS[name], kwargs)
    return SAMUNet(name, config)


@register_model(_card("sam_unet_r50", 138_428_204), tiny=_TINY)
def sam_unet_r50(in_channels: int = 3, out_channels: int = 1, **kwargs: Any) -> SAMUNet:
    """Build SAM-UNet with a ResNet-50 branch; the defaults are the paper's (138.4 M parameters, 51.8 M trainable).

    Args:
        in_channels: must be 3.
        out_channels: must be 1.
        **kwargs: fields of :class:`SAMUNetConfig`: the SAM geometry (``img_size`` = input side ``S``, 256 in the
            paper; ``embed_dim``, ``depth``, ``num_heads``, ``window_size``, ``global_attn_indexes`` (the 4
            global-attention blocks; ResNet features are added before each), ``prompt_embed_dim``,
            ``decoder_mlp_dim``, ``decoder_heads``, ...) and the ResNet branch (``resnet_layers``: bottleneck blocks
            per stage, ``resnet_inplanes``: stage widths before the x4 expansion).

    Raises:
        ConfigError: ``in_channels != 3``, ``out_channels != 1``, an unknown keyword (named, with a suggestion) or an
            inconsistent geometry.
    """
    return _create("sam_unet_r50", in_channels, out_channels, **kwargs)


@register_model(_card("sam_unet_r34", 116_019_884), tiny=_TINY)
def sam_unet_r34(in_channels: int = 3, out_channels: int = 1, **kwargs: Any) -> SAMUNet:
    """Build SAM-UNet with a ResNet-34 branch (the multi-GPU recipe; 116.0 M parameters, 29.3 M trainable).

    Args:
        in_channels: must be 3.
        out_channels: must be 1.
        **kwargs: fields of :class:`SAMUNetConfig`, as for :func:`sam_unet_r50` (``resnet_layers`` counts basic
            blocks here).

    Raises:
        ConfigError: ``in_channels != 3``, ``out_channels != 1``, an unknown keyword (named, with a suggestion) or an
            inconsistent geometry.
    """
    return _create("sam_unet_r34", in_channels, out_channels, **kwargs)
