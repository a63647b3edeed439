from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from emu_lightning.components import DiffusionDecoder
from emu_lightning.components.decoder import TINY_UNET, ConditionNorm

TINY_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
)


def data(b=2, size=8, q=4, d=16, seed=0):
    """Smooth images (4x4 noise upsampled) in [0, 1] and conditions (B, Q, D)."""
    g = torch.Generator().manual_seed(seed)
    images = F.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)
    return images, torch.randn(b, q, d, generator=g)


def sample(decoder, *args, seed=0, **kwargs):
    return decoder.sample(*args, generator=torch.Generator().manual_seed(seed), **kwargs)


def make(**kwargs):
    torch.manual_seed(0)
    return DiffusionDecoder(**{"cond_dim": 16, "image_size": 8, **kwargs})


def test_pixel_and_latent_sample_shapes_and_range():
    d = make()
    assert not d.latent and d.latent_channels == 3 and d.latent_size == 8
    assert sum(p.numel() for p in d.parameters()) < 2_000_000
    assert d.unet.config.cross_attention_dim == 16 and d.unet.config.sample_size == 8
    _, cond = data(b=3)
    out = sample(d, cond, steps=2)
    assert out.shape == (3, 3, 8, 8) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0

    lat = make(image_size=16, vae=TINY_VAE)
    assert lat.latent and lat.latent_channels == 4 and lat.latent_size == 8 and lat.unet.config.in_channels == 4
    assert not any(p.requires_grad for p in lat.vae.parameters())
    lat.train()
    assert lat.unet.training and not lat.vae.training  # the VAE stays frozen in eval mode
    out = sample(lat, cond, steps=2)
    assert out.shape == (3, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    images, _ = data(b=3, size=16)
    loss = lat.loss(images, cond)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is None for p in lat.vae.parameters())
    assert lat.training  # sample restored training mode


