"""End-to-end evaluation time per 1,000 samples on the tiny model: few-shot captioning (CIDEr) and VQA.

    .venv/bin/python benchmarks/eval_throughput.py                      # the demo's checkpoint if there is one
    .venv/bin/python benchmarks/eval_throughput.py --ckpt PATH.ckpt     # any EmuModel checkpoint
    .venv/bin/python benchmarks/eval_throughput.py --quick              # few queries, a smoke test

Prints one JSON line per (task, shots, decoding).

Method (one process, fp32, ``torch.set_num_threads`` = the usable cores):

- Model: ``--ckpt``, else the newest ``runs/tiny/**/final.ckpt`` that ``make demo`` writes, else an untrained
  tiny model from ``configs/tiny.yaml`` (``"weights": "untrained"``: it rarely stops before
  ``max_new_tokens``, so its times are an upper bound).
- Each measurement runs the real callback path, :class:`~emu_lightning.shapesworld.ShapesWorldCaptioningEval` or
  :class:`~emu_lightning.shapesworld.ShapesWorldVQAEval` (the core callbacks on held-out ShapesWorld written in the
  COCO Karpathy / VQAv2 formats), with ``--queries`` queries, one seed and one number of shots. ``setup_s`` is the
  first call (writing and reading the files, decoding the images); ``eval_s`` is the median of ``--repeats``
  further calls (prompt building, generation, post-processing, scoring with CIDEr's Java tokenizer or the VQA
  accuracy), and ``s_per_1000 = eval_s / queries * 1000``. ``score_s`` times the scoring step alone on the same
  predictions.
- Decoding: ``greedy`` (the tiny config's: captions up to 40 new tokens, answers up to 5) and ``beam5``
  (the paper's beam 5; captions 20 new tokens with at least 8 and length penalty -1, answers 10).
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch loads the OpenMP runtime)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/train_throughput.py: shared cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from emu_lightning.cli import cli
from emu_lightning.eval.callbacks import FewShotEval
from emu_lightning.model import EmuModel
from emu_lightning.shapesworld import ShapesWorldCaptioningEval, ShapesWorldVQAEval

DECODING = {
    "captioning": {"greedy": {"num_beams": 1, "max_new_tokens": 40}, "beam5": None},
    "vqa": {"greedy": {"num_beams": 1, "max_new_tokens": 5}, "beam5": None},
}  # None: the callback's default, the paper's settings


def load_model(ckpt: str | None) -> tuple[EmuModel, str]:
    if ckpt is None:
        found = sorted(Path("runs/tiny").glob("**/final.ckpt"), key=lambda p: p.stat().st_mtime)
        ckpt = str(found[-1]) if found else None
    if ckpt is not None:
        return EmuModel.load_from_checkpoint(ckpt, map_location="cpu"), ckpt
    torch.manual_seed(0)
    return cli(["--config", "configs/tiny.yaml"], run=False).model, "untrained"


def measure(model: EmuModel, callback: FewShotEval, root: Path, repeats: int) -> dict[str, Any]:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=root, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    start = time.perf_counter()
    callback.evaluate(trainer, model)
    setup_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = callback.evaluate(trainer, model)
        times.append(time.perf_counter() - start)
    task = callback.task
    predictions = task.predict(model, task.shots[0], task.seeds[0])
    start = time.perf_counter()
    task.score(predictions)
    score_s = time.perf_counter() - start
    shots = results["shots"][task.shots[0]]
    eval_s = statistics.median(times)
    return {"setup_s": round(setup_s, 3), "eval_s": round(eval_s, 3), "score_s": round(score_s, 3),
            "s_per_1000": round(eval_s / len(task.queries) * 1000, 1), "score": round(shots["mean"], 2),
            "num_evaluated": shots["num_evaluated"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="EmuModel checkpoint (default: the demo's newest final.ckpt)")
    p.add_argument("--queries", type=int, default=200, help="queries per measurement")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    p.add_argument("--decoding", nargs="+", default=["greedy", "beam5"], choices=["greedy", "beam5"])
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    p.add_argument("--quick", action="store_true", help="16 queries, greedy only, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.decoding, args.repeats = 16, ["greedy"], 1
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model, weights = load_model(args.ckpt)
    model.eval()
    common = {"weights": weights, "threads": threads, "torch": torch.__version__, "cpu": platform.processor()}
    with tempfile.TemporaryDirectory() as tmp:
        for task, make in (("captioning", ShapesWorldCaptioningEval), ("vqa", ShapesWorldVQAEval)):
            for decoding in args.decoding:
                for shots in args.shots:
                    callback = make(shots=[shots], seeds=[0], num_queries=args.queries, batch_size=16,
                                    generation=DECODING[task][decoding], strict=True)  # fmt: skip
                    root = Path(tmp) / f"{task}-{decoding}-{shots}"
                    record = measure(model, callback, root, args.repeats)
                    generation = callback.task.generation
                    print(json.dumps({"task": task, "shots": shots, "decoding": decoding, "generation": generation,
                                      "queries": args.queries, **record, **common}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
