"""Instruction-tuning conversations (Emu-I) in their released on-disk formats.

Every format is a json list of entries (``.json``) or one entry per line (``.jsonl``):

- ``llava`` (LLaVA-Instruct): ``{"id", "image": "rel/path.jpg" | [paths] (absent: text only), "conversations":
  [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}``; each
  ``<image>`` tag is replaced by the next image (found under ``image_dir``), in order.
- ``sharegpt``: ``{"id", "conversations": [...]}`` with the roles ``human`` / ``user``, ``gpt`` / ``chatgpt`` /
  ``bard`` / ``assistant`` and ``system``; text only.
- ``alpaca``: ``{"instruction", "input", "output"}``: one user turn (the instruction, then ``"\\n\\n"`` and the
  input when there is one) and one assistant turn.
- ``videochat`` (VideoChat-Instruct-11K): ``{"video": "rel.mp4", "QA": [{"i": instruction (optional), "q",
  "a"}, ...]}``: one user turn per QA (instruction and question joined by a newline), one assistant turn each.
- ``video_chatgpt`` (VideoInstruct-100K): ``{"video_id": "v_xxx", "q", "a"}``; the video is
  ``{video_dir}/{video_id}`` with ``.mp4``, ``.mkv`` or ``.avi``, the first that exists.

For the chat formats (``llava``, ``sharegpt``) a leading ``system`` turn replaces the system message for that
conversation, leading assistant turns (ShareGPT conversations that start with the bot) and trailing user turns
(questions without an answer) are dropped. A
video is decoded to ``num_frames`` frames with :func:`~emu_lightning.data.webvid.read_clip` (a random time in
each segment for training, its centre for evaluation) and placed as one ``(F, 3, S, S)`` item before the
first user turn's text. The turns become sequence items with
:func:`~emu_lightning.conversation.conversation_items`: the loss falls on the assistant turns only.

Units are chunks of ``conversations_per_unit`` entries of a file, located by byte offset, so one big json
splits across ranks and workers and each process reads only its chunks' bytes. Finding the entries of a
``.json`` list means parsing the whole file once, when the reader is built (a ``.jsonl`` file is only scanned
for line ends); every process that builds a reader pays this once, not per unit.

Skip reasons (each counts one conversation, except where said):

- ``malformed_json``: a jsonl line that is not JSON, an entry that is not a JSON object, or a ``.json`` file
  that does not parse as a list (one skip for the whole file; none of its entries is used).
- ``missing_field``: a required field is absent or of the wrong type (``conversations``, a turn's ``from`` /
  ``value``, ``image``, ``instruction`` / ``output``, ``video`` / ``QA`` / ``q`` / ``a``, ``video_id``).
- ``bad_roles``: a turn with an unknown role, two turns of the same role in a row, or a system turn that does
  not open the conversation.
- ``no_assistant_turn``: no assistant turn after the first user turn, so nothing to train on.
- ``image_tag_mismatch``: the number of ``<image>`` tags differs from the number of images (a tag with no
  image, an image with no tag; any tag in a text-only or video format).
- ``empty_turn``: a turn with no text (and no image).
- ``missing_image`` / ``corrupt_image``: an image file that does not exist / does not decode.
- ``missing_video`` / ``corrupt_video``: a video file that does not exist / does not decode (PyAV fails, no
  video stream, truncated); ``too_few_frames``: fewer decodable frames than ``num_frames``.
- ``bad_conversation``: any other problem the template reports (:class:`ConversationError`), e.g. text that
  holds a reserved tag such as ``[USER]`` or ``[IMG]``.
- ``dropped_leading_turn``: one leading assistant turn dropped; the conversation itself is still used.
- ``dropped_trailing_turn``: one trailing user turn without an answer dropped (ShareGPT and LLaVA-665k have
  them); the conversation itself is still used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from torch import Tensor

from emu_lightning.conversation import (
    IMAGE_TAG,
    ROLE_NAMES,
    SYSTEM,
    ConversationError,
    conversation_items,
    split_image_tags,
)
from emu_lightning.data.pairs import decode_image
from emu_lightning.data.streaming import Skip, StreamingSource, expand_urls
from emu_lightning.data.webvid import VideoError, read_clip

FORMATS = ("llava", "sharegpt", "alpaca", "videochat", "video_chatgpt")
SUFFIXES = (".json", ".jsonl")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi")
"""Video-ChatGPT's file extensions, in the order a ``video_id``'s file is looked for."""
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_BOM = "\xef\xbb\xbf"  # UTF-8's byte order mark, read as latin-1


class _Bad(Exception):
    """A conversation that is skipped; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------- files and units
