"""Training callbacks that are not evaluations (those live in ``eval/callbacks.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class FinalCheckpoint(Callback):
    """Save the weights a fit ends with, however it ends (``max_steps``, ``max_time``), at a fixed path, so that the
    next training stage can name it in its config (``model.init_checkpoint``) without knowing the run's version.

    Args:
        path: the checkpoint file; a relative path is under the trainer's ``default_root_dir``.
    """

    def __init__(self, path: str = "final.ckpt") -> None:
        self.path = path

    def target(self, trainer: L.Trainer) -> Path:
        path = Path(self.path)
        return path if path.is_absolute() else Path(trainer.default_root_dir) / path

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        target = self.target(trainer)
        trainer.save_checkpoint(target)
        rank_zero_info(f"final weights (step {trainer.global_step}): {target}")