def test_loss_falls_on_a_fixed_batch():
    images, cond = data(b=8)
    d = make(condition_dropout=0.0)

    def fixed_loss():  # averaged over 4 fixed draws of timesteps and noise per image
        d.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            value = d.loss(images.repeat(4, 1, 1, 1), cond.repeat(4, 1, 1)).item()
        d.train()
        return value

    start = fixed_loss()
    assert 0.8 < start < 1.5  # a random UNet's noise prediction: MSE about Var(noise) = 1
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for _ in range(30):
        loss = d.loss(images, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.7 * start


def test_guidance():
    d = make().train()
    _, cond = data(b=2)
    uncond = torch.randn(1, 4, 16)
    plain = sample(d, cond, None, steps=3, guidance_scale=1.0)
    # scale 1 runs the conditional branch only: exactly the unguided path, uncondition unused
    assert torch.equal(sample(d, cond, uncond, steps=3, guidance_scale=1.0), plain)
    guided = sample(d, cond, uncond, steps=3, guidance_scale=3.0)
    assert (guided - plain).abs().max() > 1e-2
    # eps_u + s (eps_c - eps_u) with eps_u == eps_c is eps_c, whatever s
    assert torch.allclose(sample(d, cond, cond, steps=3, guidance_scale=5.0), plain, atol=1e-5)
    # no uncondition with s > 1 guides against zeros
    zeros = sample(d, cond, torch.zeros(2, 4, 16), steps=3, guidance_scale=3.0)
    assert torch.equal(sample(d, cond, None, steps=3, guidance_scale=3.0), zeros)
    assert d.training
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        d.sample(cond, uncond, steps=3, guidance_scale=0.5)
    with pytest.raises(ValueError, match=r"uncondition \(1, 4, 16\) or \(2, 4, 16\)"):
        d.sample(cond, torch.zeros(3, 4, 16), steps=1)


def test_condition_dropout():
    images, cond = data(b=4)
    other = torch.randn_like(cond)
    uncond = torch.randn(1, 4, 16)

    def loss(d, c, u=uncond):
        torch.manual_seed(7)
        with torch.no_grad():
            return d.loss(images, c, u)

    always = make(condition_dropout=1.0).train()
    assert torch.equal(loss(always, cond), loss(always, other))  # every row conditioned on `uncond`
    assert torch.equal(loss(always, cond, None), loss(always, other, torch.zeros(1, 4, 16)))  # None: zeros
    always.eval()  # no dropout outside training
    assert not torch.equal(loss(always, cond), loss(always, other))
    never = make(condition_dropout=0.0).train()
    assert not torch.equal(loss(never, cond), loss(never, other))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_noises_and_targets_as_ddpm(prediction_type, monkeypatch):
    d = make(scheduler_config={"prediction_type": prediction_type, "beta_schedule": "squaredcos_cap_v2"}).eval()
    seen = {}

    def unet(noisy, t, encoder_hidden_states, class_labels=None):  # predicts zeros, so the loss is mean(target ** 2)
        seen.update(noisy=noisy, t=t)
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    monkeypatch.setattr(d.unet, "forward", unet)
    images, cond = data(b=4)
    torch.manual_seed(3)
    loss = d.loss(images, cond)
    torch.manual_seed(3)
    noise = torch.randn(4, 3, 8, 8)
    t = torch.randint(0, 1000, (4,))
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0 = images * 2 - 1
    assert torch.equal(seen["t"], t)
    assert torch.allclose(seen["noisy"], ddpm.add_noise(x0, noise, t), atol=1e-6)
    target = noise if prediction_type == "epsilon" else ddpm.get_velocity(x0, noise, t)
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion 1.5 layout: unet/ (cross_attention_dim 16), vae/, scheduler/."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=16, **TINY_UNET)
    unet.save_pretrained(root / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2").save_pretrained(root / "scheduler")
    return root, unet.state_dict()


def test_load_stable_diffusion_layout_with_new_cross_attention_width(sd_folder):
    root, saved = sd_folder
    d = DiffusionDecoder(cond_dim=24, pretrained=str(root), image_size=16)
    assert d.latent and d.latent_size == 8 and d.unet.config.cross_attention_dim == 24
    cross = [m for m in d.unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    assert len(cross) == 4  # CrossAttnDownBlock2D, mid block, 2 x CrossAttnUpBlock2D
    assert all(m.to_k.in_features == m.to_v.in_features == 24 for m in cross)
    state = d.unet.state_dict()
    assert state.keys() == saved.keys()
    replaced = {k for k in state if ".attn2.to_k." in k or ".attn2.to_v." in k}
    assert len(replaced) == 8 and all(state[k].shape[1] == 24 for k in replaced)
    assert all(torch.equal(state[k], saved[k]) for k in state.keys() - replaced)
    # the scheduler config comes from scheduler/, shared by the sampling scheduler
    assert d.train_scheduler.config.num_train_timesteps == 500
    assert isinstance(d.sample_scheduler, DDIMScheduler)
    assert d.sample_scheduler.config.beta_schedule == "squaredcos_cap_v2"
    out = sample(d, torch.randn(2, 3, 24), torch.zeros(1, 3, 24), steps=2)
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1

    same = DiffusionDecoder(cond_dim=16, pretrained=str(root), image_size=16)  # same width: every weight loaded
    assert all(torch.equal(v, saved[k]) for k, v in same.unet.state_dict().items())


def test_load_errors(sd_folder, tmp_path):
    root, _ = sd_folder
    with pytest.raises(FileNotFoundError, match="missing"):
        DiffusionDecoder(cond_dim=24, pretrained=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no unet/ subfolder"):
        DiffusionDecoder(cond_dim=24, pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="image_size 15 is not divisible by the VAE's downsampling factor 2"):
        DiffusionDecoder(cond_dim=24, pretrained=str(root), image_size=15)
    with pytest.raises(ValueError, match="UNet maps 4 to 4 channels, but RGB pixel space needs 3"):
        DiffusionDecoder(cond_dim=24, pretrained=str(root), image_size=16, latent=False)
    with pytest.raises(ValueError, match="only apply when building from scratch"):
        DiffusionDecoder(cond_dim=24, pretrained=str(root), unet={"layers_per_block": 2})


@pytest.mark.parametrize(
    "name, steps", [("DDIMScheduler", 2), ("PNDMScheduler", 4), ("EulerDiscreteScheduler", 2), ("DDPMScheduler", 2)]
)
def test_any_diffusers_sample_scheduler(name, steps):
    d = make(sample_scheduler=name)
    assert type(d.sample_scheduler).__name__ == name
    out = sample(d, data(b=2)[1], torch.zeros(1, 4, 16), steps=steps, guidance_scale=2.0)
    assert out.shape == (2, 3, 8, 8) and out.min() >= 0 and out.max() <= 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown diffusers scheduler 'NoSuchScheduler'"):
        make(sample_scheduler="NoSuchScheduler")
    with pytest.raises(ValueError, match="unknown diffusers scheduler 'UNet2DConditionModel'"):
        make(train_scheduler="UNet2DConditionModel")
    with pytest.raises(ValueError, match="no DDPM noise schedule"):
        make(train_scheduler="FlowMatchEulerDiscreteScheduler")
    with pytest.raises(ValueError, match="latent=True needs"):
        make(latent=True)
    with pytest.raises(ValueError, match="cross_attention_dim=8 conflicts"):
        make(unet={"cross_attention_dim": 8})
    d = make()
    images, cond = data()
    with pytest.raises(ValueError, match=r"expected condition \(2, Q, 16\), got shape \(2, 4, 8\)"):
        d.loss(images, cond[..., :8])
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 8, 8\)"):
        d.loss(images[..., :4], cond)


def test_pooled_condition_reaches_every_block(sd_folder):
    decoder = make(pooled_condition=True)
    images, cond = data()
    assert decoder.unet.class_embedding.linear_1.in_features == 16  # the mean embedding's projection
    assert decoder.loss(images, cond).isfinite()
    out = sample(decoder, cond, torch.zeros(1, 4, 16), steps=2, guidance_scale=2.0)
    assert out.shape == (2, 3, 8, 8)
    shifted = sample(decoder, cond + 1.0, torch.zeros(1, 4, 16), steps=2, guidance_scale=2.0)
    assert not torch.allclose(out, shifted)
    with pytest.raises(ValueError, match="pooled_condition needs a UNet built here"):
        DiffusionDecoder(cond_dim=24, pretrained=str(sd_folder[0]), image_size=16, pooled_condition=True)


def test_condition_norm_accumulates_exact_statistics_and_ignores_the_batch():
    norm = ConditionNorm(16)
    x = torch.randn(40, 16) * 3 + torch.randn(16) * 10  # a large component shared by every row
    for part in x.split(7):  # batches of 7 (and one of 5) accumulate to the statistics of all 40 rows
        norm(part)
    torch.testing.assert_close(norm.mean, x.mean(0))
    torch.testing.assert_close(norm.var, x.var(0, unbiased=False))
    assert norm.count == 40
    norm.eval()
    out = norm(x)  # no update in eval mode; each row is normalised on its own
    assert norm.count == 40
    torch.testing.assert_close(out.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm(x[:1]), out[:1])


def test_condition_norm_removes_what_all_conditions_share():
    images, cond = data(b=4)
    shared = torch.randn(16) * 10  # a large component common to every image's embeddings

    def loss(c):
        decoder = make(condition_norm=True, condition_dropout=0.0).train()
        torch.manual_seed(1)
        return decoder.loss(images, c)

    torch.testing.assert_close(loss(cond + shared), loss(cond), atol=1e-4, rtol=1e-4)


def test_per_embedding_condition_norm():
    decoder = make(condition_norm=True, condition_dropout=0.0, num_queries=4).train()
    assert decoder.condition_norm.mean.shape == (4 * 16,)
    images, cond = data(b=4)
    per_token = torch.randn(4, 16) * 10  # a large component that differs between the Q embeddings

    def loss(c):
        fresh = make(condition_norm=True, condition_dropout=0.0, num_queries=4).train()
        torch.manual_seed(1)
        return fresh.loss(images, c)

    torch.testing.assert_close(loss(cond + per_token), loss(cond), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"expected condition \(2, 4, 16\)"):
        decoder.loss(images[:2], torch.randn(2, 5, 16))


def test_fit_sketch_solves_the_pooled_images_in_closed_form():
    decoder = make(num_queries=2, spatial_condition=4, spatial_grid=2, sketch_weight=1.0, condition_norm=True)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(256, 2, 16, generator=g) * 2 + 5
    mix = torch.randn(32, 12, generator=g) * 0.1
    pooled = (((cond - 5) / 2).flatten(1) @ mix).view(-1, 3, 2, 2)  # the pooled targets, linear in the condition
    images = F.interpolate((pooled + 1) / 2, scale_factor=4, mode="nearest")  # 8 px images, flat 4 px cells
    assert decoder.fit_sketch(cond, images, ridge=1e-6) < 1e-6
    assert decoder.condition_norm.count == 256
    decoder.eval()
    sketch = decoder.spatial(decoder._normalise(cond))[:, :3]
    torch.testing.assert_close(sketch, pooled, atol=1e-3, rtol=0)  # the images pooled, in [-1, 1] space
    before = decoder.spatial.proj[0].weight[12:].clone()  # the map's other channels are left as they were
    decoder.fit_sketch(cond, images)
    torch.testing.assert_close(decoder.spatial.proj[0].weight[12:], before)
    with pytest.raises(ValueError, match="linear spatial map"):
        make(num_queries=2, spatial_condition=4, spatial_hidden=8, sketch_weight=1.0).fit_sketch(cond, images)


def test_spatial_condition_and_sketch_loss():
    decoder = make(num_queries=4, spatial_condition=5, spatial_grid=4, spatial_hidden=32, condition_dropout=0.0)
    assert decoder.unet.config.in_channels == 3 + 5
    images, cond = data(b=3)
    assert decoder.spatial(cond).shape == (3, 5, 4, 4)
    out = sample(decoder, cond, torch.zeros(1, 4, 16), steps=2, guidance_scale=2.0)
    assert out.shape == (3, 3, 8, 8)
    # the map is the only way the condition reaches the UNet once cross-attention and pooling are cut off
    for m in decoder.unet.modules():
        if isinstance(m, Attention) and m.is_cross_attention:
            m.to_v.weight.data.zero_()
    with torch.no_grad():
        decoder.spatial.proj[-1].bias.add_(torch.randn(5 * 16))
    assert not torch.allclose(sample(decoder, cond, steps=2, guidance_scale=1.0),
                              sample(decoder, cond * 3, steps=2, guidance_scale=1.0))  # fmt: skip

    with_sketch = make(num_queries=4, spatial_condition=5, spatial_grid=4, sketch_weight=2.0, condition_dropout=0.0)
    without = make(num_queries=4, spatial_condition=5, spatial_grid=4, condition_dropout=0.0)

    def loss(d, **kwargs):
        torch.manual_seed(1)
        return d.loss(images, cond, **kwargs)

    coarse = with_sketch.spatial(cond)
    target = F.avg_pool2d(images * 2 - 1, 2)  # 8 px pooled to the 4x4 grid, in the UNet's [-1, 1] space
    expected = 2.0 * (coarse[:, :3] - target).pow(2).mean()
    torch.testing.assert_close(loss(with_sketch) - loss(without), expected, atol=1e-5, rtol=1e-4)

    dropped = make(num_queries=4, spatial_condition=5, spatial_grid=4, sketch_weight=2.0, condition_dropout=1.0)
    no_sketch = make(num_queries=4, spatial_condition=5, spatial_grid=4, condition_dropout=1.0)
    torch.testing.assert_close(loss(dropped.train()), loss(no_sketch.train()))  # dropped rows draw no sketch


def test_spatial_condition_widens_a_pretrained_unet(sd_folder):
    root, saved = sd_folder
    d = DiffusionDecoder(cond_dim=16, pretrained=str(root), image_size=16, num_queries=3, spatial_condition=6)
    weight = d.unet.conv_in.weight
    assert weight.shape[1] == 4 + 6 and d.unet.config.in_channels == 10
    assert torch.equal(weight[:, :4], saved["conv_in.weight"]) and not weight[:, 4:].any()  # zero: output unchanged
    assert torch.equal(d.unet.conv_in.bias, saved["conv_in.bias"])
    x = torch.randn(2, 4, 8, 8)
    cond = torch.randn(2, 3, 16)
    plain = DiffusionDecoder(cond_dim=16, pretrained=str(root), image_size=16)
    torch.testing.assert_close(d._unet(x, torch.tensor([10, 10]), cond), plain._unet(x, torch.tensor([10, 10]), cond))


def test_spatial_condition_errors():
    with pytest.raises(ValueError, match="spatial_condition needs num_queries"):
        make(spatial_condition=4)
    with pytest.raises(ValueError, match="sketch_weight needs spatial_condition >= 3"):
        make(num_queries=4, spatial_condition=2, sketch_weight=1.0)
    with pytest.raises(ValueError, match="spatial_grid 3 must divide"):
        make(num_queries=4, spatial_condition=4, spatial_grid=3)
    with pytest.raises(ValueError, match="must not be negative"):
        make(num_queries=4, sketch_weight=-1.0)
