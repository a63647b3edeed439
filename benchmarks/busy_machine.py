"""Training on a busy machine: how much one competing CPU-bound process slows the tiny config's steps, with OpenMP's
default wait policy (what `emu-lightning fit` and `make demo` had before) and with the library's default
(``OMP_WAIT_POLICY=PASSIVE``, set by ``import emu_lightning`` unless the variable is set).

Method: each contender is a fresh Python process (the OpenMP runtime reads its wait policy once, when torch loads it)
that builds ``configs/tiny.yaml`` (little ShapesWorld data, no validation or evaluation) and times ``--steps``
training steps after ``--warmup`` (the median step, from the start of one batch to the start of the next). The
"default" contender imports torch before emu_lightning with ``OMP_WAIT_POLICY`` unset, so OpenMP keeps its own
default (spinning); the "passive" one imports emu_lightning first, as the command line does. Each runs idle and then
beside one competitor, a process spinning in a Python loop (``while True: pass``) for the whole measurement. Every
contender uses torch's default thread count (the usable cores).

Prints one JSON line per run, then ratios side by side:

- ``slowdown``: busy step time / idle step time, per policy (the issue measured 4.2x by default, 1.8x with PASSIVE:
  losing one of two cores costs about 2x whatever the policy);
- ``busy_default_over_passive``: what the default policy costs on the busy machine;
- ``idle_passive_over_default``: what PASSIVE costs on an idle machine (threads sleep and wake between regions).

    .venv/bin/python benchmarks/busy_machine.py            # about 2-3 minutes
    .venv/bin/python benchmarks/busy_machine.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys, json, time
first_torch = sys.argv[1] == "default"
if first_torch:
    os.environ.pop("OMP_WAIT_POLICY", None)
    import torch  # the OpenMP runtime starts with its own default wait policy
else:
    import emu_lightning  # first, as the command line does: it sets the policy before torch loads
import lightning as L
from emu_lightning.cli import cli
at_load = None if first_torch else os.environ.get("OMP_WAIT_POLICY")  # the policy OpenMP started with

steps, warmup, config = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

class Clock(L.Callback):
    def __init__(self):
        self.starts = []
    def on_train_batch_start(self, *args):
        self.starts.append(time.perf_counter())

clock = Clock()
run = cli(["--config", config, f"--trainer.max_steps={steps + warmup + 1}", "--trainer.max_time=null",
           "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
           "--trainer.default_root_dir=run",
           "--data.init_args.sources.pairs.init_args.writer.init_args.train=40",
           "--data.init_args.sources.mmc4.init_args.writer.init_args.train=8",
           "--data.init_args.sources.webvid.init_args.writer.init_args.train=8",
           "--data.init_args.sources.storyboard.init_args.writer.init_args.train=8"], run=False)
run.trainer.callbacks = [c for c in run.trainer.callbacks if type(c).__name__ != "FinalCheckpoint"] + [clock]
run.trainer.fit(run.model, run.datamodule)
import torch
gaps = [b - a for a, b in zip(clock.starts[warmup:], clock.starts[warmup + 1:])]
print(json.dumps({"step_seconds": gaps, "threads": torch.get_num_threads(),
                  "omp_wait_policy": at_load}))
"""


def measure(policy: str, busy: bool, steps: int, warmup: int, workdir: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_WAIT_POLICY", None)  # each contender chooses, as a user who set nothing
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, policy, str(steps), str(warmup), str(ROOT / "configs" / "tiny.yaml")],
            cwd=workdir, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - start
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if out.returncode != 0:
        raise SystemExit(f"{policy} {'busy' if busy else 'idle'} failed:\n{out.stderr[-3000:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    step = statistics.median(child["step_seconds"])
    return {"policy": policy, "machine": "busy" if busy else "idle", "median_step_seconds": round(step, 4),
            "steps_timed": len(child["step_seconds"]), "threads": child["threads"],
            "omp_wait_policy": child["omp_wait_policy"], "process_seconds": round(wall, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--quick", action="store_true", help="10 timed steps after 3")
    args = p.parse_args()
    steps, warmup = (10, 3) if args.quick else (args.steps, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for policy in ("default", "passive"):
            for busy in (False, True):
                r = measure(policy, busy, steps, warmup, Path(tmp))
                runs[(policy, busy)] = r["median_step_seconds"]
                print(json.dumps(r), flush=True)
    ratio = lambda a, b: round(a / b, 2)  # noqa: E731
    print(json.dumps({
        "slowdown": {"default": ratio(runs["default", True], runs["default", False]),
                     "passive": ratio(runs["passive", True], runs["passive", False])},
        "busy_default_over_passive": ratio(runs["default", True], runs["passive", True]),
        "idle_passive_over_default": ratio(runs["passive", False], runs["default", False]),
        "cores": len(os.sched_getaffinity(0)),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
