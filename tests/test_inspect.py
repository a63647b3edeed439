import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu_lightning.inspect import build, count, main, training_memory

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
    assert report["trainable_params"] == total - vae  # only the VAE is frozen in this config
    memory = report["memory"]
    assert memory["devices"] == 4  # --devices beats trainer.devices (8)
    assert memory["ddp"]["bytes"] == 2 * total + 10 * (total - vae)
    assert memory["sharded"]["bytes"] == -(-memory["ddp"]["bytes"] // 4)


def test_tiny_meta_count_equals_real_model():
    meta, config = build(["--config", TINY], device="meta")
    assert all(p.is_meta for p in meta.parameters())
    real, _ = build(["--config", TINY], device="cpu")
    assert all(p.device.type == "cpu" for p in real.parameters())
    assert count(meta) == count(real)
    assert count(meta)["total_params"] == sum(p.numel() for p in real.parameters())
    assert config["trainer.devices"] == 1


def test_memory_arithmetic():
    memory = training_memory(total=10, trainable=4, devices=2)
    ddp = 2 * 10 + 2 * 4 + 8 * 4
    assert memory["devices"] == 2
    assert memory["ddp"]["bytes"] == ddp == 60
    assert (memory["ddp"]["weights_bytes"], memory["ddp"]["grads_bytes"], memory["ddp"]["optimizer_bytes"]) == (
        20,
        8,
        32,
    )
    assert memory["sharded"]["bytes"] == ddp / 2
    assert memory["ddp"]["gib"] == round(60 / 2**30, 3)
    assert "devices" in memory["assumptions"]
    assert training_memory(10**9, 0, 1)["ddp"]["bytes"] == 2 * 10**9  # all frozen: weights only
    with pytest.raises(ValueError):
        training_memory(10, 11, 1)


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


def test_overrides_and_missing_config(capsys):
    frozen = main(["--config", TINY, "--model.frozen", "[vision]"])
    vision = frozen["components"]["vision"]
    assert vision["trainable"] == 0 < vision["total"]
    assert frozen["trainable_params"] == frozen["total_params"] - vision["total"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(["--config", TINY, "--config", "configs/does-not-exist.yaml"])
    assert err.value.code == 2
    assert "configs/does-not-exist.yaml" in capsys.readouterr().err


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
