"""SAM core: official ViT-B layout and sizes, checkpoint reading / resizing / loading, prompt handling, attention."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.models.layers.sam_decoder import MLP, MaskDecoder, PromptEncoder, TwoWayTransformer
from medseg.models.layers.sam_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    LayerNorm2d,
    resize_rel_pos,
    window_partition,
    window_unpartition,
)
from medseg.models.sam import (
    VIT_B,
    SamConfig,
    SamCore,
    load_sam_checkpoint,
    official_sam_vit_b_shapes,
    read_sam_checkpoint,
    resize_sam_state_dict,
    split_sam_state_dict,
    validate_sam_state_dict,
    write_synthetic_sam_checkpoint,
)
from tests.models.sam_official_keys import (
    OFFICIAL_IMAGE_ENCODER_PARAMS,
    OFFICIAL_MASK_DECODER_PARAMS,
    OFFICIAL_PROMPT_ENCODER_PARAMS,
    OFFICIAL_TOTAL_NUMEL,
    official_layout,
)

TINY = SamConfig(
    img_size=64, embed_dim=48, num_heads=3, window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64, decoder_heads=2
)
GLOBAL_BLOCKS = (2, 5, 8, 11)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight file in the official ViT-B layout (about 375 MB, written once)."""
    return write_synthetic_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_vit_b_synthetic.pth", seed=0)


@pytest.fixture(scope="module")
def synthetic_state(synthetic_ckpt: Path) -> dict[str, torch.Tensor]:
    return read_sam_checkpoint(synthetic_ckpt)


@pytest.fixture()
def tiny_model() -> SamCore:
    torch.manual_seed(0)
    return SamCore(TINY)


# ------------------------------------------------------------------------------------------------ official layout
def test_official_table_matches_independent_statement() -> None:
    assert official_sam_vit_b_shapes() == official_layout()
    assert sum(math.prod(s) for s in official_layout().values()) == OFFICIAL_TOTAL_NUMEL


def test_vit_b_state_dict_is_the_official_layout() -> None:
    with torch.device("meta"):
        model = SamCore(VIT_B)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_layout()
    assert set(shapes) == set(official), sorted(set(shapes) ^ set(official))[:10]
    assert shapes == official
    assert _n_params(model.image_encoder) == OFFICIAL_IMAGE_ENCODER_PARAMS
    assert round(_n_params(model.image_encoder) / 1e6, 2) == 89.67
    assert _n_params(model.prompt_encoder) == OFFICIAL_PROMPT_ENCODER_PARAMS
    assert _n_params(model.mask_decoder) == OFFICIAL_MASK_DECODER_PARAMS
    assert sum(v.numel() for v in model.state_dict().values()) == OFFICIAL_TOTAL_NUMEL
    assert _n_params(model) == OFFICIAL_TOTAL_NUMEL - 256 == 93_735_472  # the Gaussian matrix is a buffer
    enc = model.image_encoder
    assert [b.window_size for b in enc.blocks] == [0 if i in GLOBAL_BLOCKS else 14 for i in range(12)]
    assert enc.patch_embed.proj.kernel_size == (16, 16) and enc.patch_embed.proj.stride == (16, 16)


def test_module_docstring_quotes_the_measured_counts() -> None:
    import medseg.models.sam as sam_module

    with torch.device("meta"):
        model = SamCore(VIT_B)
    doc = " ".join((sam_module.__doc__ or "").split())
    for part in (model, model.image_encoder, model.prompt_encoder, model.mask_decoder):
        assert f"{_n_params(part):,}" in doc, f"{_n_params(part):,}"
    assert f"{OFFICIAL_TOTAL_NUMEL:,} values" in doc


# ------------------------------------------------------------------------------------------------ checkpoint loading
def test_synthetic_checkpoint_loads_strictly_at_1024(synthetic_ckpt: Path, synthetic_state: dict) -> None:
    assert set(synthetic_state) == set(official_layout())
    assert resize_sam_state_dict(synthetic_state, VIT_B) == synthetic_state  # no-op at 1024
    torch.manual_seed(0)
    model = SamCore(VIT_B)
    load_sam_checkpoint(model, synthetic_ckpt)
    loaded = model.state_dict()
    for key in ("image_encoder.pos_embed", "image_encoder.blocks.11.attn.rel_pos_h", "mask_decoder.mask_tokens.weight"):
        assert torch.equal(loaded[key], synthetic_state[key])


