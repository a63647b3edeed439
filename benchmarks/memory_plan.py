"""Check ``python -m emu_lightning.inspect``'s per-device memory plan against a real 2-process DDP run on CPU.

    .venv/bin/python benchmarks/memory_plan.py            # a ~106M-parameter model, 3 steps: about 30 s on 2 cores
    .venv/bin/python benchmarks/memory_plan.py --quick    # an ~8M-parameter model, 2 steps: a smoke test (~15 s)

Method:

1. Model: ``configs/tiny.yaml``'s (its ViT, Causal Transformer, ShapesWorld BPE and fused AdamW) with a bigger
   LLaMA (``--hidden`` 1024, ``--layers`` 8, SwiGLU width 2816, 8 heads), so that parameters, gradients and optimizer
   state dominate; ``max_length`` = ``--seq-len`` (128). Built through ``emu_lightning.inspect.build``, i.e. the
   ``emu-lightning`` parser with dotted overrides, on the CPU.
2. Run: two worker processes, launched here as torchrun would (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``),
   each one torch thread, train with Lightning's ``Trainer`` (accelerator ``cpu``, ``devices`` 2, strategy ``ddp``
   with gloo, precision ``32-true``: the CPU has no fast bf16) for ``--steps`` steps of ``--batch`` sequences of
   exactly ``--seq-len`` tokens per process (ShapesWorld image-caption chains, as ``train_throughput.py`` makes them).
3. Plan: each worker calls ``inspect.describe`` on its own model and ``inspect.plan_memory`` (the code behind
   ``python -m emu_lightning.inspect``) for DDP over 2 devices at ``32-true``, its sequence length, batch and
   number of images.
4. Measurement: what is measurable on the CPU is the process's resident memory. torch's CPU allocator keeps no
   peak counter and tracemalloc does not see its allocations, so each worker reads its peak resident set size
   (``VmHWM`` in ``/proc/self/status``, the counter behind ``getrusage``'s ``ru_maxrss``) after the run. The peak
   counter is reset (``/proc/self/clear_refs``, ``5``) once the model and the batches are built, so that
   ``measured_training_bytes`` = peak - resident memory at that point: gradients, DDP's buckets, AdamW's state and
   the activations (the weights were already resident), against the plan's ``peak - weights``. ``measured_bytes``
   = peak - resident memory after the imports, before the model was built, against the plan's whole per-device
   peak (weights included; also holds what building the model and the batches left behind). glibc's malloc is
   told (``MALLOC_MMAP_THRESHOLD_`` = 128 KiB, which also stops its dynamic threshold) to map every tensor of
   128 KiB or more on its own, so a freed tensor leaves the resident set at once instead of staying in the heap.
   Also in the resident set and not in the plan: Python objects, the autograd graph's nodes, Lightning's and
   gloo's own state, pages of libraries first touched during the run.

Printed: one JSON line with the plan's parts, the measured bytes of each rank, and ``ratio`` = measured /
predicted for the training part (the larger of the two ranks) and ``ratio_total`` for the whole peak. The aim
is within 15% (0.85-1.15).

What it showed (2 shared cores, torch 2.14, Lightning 2.6): ``ratio`` 1.01 and ``ratio_total`` 1.02 at the
defaults (1,798 MiB planned for the training part, 1,819 MiB measured on each rank). The plan adds the gradients
and the activations, and that is what is measured: Lightning zeroes the gradients after ``training_step``, so the
previous step's are held when the forward ends; with ``--batch`` 8 instead of 2 the planned activations grow by
533 MiB and the measured peak by 536 MiB. Without DDP's second copy of the gradients (its buckets) the plan would
be 405 MiB (22%) short.

Like ``train_throughput.py``, it defaults ``OMP_WAIT_POLICY`` to ``PASSIVE`` (two processes share two cores).
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY and malloc's settings must be set before torch loads)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import gc
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
MALLOC_MMAP_THRESHOLD = 128 * 1024


def log(msg: str) -> None:
    print(f"[memory_plan] {msg}", file=sys.stderr, flush=True)


def model_args(args: argparse.Namespace) -> list[str]:
    """``emu-lightning`` arguments for the benchmark's model: tiny.yaml with a bigger LLM."""
    llm = "--model.llm.init_args.config."
    return [
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"{llm}hidden_size", str(args.hidden),
        f"{llm}intermediate_size", str(args.intermediate),
        f"{llm}num_hidden_layers", str(args.layers),
        f"{llm}num_attention_heads", str(args.heads),
        f"{llm}num_key_value_heads", str(args.heads),
        f"{llm}max_position_embeddings", str(max(args.seq_len, 256)),
        "--model.max_length", str(args.seq_len),
    ]  # fmt: skip


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset the peak resident set size to the current one (Linux >= 4.0); False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from emu_lightning.inspect import build
    from emu_lightning.memory import describe, plan_memory

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import loader, make_batches

    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # two processes on two cores
    rank = int(os.environ["LOCAL_RANK"])
    rss_imports = _status_kib("VmRSS") * 1024

    torch.manual_seed(0)
    model, _ = build(model_args(args), device="cpu")
    batches = make_batches(model, SimpleNamespace(seq_len=args.seq_len, image_size=model.vision.image_size),
                           args.batch, num_batches=2)  # fmt: skip
    images = int(batches[0]["images"].shape[0])
    facts = describe(model)
    plan = plan_memory(facts, "32-true", devices=WORLD_SIZE, seq_lens=[args.seq_len], batch=args.batch, images=images)
    gc.collect()
    reset = _reset_peak()
    rss_built = _status_kib("VmRSS") * 1024

    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        num_nodes=1,
        strategy=DDPStrategy(process_group_backend="gloo"),
        precision="32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # each process has its own ready batches
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader(batches, args.steps))
    fit_s = time.perf_counter() - start
    if trainer.global_step != args.steps:
        raise RuntimeError(f"Trainer ran {trainer.global_step} steps, expected {args.steps}")
    peak = _status_kib("VmHWM") * 1024
    return {
        "rank": rank,
        "rss_after_imports": rss_imports,
        "rss_after_build": rss_built,
        "peak_rss": peak,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_reset_after_build": reset,
        "images": images,
        "tokens": int(batches[0]["attention_mask"].sum()),
        "total_params": facts.total_params,
        "fit_s": round(fit_s, 1),
        "plan": plan,
    }


