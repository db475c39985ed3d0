"""The Segment Anything prompt encoder and mask decoder (two-way transformer, hypernetwork mask heads).

Paper: A. Kirillov et al., "Segment Anything", arXiv:2304.02643 (2023). Point and box prompts are encoded with
random Fourier features (M. Tancik et al., arXiv:2006.10739) plus learned type embeddings; masks by a small strided
conv stack. The decoder runs a two-way transformer between the output/prompt tokens and the image embedding, upscales
the embedding 4x and predicts each mask as a dot product with a per-token MLP output, plus an IoU estimate per mask.

Module and parameter names match the ``prompt_encoder.*`` and ``mask_decoder.*`` parts of the official checkpoints
(``sam_vit_b_01ec64.pth``). The decoder takes one prompt set per image (batch of ``B`` images <-> ``B`` prompt sets).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.models.layers.sam_encoder import LayerNorm2d, MLPBlock

__all__ = [
    "MLP",
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptEncoder",
    "TokenAttention",
    "TwoWayAttentionBlock",
    "TwoWayTransformer",
]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (none after the last), optional sigmoid on the output.

    Args:
        input_dim: input width.
        hidden_dim: width of the hidden layers.
        output_dim: output width.
        num_layers: number of linear layers.
        sigmoid_output: apply a sigmoid to the output.
    """

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.num_layers = num_layers
        self.sigmoid_output = sigmoid_output

    def forward(self, x: Tensor) -> Tensor:
        """``(..., input_dim) -> (..., output_dim)``."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2-D positions: ``[sin(2 pi (2p - 1) G), cos(2 pi (2p - 1) G)]`` for ``p`` in [0, 1].

    Args:
        num_pos_feats: columns of the fixed Gaussian matrix ``G`` ``(2, num_pos_feats)``; the encoding has
            ``2 * num_pos_feats`` channels.
        scale: standard deviation of ``G``.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, coords: Tensor) -> Tensor:
        """``(..., 2)`` coordinates (x, y) in [0, 1] -> ``(..., 2 * num_pos_feats)``."""
        gaussian = self.positional_encoding_gaussian_matrix
        proj = (2.0 * coords.to(gaussian.dtype) - 1.0) @ gaussian * (2.0 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Encoding of the pixel centres of an ``(h, w)`` grid: ``(2 * num_pos_feats, h, w)``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Encoding of pixel coordinates ``(B, N, 2)`` (x, y) in an ``image_size = (H, W)`` frame: ``(B, N, C)``."""
        scale = torch.tensor([1.0 / image_size[1], 1.0 / image_size[0]], device=coords.device, dtype=torch.float32)
        return self._encode(coords.float() * scale)


class PromptEncoder(nn.Module):
    """SAM's prompt encoder: points and boxes -> sparse tokens, a low-res mask -> dense embedding.

    Args:
        embed_dim: token width ``C``.
        image_embedding_size: the image embedding grid ``(h, w)``.
        input_image_size: the model input frame ``(H, W)`` prompt coordinates refer to.
        mask_in_chans: hidden channels of the mask downscaling stack.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left corner, 3: box bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self, size: tuple[int, int] | None = None) -> Tensor:
        """Positional encoding of the image embedding grid: ``(1, C, h, w)`` (``size`` overrides ``(h, w)``)."""
        return self.pe_layer(tuple(size) if size is not None else self.image_embedding_size)[None]

    def _embed_points(self, coords: Tensor, labels: Tensor, pad: bool, frame: tuple[int, int]) -> Tensor:
        coords = coords.float() + 0.5  # pixel centres
        labels = labels.to(coords.device)
        if pad:  # a padding point stands in for the missing box, as in SAM
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        pe = self.pe_layer.forward_with_coords(coords, frame)
        labels = labels[..., None]
        out = torch.where(labels == -1, self.not_a_point_embed.weight, pe)
        out = out + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        return out + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)

    def _embed_boxes(self, boxes: Tensor, frame: tuple[int, int]) -> Tensor:
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2)  # (x0, y0), (x1, y1)
        pe = self.pe_layer.forward_with_coords(corners, frame)
        corner_types = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return pe + corner_types

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        masks: Tensor | None,
        *,
        batch_size: int | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Embed the prompts of a batch.

        Args:
            points: ``(coords (B, N, 2), labels (B, N))``; coordinates are (x, y) pixels of the model input frame
                (x = column), labels 1 foreground, 0 background, -1 padding. Without boxes a padding point is
                appended, as SAM does.
            boxes: ``(B, 4)`` as ``(x0, y0, x1, y1)`` pixels of the model input frame.
            masks: ``(B, 1, 4h, 4w)`` low-resolution mask logits.
            batch_size: ``B`` when no prompt carries it (default 1).
            image_size: the model input frame ``(H, W)`` when it differs from ``input_image_size``; the embedding
                grid then scales with it.

        Returns:
            ``sparse (B, T, C)`` (``T = N (+1) + 2 * boxes``, 0 without prompts) and ``dense (B, C, h, w)``.
        """
        frame = tuple(image_size) if image_size is not None else self.input_image_size
        grid = self._grid(frame)
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = batch_size or 1
        weight = self.no_mask_embed.weight
        parts = [weight.new_zeros(bs, 0, self.embed_dim)]
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None, frame=frame))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes, frame))
        sparse = torch.cat([p.to(weight.dtype) for p in parts], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, grid[0], grid[1])
        return sparse, dense

    def _grid(self, frame: tuple[int, int]) -> tuple[int, int]:
        if frame == self.input_image_size:
            return self.image_embedding_size
        return (
            frame[0] * self.image_embedding_size[0] // self.input_image_size[0],
            frame[1] * self.image_embedding_size[1] // self.input_image_size[1],
        )


