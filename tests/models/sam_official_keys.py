"""The key -> shape table of the official ``sam_vit_b_01ec64.pth``, re-stated independently of ``medseg.models.sam``.

Written as per-module templates from the segment_anything ViT-B description (arXiv:2304.02643; docs/models/sam.md):
image encoder 768 wide, 12 blocks, head width 64, global blocks 2/5/8/11 with (127, 64) tables, windowed blocks with
(27, 64) tables; prompt encoder of width 256; mask decoder with a depth-2 two-way transformer.
"""

from __future__ import annotations

# Parameter counts of the released file (numel of every tensor it holds, the prompt encoder's Gaussian buffer of
# 2 x 128 included in the total).
OFFICIAL_TOTAL_NUMEL = 93_735_728
OFFICIAL_PROMPT_ENCODER_PARAMS = 6_220
OFFICIAL_MASK_DECODER_PARAMS = 4_058_340
OFFICIAL_IMAGE_ENCODER_PARAMS = 89_670_912  # 93,735,728 - 6,220 - 4,058,340 - 256 (the buffer)

_BLOCK = {
    "norm1.weight": (768,),
    "norm1.bias": (768,),
    "attn.qkv.weight": (2304, 768),
    "attn.qkv.bias": (2304,),
    "attn.proj.weight": (768, 768),
    "attn.proj.bias": (768,),
    "norm2.weight": (768,),
    "norm2.bias": (768,),
    "mlp.lin1.weight": (3072, 768),
    "mlp.lin1.bias": (3072,),
    "mlp.lin2.weight": (768, 3072),
    "mlp.lin2.bias": (768,),
}

_ENCODER = {
    "patch_embed.proj.weight": (768, 3, 16, 16),
    "patch_embed.proj.bias": (768,),
    "pos_embed": (1, 64, 64, 768),
    "neck.0.weight": (256, 768, 1, 1),
    "neck.1.weight": (256,),
    "neck.1.bias": (256,),
    "neck.2.weight": (256, 256, 3, 3),
    "neck.3.weight": (256,),
    "neck.3.bias": (256,),
}

_PROMPT = {
    "pe_layer.positional_encoding_gaussian_matrix": (2, 128),
    "point_embeddings.0.weight": (1, 256),
    "point_embeddings.1.weight": (1, 256),
    "point_embeddings.2.weight": (1, 256),
    "point_embeddings.3.weight": (1, 256),
    "not_a_point_embed.weight": (1, 256),
    "mask_downscaling.0.weight": (4, 1, 2, 2),
    "mask_downscaling.0.bias": (4,),
    "mask_downscaling.1.weight": (4,),
    "mask_downscaling.1.bias": (4,),
    "mask_downscaling.3.weight": (16, 4, 2, 2),
    "mask_downscaling.3.bias": (16,),
    "mask_downscaling.4.weight": (16,),
    "mask_downscaling.4.bias": (16,),
    "mask_downscaling.6.weight": (256, 16, 1, 1),
    "mask_downscaling.6.bias": (256,),
    "no_mask_embed.weight": (1, 256),
}


def _attention(inner: int) -> dict[str, tuple[int, ...]]:
    return {
        "q_proj.weight": (inner, 256),
        "q_proj.bias": (inner,),
        "k_proj.weight": (inner, 256),
        "k_proj.bias": (inner,),
        "v_proj.weight": (inner, 256),
        "v_proj.bias": (inner,),
        "out_proj.weight": (256, inner),
        "out_proj.bias": (256,),
    }


def _two_way_layer() -> dict[str, tuple[int, ...]]:
    layer: dict[str, tuple[int, ...]] = {}
    for name, inner in (("self_attn", 256), ("cross_attn_token_to_image", 128), ("cross_attn_image_to_token", 128)):
        layer.update({f"{name}.{k}": v for k, v in _attention(inner).items()})
    for n in (1, 2, 3, 4):
        layer[f"norm{n}.weight"] = (256,)
        layer[f"norm{n}.bias"] = (256,)
    layer.update({"mlp.lin1.weight": (2048, 256), "mlp.lin1.bias": (2048,)})
    layer.update({"mlp.lin2.weight": (256, 2048), "mlp.lin2.bias": (256,)})
    return layer


def _mlp3(out: int) -> dict[str, tuple[int, ...]]:
    return {
        "layers.0.weight": (256, 256),
        "layers.0.bias": (256,),
        "layers.1.weight": (256, 256),
        "layers.1.bias": (256,),
        "layers.2.weight": (out, 256),
        "layers.2.bias": (out,),
    }


def official_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``sam_vit_b_01ec64.pth``."""
    table: dict[str, tuple[int, ...]] = {f"image_encoder.{k}": v for k, v in _ENCODER.items()}
    for i in range(12):
        rows = 127 if i % 3 == 2 else 27
        table.update({f"image_encoder.blocks.{i}.{k}": v for k, v in _BLOCK.items()})
        table[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = (rows, 64)
        table[f"image_encoder.blocks.{i}.attn.rel_pos_w"] = (rows, 64)
    table.update({f"prompt_encoder.{k}": v for k, v in _PROMPT.items()})
    dec = "mask_decoder"
    for i in range(2):
        table.update({f"{dec}.transformer.layers.{i}.{k}": v for k, v in _two_way_layer().items()})
    table.update({f"{dec}.transformer.final_attn_token_to_image.{k}": v for k, v in _attention(128).items()})
    table[f"{dec}.transformer.norm_final_attn.weight"] = (256,)
    table[f"{dec}.transformer.norm_final_attn.bias"] = (256,)
    table[f"{dec}.iou_token.weight"] = (1, 256)
    table[f"{dec}.mask_tokens.weight"] = (4, 256)
    table[f"{dec}.output_upscaling.0.weight"] = (256, 64, 2, 2)
    table[f"{dec}.output_upscaling.0.bias"] = (64,)
    table[f"{dec}.output_upscaling.1.weight"] = (64,)
    table[f"{dec}.output_upscaling.1.bias"] = (64,)
    table[f"{dec}.output_upscaling.3.weight"] = (64, 32, 2, 2)
    table[f"{dec}.output_upscaling.3.bias"] = (32,)
    for i in range(4):
        table.update({f"{dec}.output_hypernetworks_mlps.{i}.{k}": v for k, v in _mlp3(32).items()})
    table.update({f"{dec}.iou_prediction_head.{k}": v for k, v in _mlp3(4).items()})
    return table
