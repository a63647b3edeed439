"""Reading checkpoints safely: no file runs code when it is read, and a bad file is an error that names it.

Every checkpoint the library reads (``fit --ckpt_path``, ``validate --ckpt_path``, ``model.init_checkpoint``,
``chat --ckpt``, ``generate --ckpt``) goes through :func:`load_checkpoint`: ``torch.load(weights_only=True)``, which
reads tensors and plain data (dicts, lists, strings, numbers, bytes) only and refuses any other Python object,
because unpickling an object can run arbitrary code. Everything Lightning and EmuModel store is plain data, so real
checkpoints load unchanged; a file that holds something else is refused, never executed. A missing, empty,
truncated, corrupt or foreign file raises :class:`CheckpointError` with the path and what is wrong with it.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

LIGHTNING = ("state_dict", "pytorch-lightning_version")
"""What every Lightning checkpoint holds (``fit`` / ``validate --ckpt_path``)."""
EMU = ("state_dict", "emu_tokenizer")
"""What EmuModel's weights need (``model.init_checkpoint``): the state dict and the tokenizer stored beside it."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint file at the given path."""


def _unsafe_object(message: str) -> str | None:
    """The global a weights-only unpickling refused (``posix.system``); None when the bytes are no pickle."""
    match = re.search(r"(?:unsupported GLOBAL|Unsupported global:\s*GLOBAL)\s+([\w.]+)", message)
    return match.group(1) if match else None


def load_checkpoint(
    path: str | Path, what: str = "checkpoint", require: Sequence[str] = LIGHTNING, mmap: bool = False
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Args:
        path: the file.
        what: how the error messages name it (``--ckpt_path``, ``model.init_checkpoint``, ...).
        require: the keys the checkpoint must hold (:data:`LIGHTNING`, :data:`EMU`, both, or none: any dict).
        mmap: map the file instead of reading it (tensors are read when used): cheap for a look at the metadata of a
            large file, or for weights that are copied at once. Never for state kept alive, because a save to the same
            path truncates the mapped file under it.
    Raises:
        CheckpointError: the file is missing (:class:`CheckpointNotFoundError`, also a ``FileNotFoundError``) or
            unusable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{what} {str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir() else "")
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} {str(path)!r} is empty (0 bytes): an interrupted copy or save?")
    is_zip = zipfile.is_zipfile(path)
    try:
        # torch.save writes a zip archive, which can be memory-mapped; anything else is tried as a legacy pickle.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as err:  # random bytes make the unpickler raise anything (IndexError, KeyError, ...)
        refused = _unsafe_object(str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if refused is not None:
            raise CheckpointError(
                f"{what} {str(path)!r} holds a Python object ({refused}) besides tensors and plain data; it is not "
                "loaded, because unpickling it could run code. Re-save the checkpoint's tensors and plain data "
                "(a state dict) from a trusted copy"
            ) from None
        with path.open("rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if is_zip or zip_start:  # a zip archive (torch.save's format) that is cut short or damaged
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(
                f"{what} {str(path)!r} cannot be read ({size} bytes; truncated or corrupt?): {first}"
            ) from None
        raise CheckpointError(
            f"{what} {str(path)!r} is not a PyTorch checkpoint ({size} bytes that are neither the zip archive that "
            "torch.save writes nor a pickle)"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{what} {str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint's dict")
    missing = [k for k in require if k not in checkpoint]
    if missing:
        held = sorted(map(str, checkpoint))[:8]
        kind = "a Lightning checkpoint" if "pytorch-lightning_version" in missing else "an EmuModel checkpoint"
        raise CheckpointError(
            f"{what} {str(path)!r} is not {kind}: it lacks {missing} (it holds {held}). A bare state dict or another "
            "library's checkpoint must be converted first"
        )
    return checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`load_checkpoint`'s reading: weights only, errors that name the file."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, what="checkpoint")