class TokenAttention(nn.Module):
    """Multi-head attention with separate query/key/value inputs and an optional internal down-projection.

    Args:
        embedding_dim: input / output width ``C``.
        num_heads: attention heads.
        downsample_rate: the attention runs at width ``C / downsample_rate``.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = embedding_dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"attention width {internal} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.internal_dim = internal
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``q (B, Nq, C)``, ``k, v (B, Nk, C)`` -> ``(B, Nq, C)``."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention (post-norm).

    Args:
        embedding_dim: width ``C``.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP (ReLU).
        attention_downsample_rate: width reduction inside the cross-attentions.
        skip_first_layer_pe: the first block's self-attention sees the tokens without their positional encoding and
            has no residual connection.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = TokenAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        """``queries (B, N, C)``, ``keys (B, h*w, C)`` and their encodings -> updated ``(queries, keys)``."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer between prompt/output tokens and the image embedding.

    Args:
        depth: number of :class:`TwoWayAttentionBlock`.
        embedding_dim: width ``C``.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLPs.
        attention_downsample_rate: width reduction inside the cross-attentions.
    """

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """Attend tokens and image to each other.

        Args:
            image_embedding: ``(B, C, h, w)``.
            image_pe: ``(B or 1, C, h, w)`` positional encoding of the image grid.
            point_embedding: tokens ``(B, N, C)``.

        Returns:
            ``queries (B, N, C)`` and ``keys (B, h*w, C)``.
        """
        b = image_embedding.shape[0]
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2).expand(b, -1, -1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    """SAM's mask decoder: masks ``(B, 3 or 1, 4h, 4w)`` and IoU estimates from an image embedding and prompts.

    Output tokens ``[iou, mask_0 .. mask_M]`` are prepended to the sparse prompt tokens; token ``mask_0`` is the
    single-mask output, ``mask_1..M`` the multi-mask outputs.

    Args:
        transformer_dim: width ``C`` of tokens and image embedding.
        transformer: the token/image transformer; ``None`` builds the default :class:`TwoWayTransformer`
            (depth 2, 8 heads, MLP 2048) at ``transformer_dim``.
        num_multimask_outputs: ``M``.
        iou_head_depth: layers of the IoU MLP.
        iou_head_hidden_dim: hidden width of the IoU MLP.
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer if transformer is not None else TwoWayTransformer(embedding_dim=transformer_dim)
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """All ``M + 1`` masks ``(B, M+1, 4h, 4w)`` and IoU estimates ``(B, M+1)``."""
        b, c, h, w = image_embeddings.shape
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens[None].expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        hs, keys = self.transformer(src, image_pe, tokens)
        iou_out = hs[:, 0]
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        uc, uh, uw = upscaled.shape[1:]
        masks = (hyper @ upscaled.reshape(b, uc, uh * uw)).reshape(b, -1, uh, uw)
        return masks, self.iou_prediction_head(iou_out)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks for one prompt set per image.

        Args:
            image_embeddings: ``(B, C, h, w)``.
            image_pe: ``(1, C, h, w)`` (or ``B``) positional encoding of the grid.
            sparse_prompt_embeddings: ``(B, T, C)`` (``T`` may be 0).
            dense_prompt_embeddings: ``(B, C, h, w)``.
            multimask_output: return the ``M`` multi-mask outputs instead of the single one.

        Returns:
            ``masks (B, M or 1, 4h, 4w)`` logits and ``iou_pred (B, M or 1)``.
        """
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]
