import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emu_lightning.inspect import build, count, main
from emu_lightning.memory import (
    ModelFacts,
    cross_layer_bytes,
    describe,
    llama_layer_bytes,
    plan_memory,
    vit_layer_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
EMU_14B = str(ROOT / "configs" / "emu-14b.yaml")
PERCEIVER = str(ROOT / "configs" / "ablations" / "resampler-perceiver.yaml")


def test_emu_14b_through_the_command_line():
    # The weight and tokenizer paths of this config do not exist: nothing may be read on meta.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "emu_lightning.inspect", "--config", EMU_14B, "--devices", "4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout holds exactly one JSON object
    total = report["total_params"]
    print(f"emu-14b total_params: {total:,}")
    assert set(report["components"]) == {"vision", "resampler", "llm", "decoder"}
    # the released model's counts: EVA-CLIP g/14 without its head, and the T5 Causal Transformer without T5's
    # unused token embedding
    assert report["components"]["vision"]["total"] == 1_011_146_112
    assert report["components"]["resampler"]["total"] == 129_033_344
    assert report["components"]["llm"]["total"] == 13_042_119_680  # LLaMA-13B, 32,004 rows, the regression head
    # Stable Diffusion 1.5 (its folder is absent: counted from its config): the UNet's 859,520,964 with every
    # cross-attention's keys and values reading 5120 wide instead of 768 (16 layers, inner widths summing to 12,480:
    # 2 x 12,480 x 4,352 more), and the frozen VAE's 83,653,863
    unet, vae = 859_520_964 + 2 * 12_480 * (5120 - 768), 83_653_863
    assert report["components"]["decoder"] == {
        "class": "emu_lightning.components.decoder.DiffusionDecoder",
        "total": unet + vae,
        "trainable": unet,
    }
    assert sum(c["total"] for c in report["components"].values()) == total == 15_234_099_883
    trainable = total - vae
    assert report["trainable_params"] == trainable  # only the VAE is frozen in this config

    memory = report["memory"]
    assert memory["devices"] == 4  # --devices beats trainer.devices (8)
    assert memory["precision"] == "bf16-mixed"  # trainer.precision
    assert memory["batch"] == 16 + 16 + 8 + 2 + 2  # the mixture's batch_sizes, summed
    assert memory["seq_lens"] == [1024] and memory["images"] == 44  # max_length; one image per sequence
    assert memory["optimizer"] == "AdamW (foreach)"  # torch's default for CUDA parameters (accelerator: gpu)
    assert memory["checkpointed_as_configured"] == ["llm"]  # llm.gradient_checkpointing
    assert memory["gradient_path"] == ["vision", "resampler", "llm"]
    # The wrapped blocks, by hand. LLaMA-13B's decoder layer: q, k, v, o, SwiGLU and two RMSNorms. EVA-CLIP g/14's
    # block: qkv without bias but q and v biases, proj, a 6144-wide MLP, two LayerNorms. The released Causal
    # Transformer's T5 block: self-attention, a cross-attention whose k and v read 1408 wide, the ReLU MLP, three
    # RMS norms, no biases; only the first block holds the 32 x 12 relative position bias.
    llama = 4 * 5120 * 5120 + 3 * 5120 * 13824 + 2 * 5120
    eva = 1408 * 4224 + 2 * 1408 + (1408 * 1408 + 1408) + (1408 * 6144 + 6144) + (6144 * 1408 + 1408) + 4 * 1408
    t5 = 4 * 768 * 768 + 2 * 768 * 768 + 2 * 1408 * 768 + 2 * 768 * 3072 + 3 * 768
    assert (llama, eva, t5) == (317_204_480, 25_248_768, 10_422_528)
    blocks = {b["class"]: (b["component"], b["count"], b["params"]) for b in memory["units"]["blocks"]}
    assert blocks == {
        "EvaBlock": ("vision", 40, eva),
        "T5Block": ("resampler", 12, t5 + 32 * 12),
        "LlamaDecoderLayer": ("llm", 40, llama),
    }
    root = total - 40 * llama - 40 * eva - 12 * t5 - 32 * 12
    assert memory["units"]["root_params"] == root == 1_410_899_243  # embeddings, heads, the decoder, ...

    # bf16-mixed: fp32 weights (no second master copy), fp32 gradients (twice under DDP: its buckets), two fp32
    # AdamW moments, foreach's one more fp32 copy in the step
    ddp, fsdp = memory["ddp"], memory["fsdp"]
    assert ddp["weights_bytes"] == 4 * total and ddp["master_weights_bytes"] == 0
    assert ddp["grads_bytes"] == ddp["grad_buckets_bytes"] == ddp["optimizer_step_bytes"] == 4 * trainable
    assert ddp["optimizer_bytes"] == 8 * trainable
    assert ddp["states_bytes"] == 4 * total + 8 * trainable + 4 * trainable
    assert (fsdp["weights_bytes"], fsdp["grads_bytes"], fsdp["optimizer_bytes"]) == (total, trainable, 2 * trainable)
    assert fsdp["gathered_root_bytes"] == 2 * 2 * root  # bf16 weights and their unsharded gradient
    assert fsdp["gathered_block_bytes"] == 2 * 3 * llama  # the block, the prefetched one, its gradient
    # One LLaMA-13B layer under DDP's autocast, per token: two RMSNorms (fp32 input, 1/rms, fp32 normalised)
    # 2 x (4 x 5121 + 4 x 5120) = 81,928; five bf16 casts of their outputs 5 x 2 x 5120 = 51,200; q, k, v
    # 3 x 2 x 5120 = 30,720; attention output 2 x 5120 and 40 fp32 log-sum-exps: 10,400; SwiGLU 4 x 2 x 13824 = 110,592
    per_token = 81_928 + 51_200 + 30_720 + 10_400 + 110_592
    tokens = 1024 * 44
    (step,) = ddp["per_seq_len"]
    assert step["seq_len"] == 1024
    assert step["activations"]["llm"] == 40 * tokens * per_token
    # checkpointed: each of the 40 layers keeps its fp32 input, one layer's activations at a time
    assert step["activations_checkpointed"]["llm"] == 40 * tokens * 4 * 5120 + tokens * per_token
    assert step["activations_as_configured_bytes"] == step["activations"]["bytes"] - (
        step["activations"]["llm"] - step["activations_checkpointed"]["llm"]
    )
    assert step["peak_as_configured_bytes"] == (
        ddp["states_bytes"]
        + ddp["grads_bytes"]
        + step["activations_as_configured_bytes"]
        + ddp["autocast_copies_bytes"]
    )
    assert fsdp["per_seq_len"][0]["peak_as_configured_gib"] < step["peak_as_configured_gib"]


def test_tiny_meta_count_equals_real_model():
    meta, config = build(["--config", TINY], device="meta")
    assert all(p.is_meta for p in meta.parameters())
    real, _ = build(["--config", TINY], device="cpu")
    assert all(p.device.type == "cpu" for p in real.parameters())
    assert count(meta) == count(real)
    assert count(meta)["total_params"] == sum(p.numel() for p in real.parameters())
    assert describe(meta) == describe(real)
    assert config["trainer.devices"] == 1


# tiny.yaml's parameters, by hand. LLM (LLaMA, width 128, SwiGLU 384, 3 layers, 512 rows): a layer is
# 4 x 128^2 + 3 x 128 x 384 + 2 x 128 = 213,248; embeddings and LM head 2 x 512 x 128, final norm 128, regression
# head 128^2. Vision (ViT, width 128, MLP 512, 3 blocks, 8-px patches of 32-px images: 16 patches and a class
# token): a block is LayerNorms 2 x 256, qkv 128 x 384 + 384, proj 128^2 + 128, fc1 128 x 512 + 512, fc2 512 x 128
# + 128 = 198,272; patch embedding 3 x 8 x 8 x 128 + 128, class token 128, positions 17 x 128, the output LayerNorm
# 256. Resampler (pre-norm Causal Transformer, width 128, 2 layers, Q = 8): a layer is 3 LayerNorms 3 x 256, two
# attentions of q (128^2 + 128), kv (128 x 256 + 256) and proj (128^2 + 128), the MLP 66,048 + 65,664 = 264,576;
# queries 8 x 128, the visual tokens' LayerNorm and projection 256 + 128^2 + 128, final norm 256, head 128^2 + 128.
LLAMA_LAYER, VIT_BLOCK, RESAMPLER_LAYER = 213_248, 198_272, 264_576
TINY_LLM = 2 * 512 * 128 + 3 * LLAMA_LAYER + 128 + 128 * 128
TINY_VISION = 3 * 8 * 8 * 128 + 128 + 128 + 17 * 128 + 3 * VIT_BLOCK + 256
TINY_RESAMPLER = 8 * 128 + (256 + 128 * 128 + 128) + 2 * RESAMPLER_LAYER + 256 + (128 * 128 + 128)
TINY_TOTAL = TINY_LLM + TINY_VISION + TINY_RESAMPLER
# Linear/conv parameters of the three (autocast casts them): all but embeddings, norms, tokens and positions
TINY_MATMUL = (
    (3 * 8 * 8 * 128 + 128) + 3 * (VIT_BLOCK - 4 * 128)  # patch embedding, blocks without their LayerNorms
    + (128 * 128 + 128) + 2 * (RESAMPLER_LAYER - 6 * 128) + (128 * 128 + 128)  # projection, layers, head
    + 3 * (LLAMA_LAYER - 2 * 128) + 512 * 128 + 128 * 128  # layers without their norms, LM head, regression head
)  # fmt: skip


def test_tiny_plan_by_hand(capsys):
    report = main(
        [
            "--config",
            TINY,
            "--devices",
            "2",
            "--seq-len",
            "64",
            "--batch",
            "2",
            "--images",
            "3",
            "--precision",
            "bf16-mixed",
        ]  # fmt: skip
    )
    capsys.readouterr()
    assert report["total_params"] == report["trainable_params"] == TINY_TOTAL == 1_973_120
    memory = report["memory"]
    assert (memory["precision"], memory["devices"], memory["seq_lens"], memory["batch"], memory["images"]) == (
        "bf16-mixed", 2, [64], 2, 3
    )  # fmt: skip
    assert memory["optimizer"] == "AdamW (fused)"  # tiny.yaml's
    units = memory["units"]
    assert [(b["class"], b["count"], b["params"], b["kind"]) for b in units["blocks"]] == [
        ("Block", 3, VIT_BLOCK, "vit"),
        ("CausalTransformerLayer", 2, RESAMPLER_LAYER, "cross"),
        ("LlamaDecoderLayer", 3, LLAMA_LAYER, "llama"),
    ]
    root = TINY_TOTAL - 3 * LLAMA_LAYER - 3 * VIT_BLOCK - 2 * RESAMPLER_LAYER
    assert units["root_params"] == root == 209_408
    assert units["autocast_params"] == TINY_MATMUL == 1_899_520

    p = TINY_TOTAL
    ddp = memory["ddp"]
    assert (ddp["weights_bytes"], ddp["master_weights_bytes"], ddp["grads_bytes"], ddp["grad_buckets_bytes"]) == (
        4 * p, 0, 4 * p, 4 * p
    )  # fmt: skip
    assert (ddp["optimizer_bytes"], ddp["optimizer_step_bytes"]) == (8 * p, 0)  # fused: no temporaries
    assert ddp["autocast_copies_bytes"] == 2 * TINY_MATMUL == 3_799_040
    assert ddp["states_bytes"] == 16 * p == 31_569_920
    # Activations under DDP's autocast: r = 4 (fp32 residual), c = 2, 64 x 2 = 128 tokens, 3 images of 17 tokens.
    # LLaMA layer per token: norms 2 x (4 x 129 + 4 x 128) = 2056, five casts 5 x 2 x 128 = 1280, q/k/v 2 x 384 = 768,
    # attention output 2 x 128 + 4 x 4 = 272, SwiGLU 4 x 2 x 384 = 3072: 7448
    (step,) = ddp["per_seq_len"]
    assert step["activations"]["llm"] == 3 * 128 * 7448 == 2_860_032
    # outside the layers, per token: rotary 2 x 32 x 4 = 256, final norm 4 x 129 + 4 x 128 = 1028, LM head input
    # 2 x 128 = 256, the loss 12 x 512 = 6144: 7684
    assert step["activations"]["llm_head"] == 128 * 7684 == 983_552
    # ViT block per token: LayerNorms 2 x (4 x 128 + 8) = 1040, 2 x (6 x 128 + 2 x 512) = 3584, 4 x 4 = 16: 4640
    assert step["activations"]["vision"] == 3 * 51 * 4640 == 709_920
    # resampler layer per image: 8 queries x (4640 + cross-attention norm 4 x 128 + 8, 3 x 2 x 128, a second cast
    # 2 x 128, 16 = 6200) + keys and values of 17 visual tokens 2 x 17 x 2 x 128 = 8704: 58,304
    assert step["activations"]["resampler"] == 2 * 3 * 58_304 == 349_824
    full = 2_860_032 + 983_552 + 709_920 + 349_824
    assert step["activations"]["bytes"] == full
    # checkpointed: every block keeps its fp32 input (4 x 128 per token), plus one block's full activations
    assert step["activations_checkpointed"] == {
        "vision": 3 * 51 * 512 + 51 * 4640,
        "resampler": 2 * 3 * 8 * 512 + 3 * 58_304,
        "llm": 3 * 128 * 512 + 128 * 7448,
        "llm_head": 983_552,
        "bytes": 78_336 + 236_640 + 24_576 + 174_912 + 196_608 + 953_344 + 983_552,
    }
    # peak: the previous step's gradients are still held when the forward ends (Lightning zeroes them later)
    assert step["peak_bytes"] == 16 * p + 4 * p + full + 3_799_040 == 48_164_768
    assert step["peak_as_configured_bytes"] == step["peak_bytes"]  # tiny.yaml checkpoints nothing

    fsdp = memory["fsdp"]
    assert (fsdp["weights_bytes"], fsdp["grads_bytes"], fsdp["optimizer_bytes"]) == (2 * p, 2 * p, 4 * p)
    assert fsdp["grad_buckets_bytes"] == 0
    # gathered in bf16: the root unit and its gradient, the largest block (a resampler layer) three times
    assert fsdp["gathered_root_bytes"] == 2 * 2 * root and fsdp["gathered_block_bytes"] == 2 * 3 * RESAMPLER_LAYER
    # FSDP: the gathered weights are bf16, so r = c = 2 and no casts. LLaMA layer per token: norms
    # 2 x (4 x 129 + 2 x 128) = 1544, inputs 2 x 2 x 128 = 512, q/k/v 768, attention 272, SwiGLU 3072: 6168.
    # Outside: rotary 2 x 32 x 2 = 128, final norm 516 + 256, LM head input 256, loss 6144: 7300. ViT: 4640 as
    # under DDP (autocast's LayerNorms save fp32 whatever the residual's dtype). Resampler: no second cast,
    # 8 x (4640 + 520 + 768 + 16) + 8704 = 56,256.
    (fstep,) = fsdp["per_seq_len"]
    assert fstep["activations"] == {
        "vision": 3 * 51 * 4640,
        "resampler": 2 * 3 * 56_256,
        "llm": 3 * 128 * 6168,
        "llm_head": 128 * 7300,
        "bytes": 709_920 + 337_536 + 2_368_512 + 934_400,
    }
    gathered = 2 * 2 * root + 2 * 3 * RESAMPLER_LAYER
    assert fstep["peak_bytes"] == 2 * p + 4 * p + 2 * p + 4_350_368 + gathered  # weights, AdamW, gradients


def test_tiny_defaults_come_from_the_config(capsys):
    report = main(["--config", TINY])
    checkpointed = main(["--config", TINY, "--model.llm.init_args.gradient_checkpointing", "true"])
    capsys.readouterr()
    memory = report["memory"]
    assert memory["precision"] == "32-true"  # tiny.yaml sets none: Lightning's default
    assert memory["devices"] == 1  # trainer.devices
    assert memory["seq_lens"] == [192]  # model.max_length
    assert memory["batch"] == memory["images"] == 5 + 3 + 1 + 1 + 1 + 4  # the mixture's batch_sizes
    assert memory["checkpointed_as_configured"] == [] and checkpointed["memory"]["checkpointed_as_configured"] == [
        "llm"
    ]
    step = checkpointed["memory"]["ddp"]["per_seq_len"][0]
    ckpt, full = step["activations_checkpointed"], step["activations"]
    assert step["activations_as_configured_bytes"] == full["bytes"] - full["llm"] + ckpt["llm"]
    # 32-true: every byte count is 4 per element
    ddp = memory["ddp"]
    assert ddp["weights_bytes"] == 4 * TINY_TOTAL and ddp["autocast_copies_bytes"] == 0


def test_memory_arithmetic():
    """The plan's arithmetic on a made-up model without blocks: 10 parameters, 4 trainable (the largest 3)."""

    def plan(precision: str, optimizer: str = "fused", amsgrad: bool = False, devices: int = 3) -> dict:
        facts = ModelFacts(
            total_params=10,
            trainable_params=4,
            stacks=(),
            root_params=10,
            root_trainable=4,
            autocast_params=6,
            largest_trainable_param=3,
            grad_path=(),
            max_length=8,
            optimizer=optimizer,
            amsgrad=amsgrad,
        )
        return plan_memory(facts, precision, devices=devices)

    memory = plan("32-true")
    ddp, fsdp = memory["ddp"], memory["fsdp"]
    assert (ddp["weights_bytes"], ddp["grads_bytes"], ddp["grad_buckets_bytes"], ddp["optimizer_bytes"]) == (
        40, 16, 16, 32
    )  # fmt: skip
    assert ddp["states_bytes"] == 40 + 32 + 16 and ddp["per_seq_len"][0]["peak_bytes"] == 88 + 16
    assert memory["seq_lens"] == [8] and ddp["per_seq_len"][0]["activations"] == {"bytes": 0}
    # sharded over 3, rounded up: 40 / 3, 16 / 3, 32 / 3; the root unit (everything) gathered with its gradient
    assert (fsdp["weights_bytes"], fsdp["grads_bytes"], fsdp["optimizer_bytes"]) == (14, 6, 11)
    assert fsdp["gathered_bytes"] == fsdp["gathered_root_bytes"] == 4 * 10 * 2
    assert fsdp["per_seq_len"][0]["peak_bytes"] == 14 + 11 + 6 + 80
    # bf16-true: bf16 weights, gradients and moments; foreach's temporary: one more bf16 copy of the trainable ones
    ddp = plan("bf16-true", "foreach")["ddp"]
    assert (ddp["weights_bytes"], ddp["grads_bytes"], ddp["optimizer_bytes"], ddp["optimizer_step_bytes"]) == (
        20, 8, 16, 8
    )  # fmt: skip
    assert ddp["per_seq_len"][0]["peak_bytes"] == 20 + 16 + 8 + 8 + 8
    # bf16-mixed: fp32 weights, bf16 copies of the 6 matmul parameters; the for-loop's two copies of the largest
    ddp = plan("bf16-mixed", "for-loop")["ddp"]
    assert (ddp["weights_bytes"], ddp["autocast_copies_bytes"], ddp["optimizer_step_bytes"]) == (40, 12, 24)
    assert ddp["per_seq_len"][0]["peak_bytes"] == 40 + 32 + 16 + 16 + max(12, 24)
    assert plan("16-mixed", amsgrad=True)["ddp"]["optimizer_bytes"] == 3 * 4 * 4  # amsgrad's third moment
    assert plan("32-true", devices=1)["fsdp"]["weights_bytes"] == 40
    with pytest.raises(ValueError, match="not planned"):
        plan("64-true")
    with pytest.raises(ValueError):
        plan_memory(ModelFacts(10, 11, (), 10, 11, 0, 1, ()), "32-true")


# ------------------------------------------------------------------------------------------------------------------
# The activation formulas against what autograd saves (saved_tensors_hooks), per token, on CPU. Modes: (weights'
# dtype, autocast, r, c, casts): DDP holds fp32 weights; FSDP gathers bf16 ones under the mixed precisions.
MODES = {
    "32-true": (torch.float32, False, 4, 4, False),
    "ddp-bf16-mixed": (torch.float32, True, 4, 2, True),
    "fsdp-bf16-mixed": (torch.bfloat16, True, 2, 2, False),
    "bf16-true": (torch.bfloat16, False, 2, 2, False),
}


def _saved_bytes(run, exclude) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` builds its graph, without those of ``exclude``
    (parameters: they are held anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage  # held: no address is reused while counting
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(s.nbytes() for s in seen.values())


def _per_token(module, make_inputs, autocast: bool, tokens: int) -> float:
    """Saved bytes per token: the difference between 3 and 1 sequences of ``tokens`` tokens (autocast's cached
    weight copies, the same for both, cancel)."""

    def at(batch: int) -> int:
        inputs, exclude = make_inputs(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            return _saved_bytes(lambda: module(*inputs[:1], **inputs[1]), [*module.parameters(), *exclude])

    return (at(3) - at(1)) / (2 * tokens)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_layer_formula_matches_saved_tensors(mode, kv_heads):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    dtype, autocast, r, c, casts = MODES[mode]
    h, i, heads, s = 64, 160, 4, 16
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=heads, num_key_value_heads=kv_heads)
    config._attn_implementation = "sdpa"
    layer, rotary = LlamaDecoderLayer(config, 0).to(dtype), LlamaRotaryEmbedding(config)

    def inputs(batch):
        x = torch.randn(batch, s, h, dtype=dtype, requires_grad=True)
        positions = torch.arange(s)[None].expand(batch, s)
        with torch.no_grad():
            cos_sin = rotary(x, positions)
        return (x, {"position_embeddings": cos_sin, "position_ids": positions}), []

    measured = _per_token(layer, inputs, autocast, s)
    # a single layer also saves the rotary cos/sin, which the plan counts once per token for the whole LLM
    assert measured == llama_layer_bytes(h, i, heads, kv_heads, r, c, casts) + 2 * (h // heads) * r


@pytest.mark.parametrize("mode", [m for m in MODES if m != "fsdp-bf16-mixed"])  # see below
def test_vit_and_resampler_formulas_match_saved_tensors(mode):
    """CPU's autocast leaves layer_norm on a bf16 input in bf16, where CUDA's (which the plan follows) runs it in
    fp32: the two differ for FSDP's bf16 residual stream, and only there."""
    import timm

    from emu_lightning.components.resampler import CausalTransformerLayer

    dtype, autocast, r, c, casts = MODES[mode]
    h, heads, tokens, queries = 64, 4, 17, 8
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, embed_dim=h, depth=1,
        num_heads=heads,
    ).blocks[0].to(dtype)  # fmt: skip

    def vit_inputs(batch):
        return (torch.randn(batch, tokens, h, dtype=dtype, requires_grad=True), {}), []

    assert _per_token(vit, vit_inputs, autocast, tokens) == vit_layer_bytes(h, 4 * h, heads, r, c, autocast)

    layer = CausalTransformerLayer(h, heads, 4.0).to(dtype)

    def layer_inputs(batch):
        x = torch.randn(batch, queries, h, dtype=dtype, requires_grad=True)
        # the visual tokens, as the resampler's projection hands them over (in c under autocast); shared by every
        # layer, they are not part of a layer's count
        context = torch.randn(batch, tokens, h, dtype=torch.bfloat16 if c == 2 else torch.float32)
        return (x, {"context": context.requires_grad_()}), [context]

    per_image = _per_token(layer, layer_inputs, autocast, 1)
    assert per_image == cross_layer_bytes(h, 4 * h, heads, r, c, autocast, casts, queries, tokens, eager=False)


def test_ablation_stack_swaps_the_resampler(capsys):
    tiny = main(["--config", TINY])
    stacked = main(["--config", TINY, "--config", PERCEIVER, "--devices", "2"])
    out = capsys.readouterr().out
    first, end = json.JSONDecoder().raw_decode(out)  # each call prints its report as one JSON object
    assert (first, json.loads(out[end:])) == (tiny, stacked)
    resampler = stacked["components"]["resampler"]
    assert resampler["class"] == "emu_lightning.components.resampler.PerceiverResampler"
    assert tiny["components"]["resampler"]["class"] == "emu_lightning.components.resampler.PreNormCausalTransformer"
    assert resampler["total"] != tiny["components"]["resampler"]["total"]
    for name in ("vision", "llm"):  # the rest of tiny.yaml is untouched
        assert stacked["components"][name] == tiny["components"][name]
    assert (tiny["memory"]["devices"], stacked["memory"]["devices"]) == (1, 2)
    blocks = {b["component"]: b["class"] for b in stacked["memory"]["units"]["blocks"]}
    assert blocks["resampler"] == "PerceiverLayer"


def test_overrides_and_missing_config(capsys):
    frozen = main(["--config", TINY, "--model.frozen", "[vision]"])
    vision = frozen["components"]["vision"]
    assert vision["trainable"] == 0 < vision["total"]
    assert frozen["trainable_params"] == frozen["total_params"] - vision["total"]
    memory = frozen["memory"]
    # the frozen tower is first in line: it saves nothing for the backward, has no gradient and no AdamW state
    assert memory["gradient_path"] == ["resampler", "llm"]
    assert "vision" not in memory["ddp"]["per_seq_len"][0]["activations"]
    assert memory["ddp"]["optimizer_bytes"] == 8 * frozen["trainable_params"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(["--config", TINY, "--config", "configs/does-not-exist.yaml"])
    assert err.value.code == 2
    assert "configs/does-not-exist.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["--config", TINY, "--precision", "64-true"])
    assert err.value.code == 2
    assert "not planned" in capsys.readouterr().err


def test_emu_i_overlay_counts_the_released_emu_i(capsys):
    """configs/emu-i.yaml on top of the 14B config: [USER] and [ASSISTANT] add two rows to LLaMA's embedding and LM
    head, the released LoRA (r 16 on q/k/v/o, 40 layers) adds 40 x 4 x 16 x (5120 + 5120) trainable parameters, the
    decoder is gone, and only the adapters train."""
    report = main(["--config", EMU_14B, "--config", str(ROOT / "configs" / "emu-i.yaml")])
    capsys.readouterr()
    llm = report["components"]["llm"]
    lora = 40 * 4 * 16 * (5120 + 5120)
    assert set(report["components"]) == {"vision", "resampler", "llm"}
    assert llm["total"] == 13_042_119_680 + 2 * 2 * 5120 + lora and llm["trainable"] == lora == 26_214_400
    assert report["trainable_params"] == lora
    memory = report["memory"]
    assert memory["gradient_path"] == ["llm"]  # vision and resampler frozen: they save nothing
    ddp = memory["ddp"]
    assert ddp["grads_bytes"] == ddp["grad_buckets_bytes"] == 4 * lora and ddp["optimizer_bytes"] == 8 * lora
    assert ddp["weights_bytes"] == 4 * report["total_params"]
