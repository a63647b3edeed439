"""Interleaved samples to model batches: token ids with image placeholders, labels, masks, stacked images.

A sample is a list of items (or a dict with an ``"items"`` list):

- ``str``: text, trained on (cross-entropy) by default;
- ``{"text": str, "loss": bool}``: text whose loss can be switched off (prompts, user turns);
- a ``(3, H, W)`` tensor: an image (float in ``[0, 1]``, or uint8 0-255), written as ``[IMG]`` +
  ``<image>`` x Q + ``[/IMG]``;
- a ``(F, 3, H, W)`` tensor or a list of ``(3, H, W)`` tensors: a video, one image block per frame;
- :data:`END_OF_CHUNK`: the tokenizer's EOS inside a sample, trained on, ending one example of several
  chained in a sequence (as packed pretraining data and few-shot prompts chain them), so that generation
  after an example's text stops there.

The ``<image>`` embeddings are overwritten by the resampler's outputs in row-major order, so
``batch["images"]`` lists every kept image in the order its block appears (sample by sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import get_worker_info
from transformers import PreTrainedTokenizerBase

from emu_lightning.tokenizer import IMAGE, IMG_END, IMG_START

IGNORE_INDEX = -100
END_OF_CHUNK: dict[str, bool] = {"end_of_chunk": True}
"""The item that ends a chunk (an example) inside a sample; encoded as the EOS token, with loss."""


def is_end_of_chunk(item: Any) -> bool:
    return isinstance(item, dict) and bool(item.get("end_of_chunk"))


@dataclass
class _Encoded:
    ids: list[int]
    labels: list[int]
    images: list[Tensor]
    truncated: bool


def _flatten_items(sample: Any) -> list[Any]:
    items = sample["items"] if isinstance(sample, dict) else sample
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"a sample must be a list of items or a dict with 'items', got {type(sample).__name__}")
    flat: list[Any] = []
    for item in items:
        if isinstance(item, Tensor) and item.dim() == 4:
            flat.extend(item.unbind(0))  # a video: one image block per frame
        elif isinstance(item, (list, tuple)) and item and all(isinstance(f, Tensor) for f in item):
            flat.extend(item)
        else:
            flat.append(item)
    return flat


def to_unit_range(images: Tensor) -> Tensor:
    """Images as floats in ``[0, 1]``: uint8 images (0-255, as the on-disk readers decode them) are scaled."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def _stack(images: list[Tensor]) -> Tensor:
    """The images as one tensor: uint8 when every image is uint8 (the model scales them on its device), else
    float in [0, 1]. In a DataLoader worker it is written straight into shared memory (as torch's
    ``default_collate`` does), which saves a copy when the batch is sent to the main process."""
    if any(img.dtype != torch.uint8 for img in images):
        images = [to_unit_range(img).float() for img in images]
    out = None
    if get_worker_info() is not None:
        first = images[0]
        storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(images), *first.shape)
    return torch.stack(images, out=out)


