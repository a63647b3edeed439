import math

import pytest
import torch
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack

from emu_lightning.components.resampler import (
    CausalTransformer,
    MLPProjector,
    PerceiverResampler,
    PooledProjector,
    PreNormCausalTransformer,
)


def feats(n=17, d=24, b=3):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "make, q",
    [
        (lambda: CausalTransformer(24, 40, num_queries=6, width=32, depth=2, num_heads=4, output_norm=True), 6),
        (lambda: PreNormCausalTransformer(24, 40, num_queries=6, width=32, depth=2, num_heads=4), 6),
        (lambda: PerceiverResampler(24, 40, num_queries=5, width=32, depth=2, num_heads=4), 5),
        (lambda: MLPProjector(24, 40, num_tokens=17), 17),
        (lambda: MLPProjector(24, 40, num_tokens=17, num_prefix_tokens=1), 16),
        (lambda: PooledProjector(24, 40, grid=2, num_prefix_tokens=1), 4),
    ],
)
def test_shapes_and_fixed_output_scale(make, q):
    r = make()
    out = r(feats())
    assert out.shape == (3, q, 40) and r.num_queries == q and r.out_dim == 40 and r.in_dim == 24
    # output_norm: every embedding has zero mean and unit variance over its width
    assert torch.allclose(out.mean(-1), torch.zeros(3, q), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(3, q), atol=1e-3)


@pytest.mark.parametrize("cls", [CausalTransformer, PreNormCausalTransformer])
def test_causal_transformer_queries_are_causal(cls):
    r = cls(24, 40, num_queries=6, width=32, depth=2, num_heads=4, output_norm=False).eval()
    assert r.queries.std().item() == pytest.approx(0.02, rel=0.3)  # N(0, 0.02) init, as in the paper
    x = feats()
    base = r(x)
    # Perturbing the learned query 3 changes outputs 3.. only: query i sees queries <= i.
    with torch.no_grad():
        r.queries.view(6, 32)[3] += 1.0
    moved = (r(x) - base).abs().amax(dim=(0, 2))
    assert torch.all(moved[:3] == 0) and torch.all(moved[3:] > 0)


def _t5_decoder(width, depth, heads, ffn):
    config = T5Config(vocab_size=8, d_model=width, d_kv=width // heads, d_ff=ffn, num_layers=depth, num_heads=heads,
                      dropout_rate=0.1, feed_forward_proj="relu", is_decoder=True, is_encoder_decoder=False,
                      use_cache=False)  # fmt: skip
    config._attn_implementation = "eager"
    return T5Stack(config)


def test_causal_transformer_is_transformers_t5_decoder_stack():
    """With visual tokens as wide as the decoder, the released network is transformers' T5 decoder unchanged:
    outputs equal on the same weights, in eval mode and in train mode (dropout) with the same random stream."""
    torch.manual_seed(0)
    r = CausalTransformer(32, 40, num_queries=5, width=32, depth=2, num_heads=4, ffn_dim=64)
    reference = _t5_decoder(32, 2, 4, 64)
    missing, unexpected = reference.load_state_dict(r.stack.state_dict(), strict=False)
    assert missing == ["embed_tokens.weight"] and unexpected == []  # T5's token embedding is not built here
    x = feats(d=32)
    for train in (False, True):
        r.train(train), reference.train(train)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            ours = r(x)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            hidden = reference(inputs_embeds=r.queries.expand(3, -1, -1), encoder_hidden_states=x).last_hidden_state
            theirs = r.projection(hidden)
        diff = (ours - theirs).abs().max().item()
        mode = "train" if train else "eval"
        print(f"CausalTransformer vs transformers' T5 decoder stack ({mode}): max|diff| {diff:.3g}")
        assert diff <= 1e-5, train


