"""WebVid-10M: short stock-footage clips with one caption each, read from the release's csv and mp4 files.

The csv has the columns ``videoid,contentUrl,duration,page_dir,name`` (``duration`` in ISO-8601,
``PT00H00M12S``; plain seconds are accepted too) and the downloaded clips lie at
``{video_dir}/{page_dir}/{videoid}.mp4``. A source's units are chunks of ``rows_per_unit`` csv rows
(located by byte offset, so one 10M-row csv splits across ranks and workers without anyone reading it whole).

Frame sampling (as Emu samples 8 frames per clip): the clip is cut into ``num_frames`` equal segments and
one frame is taken per segment, at a random time inside it for training and at its centre for evaluation;
the frame taken for a time ``t`` is the one shown at ``t`` (the last frame whose timestamp is ``<= t``).
Frames are decoded sequentially with PyAV, converting to RGB only the frames that are taken: WebVid clips are
short (18 s on average) and encoded with long keyframe intervals, so seeking would decode from a keyframe
most of the way anyway, and a sequential pass stops after the last frame it needs.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch import Tensor

from emu_lightning.data.streaming import Skip, StreamingSource, empty_source
from emu_lightning.images import ImageTransform

REQUIRED_COLUMNS = ("videoid", "page_dir", "name")
_ISO_DURATION = re.compile(r"PT(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?")
_EPS = 1e-6  # seconds: a frame whose timestamp equals a target time (up to rounding) is shown at that time


class VideoError(Exception):
    """A video that decodes but cannot give a clip; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------- pixels
def frame_to_tensor(frame: av.VideoFrame, size: int) -> Tensor:
    """A decoded frame as a ``(3, S, S)`` uint8 tensor, through the library's one image transform
    (:class:`emu_lightning.images.ImageTransform`: the whole frame resized to the square, bicubic)."""
    return ImageTransform(size).frame(frame.to_ndarray(format="rgb24"))


# ---------------------------------------------------------------------- times
def parse_duration(text: str) -> float:
    """Seconds in ISO-8601 (``PT00H00M12S``, ``PT1M3.5S``, as WebVid writes them) or plain seconds (``12.5``)."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        match = _ISO_DURATION.fullmatch(text)
        if match is None or not any(match.groups()):
            raise ValueError(f"duration {text!r} is neither seconds nor ISO-8601 like 'PT00H00M12S'") from None
        hours, minutes, secs = (float(g or 0) for g in match.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration {text!r} is not a non-negative number of seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """WebVid's duration form, whole seconds: ``PT00H00M12S``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"PT{hours:02d}H{minutes:02d}M{secs:02d}S"


def sample_times(duration: float, num_frames: int, rng: np.random.Generator | None = None) -> list[float]:
    """One time per segment of ``[0, duration)`` cut into ``num_frames`` equal parts: uniform inside each
    segment with ``rng`` (training), else the segment's centre (evaluation)."""
    step = duration / num_frames
    offsets = rng.random(num_frames) if rng is not None else np.full(num_frames, 0.5)
    return [(k + float(u)) * step for k, u in enumerate(offsets)]


# ---------------------------------------------------------------------- decoding
def _video_duration(container: Any, stream: Any, fallback: float | None) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    if fallback is not None:
        return fallback
    raise VideoError("corrupt_video", "the video has no duration")


def read_clip(
    path: str | Path,
    num_frames: int,
    image_size: int,
    rng: np.random.Generator | None = None,
    duration: float | None = None,
) -> tuple[Tensor, list[float]]:
    """``num_frames`` frames of the video at ``path``, one per segment (see :func:`sample_times`), as a
    ``(F, 3, S, S)`` float tensor in [0, 1], with the times (seconds from the first frame) they are shown at.

    ``duration`` (seconds) is used only when the container reports none. Raises ``av.FFmpegError`` when the
    file does not decode, and :class:`VideoError` when it has no video stream, fewer than ``num_frames``
    frames (``too_few_frames``), or ends a whole segment before its declared duration (``corrupt_video``).
    """
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError("corrupt_video", "no video stream")
        stream = container.streams.video[0]
        total = _video_duration(container, stream, duration)
        targets = sample_times(total, num_frames, rng)
        rate = float(stream.average_rate or 25)
        frames: list[Tensor] = []
        times: list[float] = []
        shown: tuple[float, Any] | None = None  # the frame on screen before the current one
        origin = count = 0
        for frame in container.decode(stream):
            if frame.time is None:  # a raw stream without timestamps
                t = count / rate
            else:  # the first frame's timestamp is time 0 (some containers start later, e.g. one frame in)
                origin = frame.time if count == 0 else origin
                t = frame.time - origin
            while shown is not None and len(frames) < num_frames and t > targets[len(frames)] + _EPS:
                frames.append(frame_to_tensor(shown[1], image_size))  # the frame on screen at the target
                times.append(shown[0])
            count += 1
            shown = (t, frame)
            if len(frames) == num_frames and count >= num_frames:
                break
    if count < num_frames:
        raise VideoError("too_few_frames", f"{count} decodable frames, {num_frames} needed")
    last_time, last = shown
    last_segment = total * (num_frames - 1) / num_frames
    if len(frames) < num_frames and last_time < last_segment - _EPS:  # no frame at all in the last segment
        raise VideoError("corrupt_video", f"frames end at {last_time:.2f}s of a {total:.2f}s video (truncated?)")
    while len(frames) < num_frames:  # targets the last frame is still shown at
        frames.append(frame_to_tensor(last, image_size))
        times.append(last_time)
    return torch.stack(frames), times


