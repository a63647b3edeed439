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
        max_steps: step at which the cosine reaches ``min_ratio``; the rate stays there afterwards.
        min_ratio: final learning rate as a fraction of the base rate.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 100, max_steps: int = 10_000, min_ratio: float = 0.1):
        if max_steps <= warmup_steps:
            raise ValueError(f"max_steps {max_steps} must exceed warmup_steps {warmup_steps}")
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.max_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
