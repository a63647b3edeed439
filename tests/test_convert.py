"""`emu-lightning convert`: Emu's released weights in, the released layout back out.

The released files are written here, at tiny sizes, with the key names and shapes that the released model definitions
(``Emu1/models``: EVA-CLIP's ``EVAVisionTransformer``, ``ln_visual``, ``CausalFormer`` around transformers' T5 decoder,
``LLaMAForClsAndRegression`` around ``LlamaForCausalLM`` of the transformers release it used, which kept the rotary
``inv_freq`` buffers in the state dict; Emu-I wraps the LLaMA in peft's LoRA) give them, independently of the converter.
"""

import io
import json
import sys

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

from emu_lightning.cli import ConfigError, cli
from emu_lightning.convert import ConversionError, convert_released, main
from emu_lightning.model import EmuModel

W, DEPTH, MLP, PATCHES, CLIP_DIM = 32, 2, 64, 4, 24  # vision: width, blocks, MLP width, 2x2 patches, head rows
D, T5_HEADS, T5_LAYERS, FF, Q = 32, 2, 2, 64, 4  # Causal Transformer
L, LAYERS, HEADS, INTER = 64, 2, 4, 128  # LLaMA
LORA_R = 4


def released_state(vocab: int, instruct: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Emu state dict in the released layout (random values, the released names and shapes)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "visual.cls_token": (1, 1, W),
        "visual.pos_embed": (1, 1 + PATCHES, W),
        "visual.patch_embed.proj.weight": (W, 3, 14, 14),
        "visual.patch_embed.proj.bias": (W,),
    }
    for i in range(DEPTH):
        b = f"visual.blocks.{i}."
        shapes.update({
            b + "norm1.weight": (W,), b + "norm1.bias": (W,),
            b + "attn.q_bias": (W,), b + "attn.v_bias": (W,), b + "attn.qkv.weight": (3 * W, W),
            b + "attn.proj.weight": (W, W), b + "attn.proj.bias": (W,),
            b + "norm2.weight": (W,), b + "norm2.bias": (W,),
            b + "mlp.fc1.weight": (MLP, W), b + "mlp.fc1.bias": (MLP,),
            b + "mlp.fc2.weight": (W, MLP), b + "mlp.fc2.bias": (W,),
        })  # fmt: skip
    shapes.update({"visual.norm.weight": (W,), "visual.norm.bias": (W,), "visual.head.weight": (CLIP_DIM, W),
                   "visual.head.bias": (CLIP_DIM,), "ln_visual.weight": (W,), "ln_visual.bias": (W,)})  # fmt: skip
    c = "cformer.cformer."
    shapes.update({"cformer.causal_tokens": (1, Q, D), c + "embed_tokens.weight": (32128, D)})
    for i in range(T5_LAYERS):
        b = f"{c}block.{i}.layer."
        for p in "qkvo":
            shapes[f"{b}0.SelfAttention.{p}.weight"] = (D, D)
            shapes[f"{b}1.EncDecAttention.{p}.weight"] = (D, W) if p in "kv" else (D, D)  # keys, values read W wide
        if i == 0:
            shapes[f"{b}0.SelfAttention.relative_attention_bias.weight"] = (32, T5_HEADS)
        shapes.update({f"{b}0.layer_norm.weight": (D,), f"{b}1.layer_norm.weight": (D,),
                       f"{b}2.DenseReluDense.wi.weight": (FF, D), f"{b}2.DenseReluDense.wo.weight": (D, FF),
                       f"{b}2.layer_norm.weight": (D,)})  # fmt: skip
    shapes.update({c + "final_layer_norm.weight": (D,), "cformer.projection.weight": (L, D)})
    shapes["cformer.projection.bias"] = (L,)
    lm = "decoder.lm.base_model.model." if instruct else "decoder.lm."
    shapes[lm + "model.embed_tokens.weight"] = (vocab, L)
    for i in range(LAYERS):
        b = f"{lm}model.layers.{i}."
        for p in ("q", "k", "v", "o"):
            shapes[f"{b}self_attn.{p}_proj.weight"] = (L, L)
            if instruct:  # peft of the time: the adapted layer keeps its weight, adapters beside it
                shapes[f"{b}self_attn.{p}_proj.lora_A.default.weight"] = (LORA_R, L)
                shapes[f"{b}self_attn.{p}_proj.lora_B.default.weight"] = (L, LORA_R)
        shapes.update({f"{b}self_attn.rotary_emb.inv_freq": (L // HEADS // 2,), f"{b}mlp.gate_proj.weight": (INTER, L),
                       f"{b}mlp.up_proj.weight": (INTER, L), f"{b}mlp.down_proj.weight": (L, INTER),
                       f"{b}input_layernorm.weight": (L,), f"{b}post_attention_layernorm.weight": (L,)})  # fmt: skip
    shapes.update({lm + "model.norm.weight": (L,), lm + "lm_head.weight": (vocab, L)})
    shapes[lm + "stu_regress_head.weight"] = (L, L)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    head_dim = L // HEADS
    for k in state:
        if k.endswith("inv_freq"):
            state[k] = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released files: pretrained and instruct encoders, the generation pipeline folder, the LLaMA-style tokenizer,
    and the tiny model config to convert into."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("released")
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["a red circle in the top left.", "what colour is the square? blue.", "a small green triangle."] * 4
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(root / "llama")
    base = len(tok)
    torch.save({"module": released_state(base + 4)}, root / "Emu-pretrain.pt")  # DeepSpeed's nesting
    torch.save(released_state(base + 6, instruct=True, seed=1), root / "Emu-instruct.pt")
    pipeline = root / "pipeline"
    UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=4,
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=L,
                         attention_head_dim=4).save_pretrained(pipeline / "unet")  # fmt: skip
    AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(
        pipeline / "vae"
    )
    PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True).save_pretrained(pipeline / "scheduler")
    config = {
        "model": {
            "vision": {"class_path": "emu_lightning.components.vision.TimmVisionBackbone", "init_args": {
                "model_name": "eva_giant_patch14_clip_224", "image_size": 28,
                "model_kwargs": {"embed_dim": W, "depth": DEPTH, "num_heads": 2, "mlp_ratio": MLP / W}}},
            "resampler": {"class_path": "emu_lightning.components.resampler.CausalTransformer", "init_args": {
                "num_queries": Q, "width": D, "depth": T5_LAYERS, "num_heads": T5_HEADS,
                "ffn_dim": FF}},
            "llm": {"class_path": "emu_lightning.components.llm.HFCausalLM", "init_args": {"model_type": "llama",
                "config": {"vocab_size": base, "hidden_size": L, "intermediate_size": INTER,
                           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
                           "max_position_embeddings": 256}}},
            "decoder": {"class_path": "emu_lightning.components.decoder.DiffusionDecoder", "init_args": {
                "image_size": 8, "pretrained": "not/converted/yet", "sample_scheduler": "PNDMScheduler"}},
            "tokenizer": str(root / "llama"),
            "max_length": 128,
        },
        "data": {"class_path": "emu_lightning.shapesworld.ShapesWorldDataModule", "init_args": {
            "image_size": 28, "val_size": 4, "batch_size": 2, "num_workers": 0}},
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
                    "default_root_dir": str(root / "runs")},
    }  # fmt: skip
    (root / "emu-tiny.yaml").write_text(yaml.safe_dump(config))
    return root


