"""Instruction tuning with LoRA against full fine-tuning of the language model: trainable parameters, memory, speed.

    .venv/bin/python benchmarks/instruct_memory.py            # the small config (52M-parameter LLM), ~2 min
    .venv/bin/python benchmarks/instruct_memory.py --quick    # tiny sizes, a smoke test

Both contenders are the instruct stage of ``benchmarks/train_throughput.py``'s ``small`` config (LLaMA-shaped LLM,
16 layers of width 512; 4-block ViT at 64 px; Causal Transformer with Q = 32), vision and resampler frozen as the
stage freezes them, on the same batches of ShapesWorld conversations (an image and a question, the answer trained;
batch 8, padded to the longest):

- ``lora``: LoRA r 16, alpha 16, dropout 0.05 on q/k/v/o (the paper's Emu-I); only the adapters train.
- ``full``: the same stage without LoRA: every weight of the language model trains.

Each runs in a fresh process (so one's allocations cannot hide the other's): build the model, make the batches,
then ``--steps`` AdamW steps (the model's own ``configure_optimizers``). Printed per contender, one JSON line:

- ``trainable_parameters`` and ``parameters``;
- ``peak_training_mib``: the highest resident memory (RSS) during the steps minus the RSS just before them (model
  and batches already in memory): activations, gradients and optimizer state. RSS is sampled every millisecond by a
  thread reading ``/proc/self/statm`` (CPU: there is no allocator peak counter like ``torch.cuda``'s);
- ``peak_rss_mib``: the process's highest RSS (``ru_maxrss``), everything included;
- ``state_mib``: gradient and AdamW state of the trainable parameters (3 float32 copies), computed;
- ``step_s``: median seconds an optimizer step (after the first).

A last line gives the ratios, ``full`` over ``lora``.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import torch

from emu_lightning.components.llm import HFCausalLM, LoRA
from emu_lightning.components.resampler import CausalTransformer
from emu_lightning.components.vision import TimmVisionBackbone
from emu_lightning.conversation import conversation_items
from emu_lightning.data.world import ShapesWorld
from emu_lightning.model import EmuModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import QUICK, SMALL, Config  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def build(cfg: Config, lora: bool) -> EmuModel:
    torch.manual_seed(0)
    vision = TimmVisionBackbone(
        "vit_base_patch16_224",
        image_size=cfg.image_size,
        model_kwargs={"patch_size": cfg.patch, "embed_dim": cfg.vit_dim, "depth": cfg.vit_depth,
                      "num_heads": cfg.vit_heads},
    )  # fmt: skip
    resampler = CausalTransformer(
        in_dim=vision.out_dim, out_dim=cfg.hidden, num_queries=cfg.queries, width=cfg.resampler_width,
        depth=cfg.resampler_depth, num_heads=cfg.resampler_heads,
    )  # fmt: skip
    llm = HFCausalLM(
        model_type="llama",
        config={"vocab_size": 512, "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
                "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.heads,
                "max_position_embeddings": cfg.seq_len},
        lora=LoRA() if lora else None,
    )  # fmt: skip
    return EmuModel(vision, resampler, llm, max_length=cfg.seq_len, stage="instruct", regression_weight=0.0)


def batches(model: EmuModel, cfg: Config, batch_size: int, num: int) -> list[dict[str, Any]]:
    """ShapesWorld conversations: an image and a question from the user, the short answer trained."""
    world = ShapesWorld(image_size=cfg.image_size)
    out = []
    for b in range(num):
        samples = []
        for i in range(b * batch_size, (b + 1) * batch_size):
            qa = world.questions("train", i)[i % 4]
            turns = [{"role": "user", "content": [world.image("train", i), qa.question]},
                     {"role": "assistant", "content": f"{qa.answer}."}]  # fmt: skip
            samples.append(conversation_items(turns))
        out.append(model.sequencer(samples))
    return out


class RSSPeak:
    """The highest resident set size seen by a thread that samples ``/proc/self/statm`` every millisecond."""

    def __init__(self) -> None:
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __enter__(self) -> RSSPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def child(mode: str, cfg: Config, steps: int, batch_size: int) -> dict[str, Any]:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = build(cfg, lora=mode == "lora")
    model.train()
    data = batches(model, cfg, batch_size, steps)
    optimizer = model.configure_optimizers()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = rss()
    times, losses = [], []
    with RSSPeak() as peak:
        for batch in data:
            start = time.perf_counter()
            loss = model.losses(batch)["loss"]
            loss.backward()
            losses.append(float(loss))
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep the gradients' memory, as a training loop holds it
            times.append(time.perf_counter() - start)
    mib = 2**20
    return {
        "contender": mode,
        "config": cfg.name,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "parameters": sum(p.numel() for p in model.parameters()),
        "llm_parameters": sum(p.numel() for p in model.llm.parameters()),
        "peak_training_mib": round((peak.peak - before) / mib, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "state_mib": round(3 * 4 * sum(p.numel() for p in trainable) / mib, 1),
        "step_s": round(statistics.median(times[1:] or times), 3),
        "steps": len(times),
        "batch_size": batch_size,
        "tokens_per_batch": int(data[0]["input_ids"].numel()),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per contender")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--child", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = replace(QUICK, batch_size=2) if args.quick else SMALL
    if args.child:
        print(json.dumps(child(args.child, cfg, args.steps, args.batch_size)), flush=True)
        return
    results = {}
    for mode in ("lora", "full"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size)] + (["--quick"] if args.quick else [])  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[mode]), flush=True)
    lora, full = results["lora"], results["full"]
    print(json.dumps({
        "ratio": "full / lora",
        "trainable_parameters": round(full["trainable_parameters"] / lora["trainable_parameters"], 1),
        "peak_training_memory": round(full["peak_training_mib"] / max(lora["peak_training_mib"], 1e-9), 2),
        "peak_rss": round(full["peak_rss_mib"] / lora["peak_rss_mib"], 2),
        "step_time": round(full["step_s"] / lora["step_s"], 2),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