def test_synthetic_checkpoint_loads_at_256_after_resizing(synthetic_ckpt: Path, synthetic_state: dict) -> None:
    config = SamConfig(img_size=256)
    resized = resize_sam_state_dict(synthetic_state, config)
    assert resized["image_encoder.pos_embed"].shape == (1, 16, 16, 768)
    for i in range(12):
        rows = 31 if i in GLOBAL_BLOCKS else 27
        assert resized[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape == (rows, 64)
        assert resized[f"image_encoder.blocks.{i}.attn.rel_pos_w"].shape == (rows, 64)
    assert resized["image_encoder.blocks.0.attn.rel_pos_h"] is synthetic_state["image_encoder.blocks.0.attn.rel_pos_h"]
    assert synthetic_state["image_encoder.pos_embed"].shape == (1, 64, 64, 768)  # input left untouched

    with torch.device("meta"):  # no initialisation: every tensor comes from the checkpoint
        model = SamCore(config).eval()
    model.to_empty(device="cpu")
    load_sam_checkpoint(model, synthetic_ckpt)
    assert torch.equal(model.image_encoder.pos_embed, resized["image_encoder.pos_embed"])
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        logits, iou = model(x, boxes=torch.tensor([[40.0, 60.0, 180.0, 200.0]]))
    assert logits.shape == (1, 1, 64, 64) and iou.shape == (1, 1)
    assert torch.isfinite(logits).all() and torch.isfinite(iou).all()
    assert logits.std() > 0


def test_resize_is_bilinear() -> None:
    state = {
        "image_encoder.pos_embed": torch.full((1, 64, 64, 8), 3.0),
        "image_encoder.blocks.2.attn.rel_pos_h": torch.linspace(-1, 1, 127)[:, None].repeat(1, 4),
        "image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(27, 4),
    }
    out = resize_sam_state_dict(state, SamConfig(img_size=128))
    assert torch.allclose(out["image_encoder.pos_embed"], torch.full((1, 8, 8, 8), 3.0))
    table = out["image_encoder.blocks.2.attn.rel_pos_h"]
    assert table.shape == (15, 4)
    assert torch.allclose(table[:, 0], table[:, 0].flip(0).neg(), atol=1e-6)  # a centred ramp stays centred
    assert torch.all(table[1:, 0] > table[:-1, 0])
    assert out["image_encoder.blocks.0.attn.rel_pos_h"] is state["image_encoder.blocks.0.attn.rel_pos_h"]


def test_split_strips_prefixes(synthetic_state: dict) -> None:
    parts = split_sam_state_dict(synthetic_state)
    assert set(parts) == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert sum(len(p) for p in parts.values()) == len(synthetic_state)
    assert parts["image_encoder"]["pos_embed"] is synthetic_state["image_encoder.pos_embed"]
    assert "pe_layer.positional_encoding_gaussian_matrix" in parts["prompt_encoder"]
    assert "transformer.norm_final_attn.weight" in parts["mask_decoder"]


# ------------------------------------------------------------------------------------------------ bad checkpoints
def _encoder_stub(embed: int, blocks: int) -> dict[str, torch.Tensor]:
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(embed, 3, 16, 16)}
    state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(embed) for i in range(blocks)})
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 256)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    return state


def test_vit_l_and_vit_h_are_named(tmp_path: Path) -> None:
    path = tmp_path / "sam_vit_l.pth"
    torch.save(_encoder_stub(1024, 24), path)
    with pytest.raises(WeightsError, match="ViT-L") as info:
        read_sam_checkpoint(path)
    assert "sam_vit_b_01ec64.pth" in str(info.value) and info.value.path == str(path)
    with pytest.raises(WeightsError, match="ViT-H"):
        validate_sam_state_dict(_encoder_stub(1280, 32))