def _convert(root, *args):
    assert main(["--config", str(root / "emu-tiny.yaml"), "--tokenizer", str(root / "llama"), *args]) == 0


def test_released_layout_converts_loads_strictly_and_exports_back_bit_exactly(released, tmp_path, capsys):
    out = tmp_path / "emu.ckpt"
    _convert(released, "--released", str(released / "Emu-pretrain.pt"), "--decoder", str(released / "pipeline"),
             "--out", str(out))  # fmt: skip
    # visual.norm and visual.head (2 + 2), T5's token embedding, 2 layers' rotary inv_freq
    assert "(7 unused released keys dropped)" in capsys.readouterr().out
    source = torch.load(released / "Emu-pretrain.pt", weights_only=True)["module"]
    model = EmuModel.load_from_checkpoint(out, map_location="cpu")  # strict
    vocab = len(model.tokenizer)
    assert model.llm.vocab_size == vocab and model.tokenizer.convert_tokens_to_ids("<image>") == vocab - 1
    assert torch.equal(model.vision.model.blocks[1].attn.qkv.weight, source["visual.blocks.1.attn.qkv.weight"])
    assert torch.equal(model.resampler.queries, source["cformer.causal_tokens"])
    cross_k = model.resampler.stack.block[0].layer[1].EncDecAttention.k.weight
    assert torch.equal(cross_k, source["cformer.cformer.block.0.layer.1.EncDecAttention.k.weight"])
    assert torch.equal(model.llm.regression_head.weight, source["decoder.lm.stu_regress_head.weight"])
    unet = UNet2DConditionModel.from_pretrained(released / "pipeline" / "unet")
    assert all(torch.equal(a, b) for a, b in zip(model.decoder.unet.state_dict().values(), unet.state_dict().values()))

    export = tmp_path / "exported"
    assert main(["--export", str(out), "--out", str(export), "--clip-embed-dim", str(CLIP_DIM)]) == 0
    back = torch.load(export / "multimodal_encoder" / "pytorch_model.bin", weights_only=True)
    assert sorted(back) == sorted(source)  # every released key, the unused ones included: strict loading works
    unused = ("visual.norm.", "visual.head.", "cformer.cformer.embed_tokens.")
    for key, tensor in source.items():
        assert back[key].shape == tensor.shape, key
        if not key.startswith(unused):
            assert torch.equal(back[key], tensor), key  # bit-exact, the rotary inv_freq recomputed included
    again = UNet2DConditionModel.from_pretrained(export / "unet")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), unet.state_dict().values()))
    assert PNDMScheduler.from_pretrained(export / "scheduler").config.skip_prk_steps
    assert (export / "vae" / "config.json").is_file() and (export / "tokenizer" / "tokenizer.json").is_file()


