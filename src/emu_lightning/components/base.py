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

    def set_num_tokens(self, num_tokens: int) -> None:
        """Told by :class:`~emu_lightning.model.EmuModel`, before anything else, how many tokens the vision backbone
        emits per image: a resampler whose number of embeddings follows it (one per token) takes it here, so that
        configs need not repeat it. The default needs nothing."""


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
    """A causal language model that also regresses the next visual embedding.

    Everything :class:`~emu_lightning.model.EmuModel` calls is declared here; a subclass implements the methods that
    raise ``NotImplementedError`` (the others have working defaults).
    """

    hidden_size: int
    pretrained_path: str | None = None
    """Where pretrained weights were loaded from (``None``: trained from scratch). A pretrained model needs the
    tokenizer it was trained with: EmuModel refuses to pair it with anything but a tokenizer folder."""

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding (and output) table."""
        raise NotImplementedError

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (``None``: no limit)."""
        return None

    @property
    def has_lora(self) -> bool:
        """True while LoRA adapters are injected (not merged)."""
        return False

    def resize_token_embeddings(self, num_tokens: int) -> None:
        """Grow the vocabulary to ``num_tokens`` rows (a no-op when it has that many); Emu starts new rows at the mean
        of the old ones."""
        raise NotImplementedError

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids ``(B, T)`` to input embeddings ``(B, T, hidden_size)``."""
        raise NotImplementedError

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        position_ids: Tensor | None = None,
    ) -> LMOutput:
        """One causal pass over ``inputs_embeds`` ``(B, T, D)``; with ``past_key_values`` (what an earlier call with
        ``use_cache`` returned) they continue that sequence, ``attention_mask`` covering all of it. ``position_ids``
        count from each row's first real token (prompts are left-padded)."""
        raise NotImplementedError

    def regress(self, hidden: Tensor) -> Tensor:
        """Last hidden states ``(..., D)`` to the regressed next visual embeddings ``(..., D)``."""
        raise NotImplementedError

    def generate(self, inputs_embeds: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        """Continue left-padded prompts with new token ids ``(B, N)``. ``kwargs`` are transformers' generation options
        (``max_new_tokens``, ``min_new_tokens``, ``num_beams``, ``length_penalty``, ``do_sample``, ``eos_token_id``,
        ``pad_token_id``, ``streamer``, ...)."""
        raise NotImplementedError

    def merge_lora(self) -> LanguageModel:
        """Fold LoRA adapters into the weights (inference)."""
        raise ValueError(f"{type(self).__name__} has no LoRA adapters to merge")


class VisualDecoder(L.LightningModule):
    """Turns ``(B, Q, D)`` regressed visual embeddings into images ``(B, 3, H, W)`` in ``[0, 1]``.

    Subclasses set ``cond_dim`` (D) and may set ``num_queries`` (Q, when they need a fixed number of embeddings)
    and ``image_size`` (the side of the images it trains on, when fixed: the decoder stage's data then comes at the
    larger of it and the vision tower's, and each is resized from it).
    """

    cond_dim: int
    num_queries: int | None = None
    image_size: int | None = None

    def loss(self, images: Tensor, condition: Tensor, uncondition: Tensor | None = None) -> Tensor:
        """The training loss of generating ``images`` from ``condition``; ``uncondition`` ``(1 or B, Q, D)`` is what
        a dropped condition is replaced by (classifier-free guidance)."""
        raise NotImplementedError

    def sample(
        self,
        condition: Tensor,
        uncondition: Tensor | None = None,
        steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images for ``condition``, guided against ``uncondition``; ``generator`` seeds the noise."""
        raise NotImplementedError

    @property
    def fits_before_training(self) -> bool:
        """Whether :meth:`fit_before_training` has something to fit (the decoder stage's ``decoder_sketch_fit``)."""
        return False

    def fit_before_training(self, condition: Tensor, images: Tensor) -> tuple[float, list[Tensor]]:
        """Fit what can be solved in closed form on training pairs before the first step; returns the fit's error and
        the tensors it set (every process starts from the first one's)."""
        raise NotImplementedError(f"{type(self).__name__} fits nothing before training")