def test_missing_prompt_encoder_is_named(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pth"
    state = {k: v for k, v in _encoder_stub(768, 12).items() if not k.startswith("prompt_encoder.")}
    torch.save({"model": state}, path)  # the wrapper is unpacked before the check
    with pytest.raises(WeightsError, match="prompt encoder") as info:
        read_sam_checkpoint(path)
    assert "image encoder" not in str(info.value) and "mask decoder" not in str(info.value)


def test_missing_and_misshaped_keys_are_listed(synthetic_state: dict) -> None:
    state = dict(synthetic_state)
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.blocks.3.attn.rel_pos_h"] = torch.zeros(31, 64)
    state["image_encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        validate_sam_state_dict(state)
    message = str(info.value)
    assert "1 missing: mask_decoder.iou_token.weight" in message
    assert "image_encoder.blocks.3.attn.rel_pos_h (31, 64) instead of (27, 64)" in message
    assert "1 unexpected: image_encoder.extra.weight" in message


def test_model_that_does_not_fit_lists_keys(synthetic_ckpt: Path) -> None:
    with torch.device("meta"):
        model = SamCore(SamConfig(img_size=256, decoder_mlp_dim=1024))
    with pytest.raises(WeightsError, match=r"mask_decoder\.transformer\.layers\.0\.mlp\.lin1\.weight"):
        load_sam_checkpoint(model, synthetic_ckpt)


def test_sha256_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save({"image_encoder.x": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="sha256"):
        read_sam_checkpoint(path, sha256="0" * 64)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="prompt encoder"):  # the digest fits: the content check comes next
        read_sam_checkpoint(path, sha256=digest.upper())


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        read_sam_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="not a file"):
        read_sam_checkpoint(tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="cannot read"):
        read_sam_checkpoint(garbage)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(WeightsError, match="no SAM state dict"):
        read_sam_checkpoint(tensor_only)


# ------------------------------------------------------------------------------------------------ tiny forward
@pytest.mark.parametrize("prompt", ["box", "points", "both", "none", "mask"])
def test_tiny_forward_and_gradients(tiny_model: SamCore, prompt: str) -> None:
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 12.0, 60.0, 30.0]])
    points = (torch.tensor([[[20.0, 30.0], [5.0, 9.0]], [[50.0, 8.0], [0.0, 0.0]]]), torch.tensor([[1, 0], [1, -1]]))
    kwargs: dict = {
        "box": {"boxes": boxes},
        "points": {"points": points},
        "both": {"boxes": boxes, "points": points},
        "none": {},
        "mask": {"masks": torch.randn(2, 1, 16, 16), "multimask_output": True},
    }[prompt]
    logits, iou = tiny_model(x, **kwargs)
    outputs = 3 if prompt == "mask" else 1
    assert logits.shape == (2, outputs, 16, 16) and iou.shape == (2, outputs)
    assert torch.isfinite(logits).all()
    (logits.mean() + iou.mean()).backward()
    for module in (tiny_model.image_encoder.patch_embed, tiny_model.image_encoder.neck, tiny_model.mask_decoder):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    pe = tiny_model.prompt_encoder
    used = {
        "box": [pe.point_embeddings[2], pe.point_embeddings[3]],
        "points": [pe.point_embeddings[0], pe.point_embeddings[1], pe.not_a_point_embed],
        "both": [pe.point_embeddings[0], pe.point_embeddings[3]],
        "none": [pe.no_mask_embed],
        "mask": [pe.mask_downscaling],
    }[prompt]
    for module in used:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_prompt_token_counts() -> None:
    torch.manual_seed(0)
    pe = PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=8)
    points = (torch.rand(3, 5, 2) * 64, torch.ones(3, 5, dtype=torch.long))
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0]]).repeat(3, 1)
    assert pe(points, None, None)[0].shape == (3, 6, 32)  # a padding point replaces the missing box
    assert pe(None, boxes, None)[0].shape == (3, 2, 32)
    assert pe(points, boxes, None)[0].shape == (3, 7, 32)
    sparse, dense = pe(None, None, None, batch_size=3)
    assert sparse.shape == (3, 0, 32) and dense.shape == (3, 32, 4, 4)
    assert pe(None, None, torch.randn(3, 1, 16, 16))[1].shape == (3, 32, 4, 4)
    assert pe.get_dense_pe().shape == (1, 32, 4, 4)
    # a padding point (-1) carries only its type embedding; x is the column
    labels = torch.tensor([[-1]])
    assert torch.equal(
        pe((torch.tensor([[[7.0, 3.0]]]), labels), boxes[:1], None)[0][0, 0], pe.not_a_point_embed.weight[0]
    )
    swapped = pe.pe_layer.forward_with_coords(torch.tensor([[[24.0, 56.0]]]), (64, 64))[0, 0]
    grid = pe.pe_layer((4, 4))  # (C, h, w): pixel centre of row 1, column 3 is (x, y) = (56, 24) in a 64 frame
    assert torch.allclose(
        pe.pe_layer.forward_with_coords(torch.tensor([[[56.0, 24.0]]]), (64, 64))[0, 0], grid[:, 1, 3]
    )
    assert not torch.allclose(swapped, grid[:, 1, 3])


def test_non_square_and_non_default_sizes(tiny_model: SamCore) -> None:
    logits, _ = tiny_model(torch.randn(1, 3, 80, 96), boxes=torch.tensor([[8.0, 8.0, 70.0, 60.0]]))
    assert logits.shape == (1, 1, 20, 24) and torch.isfinite(logits).all()


def test_bad_inputs_raise(tiny_model: SamCore) -> None:
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ModelInputError, match="channel"):
        tiny_model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ModelInputError, match="divisible"):
        tiny_model(torch.randn(2, 3, 60, 64))
    with pytest.raises(ModelInputError, match="boxes"):
        tiny_model(x, boxes=torch.zeros(1, 4))
    with pytest.raises(ModelInputError, match="points are"):
        tiny_model(x, points=(torch.zeros(2, 3, 2), torch.zeros(2, 2)))
    with pytest.raises(ModelInputError, match="mask prompt"):
        tiny_model(x, masks=torch.zeros(2, 1, 64, 64))
    with pytest.raises(ConfigError, match="img_size"):
        SamConfig(img_size=100)