@dataclass(frozen=True)
class JsonChunk:
    """A unit: ``count`` entries of ``path`` from entry number ``first``, in bytes ``start`` to ``end``; a file
    that does not parse is one unit with ``error`` set (read as one ``malformed_json`` skip)."""

    path: Path
    first: int
    start: int
    end: int
    count: int
    error: str = ""


def _list_spans(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each element of the json list ``text``; raises ValueError where it is not one."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, len(_BOM) if text.startswith(_BOM) else 0).end()
    if not text.startswith("[", pos):
        raise ValueError(f"expected a json list ('[') at byte {pos}")
    pos = _WHITESPACE.match(text, pos + 1).end()
    end = pos + 1
    if not text.startswith("]", pos):
        while True:
            _, end = decoder.raw_decode(text, pos)
            yield pos, end
            pos = _WHITESPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WHITESPACE.match(text, pos + 1).end()
                continue
            if not text.startswith("]", pos):
                raise ValueError(f"expected ',' or ']' at byte {pos}")
            end = pos + 1
            break
    if _WHITESPACE.match(text, end).end() != len(text):
        raise ValueError(f"extra data after the list at byte {end}")


def _line_spans(path: Path) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each non-blank line of a jsonl file."""
    offset = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield offset, offset + len(line)
            offset += len(line)


def index_file(path: str | Path, per_unit: int) -> list[JsonChunk]:
    """Cut a ``.json`` list or ``.jsonl`` file into chunks of ``per_unit`` entries (a ``.json`` file that does
    not parse as a list gives one chunk with ``error``); raises FileNotFoundError for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        spans = _line_spans(path)
    else:
        # Latin-1 maps each byte to one character, so character offsets are byte offsets; the json structure
        # is ASCII, and UTF-8's multi-byte characters (all bytes >= 0x80) can only sit inside strings.
        spans = _list_spans(path.read_bytes().decode("latin-1"))
    chunks: list[JsonChunk] = []
    count = start = last = 0
    try:
        for number, (begin, end) in enumerate(spans):
            if number % per_unit == 0:
                if number:
                    chunks.append(JsonChunk(path, number - per_unit, start, last, per_unit))
                start = begin
            last = end
            count = number + 1
    except ValueError as error:
        return [JsonChunk(path, 0, 0, 0, 0, error=str(error))]
    if count:
        first = (count - 1) // per_unit * per_unit
        chunks.append(JsonChunk(path, first, start, last, count - first))
    return chunks


def read_chunk(chunk: JsonChunk) -> list[Any | Skip]:
    """The entries of one chunk (a ``malformed_json`` :class:`Skip` for each jsonl line that does not parse)."""
    with chunk.path.open("rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    if chunk.path.suffix != ".jsonl":
        try:  # the chunk's bytes are the list's elements with the commas between them
            return json.loads("[" + data.decode("utf-8", errors="replace") + "]")
        except ValueError as error:  # the file changed since it was indexed
            return [Skip("malformed_json", f"{chunk.path}: entries {chunk.first}+: {error}")]
    entries: list[Any | Skip] = []
    for number, line in enumerate((line for line in data.splitlines() if line.strip()), chunk.first):
        try:
            entries.append(json.loads(line))
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            entries.append(Skip("malformed_json", f"{chunk.path.name}:{number}: {error}"))
    return entries


# ---------------------------------------------------------------------- formats
@dataclass
class Dialogue:
    """An entry read from its format: ``(role, text)`` turns, image paths for its ``<image>`` tags, and the
    candidate paths of its video (the first that exists is used)."""

    turns: list[tuple[str, str]]
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)


def _field(entry: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    value = entry.get(key)
    if not isinstance(value, kind):
        raise _Bad("missing_field", f"{where}{key!r} is missing or not a {getattr(kind, '__name__', 'value')}")
    return value


def _chat(entry: dict[str, Any]) -> Dialogue:
    """LLaVA and ShareGPT: ``conversations`` of ``{"from", "value"}`` turns (LLaVA: with ``image``)."""
    turns = []
    for k, turn in enumerate(_field(entry, "conversations", list)):
        if not isinstance(turn, dict):
            raise _Bad("missing_field", f"turn {k} is not an object")
        role, value = _field(turn, "from", str, f"turn {k}: "), _field(turn, "value", str, f"turn {k}: ")
        if role not in ROLE_NAMES:
            raise _Bad("bad_roles", f"turn {k} has role {role!r}; expected one of {list(ROLE_NAMES)}")
        turns.append((ROLE_NAMES[role], value))
    images = entry.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise _Bad("missing_field", f"'image' must be a path or a list of paths, got {images!r}")
    return Dialogue(turns, images)


def _alpaca(entry: dict[str, Any]) -> Dialogue:
    instruction, output = _field(entry, "instruction", str), _field(entry, "output", str)
    extra = _field(entry, "input", str) if entry.get("input") is not None else ""
    prompt = "\n\n".join(part for part in (instruction.strip(), extra.strip()) if part)
    return Dialogue([("user", prompt), ("assistant", output)])


def _videochat(entry: dict[str, Any]) -> Dialogue:
    video, turns = _field(entry, "video", str), []
    for k, qa in enumerate(_field(entry, "QA", list)):
        if not isinstance(qa, dict):
            raise _Bad("missing_field", f"QA {k} is not an object")
        question, answer = _field(qa, "q", str, f"QA {k}: "), _field(qa, "a", str, f"QA {k}: ")
        instruction = _field(qa, "i", str, f"QA {k}: ") if qa.get("i") is not None else ""
        turns += [("user", "\n".join(p for p in (instruction.strip(), question.strip()) if p)), ("assistant", answer)]
    return Dialogue(turns, videos=[video])


def _video_chatgpt(entry: dict[str, Any]) -> Dialogue:
    video_id, question, answer = (_field(entry, key, str) for key in ("video_id", "q", "a"))
    return Dialogue([("user", question), ("assistant", answer)], videos=[video_id + s for s in VIDEO_SUFFIXES])


PARSERS = {
    "llava": _chat,
    "sharegpt": _chat,
    "alpaca": _alpaca,
    "videochat": _videochat,
    "video_chatgpt": _video_chatgpt,
}


def _check_roles(
    turns: list[tuple[str, str]], system: str | None
) -> tuple[list[tuple[str, str]], str | None, int, int]:
    """The turns from the first user turn to the last assistant turn, the system message (a leading system turn's,
    else ``system``), and how many leading assistant and trailing user turns were dropped (an unanswered question
    has nothing to train on, and the EOS after it would teach the model to stop after a question); raises for
    roles the template cannot take."""
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1].strip(), turns[1:]
    if any(role == "system" for role, _ in turns):
        raise _Bad("bad_roles", "a system turn that does not open the conversation")
    dropped = 0
    while turns and turns[0][0] != "user":
        turns, dropped = turns[1:], dropped + 1
    for k in range(1, len(turns)):
        if turns[k][0] == turns[k - 1][0]:
            raise _Bad("bad_roles", f"turns {k - 1} and {k} are both {turns[k][0]} turns")
    if not any(role == "assistant" for role, _ in turns):
        raise _Bad("no_assistant_turn", f"{len(turns)} turn(s) from the first user turn, none by the assistant")
    trailing = 0
    while turns[-1][0] == "user":
        turns, trailing = turns[:-1], trailing + 1
    return turns, system, dropped, trailing


# ---------------------------------------------------------------------- source
class InstructionConversations(StreamingSource):
    """Instruction conversations of one format (see the module docstring for the formats and the skip reasons),
    as samples ``{"items": conversation_items(...), "id": the entry's id}``; entries without an ``id`` get
    ``"<file name>:<entry number>"``. Images are ``(3, S, S)`` uint8 tensors, videos ``(F, 3, S, S)``.

    Args:
        paths: ``.json`` / ``.jsonl`` files: a path, a brace pattern, or a list of them.
        format: ``llava``, ``sharegpt``, ``alpaca``, ``videochat`` or ``video_chatgpt``.
        image_size: side S of the square images and frames, the whole picture resized to S x S (bicubic, the
            library's one transform); by default the model's (set by the DataModule).
        image_dir: folder LLaVA's image paths are relative to; by default each file's own folder.
        video_dir: folder the video paths (VideoChat) and ids (Video-ChatGPT) are relative to; by default each
            file's own folder.
        num_frames: frames sampled per video, one per equal segment.
        system: the system message of every conversation (a leading ``system`` turn replaces it); ``None`` or
            ``""``: none.
        train: sample a random time in each video segment (from the reader's seeded rng); False: the centre.
        conversations_per_unit: entries per unit, the grain at which ranks and workers split a file.
        name: the source's name in sample metadata and skip counts; by default the format.
        shuffle: shuffle the units and the entries inside each (seeded).
        repeat: start a new pass when one ends.
        seed: seeds every random choice.
        split_by_node: split units across distributed ranks.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        format: str,
        image_size: int | None = None,
        image_dir: str | Path | None = None,
        video_dir: str | Path | None = None,
        num_frames: int = 8,
        system: str | None = SYSTEM,
        train: bool = True,
        conversations_per_unit: int = 64,
        name: str | None = None,
        shuffle: bool = True,
        repeat: bool = True,
        seed: int = 0,
        split_by_node: bool = True,
    ) -> None:
        super().__init__(name or format, shuffle=shuffle, repeat=repeat, seed=seed, split_by_node=split_by_node)
        if format not in FORMATS:
            raise ValueError(f"format {format!r} is not one of {list(FORMATS)}")
        if (image_size is not None and image_size < 1) or num_frames < 1 or conversations_per_unit < 1:
            raise ValueError(
                f"image_size {image_size}, num_frames {num_frames} and conversations_per_unit "
                f"{conversations_per_unit} must be >= 1"
            )
        files = expand_urls(paths)
        if not files:
            raise ValueError("no instruction file given")
        for path in files:
            if not path.endswith(SUFFIXES):
                raise ValueError(f"{path!r} is not an instruction file (expected {' or '.join(SUFFIXES)})")
        self.format, self.image_size, self.num_frames, self.train = format, image_size, num_frames, train
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.video_dir = Path(video_dir) if video_dir is not None else None
        self.system = system or None
        self.files, self.conversations_per_unit = files, conversations_per_unit
        self.chunks: list[JsonChunk] | None = None  # indexed on first use: a writer may create the files after this

    def units(self) -> list[JsonChunk]:
        if self.chunks is None:
            self.chunks = [chunk for path in self.files for chunk in index_file(path, self.conversations_per_unit)]
        return self.chunks

    def read(self, unit: JsonChunk, rng: np.random.Generator) -> Iterator[dict[str, Any] | Skip]:
        if unit.error:
            yield Skip("malformed_json", f"{unit.path}: {unit.error}")
            return
        entries = list(enumerate(read_chunk(unit), start=unit.first))
        if self.shuffle:
            entries = [entries[i] for i in rng.permutation(len(entries))]
        for number, entry in entries:
            if isinstance(entry, Skip):
                yield entry
                continue
            try:
                yield from self.conversation(unit.path, number, entry, rng)
            except _Bad as bad:
                yield Skip(bad.reason, f"{unit.path.name}:{number}: {bad}")

    def conversation(
        self, path: Path, number: int, entry: Any, rng: np.random.Generator
    ) -> Iterator[dict[str, Any] | Skip]:
        """One entry as a sample, after a ``dropped_leading_turn`` / ``dropped_trailing_turn`` skip per dropped turn;
        raises :class:`_Bad`."""
        if not isinstance(entry, dict):
            raise _Bad("malformed_json", f"an entry must be a JSON object, got {type(entry).__name__}")
        dialogue = PARSERS[self.format](entry)
        turns, system, dropped, trailing = _check_roles(dialogue.turns, self.system)
        tags = sum(text.count(IMAGE_TAG) for _, text in turns)
        if tags != len(dialogue.images):
            raise _Bad("image_tag_mismatch", f"{tags} {IMAGE_TAG} tag(s) for {len(dialogue.images)} image(s)")
        for k, (role, text) in enumerate(turns):
            if IMAGE_TAG not in text and not text.strip():
                raise _Bad("empty_turn", f"turn {k} ({role}) has no text")
        images = [self.image(path, name) for name in dialogue.images]
        video = self.video(path, dialogue.videos, rng) if dialogue.videos else None
        content, used = [], 0
        for role, text in turns:
            count = text.count(IMAGE_TAG)
            content.append({"role": role, "content": split_image_tags(text, images[used : used + count])})
            used += count
        if video is not None:
            content[0]["content"].insert(0, video)
        try:
            items = conversation_items(content, system)
        except ConversationError as error:
            raise _Bad("bad_conversation", str(error)) from None
        for _ in range(dropped):
            yield Skip("dropped_leading_turn", f"{path.name}:{number}")
        for _ in range(trailing):
            yield Skip("dropped_trailing_turn", f"{path.name}:{number}")
        sample_id = entry.get("id")
        yield {"items": items, "id": str(sample_id) if sample_id is not None else f"{path.name}:{number}"}

    def image(self, path: Path, name: str) -> Tensor:
        """An entry's image, relative to ``image_dir`` (or the file's folder); raises :class:`_Bad`."""
        location = (self.image_dir or path.parent) / name
        try:
            data = location.read_bytes()
        except OSError as error:
            raise _Bad("missing_image", str(error)) from None
        try:
            return decode_image(data, self.image_size)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on broken bytes
            raise _Bad("corrupt_image", f"{location}: {error}") from None

    def video(self, path: Path, names: list[str], rng: np.random.Generator | None = None) -> Tensor:
        """The first of ``names`` that exists under ``video_dir`` (or the file's folder), decoded; raises
        :class:`_Bad`."""
        folder = self.video_dir or path.parent
        location = next((folder / n for n in names if (folder / n).is_file()), None)
        if location is None:
            raise _Bad("missing_video", str(folder / names[0]))
        try:
            frames, _ = read_clip(location, self.num_frames, self.image_size, rng if self.train else None)
        except VideoError as error:
            raise _Bad(error.reason, f"{location}: {error}") from None
        except (av.FFmpegError, OSError) as error:
            raise _Bad("corrupt_video", f"{location}: {error}") from None
        return frames