# ---------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Start the two workers as torchrun would, wait for both, return their results in rank order."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(WORLD_SIZE):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "WORLD_SIZE": str(WORLD_SIZE),
                "NODE_RANK": "0",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD)),
            }
            out = os.path.join(tmp, f"rank{rank}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker-out", out]
            procs.append((subprocess.Popen(cmd, env=env, stdout=sys.stderr), out))
        codes = []
        for proc, _ in procs:
            try:
                codes.append(proc.wait(timeout=args.timeout))
            except subprocess.TimeoutExpired:
                for other, _ in procs:
                    other.kill()
                raise RuntimeError(f"a worker ran past --timeout {args.timeout} s") from None
        if any(codes):
            raise RuntimeError(f"workers exited with {codes}")
        return [json.loads(Path(out).read_text()) for _, out in procs]


def summarize(results: list[dict[str, Any]], args: argparse.Namespace, wall_s: float) -> dict[str, Any]:
    plan = results[0]["plan"]
    ddp = plan["ddp"]
    entry = ddp["per_seq_len"][0]
    predicted_total = entry["peak_bytes"]
    predicted_training = predicted_total - ddp["weights_bytes"]
    training = [r["peak_rss"] - r["rss_after_build"] for r in results]
    total = [r["peak_rss"] - r["rss_after_imports"] for r in results]
    mib = 2**20
    return {
        "benchmark": "memory_plan",
        "config": "quick" if args.quick else "default",
        "strategy": "ddp (Lightning, gloo, 2 CPU processes)",
        "precision": plan["precision"],
        "optimizer": plan["optimizer"],
        "total_params": results[0]["total_params"],
        "seq_len": args.seq_len,
        "batch": args.batch,
        "images": results[0]["images"],
        "steps": args.steps,
        "predicted": {
            k: ddp[k]
            for k in ("weights_bytes", "grads_bytes", "grad_buckets_bytes", "optimizer_bytes", "optimizer_step_bytes")
        }
        | {"activations_bytes": entry["activations"]["bytes"], "peak_bytes": predicted_total},
        "predicted_training_bytes": predicted_training,
        "measured_training_bytes": training,
        "ratio": round(max(training) / predicted_training, 4),
        "predicted_bytes": predicted_total,
        "measured_bytes": total,
        "ratio_total": round(max(total) / predicted_total, 4),
        "predicted_training_mib": round(predicted_training / mib, 1),
        "measured_training_mib": [round(b / mib, 1) for b in training],
        "rss_after_build_mib": [round(r["rss_after_build"] / mib, 1) for r in results],
        "peak_rss_mib": [round(r["peak_rss"] / mib, 1) for r in results],
        "ru_maxrss_mib": [round(r["ru_maxrss"] / mib, 1) for r in results],
        "peak_reset_after_build": all(r["peak_reset_after_build"] for r in results),
        "malloc_mmap_threshold": int(os.environ.get("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)),
        "fit_s": [r["fit_s"] for r in results],
        "wall_s": round(wall_s, 1),
        "aim": "ratio within 0.85-1.15",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a ~7M-parameter LLM and 2 steps: a smoke test")
    p.add_argument("--hidden", type=int, default=None, help="LLM width (default 1024; quick: 512)")
    p.add_argument("--layers", type=int, default=None, help="LLM layers (default 8; quick: 2)")
    p.add_argument("--intermediate", type=int, default=None, help="LLM SwiGLU width (default 2816; quick: 1408)")
    p.add_argument("--heads", type=int, default=8, help="LLM attention heads")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (every sequence is full)")
    p.add_argument("--batch", type=int, default=2, help="sequences per process and step")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3; quick: 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the workers are killed")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.hidden = args.hidden or (512 if quick else 1024)
    args.layers = args.layers or (2 if quick else 8)
    args.intermediate = args.intermediate or (1408 if quick else 2816)
    args.steps = args.steps or (2 if quick else 3)
    if min(args.hidden, args.layers, args.intermediate, args.heads, args.seq_len, args.batch, args.steps) < 1:
        p.error("sizes, --batch and --steps must be >= 1")
    if args.steps < 2:
        p.error("--steps must be >= 2: the first step creates AdamW's state, the second runs with all of it")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.worker_out:
        with contextlib.redirect_stdout(sys.stderr):
            result = worker(args)
        Path(args.worker_out).write_text(json.dumps(result))
        return None
    start = time.perf_counter()
    log(f"2 DDP workers: LLM width {args.hidden}, {args.layers} layers, {args.steps} steps")
    worker_argv = [a for a in argv if a != "--worker-out"]
    results = launch(args, worker_argv)
    summary = summarize(results, args, time.perf_counter() - start)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
