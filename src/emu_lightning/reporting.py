"""Text tables and images through whatever logger a run has, and a learning-rate monitor that a logger-less run
tolerates.

:func:`log_text` and :func:`log_image` dispatch on each of the trainer's loggers:

- TensorBoard: ``experiment.add_text`` (a Markdown table) and ``experiment.add_image``;
- Weights & Biases: ``WandbLogger.log_text`` (a table) and ``WandbLogger.log_image``;
- MLflow: ``experiment.log_text`` and ``experiment.log_image`` on the logger's run, as artifacts
  ``<key>/step<step>.md`` and ``.png``;
- CSV and any other logger: files in its folder, ``<log dir>/media/<key>-step<step>.md`` and ``.png`` (``/`` in
  the key becomes ``-``);
- no logger (``logger: false``): nothing.

Only the global rank 0 logs; other ranks return at once (call them on every rank, or on rank 0 only: neither waits
for another rank).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLearningRateMonitor
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; ``|`` and line breaks inside cells are escaped."""

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        return " ".join(text.splitlines()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def log_text(
    trainer: L.Trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> list[Path]:
    """Log a table of text (e.g. sample predictions beside their references) under ``key`` at ``step``.

    Args:
        trainer: its loggers receive the table.
        key: the name, e.g. ``"eval/vqa_samples"``.
        columns: the column names.
        rows: one sequence of cells per row, as many as ``columns`` (cells are written with ``str``).
        step: the training step.

    Returns:
        The files written (for loggers without a text API), if any.
    """
    columns = [str(c) for c in columns]
    bad = [i for i, row in enumerate(rows) if len(row) != len(columns)]
    if bad:
        raise ValueError(f"log_text {key!r}: row {bad[0]} has {len(rows[bad[0]])} cells for {len(columns)} columns")
    if not trainer.is_global_zero:
        return []
    table = markdown_table(columns, rows)
    written = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, table, global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_text(key=key, columns=columns, data=[[_plain(v) for v in row] for row in rows], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, table, f"{_artifact_name(key)}/step{step:07d}.md")
        else:  # CSVLogger and any other: a file beside the logger's own
            path = _media_folder(trainer, logger) / f"{_file_name(key)}-step{step:07d}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# {key} at step {step}\n\n{table}")
            written.append(path)
    return written


def log_image(trainer: L.Trainer, key: str, image: torch.Tensor, step: int) -> list[Path]:
    """Log one image (e.g. a grid of generated images, ``torchvision.utils.make_grid``) under ``key`` at ``step``.

    Args:
        trainer: its loggers receive the image.
        key: the name, e.g. ``"eval/text_to_image"``.
        image: ``(3, H, W)`` (or ``(1, H, W)``) floats in ``[0, 1]`` or uint8.
        step: the training step.

    Returns:
        The files written (for loggers without an image API), if any.
    """
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"log_image {key!r}: expected an image (3, H, W) or (1, H, W), got {tuple(image.shape)}")
    if not trainer.is_global_zero:
        return []
    chw = image.detach().cpu()
    chw = chw if chw.dtype == torch.uint8 else (chw.float().clamp(0, 1) * 255).round().to(torch.uint8)
    hwc = chw.permute(1, 2, 0).numpy()
    hwc = np.ascontiguousarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc)
    written = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, chw, global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[hwc], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, hwc, artifact_file=f"{_artifact_name(key)}/step{step:07d}.png")
        else:
            from PIL import Image

            path = _media_folder(trainer, logger) / f"{_file_name(key)}-step{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(hwc).save(path)
            written.append(path)
    return written


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _file_name(key: str) -> str:
    return re.sub(r"[^\w.=+-]+", "-", key.replace("/", "-")).strip("-") or "logged"


def _artifact_name(key: str) -> str:
    return "/".join(_file_name(part) for part in key.split("/") if part) or "logged"


def _media_folder(trainer: L.Trainer, logger: Any) -> Path:
    """``<log dir>/media``: a CSVLogger's version folder (beside its ``metrics.csv``), another logger's ``log_dir`` or
    ``save_dir``, else the trainer's root."""
    folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return Path(folder or trainer.default_root_dir) / "media"


class LearningRateMonitor(_LightningLearningRateMonitor):
    """Lightning's :class:`~lightning.pytorch.callbacks.LearningRateMonitor`, except that a run without a logger
    (``logger: false``) gets a note and logs nothing, instead of failing as Lightning's does when training starts.

    The configs use it with ``logging_interval: step``: ``lr-<optimizer>`` (one curve per parameter group,
    ``/pg<N>`` when there are several) at every logged step, beside the losses.
    """

    _inactive = False

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._inactive = not trainer.loggers
        if self._inactive:
            rank_zero_info("LearningRateMonitor: this run has no logger (logger: false), so the learning rate is not "
                           "logged")  # fmt: skip
            return
        super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._inactive:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._inactive:
            super().on_train_epoch_start(trainer, *args, **kwargs)
