"""Training throughput, model FLOP utilisation and Lightning's per-step overhead of a small Emu, on CPU.

    .venv/bin/python benchmarks/train_throughput.py            # the `small` config, a few minutes on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --quick    # tiny sizes, a smoke test

Method (one process, fp32, ``torch.set_num_threads`` = the usable cores):

1. Model: a LLaMA-shaped ``HFCausalLM`` of about 50M parameters, a 4-block ViT on 64 px images and a
   PreNormCausalTransformer resampler (Q = 32) into the LLM's width, with the default ShapesWorld BPE.
2. Data: real interleaved sequences from :class:`~emu_lightning.sequence.SequenceBuilder`. Each sample
   chains ShapesWorld image-caption pairs while they fit, then a run of further captions that the
   builder truncates, so every sequence holds exactly ``seq_len`` tokens and no padding. Only non-pad
   tokens (``attention_mask``) are counted.
3. Throughput: after ``--warmup`` steps, ``--steps`` full training steps (``training_step``, backward,
   AdamW step, ``zero_grad``) of a plain PyTorch loop are timed one by one; ``step_s`` is their median.
4. FLOPs: one training step (forward + backward; the optimizer's elementwise update is excluded) under
   ``torch.utils.flop_counter.FlopCounterMode``. ``gflops_per_step`` is exactly its total. On CPU, PyTorch's
   flash attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula, so the
   counter does not count attention scores at all; that work is reported separately, for information
   only (``attention_gflops_uncounted``), and is *not* part of ``gflops_per_step`` or ``mfu``.
5. Peak: the best GFLOP/s of several large fp32 ``torch.mm`` (1024, 2048 and 4096 square, measured before
   and after the training steps) in the same process and with the same threads.
   ``mfu = achieved_gflops / peak_gflops`` with ``achieved_gflops = gflops_per_step / step_s``.
6. Lightning overhead: ``Trainer.fit`` (``max_steps``, no logger, checkpointing, progress bar, model
   summary or validation) and a plain loop doing the same on the same modules, the same batches from the
   same kind of DataLoader, and the optimizer from ``model.configure_optimizers()``, alternate in rounds
   (L-P, P-L, ...). A step's time is the interval between consecutive step ends (a Callback's
   ``on_train_batch_end`` for Lightning, the line after ``zero_grad`` for the plain loop), so it includes
   all per-step work of either loop: fetching the batch, moving it to the device, hooks, logging and the
   loop's bookkeeping. Excluded, in both loops alike: everything before the first step ends (Trainer
   construction, setup, dataloader creation, the first step, which also creates the optimizer state) and
   everything after the last step ends (teardown). ``lightning_overhead`` is the ratio of the medians.

What the defaults rest on (2-core AMD EPYC, idle, torch 2.14): the model's GEMM shapes ((2048 x 512) @
(512 x 1408) ...) already run at the large-``mm`` peak, so the gap to 1.0 is non-GEMM work (attention,
norms, activations, the optimizer). Threads = cores (one thread halves the GEMM peak); SDPA attention
everywhere (transformers ``sdpa``, timm's fused attention, the resampler's ``F.scaled_dot_product_attention``);
flush-to-zero for denormals; AdamW ``fused=True`` (about 0.04 s a step for 64M parameters, against 0.12 s
for ``foreach=True`` and 0.10 s for the for-loop default); batch 8, as batch 16 was no faster per token
(12.7 s a step against 2 x 5.1 s; its elementwise ops took 3-4 times as long). A profile of one step at
batch 8 puts 79% of the time in ``mm``/``addmm`` (at about 0.9 of the peak), 10% in CPU flash attention.

Shared machines: OpenMP's default busy-waiting turns oversubscribed cores (another training run on the
same 2 cores) into 10-100x slower steps, as threads spin at every barrier while their partner is
descheduled. So this script defaults ``OMP_WAIT_POLICY`` to ``PASSIVE`` (set it to ``ACTIVE`` to override).
Its cost on an idle machine: about 1% on the small config (5.06 s ACTIVE, 5.12 s PASSIVE a step), more on
``--quick``'s tiny ops (17 against 42 ms a step), where waking sleeping threads is not negligible.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch loads the OpenMP runtime)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import functools
import json
import logging
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from emu_lightning import shapesworld
from emu_lightning.components.llm import HFCausalLM
from emu_lightning.components.resampler import PreNormCausalTransformer
from emu_lightning.components.vision import TimmVisionBackbone
from emu_lightning.model import EmuModel
from emu_lightning.shapesworld import ShapesWorldPairs
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.tokenizer import TrainedBPE

aten = torch.ops.aten


@dataclass(frozen=True)
class Config:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    seq_len: int
    image_size: int
    patch: int
    vit_dim: int
    vit_depth: int
    vit_heads: int
    queries: int
    resampler_width: int
    resampler_depth: int
    resampler_heads: int
    batch_size: int
    gemm_sizes: tuple[int, ...]


SMALL = Config(
    name="small",
    hidden=512,
    layers=16,  # 16 x 3.2M + embeddings + regression head: ~52M parameters in the LLM
    intermediate=1408,
    heads=8,
    seq_len=256,
    image_size=64,
    patch=8,
    vit_dim=256,
    vit_depth=4,
    vit_heads=4,
    queries=32,
    resampler_width=512,
    resampler_depth=2,
    resampler_heads=8,
    batch_size=8,
    gemm_sizes=(1024, 2048, 4096),
)
QUICK = replace(
    SMALL,
    name="quick",
    hidden=128,
    layers=2,
    intermediate=352,
    heads=4,
    seq_len=96,
    image_size=32,
    vit_dim=64,
    vit_depth=1,
    vit_heads=2,
    queries=8,
    resampler_width=128,
    resampler_depth=1,
    resampler_heads=4,
    batch_size=2,
    gemm_sizes=(512, 1024),
)


def log(msg: str) -> None:
    print(f"[train_throughput] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- model and data
def build_model(cfg: Config, optimizer: str, lr: float = 1e-4, lora: Any = None, **model_kwargs: Any) -> EmuModel:
    """The config's Emu; ``lora`` (a :class:`LoRA`) goes to the language model, ``model_kwargs`` to EmuModel
    (``stage``, ...)."""
    vision = TimmVisionBackbone(
        "vit_base_patch16_224",
        image_size=cfg.image_size,
        model_kwargs={
            "patch_size": cfg.patch,
            "embed_dim": cfg.vit_dim,
            "depth": cfg.vit_depth,
            "num_heads": cfg.vit_heads,
        },
    )
    resampler = PreNormCausalTransformer(
        in_dim=vision.out_dim,
        out_dim=cfg.hidden,
        num_queries=cfg.queries,
        width=cfg.resampler_width,
        depth=cfg.resampler_depth,
        num_heads=cfg.resampler_heads,
    )
    llm = HFCausalLM(
        model_type="llama",
        config={
            "vocab_size": 512,
            "hidden_size": cfg.hidden,
            "intermediate_size": cfg.intermediate,
            "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.heads,
            "max_position_embeddings": cfg.seq_len,
        },
        attn_implementation="sdpa",
        lora=lora,
    )
    kwargs: dict[str, Any] = {"foreach": {"foreach": True}, "fused": {"fused": True}, "default": {}}[optimizer]
    factory = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01, **kwargs)
    # No scheduler: configure_optimizers() then returns the bare optimizer, which both loops step alike.
    tokenizer = TrainedBPE(shapesworld.corpus)  # the tiny config's: a byte-level BPE on ShapesWorld's text
    return EmuModel(
        vision, resampler, llm, tokenizer=tokenizer, max_length=cfg.seq_len, optimizer=factory, **model_kwargs
    )


def make_batches(model: EmuModel, cfg: Config, batch_size: int, num_batches: int) -> list[dict[str, Any]]:
    """Full ``seq_len``-token interleaved batches: image-caption pairs while they fit, then caption text."""
    builder = model.sequencer
    pairs = ShapesWorldPairs(ShapesWorld(image_size=cfg.image_size), "train", size=10**7)
    next_index = 0

    def take() -> list[Any]:
        nonlocal next_index
        next_index += 1
        return pairs[next_index - 1]["items"]

    batches = []
    for _ in range(num_batches):
        samples = []
        for _ in range(batch_size):
            items: list[Any] = []
            while True:
                pair = take()
                if builder.encode(items + pair).truncated:
                    break
                items += pair
            filler = [take() for _ in range(cfg.seq_len // 4)]
            items.append(" ".join(next(x for x in pair if isinstance(x, str)) for pair in filler))
            samples.append(items)
        batch = builder(samples)
        if batch["attention_mask"].shape[1] != cfg.seq_len or not bool(batch["attention_mask"].all()):
            raise RuntimeError("a benchmark sequence does not fill seq_len exactly")
        batches.append(batch)
    return batches


class _Batches(Dataset):
    """``length`` ready batches, cycling through a fixed list (DataLoader with ``batch_size=None``)."""

    def __init__(self, batches: list[dict[str, Any]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index % len(self.batches)]


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def loader(batches: list[dict[str, Any]], steps: int) -> DataLoader:
    return DataLoader(_Batches(batches, steps), batch_size=None, shuffle=False, collate_fn=_identity)


# ---------------------------------------------------------------------- loops
def plain_loop(model: EmuModel, batches: list[dict[str, Any]], steps: int) -> list[float]:
    """``steps`` plain PyTorch steps; returns the step-end timestamps."""
    model.trainer = None  # detach from any finished Trainer: self.log() then returns at once
    model.train()
    optimizer = model.configure_optimizers()
    ends = []
    for i, batch in enumerate(loader(batches, steps)):
        loss = model.training_step(batch, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


class _StepEnds(L.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.ends.append(time.perf_counter())


def lightning_loop(model: EmuModel, batches: list[dict[str, Any]], steps: int) -> list[float]:
    """``steps`` steps of ``Trainer.fit``; returns the step-end timestamps."""
    timer = _StepEnds()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=loader(batches, steps))
    if len(timer.ends) != steps:
        raise RuntimeError(f"Trainer ran {len(timer.ends)} steps, expected {steps}")
    return timer.ends


def intervals(ends: list[float]) -> list[float]:
    return [b - a for a, b in zip(ends, ends[1:])]


# ---------------------------------------------------------------------- FLOPs and peak
class _CpuAttentionShapes(TorchDispatchMode):
    """Records the shapes of CPU flash-attention calls, which FlopCounterMode has no formula for."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = getattr(func, "overloadpacket", None)
        if packet is aten._scaled_dot_product_flash_attention_for_cpu:
            self.flops += sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)
        elif packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:
            self.flops += sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape, args[3].shape)
        return out


def count_step_flops(model: EmuModel, batch: dict[str, Any]) -> tuple[int, dict[str, int], int]:
    """FlopCounterMode's total and per-op counts of one forward+backward, and the uncounted attention FLOPs."""
    model.trainer = None
    model.train()
    model.zero_grad(set_to_none=True)
    attention = _CpuAttentionShapes()
    with FlopCounterMode(display=False) as counter, attention:
        model.training_step(batch, 0).backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op, attention.flops


def gemm_peak_gflops(sizes: tuple[int, ...], reps: int = 5) -> float:
    best = 0.0
    for n in sizes:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        torch.mm(a, b, out=c)  # warm-up
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b, out=c)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of well under 30 s")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 8; quick: 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed plain steps before the throughput steps")
    p.add_argument("--steps", type=int, default=6, help="timed plain steps for tokens/s and MFU")
    p.add_argument("--rounds", type=int, default=3, help="alternating Lightning / plain rounds")
    p.add_argument(
        "--round-steps",
        type=int,
        default=4,
        help="steps per round and loop; the first is warm-up, the others are timed",
    )
    p.add_argument(
        "--optimizer",
        choices=("foreach", "fused", "default"),
        default="fused",
        help="AdamW implementation; fused is the fastest on CPU (torch's CPU default is the for-loop one)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.round_steps = min(args.steps, 3), 1, 2, 3
    if args.steps < 1 or args.round_steps < 2 or args.rounds < 1 or args.warmup < 0:
        p.error("need --steps >= 1, --round-steps >= 2, --rounds >= 1, --warmup >= 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else SMALL
    batch_size = args.batch_size or cfg.batch_size
    threads = args.threads or len(os.sched_getaffinity(0))
    # Before the first parallel region, so that OpenMP's worker threads start with the same FP flags.
    torch.set_flush_denormal(True)  # denormal floats (decaying AdamW moments, tiny grads) are slow on x86
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]

    start = time.perf_counter()
    model = build_model(cfg, args.optimizer)
    batches = make_batches(model, cfg, batch_size, num_batches=4)
    tokens = int(batches[0]["attention_mask"].sum())
    images = int(batches[0]["images"].shape[0])
    log(
        f"built {cfg.name} model and data in {time.perf_counter() - start:.1f}s: {tokens} tokens, "
        f"{images} images per batch"
    )

    # Throughput: plain steps; the first `warmup` (plus the first, which creates the optimizer state) untimed.
    ends = plain_loop(model, batches, args.warmup + args.steps + 1)
    steps_s = intervals(ends)[args.warmup :]
    step_s = statistics.median(steps_s)
    log(f"plain steps: {' '.join(f'{s:.3f}' for s in steps_s)} s")

    flops, by_op, attention_flops = count_step_flops(model, batches[0])
    peak = gemm_peak_gflops(cfg.gemm_sizes)
    log(f"{flops / 1e9:.1f} GFLOP per step counted, peak {peak:.1f} GFLOP/s")

    # Lightning vs plain, alternating so that drift in machine load hits both alike.
    lightning_s: list[float] = []
    plain_s: list[float] = []
    for r in range(args.rounds):
        order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
        for which in order:
            if which == "lightning":
                lightning_s += intervals(lightning_loop(model, batches, args.round_steps))
            else:
                plain_s += intervals(plain_loop(model, batches, args.round_steps))
        log(f"round {r}: lightning {statistics.median(lightning_s):.3f} s, plain {statistics.median(plain_s):.3f} s")
    peak = max(peak, gemm_peak_gflops(cfg.gemm_sizes, reps=2))  # again, in case the load changed meanwhile

    achieved = flops / 1e9 / step_s
    lightning_step, plain_step = statistics.median(lightning_s), statistics.median(plain_s)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "config": cfg.name,
        "llm_params": sum(p.numel() for p in model.llm.parameters()),
        "total_params": n_params,
        "seq_len": cfg.seq_len,
        "batch_size": batch_size,
        "tokens_per_step": tokens,
        "images_per_step": images,
        "tokens_per_s": round(tokens / step_s, 1),
        "step_s": round(step_s, 4),
        "gflops_per_step": round(flops / 1e9, 3),
        "achieved_gflops": round(achieved, 2),
        "peak_gflops": round(peak, 2),
        "mfu": round(achieved / peak, 4),
        "mfu_target": 0.4,
        "gflops_by_op": {k: round(v / 1e9, 3) for k, v in sorted(by_op.items())},
        "attention_gflops_uncounted": round(attention_flops / 1e9, 3),
        "lightning_step_s": round(lightning_step, 4),
        "plain_step_s": round(plain_step, 4),
        "lightning_overhead": round(lightning_step / plain_step, 4),
        "lightning_overhead_total": round(sum(lightning_s) / sum(plain_s), 4),
        "overhead_steps_timed": [len(lightning_s), len(plain_s)],
        "optimizer": f"AdamW({args.optimizer})",
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line only
        result = run(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