def _released_forward(r: CausalTransformer, x: torch.Tensor) -> torch.Tensor:
    """The released Causal Transformer's eval forward written out from its T5 code: RMS norms, unscaled attention
    with a relative position bias from layer 0 (unidirectional buckets) shared by every layer, causal self-attention,
    cross-attention with keys and values projected from the visual tokens' own width, ReLU feed-forward."""
    stack, heads = r.stack, r.stack.config.num_heads

    def rms(h, norm):
        return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    def split(h):
        return h.view(h.shape[0], h.shape[1], heads, -1).transpose(1, 2)

    def attention(attn, h, context, bias):
        scores = split(attn.q(h)) @ split(attn.k(context)).transpose(-1, -2) + bias  # no 1/sqrt(d) scaling
        out = torch.softmax(scores, -1) @ split(attn.v(context))
        return attn.o(out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))

    q = r.queries.expand(x.shape[0], -1, -1)
    n = q.shape[1]
    relative = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    distance = -torch.clamp(relative, max=0)  # unidirectional: only the past
    exact, buckets = 16, 32
    large = (
        exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(128 / exact) * (buckets - exact)).long()
    )
    bucket = torch.where(distance < exact, distance, large.clamp(max=buckets - 1))
    bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias(bucket).permute(2, 0, 1)[None]
    bias = bias + torch.triu(torch.full((n, n), float("-inf")), 1)  # causal
    h = q
    for block in stack.block:
        self_attn, cross, ff = block.layer
        h = h + attention(self_attn.SelfAttention, rms(h, self_attn.layer_norm), rms(h, self_attn.layer_norm), bias)
        h = h + attention(cross.EncDecAttention, rms(h, cross.layer_norm), x, 0.0)
        h = h + ff.DenseReluDense.wo(torch.relu(ff.DenseReluDense.wi(rms(h, ff.layer_norm))))
    return r.projection(rms(h, stack.final_layer_norm))


def test_causal_transformer_equals_the_released_network_with_wide_visual_tokens():
    """Visual tokens wider than the decoder (1408 against 768 in the paper; 48 against 32 here): each layer's
    cross-attention projects them with its own keys and values."""
    torch.manual_seed(0)
    r = CausalTransformer(48, 40, num_queries=40, width=32, depth=2, num_heads=4, ffn_dim=64).eval()
    assert r.stack.block[1].layer[1].EncDecAttention.k.weight.shape == (32, 48)
    with torch.no_grad():  # a trained-looking position bias, so that every bucket (up to 40 apart) matters
        r.stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_()
        x = feats(d=48)
        diff = (r(x) - _released_forward(r, x)).abs().max().item()
    print(f"CausalTransformer vs the released forward written out (48-wide visual tokens): max|diff| {diff:.3g}")
    assert diff <= 1e-5


def test_causal_transformer_at_the_papers_sizes_has_the_released_parameter_count():
    with torch.device("meta"):
        r = CausalTransformer(1408, 5120)
    assert sum(p.numel() for p in r.parameters()) == 129_033_344


def test_pooled_projector_averages_patches():
    r = PooledProjector(2, 2, grid=2, num_prefix_tokens=1, output_norm=False)
    with torch.no_grad():
        r.head.proj.weight.copy_(torch.eye(2))
        r.head.proj.bias.zero_()
    grid = torch.arange(16.0).view(4, 4)
    x = torch.cat([torch.full((1, 1, 2), 99.0), torch.stack([grid, -grid], -1).view(1, 16, 2)], 1)
    out = r(x)[0, :, 0]
    assert out.tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x2 means of the 4x4 grid, CLS dropped


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"expects features \(B, N, 24\), got \(3, 17, 8\)"):
        CausalTransformer(24, 40, num_queries=2, width=32, depth=1, num_heads=4)(feats(d=8))
    with pytest.raises(ValueError, match="expects 17 tokens per image, got 10"):
        MLPProjector(24, 40, num_tokens=17)(feats(n=10))
    with pytest.raises(ValueError, match="square patch grid"):
        PooledProjector(24, 40, grid=2)(feats(n=13))
    with pytest.raises(ValueError, match="not divisible"):
        CausalTransformer(24, 40, width=30, num_heads=4)
