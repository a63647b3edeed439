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
run ``--profiled-steps`` (3) AdamW steps (the model's own ``configure_optimizers``) under torch.profiler's memory
profiler, then time ``--steps`` (4) more without it. Printed per contender, one JSON line:

- ``trainable_parameters`` and ``parameters``;
- ``peak_training_mib``: the peak of live tensor memory over the profiled steps, from the profiler's memory
  timeline (the CPU's counterpart of ``torch.cuda.max_memory_allocated``), and ``at_peak_mib``, what it was made
  of at that moment: parameters, optimizer state, gradients, activations, ...;
- ``state_mib``: gradients and AdamW state of the trainable parameters (3 float32 copies), computed;
- ``step_s``: median seconds an optimizer step, without the profiler.

The process's resident memory is not reported: the profiler's own records (gigabytes at the small config) swamp
it, and without the profiler an RSS sampler missed part of the optimizer state (glibc keeps freed memory).

A last line gives the ratios, ``full`` over ``lora``.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from emu_lightning.components.llm import LoRA
from emu_lightning.conversation import conversation_items
from emu_lightning.model import EmuModel
from emu_lightning.shapesworld.world import ShapesWorld

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import QUICK, SMALL, Config, build_model  # noqa: E402


def build(cfg: Config, lora: bool) -> EmuModel:
    torch.manual_seed(0)
    return build_model(cfg, "default", lora=LoRA() if lora else None, stage="instruct")


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


CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail",
              "unknown")  # fmt: skip
"""torch.profiler's memory categories, in the column order of ``export_memory_timeline`` (after a leading 0)."""


def profiled_peak(step: Callable[[dict[str, Any]], None], data: list[dict[str, Any]]) -> dict[str, Any]:
    """Run ``step`` on each batch under torch.profiler's memory profiler; the peak of live tensor memory on the CPU
    and what it was made of at that moment (MiB by category)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for batch in data:
            step(batch)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_memory_timeline(os.path.join(tmp, "timeline.json"), device="cpu")
        with open(os.path.join(tmp, "timeline.json")) as f:
            _, sizes = json.load(f)
    totals = [sum(row) for row in sizes]
    at_peak = sizes[max(range(len(totals)), key=totals.__getitem__)][1:]
    mib = 2**20
    return {
        "peak_mib": round(max(totals) / mib, 1),
        "at_peak_mib": {c: round(v / mib, 1) for c, v in zip(CATEGORIES, at_peak) if v},
    }


def child(mode: str, cfg: Config, steps: int, profiled_steps: int, batch_size: int) -> dict[str, Any]:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = build(cfg, lora=mode == "lora")
    model.train()
    data = batches(model, cfg, batch_size, profiled_steps + steps)
    optimizer = model.configure_optimizers()
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []

    def step(batch: dict[str, Any]) -> None:
        loss = model.stage_losses(batch)["loss"]  # the instruct stage: the answers' cross-entropy
        loss.backward()
        losses.append(float(loss))
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients' memory, as a training loop holds it

    # The first steps under the memory profiler (they create the optimizer state), the rest timed without it.
    memory = profiled_peak(step, data[:profiled_steps])
    times = []
    for batch in data[profiled_steps:]:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    mib = 2**20
    return {
        "contender": mode,
        "config": cfg.name,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_training_mib": memory["peak_mib"],
        "at_peak_mib": memory["at_peak_mib"],
        "state_mib": round(3 * 4 * sum(p.numel() for p in trainable) / mib, 1),
        "step_s": round(statistics.median(times), 3),
        "steps": len(losses),
        "batch_size": batch_size,
        "tokens_per_batch": int(data[0]["input_ids"].numel()),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per contender")
    p.add_argument("--profiled-steps", type=int, default=3, help="first optimizer steps, under the memory profiler")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--child", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = replace(QUICK, batch_size=2) if args.quick else SMALL
    if args.child:
        print(json.dumps(child(args.child, cfg, args.steps, args.profiled_steps, args.batch_size)), flush=True)
        return
    results = {}
    for mode in ("lora", "full"):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            mode,
            "--steps",
            str(args.steps),
            "--profiled-steps",
            str(args.profiled_steps),
            "--batch-size",
            str(args.batch_size),
        ]
        cmd += ["--quick"] if args.quick else []  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[mode]), flush=True)
    lora, full = results["lora"], results["full"]
    print(json.dumps({
        "ratio": "full / lora",
        "trainable_parameters": round(full["trainable_parameters"] / lora["trainable_parameters"], 1),
        "peak_training_memory": round(full["peak_training_mib"] / max(lora["peak_training_mib"], 1e-9), 2),
        "optimizer_and_gradients_mib": [lora["state_mib"], full["state_mib"]],
        "step_time": round(full["step_s"] / lora["step_s"], 2),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