class SequenceBuilder:
    """Tokenises interleaved samples into padded batches.

    Args:
        tokenizer: a tokenizer with Emu's tokens (see :func:`emu_lightning.tokenizer.load_tokenizer`).
        num_queries: Q, the number of ``<image>`` placeholders per image (the resampler's ``num_queries``).
        max_length: longest sequence; longer samples are truncated at a token boundary, never inside an
            image block (a block that does not fit is dropped with everything after it).
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.
        add_bos: start each sequence with the tokenizer's BOS token (if it has one).
        add_eos: end each sequence with EOS (when it fits), so generation learns to stop.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_queries: int,
        max_length: int = 256,
        padding_side: str = "right",
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side {padding_side!r} must be 'left' or 'right'")
        if num_queries < 1:
            raise ValueError(f"num_queries {num_queries} must be at least 1")
        if max_length < num_queries + 3:
            raise ValueError(f"max_length {max_length} cannot hold one image block of {num_queries + 2} tokens")
        self.tokenizer, self.num_queries, self.max_length = tokenizer, num_queries, max_length
        self.padding_side, self.add_bos, self.add_eos = padding_side, add_bos, add_eos
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMG_START, IMG_END, IMAGE) if t not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks Emu tokens {missing}; load it with emu_lightning.tokenizer.load_tokenizer"
            )
        self.img_start_id, self.img_end_id, self.image_id = (vocab[t] for t in (IMG_START, IMG_END, IMAGE))
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = tokenizer.bos_token_id if add_bos else None
        self.eos_id = tokenizer.eos_token_id if add_eos else None
        self.chunk_end_id = tokenizer.eos_token_id  # END_OF_CHUNK, in prompts (add_eos=False) too
        self.num_truncated = 0
        """How many samples were truncated so far (a counter for data statistics)."""

    @property
    def block_length(self) -> int:
        return self.num_queries + 2

    def with_options(self, **kwargs: Any) -> SequenceBuilder:
        """A copy with some options changed (e.g. ``padding_side="left", add_eos=False`` for prompts)."""
        args = dict(
            tokenizer=self.tokenizer,
            num_queries=self.num_queries,
            max_length=self.max_length,
            padding_side=self.padding_side,
            add_bos=self.add_bos,
            add_eos=self.add_eos,
        )
        return SequenceBuilder(**{**args, **kwargs})

    def encode(self, sample: Any) -> _Encoded:
        ids: list[int] = []
        labels: list[int] = []
        images: list[Tensor] = []
        if self.bos_id is not None:
            ids.append(self.bos_id)
            labels.append(IGNORE_INDEX)
        budget = self.max_length
        truncated = False
        for item in _flatten_items(sample):
            if isinstance(item, Tensor):
                if item.dim() != 3 or item.shape[0] != 3:
                    raise ValueError(f"an image must be a (3, H, W) tensor, got shape {tuple(item.shape)}")
                if len(ids) + self.block_length > budget:
                    truncated = True
                    break
                block = [self.img_start_id] + [self.image_id] * self.num_queries + [self.img_end_id]
                ids.extend(block)
                labels.extend([IGNORE_INDEX] * len(block))
                images.append(item)
                continue
            if is_end_of_chunk(item):
                if self.chunk_end_id is None:
                    raise ValueError("END_OF_CHUNK needs a tokenizer with an EOS token")
                if len(ids) >= budget:
                    truncated = True
                    break
                ids.append(self.chunk_end_id)
                labels.append(self.chunk_end_id)
                continue
            if isinstance(item, dict):
                text, loss = item["text"], bool(item.get("loss", True))
            elif isinstance(item, str):
                text, loss = item, True
            else:
                raise TypeError(f"unsupported item of type {type(item).__name__} (expected str, dict or tensor)")
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            room = budget - len(ids)
            if len(tokens) > room:
                tokens, truncated = tokens[:room], True
            ids.extend(tokens)
            labels.extend(tokens if loss else [IGNORE_INDEX] * len(tokens))
            if truncated:
                break
        if self.eos_id is not None and not truncated and ids[-1:] != [self.eos_id]:  # one EOS: a sample can end
            if len(ids) < budget:  # with END_OF_CHUNK already (a conversation's last answer)
                ids.append(self.eos_id)
                labels.append(self.eos_id)
            else:
                truncated = True
        self.num_truncated += int(truncated)
        return _Encoded(ids, labels, images, truncated)

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        """Collate ``samples`` into ``input_ids``, ``attention_mask``, ``labels`` (B, T) and ``images`` (N, 3, H, W).

        ``image_counts`` (B,) gives each sample's number of kept images; ``truncated`` (B,) flags truncation.
        Extra keys of dict samples (ids, references, ...) are passed through as lists (None where a sample lacks one).
        """
        if len(samples) == 0:
            raise ValueError("cannot build a batch from zero samples")
        encoded = [self.encode(s) for s in samples]
        length = max(len(e.ids) for e in encoded)
        input_ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.ids)
            span = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[i, span] = torch.tensor(e.ids, dtype=torch.long)
            labels[i, span] = torch.tensor(e.labels, dtype=torch.long)
            attention_mask[i, span] = 1
        all_images = [img for e in encoded for img in e.images]
        sizes = {tuple(img.shape) for img in all_images}
        if len(sizes) > 1:
            raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "images": _stack(all_images) if all_images else None,
            "image_counts": torch.tensor([len(e.images) for e in encoded], dtype=torch.long),
            "truncated": torch.tensor([e.truncated for e in encoded], dtype=torch.bool),
        }
        extra = dict.fromkeys(k for s in samples if isinstance(s, dict) for k in s)  # every sample's keys, in order
        for key in extra:
            if key != "items" and key not in batch:
                batch[key] = [s.get(key) if isinstance(s, dict) else None for s in samples]
        return batch
