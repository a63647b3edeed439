"""Learning-rate schedules that can be named from YAML (``scheduler: {class_path: ...}``)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up from 0, then cosine decay to ``min_ratio`` of the base rate at ``max_steps`` (per step).

    Args:
        optimizer: the optimizer (filled in by the model).
        warmup_steps: steps of linear warm-up.
        max_steps: step at which the cosine reaches ``min_ratio``; the rate stays there afterwards. ``None`` (the
            default): the trainer's ``max_steps``, so a config says the run's length once. A run shorter than the
            warm-up only warms up.
        min_ratio: final learning rate as a fraction of the base rate.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 100, max_steps: int | None = None, min_ratio: float = 0.1
    ) -> None:
        if warmup_steps < 1 or (max_steps is not None and max_steps < 1):
            raise ValueError(f"warmup_steps ({warmup_steps}) and max_steps ({max_steps}) must be >= 1")
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.max_steps is None:
            raise RuntimeError("WarmupCosine.max_steps is not set: give it, or let EmuModel take the trainer's")
        span = self.max_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
