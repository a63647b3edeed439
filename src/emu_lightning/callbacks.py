"""Training callbacks that are not evaluations (those live in ``eval/callbacks.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class DataAccounting(Callback):
    """Counts, in every training batch, the samples the streaming readers skipped (per source and reason) and the
    samples cut at ``max_length``; logs the running totals (``data/skipped/<source>/<reason>``, ``data/truncated``)
    and prints them when the fit ends. EmuModel adds it to every fit (``configure_callbacks``)."""

    def __init__(self) -> None:
        self.skipped: dict[str, Counter] = {}
        """Samples the streaming readers skipped in this process's training batches, per source and reason."""
        self.truncated = 0
        """Training samples cut at ``max_length`` in this process (their end, e.g. late turns, is not trained)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        from emu_lightning.data.streaming import batch_skips

        if not isinstance(batch, dict):
            return
        for source, reasons in batch_skips(batch).items():
            total = self.skipped.setdefault(source, Counter())
            total.update(reasons)
            for reason in reasons:
                pl_module.log(f"data/skipped/{source}/{reason}", float(total[reason]), reduce_fx="max", batch_size=1)
        if "truncated" in batch and bool(batch["truncated"].any()):
            self.truncated += int(batch["truncated"].sum())
            pl_module.log("data/truncated", float(self.truncated), reduce_fx="max", batch_size=1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        from emu_lightning.data.streaming import format_skips

        if self.skipped and trainer.is_global_zero:
            print(f"samples skipped by the data readers on rank 0:\n{format_skips(self.skipped)}", flush=True)
        if self.truncated and trainer.is_global_zero:
            max_length = getattr(pl_module, "max_length", None)
            print(f"training samples truncated at max_length {max_length} on rank 0: {self.truncated}")


class StepTime(Callback):
    """Logs ``train/step_time``: seconds from a training batch's start to its end (forward, backward, optimizer step;
    not the loader's wait, validation or evaluations), so runs with different evaluations compare. EmuModel adds it
    to every fit (``configure_callbacks``); ``emu-lightning ablate`` reports its median."""

    def __init__(self) -> None:
        self._start: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._start is not None:
            pl_module.log("train/step_time", time.perf_counter() - self._start, batch_size=1)
            self._start = None


class FinalCheckpoint(Callback):
    """Save the weights a fit ends with, however it ends (``max_steps``, ``max_time``), at a fixed path, so that the
    next training stage can name it in its config (``model.init_checkpoint``) without knowing the run's version.

    It never replaces the final weights of another run: a marker beside the file (``.<name>.json``) records which
    run wrote it, and a fit whose target holds another run's file (or a file without a marker) stops before its
    first step with an error naming the path, unless ``overwrite`` is set. A run resumed with ``fit --ckpt_path``
    is the same run (its identity is saved in the checkpoint) and replaces its own file.

    Args:
        path: the checkpoint file; a relative path is under the trainer's ``default_root_dir``.
        overwrite: replace a file that another run wrote (logged).
    """

    def __init__(self, path: str = "final.ckpt", overwrite: bool = False) -> None:
        self.path, self.overwrite = path, overwrite
        self.run_id = uuid.uuid4().hex

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id = state_dict.get("run_id", self.run_id)  # resumed: the same run, which may replace its own file

    def target(self, trainer: L.Trainer) -> Path:
        path = Path(self.path)
        return path if path.is_absolute() else Path(trainer.default_root_dir) / path

    @staticmethod
    def marker(target: Path) -> Path:
        return target.with_name(f".{target.name}.json")

    def check_target(self, trainer: L.Trainer) -> None:
        """Raise ``FileExistsError`` when the target holds final weights this run may not replace."""
        target = self.target(trainer)
        if not target.exists():
            return
        marker = self.marker(target)
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            owner = {}
        ours = owner.get("run_id") == self.run_id and owner.get("size") == target.stat().st_size
        if ours:
            return
        written = (f"the final weights of another run (step {owner.get('step')}, written {owner.get('time')})"
                   if owner else "a file that FinalCheckpoint did not write")  # fmt: skip
        if self.overwrite:
            rank_zero_warn(f"FinalCheckpoint: replacing {target}, {written}, at the end of this fit (overwrite: true)")
            return
        raise FileExistsError(
            f"{target} holds {written}; FinalCheckpoint does not replace it. Delete it, give this run another "
            f"`trainer.default_root_dir` or FinalCheckpoint `path`, or set FinalCheckpoint `overwrite: true`"
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.check_target(trainer)  # before the first step, not after hours of training

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        target = self.target(trainer)
        trainer.save_checkpoint(target, weights_only=False)
        if trainer.is_global_zero:
            owner = {"run_id": self.run_id, "step": trainer.global_step, "size": target.stat().st_size,
                     "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
            self.marker(target).write_text(json.dumps(owner))
        rank_zero_info(f"final weights (step {trainer.global_step}): {target}")


class Preempted(SystemExit):
    """A fit stopped by SIGTERM after saving a resumable checkpoint; exits with status 143 (128 + SIGTERM), so a
    scheduler does not take the run for finished."""


class PreemptionCheckpoint(Callback):
    """On SIGTERM (a cluster scheduler's preemption or time limit, ``kill``): finish the current training step, save a
    resumable checkpoint (weights, optimizer, schedule, loops, data position), say how to resume, and exit with status
    143. Under SLURM with Lightning's auto-requeue, the checkpoint is Lightning's ``hpc_ckpt_<n>.ckpt`` in
    ``default_root_dir`` and the job is requeued (``scontrol requeue``): the requeued job resumes from it by itself.

    Every rank stops at the same step: the ranks agree on whether any of them was signalled after every step (one
    small all-reduce). The handler replaces Lightning's own SIGTERM handling for the fit (which stops after the step
    without a checkpoint and exits 0) and is restored afterwards. ``emu-lightning`` adds this callback to every run.

    Args:
        path: where the checkpoint goes outside SLURM; a relative path is under the run's log folder (the logger's
            version folder, as ``ModelCheckpoint``'s files), so that runs never replace each other's.
        exit_code: the process's exit status after saving.
    """

    def __init__(self, path: str = "checkpoints/preempted.ckpt", exit_code: int = 143) -> None:
        self.path, self.exit_code = path, exit_code
        self.signalled = False
        self._previous: Any = None
        self.saved: Path | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.signalled = trainer.received_sigterm  # a SIGTERM during set-up, which Lightning's handler noted
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._previous = None

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def _stop_now(self, trainer: L.Trainer) -> bool:
        flag = torch.tensor(float(self.signalled), device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        return bool(flag.item() > 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if not self._stop_now(trainer):
            return
        slurm = _slurm_requeue(trainer)
        if slurm:
            path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        else:
            path = Path(self.path)
            if not path.is_absolute():
                path = Path(trainer.log_dir or trainer.default_root_dir) / path
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = path
        self._restore()
        rank_zero_info(f"SIGTERM: saved a resumable checkpoint at step {trainer.global_step}: {path}")
        if slurm and trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            result = subprocess.call(["scontrol", "requeue", job])
            rank_zero_info(f"requeued SLURM job {job}" if result == 0 else f"scontrol requeue {job} failed: {result}")
        elif not slurm:
            rank_zero_info(f"resume with the same command and `--ckpt_path {path}`")
        raise Preempted(self.exit_code)


def _slurm_requeue(trainer: L.Trainer) -> bool:
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue
