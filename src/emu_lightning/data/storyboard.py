"""Interleaved video-text documents in the style of YT-Storyboard-1B: a video's storyboard frames (with
their timestamps) and its subtitles, merged in time order into ``[frame, text, frame, text, ...]``.

The real dataset is not public, so this is the on-disk layout the reader defines (and ShapesWorld writes):

```
root/
  index.jsonl                  one video per line:
      {"video_id": "abc",
       "frames": [{"time": 0.0, "image": "frames/abc/000.png"}, ...],     # seconds, path relative to root
       "subtitles": "subtitles/abc.vtt"}                                  # a WebVTT file relative to root,
       # or inline:  "subtitles": [{"start": 0.0, "end": 2.5, "text": "..."}, ...]
  frames/...                   the frame images (any format PIL reads)
  subtitles/...                the WebVTT files
```

Merging: frames and cues are sorted by time (a frame's ``time`` against a cue's ``start``; on a tie the
frame comes first), and the cues between two frames are joined with spaces into one text item. With more
than ``max_frames`` frames, ``max_frames`` evenly spaced ones are kept (before any image is read, so only
the kept frames are loaded and can count as missing or corrupt).

Skip counting: a skip is whatever was dropped, at the finest level that leaves a usable document. One cue
with ``broken_timestamps`` (a timing that does not parse, or ends before it starts) and one
``missing_frame`` / ``corrupt_frame`` image are dropped and counted each, and the document goes on without
them. A document is skipped (counted once) as ``malformed_json`` (a line that is not a valid document),
``missing_subtitles`` (its .vtt file does not exist), ``malformed_subtitles`` (the file is not WebVTT: no
``WEBVTT`` header, or not UTF-8), ``no_text`` (no cue with text left, e.g. a file whose every timing is
broken) or ``no_frames`` (no frame listed, or none that loads). ``check()["skipped"]`` therefore counts
dropped cues and frames as well as documents.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emu_lightning.data.pairs import decode_image
from emu_lightning.data.streaming import Skip, StreamingSource, empty_source

_VTT_TIME = re.compile(r"(?:(\d{2,}):)?([0-5]\d):([0-5]\d)\.(\d{3})")
_TAG = re.compile(r"<[^>]*>")


@dataclass(frozen=True)
class Cue:
    """One subtitle: shown from ``start`` to ``end`` seconds."""

    start: float
    end: float
    text: str


# ---------------------------------------------------------------------- WebVTT
def parse_vtt_time(text: str) -> float:
    """Seconds in a WebVTT timestamp: ``HH:MM:SS.mmm`` or ``MM:SS.mmm``."""
    match = _VTT_TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a WebVTT timestamp like 00:01:02.500")
    hours, minutes, seconds, millis = match.groups()
    return 3600 * int(hours or 0) + 60 * int(minutes) + int(seconds) + int(millis) / 1000


def format_vtt_time(seconds: float) -> str:
    """``HH:MM:SS.mmm``."""
    millis = round(seconds * 1000)
    return f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}.{millis % 1000:03d}"


def clean_cue_text(lines: Sequence[str]) -> str:
    """A cue's payload as one line: tags (``<c>``, ``<v Name>``, ``<00:00:01.000>``) stripped, entities decoded."""
    return " ".join(html.unescape(_TAG.sub("", " ".join(lines))).split())


def parse_vtt(text: str) -> tuple[list[Cue], int]:
    """The cues of a WebVTT file in file order, and how many were dropped for broken timestamps.

    Blocks are separated by blank lines; a cue is an optional id line, a ``start --> end [settings]`` line and
    its text lines. ``NOTE``, ``STYLE`` and ``REGION`` blocks are ignored; a cue whose timing does not parse or
    ends before it starts is dropped (counted). Raises ``ValueError`` when the text lacks the ``WEBVTT`` header.
    """
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not re.match(r"WEBVTT($|[ \t])", lines[0]):
        raise ValueError(f"no WEBVTT header (first line {lines[0][:40]!r})")
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            blocks[-1].append(line.strip())
        elif blocks[-1]:
            blocks.append([])
    cues, broken = [], 0
    for block in blocks[1:]:  # blocks[0] is the header
        if not block or (re.match(r"(NOTE|STYLE|REGION)\b", block[0]) and "-->" not in block[0]):
            continue
        timing = 0 if "-->" in block[0] else 1
        try:
            start_text, end_text = block[timing].split("-->")
            start, end = parse_vtt_time(start_text), parse_vtt_time(end_text.split()[0])
        except (ValueError, IndexError):
            broken += 1
            continue
        if end < start:
            broken += 1
            continue
        cues.append(Cue(start, end, clean_cue_text(block[timing + 1 :])))
    return cues, broken


def write_vtt(cues: Sequence[Cue]) -> str:
    """A WebVTT file's text for ``cues`` (numbered cue ids, ``HH:MM:SS.mmm`` timings)."""
    blocks = ["WEBVTT"]
    for i, cue in enumerate(cues, start=1):
        blocks.append(f"{i}\n{format_vtt_time(cue.start)} --> {format_vtt_time(cue.end)}\n{cue.text}")
    return "\n\n".join(blocks) + "\n"


def _inline_cues(entries: list) -> tuple[list[Cue], int]:
    """Cues of an inline ``[{"start", "end", "text"}]`` list and the number with broken timestamps; raises
    ``ValueError`` for an entry that is not such a dict."""
    cues, broken = [], 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise ValueError(f"subtitle {entry!r} is not a {{'start', 'end', 'text'}} object")
        start, end = entry.get("start"), entry.get("end")
        if not (_is_time(start) and _is_time(end)) or end < start:
            broken += 1
            continue
        cues.append(Cue(float(start), float(end), clean_cue_text([entry["text"]])))
    return cues, broken


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# ---------------------------------------------------------------------- documents
def interleave(frames: Sequence[tuple[float, Any]], cues: Sequence[Cue]) -> list[Any]:
    """Merge ``(time, frame)`` pairs and cues in time order (frame time vs cue start; ties: frame first),
    joining the cues between two frames with spaces into one text item."""
    events = sorted([(t, 0, i) for i, (t, _) in enumerate(frames)] + [(c.start, 1, i) for i, c in enumerate(cues)])
    items: list[Any] = []
    texts: list[str] = []
    for _, kind, i in events:
        if kind == 1:
            texts.append(cues[i].text)
            continue
        if texts:
            items.append(" ".join(texts))
            texts = []
        items.append(frames[i][1])
    if texts:
        items.append(" ".join(texts))
    return items


def _parse_document(line: bytes) -> tuple[str, list[tuple[float, str]], str | list]:
    """``(video_id, [(time, image path)], subtitles)`` of one index line; raises ``ValueError`` when malformed."""
    doc = json.loads(line)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(doc, dict):
        raise ValueError(f"a document is a json object, got {type(doc).__name__}")
    video_id, frames, subtitles = doc.get("video_id"), doc.get("frames"), doc.get("subtitles")
    if not isinstance(video_id, (str, int)) or not isinstance(frames, list):
        raise ValueError("a document needs 'video_id' and a 'frames' list")
    if not isinstance(subtitles, (str, list)):
        raise ValueError("'subtitles' must be a .vtt path or a list of cues")
    if not all(isinstance(f, dict) and _is_time(f.get("time")) and isinstance(f.get("image"), str) for f in frames):
        raise ValueError("every frame needs a 'time' (seconds >= 0) and an 'image' path")
    return str(video_id), sorted((float(f["time"]), f["image"]) for f in frames), subtitles


def even_subset(n: int, k: int) -> list[int]:
    """``min(n, k)`` evenly spaced indices of ``range(n)``, first and last included."""
    return list(range(n)) if n <= k else np.linspace(0, n - 1, k).round().astype(int).tolist()


@dataclass(frozen=True)
class IndexChunk:
    """A unit of a storyboard source: ``lines`` documents of index ``path`` from byte ``offset``."""

    path: Path
    offset: int
    lines: int


def _lines(file: Any) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, line)`` of each non-blank line from the file's position."""
    offset = file.tell()
    for line in file:
        if line.strip():
            yield offset, line
        offset += len(line)


def index_jsonl(path: str | Path, lines_per_unit: int) -> list[IndexChunk]:
    """Cut an index jsonl into chunks of ``lines_per_unit`` documents."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"storyboard index {str(path)!r} does not exist")
    starts, count = [], 0  # only each chunk's first offset
    with path.open("rb") as f:
        for offset, _ in _lines(f):
            if count % lines_per_unit == 0:
                starts.append(offset)
            count += 1
    return [
        IndexChunk(path, offset, min(lines_per_unit, count - k * lines_per_unit)) for k, offset in enumerate(starts)
    ]


class StoryboardVideos(StreamingSource):
    """Storyboard documents (layout in the module docstring): samples ``{"items": [frame, text, ...], "id":
    video_id, "times": [frame times]}`` with ``(3, S, S)`` frames; skip reasons in the module docstring.

    Args:
        paths: an index jsonl, or a list of them.
        root: folder that frame and subtitle paths are relative to; by default each index's own folder.
        image_size: side S of the square frames, the whole picture resized to S x S (bicubic, the
            library's one transform); by default the model's (set by the DataModule).
        max_frames: most frames per document; longer storyboards keep evenly spaced frames.
        lines_per_unit: documents per unit, the grain at which ranks and workers split an index.
        name: the source's name in sample metadata and skip counts.
        shuffle: shuffle units and the documents inside each (seeded).
        repeat: start a new pass when one ends.
        seed: seeds every random choice.
        split_by_node: split units across distributed ranks.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        root: str | Path | None = None,
        image_size: int | None = None,
        max_frames: int = 8,
        lines_per_unit: int = 16,
        name: str = "storyboard",
        shuffle: bool = True,
        repeat: bool = True,
        seed: int = 0,
        split_by_node: bool = True,
    ) -> None:
        super().__init__(name, shuffle=shuffle, repeat=repeat, seed=seed, split_by_node=split_by_node)
        if (image_size is not None and image_size < 1) or max_frames < 1 or lines_per_unit < 1:
            raise ValueError(
                f"image_size {image_size}, max_frames {max_frames} and lines_per_unit {lines_per_unit} must be >= 1"
            )
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("no storyboard index given")
        self.root = Path(root) if root is not None else None
        self.image_size, self.max_frames = image_size, max_frames
        self.index_paths, self.lines_per_unit = paths, lines_per_unit
        self.chunks: list[IndexChunk] | None = None  # indexed on first use: a writer may create the index after this

    def units(self) -> list[IndexChunk]:
        if self.chunks is None:
            self.chunks = [chunk for path in self.index_paths for chunk in index_jsonl(path, self.lines_per_unit)]
            if not self.chunks:
                empty_source(self, f"storyboard index {[str(p) for p in self.index_paths]} lists no videos")
        return self.chunks

    def read(self, unit: IndexChunk, rng: np.random.Generator) -> Iterator[dict[str, Any] | Skip]:
        with unit.path.open("rb") as f:
            f.seek(unit.offset)
            lines = [line for _, line in islice(_lines(f), unit.lines)]
        if self.shuffle:
            lines = [lines[i] for i in rng.permutation(len(lines))]
        root = self.root or unit.path.parent
        for line in lines:
            yield from self._document(line, root)

    def _document(self, line: bytes, root: Path) -> Iterator[dict[str, Any] | Skip]:
        try:
            video_id, frames, subtitles = _parse_document(line)
            cues, broken = _inline_cues(subtitles) if isinstance(subtitles, list) else ([], 0)
        except ValueError as err:
            yield Skip("malformed_json", str(err))
            return
        if isinstance(subtitles, str):
            path = root / subtitles
            if not path.is_file():
                yield Skip("missing_subtitles", str(path))
                return
            try:
                cues, broken = parse_vtt(path.read_text(encoding="utf-8"))
            except ValueError as err:  # not WebVTT, or not UTF-8
                yield Skip("malformed_subtitles", f"{path}: {err}")
                return
        yield from (Skip("broken_timestamps", video_id) for _ in range(broken))
        cues = [c for c in cues if c.text]
        if not cues:
            yield Skip("no_text", video_id)
            return
        loaded = []
        for k in even_subset(len(frames), self.max_frames):
            time, image = frames[k]
            path = root / image
            try:
                data = path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                yield Skip("missing_frame", str(path))
                continue
            try:
                loaded.append((time, decode_image(data, self.image_size)))
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                yield Skip("corrupt_frame", f"{path}: {err}")
        if not loaded:
            yield Skip("no_frames", video_id)
            return
        yield {"items": interleave(loaded, cues), "id": video_id, "times": [t for t, _ in loaded]}
