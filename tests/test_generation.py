"""Image generation: the KV-cached regression loop, guidance, in-context prompts, blending, the decoder stage."""

import lightning as L
import pytest
import torch
from conftest import make_model

from emu_lightning.components.decoder import DiffusionDecoder
from emu_lightning.images import resize
from emu_lightning.shapesworld import ShapesWorldDataModule
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.tokenizer import tokenizer_to_state


def img(seed=0):
    return ShapesWorld(image_size=16).image("val", seed)


def test_kv_cached_regression_equals_the_uncached_loop():
    model = make_model(num_queries=4)
    prompts = ["a red circle.", [img(1), "and then", img(2)], []]  # text, in-context, empty (left padding)
    cached = model.regress_image_embeddings(prompts)
    uncached = model.regress_image_embeddings(prompts, use_cache=False)
    assert cached.shape == (3, 4, 32)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)
    # batching and left padding do not change a prompt's embeddings
    alone = model.regress_image_embeddings(["a red circle."])
    torch.testing.assert_close(alone[0], cached[0], atol=1e-5, rtol=0)


def test_regression_is_the_trained_prediction():
    """The first regressed embedding is what `losses` trains at [IMG] for the same text."""
    model = make_model(num_queries=4).eval()
    batch = model.sequencer([["a red circle.", img(0)]])
    ids = batch["input_ids"]
    with torch.no_grad():
        out = model.llm(model.embed(ids, batch["images"]), batch["attention_mask"])
        at_img = (ids[0] == model.img_start_id).nonzero()[0, 0]
        trained = model.llm.regress(out.hidden[0, at_img])
    torch.testing.assert_close(model.regress_image_embeddings(["a red circle."])[0, 0], trained, atol=1e-5, rtol=0)


def test_generation_bad_input():
    model = make_model(num_queries=4, max_length=32)
    with pytest.raises(ValueError, match="at least one prompt"):
        model.regress_image_embeddings([])
    with pytest.raises(ValueError, match="max_length 32"):
        model.regress_image_embeddings([[img(i) for i in range(6)]])  # more images than the context holds
    with pytest.raises(ValueError, match="no decoder"):
        model.generate_image(["a red circle."])
    with pytest.raises(ValueError, match="guidance_scale 0.5"):
        model.generate_image(["a red circle."], guidance_scale=0.5)
    with pytest.raises(ValueError, match="stage 'decoder' needs a decoder"):
        make_model(stage="decoder")
    with pytest.raises(ValueError, match="stage 'finetune'"):
        make_model(stage="finetune")


def decoder(**kwargs):
    torch.manual_seed(0)
    return DiffusionDecoder(cond_dim=32, image_size=16, unet={"block_out_channels": (16, 32)}, **kwargs)


def test_generate_image_text_in_context_and_blend():
    model = make_model(num_queries=4, decoder=decoder())
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images = model.generate_image(["a red circle.", [img(1), "like this but blue", img(2)]], steps=2, generator=gen())
    assert images.shape == (2, 3, 16, 16) and 0.0 <= images.min() and images.max() <= 1.0
    # guidance 1 is the unguided path: the decoder on the regressed embeddings alone
    unguided = model.generate_image(["a red circle."], guidance_scale=1.0, steps=2, generator=gen())
    direct = model.decoder.sample(model.regress_image_embeddings(["a red circle."]), None, steps=2,
                                  guidance_scale=1.0, generator=gen())  # fmt: skip
    torch.testing.assert_close(unguided, direct)
    guided = model.generate_image(["a red circle."], guidance_scale=5.0, steps=2, generator=gen())
    assert not torch.allclose(guided, unguided)
    # blending as released: Emu regresses the image after both, guided against the empty prompt
    a, b = torch.stack([img(3)]), torch.stack([img(4)])
    blended = model.blend_images(a, b, steps=2, generator=gen())
    torch.testing.assert_close(blended, model.generate_image([[img(3), img(4)]], steps=2, generator=gen()))
    # interpolation: weight 0 decodes the first image's own embeddings
    mixed = model.blend_images(a, b, weight=0.0, guidance_scale=1.0, steps=2, generator=gen(), mode="interpolate")
    own = model.decoder.sample(model.encode_images(a).detach(), None, steps=2, guidance_scale=1.0, generator=gen())
    torch.testing.assert_close(mixed, own)
    assert model.blend_images(a, b, weight=0.5, steps=2, mode="interpolate").shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="blend weight 1.5"):
        model.blend_images(a, b, weight=1.5, mode="interpolate")
    with pytest.raises(ValueError, match="applies to mode='interpolate'"):
        model.blend_images(a, b, weight=0.3)
    with pytest.raises(ValueError, match="differ in shape"):
        model.blend_images(a, torch.stack([img(1), img(2)]))


def _fit(model, steps=2, **data):
    dm = ShapesWorldDataModule(image_size=16, batch_size=4, val_size=8, train_size=64, **data)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=1, val_check_interval=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, dm)
    return trainer