def test_normalize_uses_sam_statistics(tiny_model: SamCore) -> None:
    images = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(tiny_model.normalize(images), torch.zeros(1, 3, 2, 2), atol=1e-6)


# ------------------------------------------------------------------------------------------------ layers
def _naive_rel_pos_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d) + q . R_h[i - k] + q . R_w[j - l]) v, written with explicit loops over positions."""
    b, h, w, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    table_h = resize_rel_pos(attn.rel_pos_h, 2 * h - 1)
    table_w = resize_rel_pos(attn.rel_pos_w, 2 * w - 1)
    bias = torch.zeros_like(logits)
    for i in range(h):
        for j in range(w):
            for kk in range(h):
                for ll in range(w):
                    r = table_h[i - kk + h - 1] + table_w[j - ll + w - 1]
                    bias[..., i * w + j, kk * w + ll] = (q[..., i * w + j, :] * r).sum(-1)
    out = torch.softmax(logits + bias, dim=-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, h, w, c))


@pytest.mark.parametrize("table_size", [(3, 4), (2, 2)])  # exact tables, and tables that need interpolation
def test_attention_matches_naive_rel_pos(table_size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, use_rel_pos=True, input_size=table_size)
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
        x = torch.randn(2, 3, 4, 8)
        assert torch.allclose(attn(x), _naive_rel_pos_attention(attn, x), atol=1e-5)


def test_resize_rel_pos_is_linear() -> None:
    ramp = torch.arange(7.0)[:, None].repeat(1, 3)
    out = resize_rel_pos(ramp, 13)
    assert out.shape == (13, 3) and torch.allclose(out[6], ramp[3])
    assert resize_rel_pos(ramp, 7) is ramp


def test_windowed_block_pads_and_unpads() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 12, requires_grad=True)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 2, 4, 4, 12) and padded == (8, 8)
    assert torch.equal(window_unpartition(windows, 4, padded, (5, 6)), x)
    block = Block(12, num_heads=2, use_rel_pos=True, window_size=4, input_size=(8, 8))
    assert block.attn.rel_pos_h.shape == (7, 6)
    out = block(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and block.attn.rel_pos_w.grad is not None
    global_block = Block(12, num_heads=2, use_rel_pos=True, window_size=0, input_size=(8, 8))
    assert global_block.attn.rel_pos_h.shape == (15, 6) and global_block(x).shape == x.shape


def test_embed_interpolates_position_embedding() -> None:
    torch.manual_seed(0)
    enc = ImageEncoderViT(
        img_size=64, embed_dim=16, depth=2, num_heads=2, out_chans=8, window_size=2, global_attn_indexes=(1,)
    )
    with torch.no_grad():
        enc.pos_embed.normal_()
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(enc.embed(x), enc.patch_embed(x) + enc.pos_embed)
    big = torch.randn(1, 3, 96, 80)
    tokens = enc.embed(big)
    assert tokens.shape == (1, 6, 5, 16)
    pos = F.interpolate(enc.pos_embed.permute(0, 3, 1, 2), size=(6, 5), mode="bicubic", align_corners=False)
    assert torch.allclose(tokens, enc.patch_embed(big) + pos.permute(0, 2, 3, 1), atol=1e-6)
    assert enc(big).shape == (1, 8, 6, 5)


def test_decoder_parts() -> None:
    torch.manual_seed(0)
    mlp = MLP(8, 16, 4, 3, sigmoid_output=True)
    assert len(mlp.layers) == 3 and ((mlp(torch.randn(5, 8)) > 0) & (mlp(torch.randn(5, 8)) < 1)).all()
    transformer = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=2, mlp_dim=64)
    queries, keys = transformer(torch.randn(2, 32, 4, 5), torch.randn(1, 32, 4, 5), torch.randn(2, 7, 32))
    assert queries.shape == (2, 7, 32) and keys.shape == (2, 20, 32)
    decoder = MaskDecoder(transformer_dim=32)
    assert isinstance(decoder.transformer, TwoWayTransformer) and decoder.transformer.embedding_dim == 32
    masks, iou = decoder(
        torch.randn(2, 32, 4, 4),
        torch.randn(1, 32, 4, 4),
        torch.randn(2, 0, 32),
        torch.randn(2, 32, 4, 4),
        multimask_output=True,
    )
    assert masks.shape == (2, 3, 16, 16) and iou.shape == (2, 3)
    norm = LayerNorm2d(6)
    y = norm(torch.randn(2, 6, 3, 3) * 5 + 2)
    assert torch.allclose(y.mean(1), torch.zeros(2, 3, 3), atol=1e-5)
