"""Tokenizers: any Hugging Face tokenizer from a local folder, or a byte-level BPE trained on a corpus.

Emu adds ``[IMG]``, ``[/IMG]`` and ``<image>`` (and ``[USER]``, ``[ASSISTANT]`` for instruction tuning) to
the language model's vocabulary, after a ``[PAD]`` token when the tokenizer has none, in the released order: on
LLaMA's 32,000 tokens, ``[PAD]`` 32000, ``[IMG]`` 32001, ``[/IMG]`` 32002, ``<image>`` 32003 (32,004 rows for
pretraining), ``[USER]`` 32004 and ``[ASSISTANT]`` 32005 (32,006 for Emu-I). Whatever tokenizer is used,
:func:`load_tokenizer` makes sure these and a pad token exist, so the rest of the library can rely on them.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMG_START = "[IMG]"
IMG_END = "[/IMG]"
IMAGE = "<image>"
USER = "[USER]"
ASSISTANT = "[ASSISTANT]"
PAD = "[PAD]"
PRETRAIN_TOKENS = (IMG_START, IMG_END, IMAGE)
"""The tokens Emu's pretraining adds to the vocabulary, in the order they are appended."""
INSTRUCT_TOKENS = (USER, ASSISTANT)
"""The tokens instruction tuning (Emu-I) adds after them."""
EMU_TOKENS = (*PRETRAIN_TOKENS, *INSTRUCT_TOKENS)


def add_emu_tokens(tokenizer: PreTrainedTokenizerBase, instruct: bool = False) -> int:
    """Add Emu's special tokens as the released code does (``[PAD]`` first when the tokenizer has no pad token, then
    :data:`PRETRAIN_TOKENS`, then with ``instruct`` :data:`INSTRUCT_TOKENS`); returns how many tokens were added."""
    added = 0
    if tokenizer.pad_token is None:
        # LLaMA has no pad token; a dedicated one keeps padding out of the real vocabulary's statistics.
        added += tokenizer.add_special_tokens({"pad_token": _special(PAD)})
    _prepend_to_every_piece(tokenizer)
    missing = [t for t in PRETRAIN_TOKENS + (INSTRUCT_TOKENS if instruct else ()) if t not in tokenizer.get_vocab()]
    if missing:
        added += tokenizer.add_special_tokens(
            {"additional_special_tokens": [_special(t) for t in missing]}, replace_extra_special_tokens=False
        )
    return added


def _prepend_to_every_piece(tokenizer: PreTrainedTokenizerBase) -> None:
    """A SentencePiece-style tokenizer saved in the newer layout (a ``Metaspace`` pre-tokenizer that prepends ``▁``
    to the first piece only) encodes the text after a special token without ``▁`` (``[USER] :``); the released slow
    tokenizer encodes every piece between special tokens as a text of its own (``[USER] ▁:``). Prepend to every
    piece, as it does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if type(pre).__name__ == "Metaspace" and pre.prepend_scheme == "first":
        pre.prepend_scheme = "always"
        backend.pre_tokenizer = pre


def _special(token: str) -> AddedToken:
    # The released slow LLaMA tokenizer strips the whitespace around special tokens, so that the text between them is
    # encoded on its own: " [USER]: hi" is `[USER] ▁: ▁hi`, not `▁ [USER] : ▁hi`.
    return AddedToken(token, lstrip=True, rstrip=True, special=True, normalized=False)


def train_bpe(corpus: Sequence[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` (deterministic for a given corpus) and add Emu's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 260:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (at least 260 expected)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    add_emu_tokens(fast)
    return fast


class TrainedBPE:
    """A byte-level BPE trained on a corpus when the model is built, with Emu's tokens: the tokenizer of a language
    model trained from scratch (``model.tokenizer`` in YAML). Training is deterministic and done once per process and
    (corpus, size); the tokenizer is then stored in every checkpoint, so inference never trains it again.

    Args:
        corpus: a function returning the training texts, e.g. ``emu_lightning.shapesworld.corpus`` (an import path in
            YAML).
        vocab_size: the BPE's size before Emu's tokens are added.
    """

    def __init__(self, corpus: Callable[[], Iterable[str]], vocab_size: int = 512) -> None:
        if vocab_size < 260:
            raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (at least 260 expected)")
        self.corpus, self.vocab_size = corpus, vocab_size

    def __call__(self) -> PreTrainedTokenizerFast:
        return copy.deepcopy(_trained(self.corpus, self.vocab_size))  # a fresh copy: callers add tokens to theirs

    def __repr__(self) -> str:
        return f"TrainedBPE({getattr(self.corpus, '__qualname__', self.corpus)}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=4)
def _trained(corpus: Callable[[], Iterable[str]], vocab_size: int) -> PreTrainedTokenizerFast:
    return train_bpe(list(corpus()), vocab_size=vocab_size)


def load_tokenizer(path: str | os.PathLike, instruct: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local Hugging Face tokenizer folder (``tokenizer.json`` / ``tokenizer.model``) with
    Emu's tokens added; with ``instruct`` also the instruction-tuning tokens ``[USER]`` and ``[ASSISTANT]``."""
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {str(path)!r} does not exist (a local Hugging Face tokenizer folder)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_emu_tokens(tokenizer, instruct=instruct)
    return tokenizer


def tokenizer_to_state(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """Serialise a tokenizer's files into a dict, to be stored inside a checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def tokenizer_from_state(state: dict[str, bytes]) -> PreTrainedTokenizerBase:
    """Inverse of :func:`tokenizer_to_state`."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in state.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