# ---------------------------------------------------------------------- csv
class _Lines:
    """Lines of a binary file as text, counting the bytes read, so each csv record's byte offset is known."""

    def __init__(self, file: io.BufferedReader) -> None:
        self.file, self.offset = file, file.tell()

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.file.readline()
        if not line:
            raise StopIteration
        self.offset += len(line)
        return line.decode("utf-8", errors="replace")


def _csv_rows(file: io.BufferedReader) -> Iterator[tuple[int, list[str] | None]]:
    """``(byte offset, fields)`` of each non-blank csv record from the file's position (quoted newlines kept in
    their record); ``fields`` is None for a record the csv module cannot parse."""
    lines = _Lines(file)
    reader = csv.reader(lines)
    while True:
        offset = lines.offset
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            row = None
        if row != []:
            yield offset, row


@dataclass(frozen=True)
class CsvChunk:
    """A unit of a WebVid source: ``rows`` csv rows of ``path`` from byte ``offset`` (the ``first``-th data row)."""

    path: Path
    columns: tuple[str, ...]
    first: int
    offset: int
    rows: int


def index_csv(path: str | Path, rows_per_unit: int) -> list[CsvChunk]:
    """Cut a WebVid csv into chunks of ``rows_per_unit`` rows; raises when the header lacks WebVid's columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WebVid csv {str(path)!r} does not exist")
    with path.open("rb") as f:
        rows = _csv_rows(f)
        header = next(rows, (0, None))[1]
        columns = tuple(c.strip().lstrip("\ufeff") for c in header or ())
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path} has columns {list(columns)}, missing {missing}: not a WebVid csv")
        starts, count = [], 0  # only each chunk's first offset: a 10M-row csv keeps 156k numbers at 64 rows/unit
        for offset, _ in rows:
            if count % rows_per_unit == 0:
                starts.append(offset)
            count += 1
    return [
        CsvChunk(path, columns, k * rows_per_unit, offset, min(rows_per_unit, count - k * rows_per_unit))
        for k, offset in enumerate(starts)
    ]


def _read_chunk(chunk: CsvChunk) -> list[list[str] | None]:
    with chunk.path.open("rb") as f:
        f.seek(chunk.offset)
        return [row for _, row in islice(_csv_rows(f), chunk.rows)]


# ---------------------------------------------------------------------- source
class WebVidVideos(StreamingSource):
    """WebVid-10M clips with their captions: samples ``{"items": [video, caption], "id": videoid, "times": [...]}``
    (the video is a ``(num_frames, 3, S, S)`` tensor; ``times`` are the frames' times in seconds).

    Skip reasons: ``malformed_row`` (wrong number of fields, empty ``videoid`` or ``page_dir``, a duration
    that does not parse), ``empty_caption``, ``missing_video``, ``corrupt_video`` (PyAV cannot decode it, no
    video stream, or truncated), ``too_few_frames`` (fewer decodable frames than ``num_frames``: such clips are
    skipped rather than padded with repeated frames, which would teach still "videos").

    Args:
        csv: a WebVid csv, or a list of them.
        video_dir: folder holding ``{page_dir}/{videoid}.mp4``; by default each csv's own folder.
        num_frames: frames sampled per clip, one per equal segment.
        image_size: side S of the square frames, the whole picture resized to S x S (bicubic, the
            library's one transform); by default the model's (set by the DataModule).
        train: sample a random time in each segment (from the reader's seeded rng); False: each segment's centre.
        video_first_prob: probability that the frames come before the caption (else after it).
        rows_per_unit: csv rows per unit, the grain at which ranks and workers split a csv.
        name: the source's name in sample metadata and skip counts.
        shuffle: shuffle units and the rows inside each (seeded).
        repeat: start a new pass when one ends.
        seed: seeds every random choice.
        split_by_node: split units across distributed ranks.
    """

    def __init__(
        self,
        csv: str | Path | Sequence[str | Path],
        video_dir: str | Path | None = None,
        num_frames: int = 8,
        image_size: int | None = None,
        train: bool = True,
        video_first_prob: float = 0.5,
        rows_per_unit: int = 64,
        name: str = "webvid",
        shuffle: bool = True,
        repeat: bool = True,
        seed: int = 0,
        split_by_node: bool = True,
    ) -> None:
        super().__init__(name, shuffle=shuffle, repeat=repeat, seed=seed, split_by_node=split_by_node)
        if num_frames < 1 or (image_size is not None and image_size < 1) or rows_per_unit < 1:
            raise ValueError(
                f"num_frames {num_frames}, image_size {image_size} and rows_per_unit {rows_per_unit} must be >= 1"
            )
        if not 0.0 <= video_first_prob <= 1.0:
            raise ValueError(f"video_first_prob {video_first_prob} is not a probability")
        paths = [csv] if isinstance(csv, (str, Path)) else list(csv)
        if not paths:
            raise ValueError("no WebVid csv given")
        self.video_dir = Path(video_dir) if video_dir is not None else None
        self.num_frames, self.image_size, self.train = num_frames, image_size, train
        self.video_first_prob = video_first_prob
        self.csv_paths, self.rows_per_unit = paths, rows_per_unit
        self.chunks: list[CsvChunk] | None = None  # indexed on first use: a writer may create the csv after this

    def units(self) -> list[CsvChunk]:
        if self.chunks is None:
            self.chunks = [chunk for path in self.csv_paths for chunk in index_csv(path, self.rows_per_unit)]
            if not self.chunks:
                empty_source(self, f"WebVid csv {[str(p) for p in self.csv_paths]} holds a header but no rows")
        return self.chunks

    def read(self, unit: CsvChunk, rng: np.random.Generator) -> Iterator[dict[str, Any] | Skip]:
        rows = list(enumerate(_read_chunk(unit), start=unit.first))
        if self.shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        for number, row in rows:
            yield self._sample(unit, number, row, rng)

    def _sample(
        self, unit: CsvChunk, number: int, row: list[str] | None, rng: np.random.Generator
    ) -> dict[str, Any] | Skip:
        where = f"{unit.path.name} data row {number}"
        if row is None or len(row) != len(unit.columns):
            fields = "unparseable" if row is None else f"{len(row)} fields"
            return Skip("malformed_row", f"{where}: {fields}, expected {len(unit.columns)}")
        fields = dict(zip(unit.columns, (value.strip() for value in row)))
        if not fields["videoid"] or not fields["page_dir"]:
            return Skip("malformed_row", f"{where}: empty videoid or page_dir")
        try:
            duration = parse_duration(fields["duration"]) if "duration" in fields else None
        except ValueError as err:
            return Skip("malformed_row", f"{where}: {err}")
        if not fields["name"]:
            return Skip("empty_caption", where)
        path = (self.video_dir or unit.path.parent) / fields["page_dir"] / f"{fields['videoid']}.mp4"
        if not path.is_file():
            return Skip("missing_video", str(path))
        try:
            video, times = read_clip(path, self.num_frames, self.image_size, rng if self.train else None, duration)
        except VideoError as err:
            return Skip(err.reason, f"{path}: {err}")
        except (av.FFmpegError, OSError) as err:
            return Skip("corrupt_video", f"{path}: {err}")
        caption = fields["name"]
        items = [video, caption] if rng.random() < self.video_first_prob else [caption, video]
        return {"items": items, "id": fields["videoid"], "times": times}


# ---------------------------------------------------------------------- writing
def write_mp4(path: str | Path, frames: Tensor, fps: int, codec: str | None = None) -> None:
    """Encode ``(F, 3, H, W)`` frames in [0, 1] as an mp4 (yuv420p; libx264 when PyAV has it, else mpeg4)."""
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[2] % 2 or frames.shape[3] % 2:
        raise ValueError(f"frames must be (F, 3, H, W) with even H and W, got {tuple(frames.shape)}")
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[3], frames.shape[2], "yuv420p"
        stream.options = {"crf": "10"} if codec == "libx264" else {"qscale": "2"}
        for rgb in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
