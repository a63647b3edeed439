"""Instruction conversations in Emu-I's template, with the loss on the assistant's turns only.

A conversation is a list of turns ``{"role": "user" | "assistant", "content": ...}``; ``content`` is a string or a
list of items as in ``sequence.py`` (text, ``(3, H, W)`` images, ``(F, 3, H, W)`` videos). It is written as

    <system> [USER]: <user turn> [ASSISTANT]: <assistant turn></s> [USER]: <user turn> [ASSISTANT]: ...

(each text piece of a turn, before or after an image, starts with one space; images sit between pieces)

where only the assistant turns and the EOS (``</s>``) that ends each of them carry loss, so the model learns to
answer and then to stop; the system message, the role tags and the user turns are context. A prompt for the
next answer (:func:`conversation_items` with ``generation_prompt=True``) ends with ``" [ASSISTANT]:"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from emu_lightning.sequence import END_OF_CHUNK
from emu_lightning.tokenizer import ASSISTANT, IMAGE, IMG_END, IMG_START, USER

SYSTEM = "you are a helpful assistant."
"""The default system message: short, since every training sequence repeats it (20 tokens of the tiny BPE)."""
ROLES = ("user", "assistant")
ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}
"""The role names of released conversation data (LLaVA and ShareGPT ``from``), as the template's roles (and
``system``, a turn that sets the system message)."""
USER_TAG = f" {USER}:"
ASSISTANT_TAG = f" {ASSISTANT}:"
IMAGE_TAG = "<image>"
"""How instruction data (LLaVA) marks where an image goes in a turn's text."""
_RESERVED = (IMG_START, IMG_END, USER, ASSISTANT)


class ConversationError(ValueError):
    """A conversation that cannot be trained on or answered; the message says what is wrong."""


def content_items(content: Any) -> list[Any]:
    """A turn's content as a list of items (a string becomes one text item)."""
    if isinstance(content, (str, Tensor)):
        return [content]
    if isinstance(content, (list, tuple)):
        return list(content)
    raise ConversationError(f"turn content must be text, a tensor or a list of items, got {type(content).__name__}")


def split_image_tags(text: str, images: Sequence[Any], tag: str = IMAGE_TAG) -> list[Any]:
    """Text with ``tag`` markers (LLaVA's ``<image>``) to items with ``images`` in their place, in order.

    Raises :class:`ConversationError` when the number of markers differs from the number of images: an image
    tag with no image, or an image with no tag.
    """
    parts = text.split(tag)
    if len(parts) - 1 != len(images):
        raise ConversationError(f"text has {len(parts) - 1} {tag} tag(s) but {len(images)} image(s) were given")
    items: list[Any] = []
    for k, part in enumerate(parts):
        part = part.strip() if len(parts) > 1 else part
        if part:
            items.append(part)
        if k < len(images):
            items.append(images[k])
    return items


def check_text(text: str) -> None:
    """Raise when ``text`` holds a tag the template reserves: an image tag with no image, or a role tag."""
    for token in (IMAGE, *_RESERVED):
        if token in text:
            what = "an image tag with no image" if token in (IMAGE, IMG_START, IMG_END) else "a role tag"
            raise ConversationError(f"text {_preview(text)!r} holds {token!r}, {what}; give images as items")


def normalise(turns: Sequence[Any]) -> list[dict[str, Any]]:
    """Validate ``turns`` and return them as ``{"role", "content": [items]}`` dicts.

    Turns must alternate between user and assistant, starting with the user; text must not hold reserved tags.
    """
    if isinstance(turns, (str, dict)) or not isinstance(turns, Sequence):
        raise ConversationError(f"a conversation is a list of turns, got {type(turns).__name__}")
    if not turns:
        raise ConversationError("the conversation has no turns")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ConversationError(f"turn {k} must be a dict with 'role' and 'content', got {_preview(turn)!r}")
        role = turn["role"]
        if role not in ROLES:
            raise ConversationError(f"turn {k} has role {role!r}; expected one of {list(ROLES)}")
        expected = ROLES[k % 2]
        if role != expected:
            raise ConversationError(f"turn {k} is a {role} turn where a {expected} turn was expected (user first, "
                                    "then alternating)")  # fmt: skip
        items = content_items(turn["content"])
        for item in items:
            if isinstance(item, str):
                check_text(item)
            elif isinstance(item, dict) and "text" in item:
                check_text(item["text"])
        if not items or all(isinstance(i, str) and not i.strip() for i in items):
            raise ConversationError(f"turn {k} ({role}) is empty")
        out.append({"role": role, "content": items})
    return out


def conversation_items(turns: Sequence[Any], system: str | None = SYSTEM, generation_prompt: bool = False) -> list[Any]:
    """The sequence items of a conversation in Emu-I's template, with loss on the assistant turns only.

    Args:
        turns: ``[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]``.
        system: the system message before the first turn (``None`` or ``""``: none).
        generation_prompt: a prompt for the next answer: the conversation must end with a user turn, and the
            items end with the assistant tag. Otherwise (training) it must end with an assistant turn.

    Raises:
        ConversationError: bad roles or order, empty turns, reserved tags in text, no assistant turn to train
            on, an unanswered last user turn (training), or (``generation_prompt``) a conversation that does not
            end with the user.
    """
    turns = normalise(turns)
    if generation_prompt and turns[-1]["role"] != "user":
        raise ConversationError("a prompt for the next answer must end with a user turn")
    if not generation_prompt and not any(t["role"] == "assistant" for t in turns):
        raise ConversationError("the conversation has no assistant turn, so nothing to train on")
    if not generation_prompt and turns[-1]["role"] == "user":  # its EOS would teach stopping after a question
        raise ConversationError("the conversation ends with a user turn that has no answer; drop it for training")
    items: list[Any] = [{"text": system, "loss": False}] if system else []
    for turn in turns:
        if turn["role"] == "user":
            items.append({"text": USER_TAG, "loss": False})
            items += [{"text": _spaced(i), "loss": False} if isinstance(i, str) else i for i in turn["content"]]
        else:
            items.append({"text": ASSISTANT_TAG, "loss": False})
            items += [_spaced(i) if isinstance(i, str) else i for i in turn["content"]]
            items.append(END_OF_CHUNK)
    if generation_prompt:
        items.append({"text": ASSISTANT_TAG, "loss": False})
    return items


def _spaced(text: str) -> str:
    """One space before each text piece of a turn: the tags end without one, and byte-level BPEs tokenise
    ``" word"`` as one token where ``"word"`` after a separate space would be two."""
    return " " + text.strip()


def _preview(value: Any, n: int = 60) -> str:
    text = re.sub(r"\s+", " ", str(value))
    return text if len(text) <= n else text[: n - 3] + "..."