@pytest.mark.parametrize("condition", ["regressed", "autoencoder"])
def test_decoder_stage_trains_only_the_decoder(condition):
    spatial = dict(num_queries=4, spatial_condition=4, spatial_grid=4, sketch_weight=1.0, condition_norm=True)
    model = make_model(num_queries=4, decoder=decoder(**spatial), stage="decoder", decoder_condition=condition)
    assert set(model.frozen) == {"vision", "resampler", "llm"}
    groups = model.configure_optimizers().param_groups  # no scheduler: the bare optimizer
    assert {g["name"].removesuffix("_no_decay") for g in groups} == {"decoder"}
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    trained = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    _fit(model, image_first_prob=0.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, model.decoder.state_dict()[k]) for k, v in trained.items())
    if condition == "regressed":  # the condition is the regression for the caption: image-first samples have none
        batch = model.sequencer([[img(0), "a red circle."]])
        with pytest.raises(ValueError, match="text-then-image"):
            model.decoder_losses(batch)


def test_decoder_stage_fits_the_sketch_in_closed_form_before_training(monkeypatch):
    spatial = dict(num_queries=4, spatial_condition=4, spatial_grid=4, sketch_weight=1.0, condition_norm=True)
    model = make_model(num_queries=4, decoder=decoder(**spatial), stage="decoder", decoder_sketch_fit=3)
    fits = []
    real = model.decoder.fit_sketch
    monkeypatch.setattr(model.decoder, "fit_sketch", lambda c, x: fits.append((c.shape, x.shape)) or real(c, x))
    _fit(model, steps=1, image_first_prob=0.0)
    assert fits == [((12, 4, 32), (12, 3, 16, 16))]  # 3 batches of 4 caption-then-image pairs, once
    assert model.decoder.condition_norm.count == 12 + 4  # the fit's pairs, then one training batch
    with pytest.raises(ValueError, match="decoder_sketch_fit must be >= 0"):
        make_model(num_queries=4, decoder=decoder(**spatial), stage="decoder", decoder_sketch_fit=-1)


def test_decoder_must_fit_the_visual_embeddings():
    with pytest.raises(ValueError, match="decoder num_queries 5 does not match the resampler's 4 embeddings"):
        make_model(num_queries=4, decoder=decoder(num_queries=5))
    with pytest.raises(ValueError, match="decoder cond_dim 24 does not match the visual embeddings' width 32"):
        make_model(num_queries=4, decoder=DiffusionDecoder(cond_dim=24, image_size=16))


def test_init_checkpoint_loads_every_component_it_holds(tmp_path):
    pretrained = make_model(num_queries=4)
    with torch.no_grad():
        pretrained.llm.regression_head.weight.add_(1.0)  # differs from a fresh model's
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": pretrained.state_dict(), "emu_tokenizer": tokenizer_to_state(pretrained.tokenizer)}, path)
    model = make_model(num_queries=4, decoder=decoder(), stage="decoder", init_checkpoint=str(path))
    for name in ("vision", "resampler", "llm"):
        for k, v in getattr(pretrained, name).state_dict().items():
            assert torch.equal(v, getattr(model, name).state_dict()[k]), f"{name}.{k}"
    torch.testing.assert_close(model.decoder.state_dict(), decoder().state_dict())  # not in the checkpoint
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        make_model(init_checkpoint=str(tmp_path / "missing.ckpt"))


def test_decoder_stage_data_comes_at_the_larger_size_and_each_part_takes_its_own(monkeypatch):
    # The paper's sizes in miniature: the decoder draws at 32 px (Stable Diffusion's 512), the vision tower sees
    # 16 px (EVA-CLIP's 224). The data module takes the larger from the model, and each part resizes to its own.
    big = DiffusionDecoder(cond_dim=32, image_size=32, unet={"block_out_channels": (16, 32)})
    model = make_model(num_queries=4, decoder=big, stage="decoder")
    assert model.data_image_size == 32 and make_model(num_queries=4, decoder=decoder()).data_image_size == 16
    seen = {"vision": set(), "decoder": set()}
    vision_forward, decoder_loss = model.vision.forward, model.decoder.loss
    monkeypatch.setattr(model.vision, "forward", lambda x: seen["vision"].add(tuple(x.shape[1:])) or vision_forward(x))
    monkeypatch.setattr(
        model.decoder, "loss", lambda x, *a: seen["decoder"].add(tuple(x.shape[1:])) or decoder_loss(x, *a)
    )
    dm = ShapesWorldDataModule(batch_size=4, val_size=8, train_size=64, image_first_prob=0.0)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, dm)
    assert dm.world.image_size == 32 and trainer.global_step == 2
    assert seen == {"vision": set(), "decoder": {(3, 32, 32)}}  # conditioned on captions: no image is encoded
    # The autoencoder condition encodes the same 32 px image at the vision tower's 16 px.
    model.decoder_condition = "autoencoder"
    image = ShapesWorld(image_size=32).image("val", 0)
    images, condition = model.decoder_inputs(model.sequencer([["a red circle.", image]]))
    assert images.shape == (1, 3, 32, 32) and seen["vision"] == {(3, 16, 16)}
    torch.testing.assert_close(condition, model.encode_images(resize(image[None], 16)))