def test_emu_i_converts_with_its_lora_and_chats(released, tmp_path, monkeypatch, capsys):
    out = tmp_path / "emu-i.ckpt"
    _convert(released, "--released", str(released / "Emu-instruct.pt"), "--out", str(out))
    assert "LoRA r=4 on ['k_proj', 'o_proj', 'q_proj', 'v_proj']" in capsys.readouterr().out
    source = torch.load(released / "Emu-instruct.pt", weights_only=True)
    model = EmuModel.load_from_checkpoint(out, map_location="cpu")
    assert model.stage == "instruct" and model.llm.has_lora and model.decoder is None
    assert model.tokenizer.convert_tokens_to_ids(["[USER]", "[ASSISTANT]"]) == [len(model.tokenizer) - 2,
                                                                               len(model.tokenizer) - 1]  # fmt: skip
    q = model.llm.model.model.layers[1].self_attn.q_proj
    prefix = "decoder.lm.base_model.model.model.layers.1.self_attn.q_proj."
    assert torch.equal(q.base_layer.weight, source[prefix + "weight"])
    assert torch.equal(q.lora_B["default"].weight, source[prefix + "lora_B.default.weight"])
    assert model.llm.lora.alpha == 16.0  # Emu-I's, which the weights do not store

    export = tmp_path / "exported"
    assert main(["--export", str(out), "--out", str(export), "--clip-embed-dim", str(CLIP_DIM)]) == 0
    back = torch.load(export / "multimodal_encoder" / "pytorch_model.bin", weights_only=True)
    assert sorted(back) == sorted(source)
    unused = ("visual.norm", "visual.head", "cformer.cformer.embed")
    assert all(torch.equal(back[k], v) for k, v in source.items() if not k.startswith(unused))

    from emu_lightning.chat import main as chat

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([{"role": "user", "content": "what colour is it?"}])))
    assert chat(["--ckpt", str(out), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("user: what colour") and lines[1].startswith("assistant:")


def test_validate_runs_on_a_converted_checkpoint_without_the_original_files(released, tmp_path, capsys):
    """`validate --ckpt_path` takes the weights and the tokenizer from the checkpoint: the config's tokenizer folder and
    decoder folder are not read (here they do not exist)."""
    out = tmp_path / "emu.ckpt"
    _convert(released, "--released", str(released / "Emu-pretrain.pt"), "--decoder", str(released / "pipeline"),
             "--out", str(out))  # fmt: skip
    run = cli(["validate", "--config", str(released / "emu-tiny.yaml"), "--model.tokenizer", "gone/llama",
               "--ckpt_path", str(out), "--trainer.limit_val_batches", "1"], run=True)  # fmt: skip
    assert run.model.tokenizer is not None and torch.isfinite(run.trainer.callback_metrics["val/ce"])
    emu_i = tmp_path / "emu-i.ckpt"  # Emu-I has no decoder: an error that says how to drop the config's
    _convert(released, "--released", str(released / "Emu-instruct.pt"), "--out", str(emu_i))
    validate = ["validate", "--config", str(released / "emu-tiny.yaml"), "--ckpt_path", str(emu_i)]
    with pytest.raises(ConfigError) as err:  # Emu-I has LoRA and no decoder: the error names both
        cli(validate)
    assert "model.decoder: None in the checkpoint, 'DiffusionDecoder' here" in str(err.value)
    assert "model.llm.init_args.lora: {'r': 4," in str(err.value) and "in the checkpoint, None here" in str(err.value)
    assert "--model.decoder null drops the config's decoder" in str(err.value)
    lora = '{"r": 4, "alpha": 16.0, "dropout": 0.05, "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"]}'
    overlay = ["--model.stage", "instruct", "--model.decoder", "null", "--model.llm.init_args.lora", lora]
    run = cli([*validate, *overlay, "--trainer.limit_val_batches", "1"])
    assert run.model.llm.has_lora and torch.isfinite(run.trainer.callback_metrics["val/ce"])


def test_a_missing_or_extra_key_is_an_error_that_names_it(released, tmp_path):
    state = released_state(len(_base_tokenizer(released)) + 4)
    del state["ln_visual.bias"]
    state["cformer.cformer.block.0.layer.3.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"cformer\.cformer\.block\.0\.layer\.3\.extra\.weight"):
        convert_released(tmp_path / "bad.pt", released / "emu-tiny.yaml", tmp_path / "x.ckpt",
                         tokenizer=released / "llama")  # fmt: skip
    del state["cformer.cformer.block.0.layer.3.extra.weight"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"missing from released bad\.pt: ln_visual\.bias \(vision\.ln\.bias\)"):
        convert_released(tmp_path / "bad.pt", released / "emu-tiny.yaml", tmp_path / "x.ckpt",
                         tokenizer=released / "llama")  # fmt: skip
    state["ln_visual.bias"] = torch.zeros(W + 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"ln_visual\.bias: \(33,\) in released bad\.pt, \(32,\) in the model"):
        convert_released(tmp_path / "bad.pt", released / "emu-tiny.yaml", tmp_path / "x.ckpt",
                         tokenizer=released / "llama")  # fmt: skip
    assert not (tmp_path / "x.ckpt").exists()


def _base_tokenizer(root):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "llama")


def test_the_command_lists_convert(monkeypatch, capsys):
    from emu_lightning.cli import main as command

    monkeypatch.setattr(sys, "argv", ["emu-lightning", "--help"])
    with pytest.raises(SystemExit) as exit_:
        command()
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "convert" in out and "chat" in out and "fit" in out


def test_training_starts_from_a_converted_checkpoint_without_the_original_files(released, tmp_path):
    """`--model.init_checkpoint` copies the converted weights in; the tokenizer and decoder folders the config names
    (missing here) are not read, and the decoder is built from the checkpoint's description of it."""
    out = tmp_path / "emu.ckpt"
    _convert(released, "--released", str(released / "Emu-pretrain.pt"), "--decoder", str(released / "pipeline"),
             "--out", str(out))  # fmt: skip
    source = torch.load(released / "Emu-pretrain.pt", weights_only=True)["module"]
    run = cli(["fit", "--config", str(released / "emu-tiny.yaml"), "--model.tokenizer", "gone/llama",
               "--model.init_checkpoint", str(out), "--model.frozen", "[vision]", "--trainer.max_steps", "1",
               "--trainer.limit_val_batches", "0"])  # fmt: skip
    assert run.trainer.global_step == 1 and run.model.decoder.unet.config.cross_attention_dim == L
    assert torch.equal(run.model.vision.model.blocks[0].attn.qkv.weight, source["visual.blocks.0.attn.qkv.weight"])
    assert len(run.model.tokenizer) == len(_base_tokenizer(released)) + 4
