"""Resamplers: visual tokens ``(B, N, in_dim)`` to ``num_queries`` embeddings ``(B, Q, out_dim)``.

- :class:`CausalTransformer`, Emu's as released: transformers' T5 decoder stack over Q learned queries (causal
  self-attention, cross-attention whose keys and values read the visual tokens at their own width, a ReLU
  feed-forward; RMS norms, unscaled attention, a shared relative position bias), then a linear map. The Q
  embeddings form a left-to-right sequence the LLM can regress.
- :class:`PreNormCausalTransformer`, the same idea in a plain pre-norm transformer (LayerNorms, scaled attention,
  GELU MLPs, the visual tokens projected to the resampler's width once): this library's first design, kept as an
  ablation.
- :class:`PerceiverResampler`, Flamingo's: latents attend to the visual tokens and themselves.
- :class:`MLPProjector`, LLaVA's: a two-layer MLP per visual token (Q = N).
- :class:`PooledProjector`, Emu2's: average-pool the patch grid to k x k, then a linear map (Q = k * k).

All end with an optional non-affine LayerNorm (``output_norm``; off in the released Emu): the visual embeddings
are regression targets, and without a fixed scale the model can shrink or grow them to game the L2 loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emu_lightning.components.base import Resampler


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs (self- or cross-attention)."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, causal: bool = False) -> Tensor:
        b, q_len, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, q_len, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, q_len, d))


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class _OutputHead(nn.Module):
    def __init__(self, width: int, out_dim: int, output_norm: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(width, out_dim)
        self.output_norm = output_norm

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return F.layer_norm(x, x.shape[-1:]) if self.output_norm else x


class CausalTransformerLayer(nn.Module):
    """Causal self-attention among the queries, cross-attention to the visual tokens, then an MLP (pre-norm)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(width), Attention(width, num_heads)
        self.norm2, self.cross_attn = nn.LayerNorm(width), Attention(width, num_heads)
        self.norm3, self.mlp = nn.LayerNorm(width), _mlp(width, mlp_ratio)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, causal=True)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class CausalTransformer(Resampler):
    """Emu's Causal Transformer as released (``Emu1/models/causal_former.py``): transformers' T5 decoder stack.

    Q learned queries (``N(0, 0.02)``) are the decoder's input embeddings; each layer has causal self-attention
    among them, cross-attention whose keys and values read the visual tokens at their own width (``in_dim``, 1408 for
    EVA-CLIP g/14) through its own projections, and a ReLU feed-forward, all without biases; T5's RMS norms, T5's
    unscaled attention and a learned relative position bias (unidirectional buckets) that the first layer computes
    and every layer shares; dropout. A final RMS norm, then ``Linear(width, out_dim)`` with a bias and nothing after
    it. The stack is built from transformers' own T5 modules (only the cross-attention's key and value projections
    are swapped for wider inputs), so it is the released network by construction; at the paper's sizes it has
    129,033,344 parameters. T5's token embedding, unused here, is not built.

    Args:
        in_dim: width of the vision backbone's tokens (1408).
        out_dim: width of the output embeddings, the LLM's hidden size (5120).
        num_queries: Q, the number of visual embeddings per image (32).
        width: the decoder's width, T5's ``d_model`` (768).
        depth: number of decoder layers (12).
        num_heads: attention heads per layer (12; each ``width // num_heads`` wide).
        ffn_dim: the ReLU feed-forward's hidden width, T5's ``d_ff`` (3072).
        dropout: T5's dropout rate (0.1), on embeddings, attention weights and residual branches in training.
        relative_attention_num_buckets: relative position buckets (32).
        relative_attention_max_distance: distance beyond which positions share a bucket (128).
        output_norm: end with a non-affine LayerNorm (not in the released network; a fixed scale for regression
            targets when training from scratch).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_dim: int = 3072,
        dropout: float = 0.1,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        output_norm: bool = False,
    ) -> None:
        super().__init__()
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Stack

        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        config = T5Config(
            vocab_size=1,  # no token embedding is used: the queries are the input embeddings
            d_model=width,
            d_kv=width // num_heads,
            d_ff=ffn_dim,
            num_layers=depth,
            num_decoder_layers=depth,
            num_heads=num_heads,
            relative_attention_num_buckets=relative_attention_num_buckets,
            relative_attention_max_distance=relative_attention_max_distance,
            dropout_rate=dropout,
            layer_norm_epsilon=1e-6,
            feed_forward_proj="relu",
            is_decoder=True,
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=None,
            eos_token_id=None,
            decoder_start_token_id=None,
        )
        config._attn_implementation = "eager"  # T5's own attention: the relative bias added to unscaled scores
        self.stack = T5Stack(config)
        self.stack.embed_tokens = None
        for block in self.stack.block:  # the released cross-attention reads the visual tokens at their width
            cross = block.layer[1].EncDecAttention
            for name in ("k", "v"):
                linear = nn.Linear(in_dim, cross.inner_dim, bias=False)
                nn.init.normal_(linear.weight, std=width**-0.5)  # as T5 initialises its k and v
                setattr(cross, name, linear)
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.projection = nn.Linear(width, out_dim)
        self.output_norm = output_norm

    def forward(self, features: Tensor) -> Tensor:
        _check_features(self, features)
        queries = self.queries.expand(features.shape[0], -1, -1).to(features.dtype)
        hidden = self.stack(inputs_embeds=queries, encoder_hidden_states=features, use_cache=False).last_hidden_state
        out = self.projection(hidden)
        return F.layer_norm(out, out.shape[-1:]) if self.output_norm else out


class PreNormCausalTransformer(Resampler):
    """A plain pre-norm Causal Transformer: Q learned queries read the image into a causal sequence of embeddings
    (LayerNorms, scaled attention, GELU MLPs; the visual tokens projected to ``width`` once). This library's first
    design, kept as an ablation against the released :class:`CausalTransformer`.

    Args:
        in_dim: width of the vision backbone's tokens.
        out_dim: width of the output embeddings (the LLM's hidden size).
        num_queries: Q, the number of visual embeddings per image (32 in the paper).
        width: the transformer's width (768 in the paper).
        depth: number of layers (12 in the paper).
        num_heads: attention heads per layer.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        output_norm: end with a non-affine LayerNorm so regression targets keep a fixed scale.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        output_norm: bool = True,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.context_proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width))
        self.layers = nn.ModuleList(CausalTransformerLayer(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = _OutputHead(width, out_dim, output_norm)

    def forward(self, features: Tensor) -> Tensor:
        _check_features(self, features)
        context = self.context_proj(features)
        x = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1).to(context.dtype)
        for layer in self.layers:
            x = layer(x, context)
        return self.head(self.norm(x))


class PerceiverLayer(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_media, self.norm_latents = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.norm_mlp, self.mlp = nn.LayerNorm(width), _mlp(width, mlp_ratio)

    def forward(self, latents: Tensor, media: Tensor) -> Tensor:
        q = self.norm_latents(latents)
        # Flamingo: keys and values are the visual tokens and the latents together.
        latents = latents + self.attn(q, torch.cat([self.norm_media(media), q], dim=1))
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(Resampler):
    """Flamingo's Perceiver Resampler: latents attend to the visual tokens and to themselves.

    Args:
        in_dim: width of the vision backbone's tokens.
        out_dim: width of the output embeddings (the LLM's hidden size).
        num_queries: number of latents, i.e. output embeddings per image (64 in Flamingo).
        width: the resampler's width.
        depth: number of layers (6 in Flamingo).
        num_heads: attention heads per layer.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        output_norm: end with a non-affine LayerNorm so regression targets keep a fixed scale.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 64,
        width: int = 1024,
        depth: int = 6,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        output_norm: bool = True,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.latents = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.media_proj = nn.Linear(in_dim, width)
        self.layers = nn.ModuleList(PerceiverLayer(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = _OutputHead(width, out_dim, output_norm)

    def forward(self, features: Tensor) -> Tensor:
        _check_features(self, features)
        media = self.media_proj(features)
        x = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1).to(media.dtype)
        for layer in self.layers:
            x = layer(x, media)
        return self.head(self.norm(x))


class MLPProjector(Resampler):
    """LLaVA's projector: a two-layer MLP applied to every visual token, so Q equals the token count.

    Args:
        in_dim: width of the vision backbone's tokens.
        out_dim: width of the output embeddings (the LLM's hidden size).
        num_tokens: tokens the backbone emits per image, including prefix tokens; by default the backbone's own
            (:meth:`set_num_tokens`, called by EmuModel).
        num_prefix_tokens: leading tokens to drop (1 drops CLS; LLaVA keeps patch tokens only).
        hidden_dim: MLP hidden width (default: ``out_dim``).
        output_norm: end with a non-affine LayerNorm so regression targets keep a fixed scale.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_tokens: int | None = None,
        num_prefix_tokens: int = 0,
        hidden_dim: int | None = None,
        output_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens {num_prefix_tokens} must be >= 0")
        self.in_dim, self.out_dim, self.num_prefix_tokens = in_dim, out_dim, num_prefix_tokens
        self.num_tokens: int | None = None
        if num_tokens is not None:
            self.set_num_tokens(num_tokens)
        hidden = hidden_dim or out_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU())
        self.head = _OutputHead(hidden, out_dim, output_norm)

    def set_num_tokens(self, num_tokens: int) -> None:
        if self.num_tokens is not None and num_tokens != self.num_tokens:
            raise ValueError(f"MLPProjector was built for {self.num_tokens} tokens per image, not {num_tokens}")
        if not 0 <= self.num_prefix_tokens < num_tokens:
            raise ValueError(f"num_prefix_tokens {self.num_prefix_tokens} must be in [0, num_tokens={num_tokens})")
        self.num_tokens = num_tokens

    @property
    def num_queries(self) -> int:
        if self.num_tokens is None:
            raise ValueError("MLPProjector does not know its token count yet: give num_tokens, or build it in EmuModel")
        return self.num_tokens - self.num_prefix_tokens

    def forward(self, features: Tensor) -> Tensor:
        _check_features(self, features, self.num_queries + self.num_prefix_tokens)
        return self.head(self.mlp(features[:, self.num_prefix_tokens :]))


class PooledProjector(Resampler):
    """Emu2's projector: average-pool the square patch grid to ``grid x grid``, then a linear map.

    Args:
        in_dim: width of the vision backbone's tokens.
        out_dim: width of the output embeddings (the LLM's hidden size).
        grid: side k of the pooled grid; Q = k * k (Emu2: 8, so 64 embeddings).
        num_prefix_tokens: leading non-patch tokens (CLS) to drop before pooling.
        output_norm: end with a non-affine LayerNorm so regression targets keep a fixed scale.
    """

    def __init__(
        self, in_dim: int, out_dim: int, grid: int = 8, num_prefix_tokens: int = 1, output_norm: bool = True
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.grid = in_dim, out_dim, grid
        self.num_prefix_tokens, self.num_queries = num_prefix_tokens, grid * grid
        self.head = _OutputHead(in_dim, out_dim, output_norm)

    def forward(self, features: Tensor) -> Tensor:
        _check_features(self, features)
        patches = features[:, self.num_prefix_tokens :]
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ValueError(
                f"PooledProjector needs a square patch grid, got {patches.shape[1]} tokens after dropping "
                f"{self.num_prefix_tokens} prefix tokens"
            )
        if side < self.grid:
            raise ValueError(f"patch grid {side}x{side} is smaller than the pooled grid {self.grid}x{self.grid}")
        x = patches.transpose(1, 2).reshape(features.shape[0], -1, side, side)
        x = F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)
        return self.head(x)


def _check_features(module: Resampler, features: Tensor, num_tokens: int | None = None) -> None:
    if features.dim() != 3 or features.shape[-1] != module.in_dim:
        raise ValueError(
            f"{type(module).__name__} expects features (B, N, {module.in_dim}), got {tuple(features.shape)}"
        )
    if num_tokens is not None and features.shape[1] != num_tokens:
        raise ValueError(f"{type(module).__name__} expects {num_tokens} tokens per image, got {features.shape[1]}")
