"""A stand-in for a model's ``generate`` that gets some answers right and some wrong, so that per-sample scores
differ and their mean is a real check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Guesser:
    """Answers each prompt with one of ``answers``, picked by the query image's pixels (the last image of the
    prompt): deterministic, and right for some queries only. Counts its calls."""

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, prompts: Sequence[list[Any]], **generation: Any) -> list[str]:
        self.calls += 1
        out = []
        for prompt in prompts:
            image = [x for x in prompt if isinstance(x, torch.Tensor)][-1]
            out.append(self.answers[int(image.double().sum() * 1000) % len(self.answers)])
        return out


VQA_ANSWERS = ("yes", "no", "1", "2", "3", "red", "blue", "circle")
