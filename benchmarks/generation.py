"""Image generation speed: the KV-cached regression loop against a full forward pass per embedding, and decoding.

    .venv/bin/python benchmarks/generation.py            # tiny (Q = 8) and small (Q = 32) models, ~1-2 min
    .venv/bin/python benchmarks/generation.py --quick    # tiny only, a smoke test
    .venv/bin/python benchmarks/generation.py --ckpt runs/tiny/final.ckpt   # tiny starts from a pretrained run

Needs no checkpoint: it runs on a fresh clone.

Prints one JSON line per model.

Method (one process, fp32, ``torch.set_num_threads`` = the usable cores, random weights: speed does not
depend on them):

- Models: ``tiny`` is ``configs/tiny.yaml`` (LLM width 128, 3 layers, Q = 8) with its pixel-space
  ``DiffusionDecoder`` (``configs/stages/decoder.yaml``, whose ``model.init_checkpoint`` is replaced by
  ``--ckpt``: none by default, so random weights and no ``make demo`` needed); ``small`` is
  ``benchmarks/train_throughput.py``'s small config (LLM of 52M parameters, width 512, 16 layers, Q = 32).
- Regression: ``EmuModel.regress_image_embeddings`` on ``--batch`` text prompts (held-out ShapesWorld
  captions naming each shape's position, as ``TextToImageEval`` prompts), with the KV cache (one LLM step
  per embedding) and without it (the paper's released code: the whole sequence runs again for each of the
  Q embeddings). The contenders alternate for ``--repeats``
  rounds; medians are reported and ``kv_speedup = uncached_s / cached_s``. ``max_abs_diff`` compares the
  two outputs.
- OpenMP: unlike the training benchmarks, this one keeps OpenMP's own thread waiting (``ACTIVE``, what a plain
  ``python`` and so every user gets): generation is latency of many tiny operations, which ``PASSIVE`` (set
  ``OMP_WAIT_POLICY=PASSIVE``; robust on shared cores) slows. The JSON line records the policy.
- Decoding (tiny only, where the decoder is defined): ``decoder.sample`` of the regressed embeddings with
  ``--steps`` DDIM steps and classifier-free guidance 7.5 (two UNet branches in one batch);
  ``images_per_s = batch / median time``.
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers loads)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from emu_lightning.cli import cli
from emu_lightning.model import EmuModel
from emu_lightning.shapesworld.world import ShapesWorld


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def tiny_model(ckpt: str | None = None) -> EmuModel:
    torch.manual_seed(0)
    # The decoder stage starts from runs/tiny/final.ckpt (`make demo`); speed does not depend on the weights, so
    # without --ckpt the model keeps its random initialisation and the benchmark runs on a fresh clone.
    configs = ["--config", "configs/tiny.yaml", "--config", "configs/stages/decoder.yaml"]
    return cli([*configs, f"--model.init_checkpoint={ckpt or 'null'}"], run=False).model


def small_model() -> EmuModel:
    from train_throughput import SMALL, build_model  # benchmarks/ is on sys.path when run as a script

    torch.manual_seed(0)
    return build_model(SMALL, "default")


def bench(name: str, model: EmuModel, args: argparse.Namespace) -> dict[str, Any]:
    model.eval()
    world = ShapesWorld(image_size=model.vision.image_size)
    # The prompts text-to-image is evaluated with: held-out captions that place each shape (about 20 tokens).
    prompts = [world.captions(world.scene("val", i))[1] for i in range(args.batch)]
    model.regress_image_embeddings(prompts)  # warm-up
    cached, uncached = [], []
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
        t, a = median_time(lambda: model.regress_image_embeddings(prompts), 1)
        cached.append(t)
        t, b = median_time(lambda: model.regress_image_embeddings(prompts, use_cache=False), 1)
        uncached.append(t)
    record: dict[str, Any] = {
        "model": name,
        "queries": model.num_queries,
        "llm_layers": model.llm.model.config.num_hidden_layers,
        "llm_width": model.llm.hidden_size,
        "batch": args.batch,
        "cached_s": round(statistics.median(cached), 4),
        "uncached_s": round(statistics.median(uncached), 4),
        "kv_speedup": round(statistics.median(uncached) / statistics.median(cached), 2),
        "max_abs_diff": float((a - b).abs().max()),
    }
    if model.decoder is not None:
        condition = model.regress_image_embeddings(prompts)
        t, images = median_time(lambda: model.decode_embeddings(condition, 7.5, args.steps), args.repeats)
        record.update({"decode_steps": args.steps, "decode_s": round(t, 3), "images_per_s": round(args.batch / t, 2),
                       "image_shape": list(images.shape[1:])})  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny model only, fewer rounds")
    p.add_argument("--batch", type=int, default=8, help="prompts per call")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps for decoding")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    p.add_argument("--ckpt", default=None, help="tiny: start from this EmuModel checkpoint (default: random weights)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 2, 5
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    models = [("tiny", lambda: tiny_model(args.ckpt))] + ([] if args.quick else [("small", small_model)])
    policy = os.environ.get("OMP_WAIT_POLICY", "ACTIVE (default)")
    for name, build in models:
        record = bench(name, build(), args)
        weights = args.ckpt if name == "tiny" and args.ckpt else "random"
        extra = {"weights": weights, "threads": threads, "omp_wait_policy": policy, "torch": torch.__version__}
        print(json.dumps({**record, **extra}), flush=True)


if __name__ == "__main__":
    main()
