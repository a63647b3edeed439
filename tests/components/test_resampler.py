import pytest
import torch

from emu_lightning.components.resampler import CausalTransformer, MLPProjector, PerceiverResampler, PooledProjector


def feats(n=17, d=24, b=3):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "make, q",
    [
        (lambda: CausalTransformer(24, 40, num_queries=6, width=32, depth=2, num_heads=4), 6),
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


def test_causal_transformer_queries_are_causal():
    r = CausalTransformer(24, 40, num_queries=6, width=32, depth=2, num_heads=4, output_norm=False).eval()
    assert r.queries.std().item() == pytest.approx(0.02, rel=0.3)  # N(0, 0.02) init, as in the paper
    x = feats()
    base = r(x)
    # Perturbing the learned query 3 changes outputs 3.. only: query i sees queries <= i.
    with torch.no_grad():
        r.queries[3] += 1.0
    moved = (r(x) - base).abs().amax(dim=(0, 2))
    assert torch.all(moved[:3] == 0) and torch.all(moved[3:] > 0)


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
