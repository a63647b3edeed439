"""The four component interfaces that :class:`~emu_lightning.model.EmuModel` composes.

Each is a :class:`lightning.LightningModule`, so a component can be trained on its own (a text-only
warm-up of the language model, the decoder stage) and swapped from YAML with a ``class_path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from emu_lightning.images import ImageTransform


def on_meta_device() -> bool:
    """True while modules are being built under ``torch.device("meta")`` (``inspect``): skip weight loading."""
    return torch.empty(0).device.type == "meta"


class VisionBackbone(L.LightningModule):
    """Images ``(B, 3, H, W)`` in ``[0, 1]`` to visual tokens ``(B, N, out_dim)``.

    Subclasses set ``out_dim`` (token width) and ``num_tokens`` (N, known before any forward pass).
    """

    out_dim: int
    num_tokens: int
    image_size: int

    @property
    def image_transform(self) -> ImageTransform:
        """How pictures become this backbone's input (every reader, evaluation, chat and generation uses it)."""
        return ImageTransform(self.image_size)

    def forward(self, pixels: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Resampler(L.LightningModule):
    """Visual tokens ``(B, N, in_dim)`` to ``num_queries`` embeddings ``(B, Q, out_dim)`` in the LLM's width."""

    in_dim: int
    out_dim: int
    num_queries: int

    def forward(self, features: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class LMOutput:
    """What :meth:`LanguageModel.forward` returns."""

    logits: Tensor
    """``(B, T, V)`` next-token logits."""
    hidden: Tensor
    """``(B, T, D)`` last hidden states (after the final norm), the input of the regression head."""
    past_key_values: Any = None
    """The KV cache, to pass back for the next step."""


class LanguageModel(L.LightningModule):
    """A causal language model that also regresses the next visual embedding."""

    hidden_size: int
    pretrained_path: str | None = None
    """Where pretrained weights were loaded from (``None``: trained from scratch). A pretrained model needs the
    tokenizer it was trained with: EmuModel refuses to pair it with the built-in ShapesWorld one."""

    def embed(self, ids: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(
        self, inputs_embeds: Tensor, attention_mask: Tensor, past_key_values: Any = None
    ) -> LMOutput:  # pragma: no cover
        raise NotImplementedError

    def regress(self, hidden: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class VisualDecoder(L.LightningModule):
    """Turns ``(B, Q, D)`` regressed visual embeddings into images ``(B, 3, H, W)`` in ``[0, 1]``."""

    def loss(self, images: Tensor, condition: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(
        self, condition: Tensor, uncondition: Tensor | None = None, steps: int = 50, guidance_scale: float = 7.5
    ) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError
