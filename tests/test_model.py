import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLM, make_model

from emu_lightning import shapesworld
from emu_lightning.components.llm import HFCausalLM
from emu_lightning.components.resampler import CausalTransformer, MLPProjector, PooledProjector
from emu_lightning.components.vision import TimmVisionBackbone
from emu_lightning.model import EmuModel
from emu_lightning.tokenizer import EMU_TOKENS, TrainedBPE


def img(seed):
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_objective_matches_hand_computation(tiny_model):
    model = tiny_model.eval()
    q = model.num_queries
    batch = model.sequencer([["a red circle.", img(0)], [img(1), "a blue square.", img(2)]])
    losses = model.losses(batch)

    ids, labels = batch["input_ids"], batch["labels"]
    embeds = model.llm.embed(ids).clone()
    visual = model.encode_images(batch["images"])
    out_ce, out_n, reg_sq, reg_n = 0.0, 0, 0.0, 0
    image_index = 0
    tok = model.tokenizer
    v = tok.get_vocab()
    for b in range(ids.shape[0]):  # overwrite placeholders image by image, in order
        t = 0
        while t < ids.shape[1]:
            if ids[b, t] == v["[IMG]"]:
                embeds[b, t + 1 : t + 1 + q] = visual[image_index]
                image_index += 1
                t += q
            t += 1
    out = model.llm(embeds, batch["attention_mask"])
    for b in range(ids.shape[0]):
        n = int(batch["attention_mask"][b].sum())
        for t in range(n - 1):
            nxt = int(ids[b, t + 1])
            if nxt in (v["[IMG]"], v["<image>"], v["[/IMG]"]):
                assert labels[b, t + 1] == -100  # never a CE target
            else:
                out_ce += F.cross_entropy(out.logits[b, t], ids[b, t + 1], reduction="sum").item()
                out_n += 1
            if int(ids[b, t]) in (v["[IMG]"], v["<image>"]):
                # Target: the next position's input embedding (visual embedding, then [/IMG]'s embedding).
                pred = model.llm.regress(out.hidden[b, t])
                reg_sq += ((pred - embeds[b, t + 1]) ** 2).sum().item()
                reg_n += 1
    assert reg_n == 3 * (q + 1)  # Q + 1 targets per image
    assert losses["ce"].item() == pytest.approx(out_ce / out_n, rel=1e-5)
    assert losses["mse"].item() == pytest.approx(reg_sq / (reg_n * model.llm.hidden_size), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(losses["ce"].item() + losses["mse"].item(), rel=1e-6)


def test_regression_targets_are_detached(tiny_model):
    # With a zero regression head the predictions carry no gradient to the resampler, so any resampler
    # gradient from the MSE could only come through the targets, which must be detached.
    torch.nn.init.zeros_(tiny_model.llm.regression_head.weight)
    batch = tiny_model.sequencer([["x", img(0)]])
    mse = tiny_model.losses(batch)["mse"]
    assert mse.item() > 0.1
    mse.backward()
    grads = [p.grad for p in tiny_model.resampler.parameters()]
    assert all(g is None or g.abs().max() == 0 for g in grads)
    assert tiny_model.llm.regression_head.weight.grad.abs().max() > 0


def test_loss_weights_and_warmup():
    model = make_model(ce_weight=0.5, regression_weight=2.0)
    batch = model.sequencer([["y", img(3)]])
    losses = model.losses(batch)
    assert losses["loss"].item() == pytest.approx(0.5 * losses["ce"].item() + 2.0 * losses["mse"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss weights"):
        make_model(ce_weight=-1.0)


def test_new_token_rows_start_at_the_mean(tokenizer):
    llm = HFCausalLM(config={**TINY_LLM, "vocab_size": 300})
    old = llm.model.get_input_embeddings().weight.detach().clone()
    llm.resize_token_embeddings(300 + len(EMU_TOKENS))
    new = llm.model.get_input_embeddings().weight
    assert new.shape[0] == 305
    assert torch.allclose(new[300:], old.mean(0, keepdim=True).expand(5, -1))
    assert torch.equal(new[:300], old)


def test_width_mismatches_are_named():
    vision = TimmVisionBackbone(
        "vit_base_patch16_224", image_size=16, model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    )
    llm = HFCausalLM(config=TINY_LLM)
    with pytest.raises(ValueError, match="in_dim 48 does not match the vision backbone's out_dim 32"):
        EmuModel(vision, CausalTransformer(48, 32, 4, width=32, depth=1, num_heads=2), llm)
    with pytest.raises(ValueError, match="out_dim 64 does not match the language model's hidden size 32"):
        EmuModel(vision, CausalTransformer(32, 64, 4, width=32, depth=1, num_heads=2), llm)
    with pytest.raises(ValueError, match="MLPProjector was built for 17 tokens per image, not 5"):
        EmuModel(vision, MLPProjector(32, 32, num_tokens=17), llm)
    with pytest.raises(ValueError, match="smaller than the pooled grid"):
        EmuModel(vision, PooledProjector(32, 32, grid=4), llm)


def test_counts_come_from_the_components_they_meet():
    """An MLP projector's token count is the backbone's; a decoder built from a factory gets the resampler's width
    and number of embeddings (configs say neither)."""
    from functools import partial

    from emu_lightning.components.decoder import DiffusionDecoder

    vision = TimmVisionBackbone(
        "vit_base_patch16_224", image_size=16, model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    )
    mlp = partial(MLPProjector, num_prefix_tokens=1)
    decoder = partial(DiffusionDecoder, image_size=8, unet={"block_out_channels": (8, 16)}, condition_norm=True)
    llm, tokenizer = HFCausalLM(config=TINY_LLM), TrainedBPE(shapesworld.corpus)
    model = EmuModel(vision, mlp, llm, decoder=decoder, tokenizer=tokenizer)
    assert vision.num_tokens == 5 and model.resampler.num_tokens == 5 and model.resampler.num_queries == 4
    assert (model.decoder.cond_dim, model.decoder.num_queries) == (32, 4)
    assert model.decoder.condition_norm.mean.shape == (32 * 4,)  # per (embedding, dimension): num_queries is known
    with pytest.raises(ValueError, match="does not know its token count yet"):
        _ = MLPProjector(32, 32).num_queries


def test_unknown_component_names_are_rejected():
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['visoin'\]"):
        make_model(lr_multipliers={"visoin": 0.1})
    with pytest.raises(ValueError, match="no decoder"):
        make_model(frozen=["decoder"])


def test_lr_multipliers_and_frozen_components():
    model = make_model(
        lr_multipliers={"vision": 0.1},
        frozen=["resampler"],
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=0.01),
    )
    opt = model.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["vision"] == pytest.approx(0.001) and lrs["llm"] == pytest.approx(0.01)
    assert not any(n.startswith("resampler") for n in lrs)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if g["name"].endswith("_no_decay"))
    model.train()
    assert not model.resampler.training and model.vision.training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = model.sequencer([["a red circle.", img(0)], [img(1), "a blue square."]])
    model.losses(batch)["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and not any(n.startswith("resampler.") for n in changed)
    assert any(n.startswith("vision.") for n in changed)


def test_generation_greedy_matches_uncached_loop(tiny_model):
    model = tiny_model.eval()
    images = torch.stack([img(5), img(6)])
    texts = model.caption(images, max_new_tokens=6, min_new_tokens=6)
    # The same greedy decoding without any cache: a full forward pass per new token.
    batch = model.sequencer.with_options(padding_side="left", add_eos=False)([[images[0]], [images[1]]])
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["images"])
        mask = batch["attention_mask"]
        eos = model.tokenizer.eos_token_id
        new = []
        for _ in range(6):
            logits = model.llm(embeds, mask).logits[:, -1]
            logits[:, eos] = -float("inf")  # min_new_tokens
            nxt = logits.argmax(-1)
            new.append(nxt)
            embeds = torch.cat([embeds, model.llm.embed(nxt)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    expected = model.tokenizer.batch_decode(torch.stack(new, 1), skip_special_tokens=True)
    assert texts == [e.strip() for e in expected]


def test_beam_search_and_answer(tiny_model):
    images = torch.stack([img(7), img(8)])
    beams = tiny_model.caption(images, num_beams=3, max_new_tokens=5, length_penalty=-1.0)
    assert len(beams) == 2 and all(isinstance(t, str) for t in beams)
    answers = tiny_model.answer(images, ["what colour?", "how many?"], max_new_tokens=3)
    assert len(answers) == 2
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        tiny_model.answer(images, ["one?"])
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny_model.generate([])


def test_tokenizer_travels_with_the_checkpoint(tiny_model):
    ckpt: dict = {}
    tiny_model.on_save_checkpoint(ckpt)
    other = make_model()
    other.tokenizer = None
    other.on_load_checkpoint(ckpt)
    assert other.tokenizer.get_vocab() == tiny_model.tokenizer.get_vocab()
    assert other.sequencer.image_id == tiny_model.image_id


def test_a_model_needs_a_tokenizer():
    """No silent default: without a tokenizer folder or a TrainedBPE the model is not built."""
    expected = r"EmuModel needs a tokenizer .*TrainedBPE\(emu_lightning.shapesworld.corpus\)"
    with pytest.raises(ValueError, match=expected):
        make_model(tokenizer=None)


def test_a_trained_bpe_checkpoint_loads_with_its_tokenizer(tmp_path):
    """A model whose tokenizer is a TrainedBPE (built from the tiny config, as `emu-lightning fit` builds it) saves a
    checkpoint that `load_from_checkpoint` reads back (weights_only) with the same vocabulary, training nothing."""
    from pathlib import Path

    from emu_lightning import shapesworld
    from emu_lightning.cli import cli
    from emu_lightning.shapesworld import ShapesWorldDataModule
    from emu_lightning.tokenizer import TrainedBPE

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    run = cli(["--config", str(tiny), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
               "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false"], run=False)  # fmt: skip
    model = run.model
    assert model.tokenizer.get_vocab() == shapesworld.tokenizer().get_vocab()
    run.trainer.fit(model, ShapesWorldDataModule(batch_size=2, train_size=4, val_size=2))
    path = tmp_path / "final.ckpt"  # every run has it (FinalCheckpoint)
    assert torch.load(path, map_location="cpu", weights_only=True)["emu_tokenizer"]  # plain data only
    loaded = EmuModel.load_from_checkpoint(path, map_location="cpu")
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())

    # Built in Python: the TrainedBPE is not a hyper-parameter (the checkpoint holds the tokenizer itself)
    built = make_model()
    assert "tokenizer" not in built.hparams
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path / "python")  # fmt: skip
    trainer.fit(built, ShapesWorldDataModule(batch_size=2, train_size=4))
    (python,) = (tmp_path / "python").rglob("*.ckpt")
    fresh = make_model(tokenizer=TrainedBPE(shapesworld.corpus, vocab_size=300))  # another vocabulary
    again = EmuModel.load_from_checkpoint(python, map_location="cpu", vision=fresh.vision, resampler=fresh.resampler,
                                          llm=fresh.llm)  # fmt: skip
    assert again.tokenizer.get_vocab() == built.tokenizer.get_vocab() != fresh.tokenizer.get_vocab()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in built.state_dict().items())


def test_the_schedule_length_is_the_trainers(tmp_path):
    """`WarmupCosine` without `max_steps` decays to the trainer's max_steps: a config says the run's length once."""
    import functools

    import lightning as L

    from emu_lightning.schedules import WarmupCosine
    from emu_lightning.shapesworld import ShapesWorldDataModule

    model = make_model(scheduler=functools.partial(WarmupCosine, warmup_steps=2, min_ratio=0.0))
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, ShapesWorldDataModule(image_size=16, batch_size=2, train_size=16, val_size=2))
    (scheduler,) = trainer.lr_scheduler_configs
    assert scheduler.scheduler.max_steps == 6
    assert [round(scheduler.scheduler.factor(s), 3) for s in range(7)] == [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    with pytest.raises(ValueError, match="must be >= 1"):
        WarmupCosine(torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0)
