"""Video question answering benchmarks in their released formats: MSVD-QA, MSRVTT-QA and NExT-QA (open-ended).

Formats followed:

* MSVD-QA (Xu et al. 2017): ``test_qa.json`` (likewise ``train_qa.json``, ``val_qa.json``), a json list of
  ``{"answer": str, "id": int, "question": str, "video_id": int}``. The videos are MSVD's ``YouTubeClips/*.avi``,
  named by YouTube clip (``<youtube_id>_<start>_<end>.avi``); the release's ``youtube_mapping.txt`` has one line
  ``"<clip name> vid<N>"`` per clip, and ``video_id`` is that ``N``. Without a mapping file the videos are looked for
  as ``vid<N>.avi`` / ``vid<N>.mp4`` (the layout of re-packaged copies).
* MSRVTT-QA (same release): ``test_qa.json``, a json list of ``{"answer", "category_id", "id", "question",
  "video_id"}`` with ``video_id`` an int ``N`` and the video ``video<N>.mp4`` (MSR-VTT's ``TrainValVideo`` /
  ``TestVideo`` folders). ``category_id`` is the video's category, not a question type, and is not kept.
* NExT-QA open-ended (NExT-OE, ``doc-doc/NExT-OE``: ``dataset/nextqa/val.csv`` / ``test.csv``): a csv with the header
  ``video,frame_count,width,height,question,answer,qid,type``; ``qid`` counts questions *within* a video (the official
  ``eval_oe.py`` indexes results as ``res[video][qid]``), so an example's key is ``"<video>_<qid>"``. NExT-QA's
  ``map_vid_vidorID.json`` maps ``video`` to ``"<folder>/<video>"`` under the video root (``NExTVideo``), ``.mp4``.
  ``add_reference_answer_{val,test}.json`` (``{video: {qid: answer}}``) gives a second reference for some questions.

Annotation files are read eagerly and checked: a missing or malformed file, or an entry missing a field, is an error
naming the file and the entry. Videos are not opened here: :func:`load_clip` decodes one, and returns ``None`` with a
warning for a missing or corrupt video, which the evaluation counts as skipped (as it does missing images).
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import torch
from torch import Tensor

from emu_lightning.images import ImageTransform

_MAPPING_LINE = re.compile(r"^(\S+)\s+vid(\d+)$")
MSVD_EXTENSIONS = (".avi", ".mp4")
NEXTQA_COLUMNS = ("video", "question", "answer", "qid", "type")


@dataclass(frozen=True)
class VideoQAExample:
    """One question about one video, with its reference answers."""

    key: str
    """The question's id as the benchmark names it: MSVD-QA / MSRVTT-QA ``str(id)``; NExT-QA ``"<video>_<qid>"``."""
    video_id: str
    """The video as the annotation names it (MSVD-QA / MSRVTT-QA ``str(video_id)``, NExT-QA ``video``)."""
    video_path: Path
    question: str
    answers: tuple[str, ...]
    question_type: str = ""
    """NExT-QA's ``type`` (``CW``, ``CH``, ``TN``, ``TC``, ``TP``, ``DL``, ``DB``, ``DC``, ``DO``); ``""`` elsewhere."""


# ---------------------------------------------------------------------------------------------------- annotation files
def _load_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid json: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid json (not UTF-8 text: {err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _qa_entries(qa_json: str | Path, what: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The entries of an MSVD-QA / MSRVTT-QA json list, each checked to have ``fields`` (``id`` and ``video_id`` ints,
    ``question`` and ``answer`` non-empty text); raises naming the file and the entry."""
    data = _load_json(qa_json, what)
    if not isinstance(data, list):
        got = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{what} {str(qa_json)!r} must be a json list of {{{', '.join(fields)}}} entries, got {got}")
    if not data:
        raise ValueError(f"{what} {str(qa_json)!r} has no entries")
    seen: set[int] = set()
    for index, entry in enumerate(data):
        where = f"entry {index}" + (f" (id {entry['id']!r})" if isinstance(entry, dict) and "id" in entry else "")
        where += f" of {qa_json}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}, not an {{{', '.join(fields)}}} object")
        missing = [key for key in fields if key not in entry]
        if missing:
            raise ValueError(f"{where} has no {', '.join(repr(k) for k in missing)} field")
        for key in ("id", "video_id"):
            if not _is_int(entry[key]):
                raise ValueError(f"{where}: {key!r} must be an integer, got {entry[key]!r}")
        for key in ("question", "answer"):
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise ValueError(f"{where}: {key!r} must be non-empty text, got {entry[key]!r}")
        if entry["id"] in seen:
            raise ValueError(f"{where}: question id {entry['id']} appears twice")
        seen.add(entry["id"])
    return data


def read_msvd_mapping(mapping_txt: str | Path) -> dict[int, str]:
    """MSVD's ``youtube_mapping.txt``: ``{N: clip name}`` from its lines ``"<clip name> vid<N>"``."""
    path = Path(mapping_txt)
    if not path.is_file():
        raise FileNotFoundError(f"MSVD mapping file {str(path)!r} does not exist")
    mapping: dict[int, str] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            match = _MAPPING_LINE.match(line.strip())
            if match is None:
                raise ValueError(f"line {number} of {path} is {line.strip()!r}, not '<clip name> vid<N>'")
            clip, vid = match.group(1), int(match.group(2))
            if vid in mapping and mapping[vid] != clip:
                raise ValueError(f"line {number} of {path}: vid{vid} is mapped twice ({mapping[vid]!r}, {clip!r})")
            mapping[vid] = clip
    if not mapping:
        raise ValueError(f"MSVD mapping file {str(path)!r} has no '<clip name> vid<N>' lines")
    return mapping


def _existing(root: Path, stem: str, extensions: tuple[str, ...]) -> Path:
    """``root/stem`` with the first extension whose file exists (else the first: a missing video is skipped later)."""
    for ext in extensions:
        if (root / f"{stem}{ext}").is_file():
            return root / f"{stem}{ext}"
    return root / f"{stem}{extensions[0]}"


def read_msvd_qa(
    qa_json: str | Path, video_root: str | Path, mapping: str | Path | None = None
) -> list[VideoQAExample]:
    """Read an MSVD-QA split (``test_qa.json``; see the module docstring for the format).

    Args:
        qa_json: the split's json list of ``{answer, id, question, video_id}``.
        video_root: folder of the videos (MSVD's ``YouTubeClips``).
        mapping: the release's ``youtube_mapping.txt``: videos are then ``<clip name>.avi`` (``.mp4`` when only that
            exists). ``None``: videos are ``vid<N>.avi`` (or ``vid<N>.mp4``).

    Raises:
        FileNotFoundError: the json or mapping file does not exist.
        ValueError: a file is malformed, an entry lacks a field or has one of the wrong type (the message names the
            entry), a question id appears twice, or a ``video_id`` is not in the mapping.
    """
    entries = _qa_entries(qa_json, "MSVD-QA file", ("answer", "id", "question", "video_id"))
    root = Path(video_root)
    clips = read_msvd_mapping(mapping) if mapping is not None else None
    examples = []
    for index, entry in enumerate(entries):
        vid = entry["video_id"]
        if clips is None:
            path = _existing(root, f"vid{vid}", MSVD_EXTENSIONS)
        elif vid in clips:
            path = _existing(root, clips[vid], MSVD_EXTENSIONS)
        else:
            raise ValueError(
                f"entry {index} (id {entry['id']}) of {qa_json}: video_id {vid} (vid{vid}) is not in {mapping}"
            )
        examples.append(
            VideoQAExample(str(entry["id"]), str(vid), path, entry["question"].strip(), (entry["answer"].strip(),))
        )
    return examples


def read_msrvtt_qa(qa_json: str | Path, video_root: str | Path) -> list[VideoQAExample]:
    """Read an MSRVTT-QA split (``test_qa.json``: a json list of ``{answer, category_id, id, question, video_id}``);
    the video of ``video_id`` N is ``video_root/video<N>.mp4``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is malformed, an entry lacks a field or has one of the wrong type (the message names the
            entry), or a question id appears twice.
    """
    entries = _qa_entries(qa_json, "MSRVTT-QA file", ("answer", "id", "question", "video_id"))
    root = Path(video_root)
    return [
        VideoQAExample(
            str(e["id"]),
            str(e["video_id"]),
            root / f"video{e['video_id']}.mp4",
            e["question"].strip(),
            (e["answer"].strip(),),
        )
        for e in entries
    ]


def read_nextqa_oe(
    csv_path: str | Path,
    video_root: str | Path,
    map_json: str | Path | None = None,
    extra_answers_json: str | Path | None = None,
) -> list[VideoQAExample]:
    """Read NExT-QA's open-ended split (NExT-OE ``val.csv`` / ``test.csv``; see the module docstring).

    Args:
        csv_path: the split's csv (header ``video,frame_count,width,height,question,answer,qid,type``; only
            ``video, question, answer, qid, type`` are required).
        video_root: NExT-QA's video folder (``NExTVideo``).
        map_json: ``map_vid_vidorID.json`` (``{video: "<folder>/<video>"}``): videos are ``video_root/<that>.mp4``;
            ``None``: ``video_root/<video>.mp4``.
        extra_answers_json: NExT-OE's ``add_reference_answer_<split>.json`` (``{video: {qid: answer}}``), whose
            answers are appended to the questions' references.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: the csv lacks a column, has no rows, a row has the wrong number of fields or an empty required
            field (the message names the line), a ``(video, qid)`` appears twice, or a video is not in the map.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"NExT-QA csv {str(path)!r} does not exist")
    folders = _load_json(map_json, "NExT-QA video map") if map_json is not None else None
    if folders is not None and not isinstance(folders, dict):
        raise ValueError(f"NExT-QA video map {str(map_json)!r} must be a json object {{video: '<folder>/<video>'}}")
    extra = _load_json(extra_answers_json, "NExT-OE extra answers file") if extra_answers_json is not None else {}
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise ValueError(f"NExT-OE extra answers file {str(extra_answers_json)!r} must be {{video: {{qid: answer}}}}")
    root = Path(video_root)
    with path.open(encoding="utf-8", newline="") as f:
        try:
            rows = list(csv.reader(f))
        except csv.Error as err:
            raise ValueError(f"NExT-QA csv {str(path)!r} does not parse: {err}") from None
    rows = [row for row in rows if row]
    header = [c.strip().lstrip("\ufeff") for c in rows[0]] if rows else []
    missing = [c for c in NEXTQA_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path} has columns {header}, missing {missing}: not a NExT-QA open-ended csv")
    if len(rows) < 2:
        raise ValueError(f"NExT-QA csv {str(path)!r} has a header but no rows")
    examples = []
    seen: set[str] = set()
    for number, row in enumerate(rows[1:], start=2):
        where = f"line {number} of {path}"
        if len(row) != len(header):
            raise ValueError(f"{where} has {len(row)} fields, expected {len(header)}: {row}")
        fields = {c: v.strip() for c, v in zip(header, row)}
        empty = [c for c in NEXTQA_COLUMNS if not fields[c]]
        if empty:
            raise ValueError(f"{where} (video {fields['video']!r}, qid {fields['qid']!r}) has an empty {empty}")
        video, qid = fields["video"], fields["qid"]
        key = f"{video}_{qid}"
        if key in seen:
            raise ValueError(f"{where}: video {video} qid {qid} appears twice")
        seen.add(key)
        if folders is None:
            video_path = root / f"{video}.mp4"
        elif video in folders:
            video_path = root / f"{folders[video]}.mp4"
        else:
            raise ValueError(f"{where}: video {video} is not in {map_json}")
        answers = [fields["answer"]]
        added = extra.get(video, {}).get(qid)
        if isinstance(added, str) and added.strip() and added.strip() != fields["answer"]:
            answers.append(added.strip())
        examples.append(VideoQAExample(key, video, video_path, fields["question"], tuple(answers), fields["type"]))
    return examples


# ------------------------------------------------------------------------------------------------------------ frames
def sample_frame_indices(num_frames_in_video: int, n: int = 8) -> list[int]:
    """The frames at the centres of ``n`` equal segments of a ``num_frames_in_video``-frame video: segment ``k`` covers
    frames ``[k N / n, (k + 1) N / n)`` and its centre is frame ``floor((k + 1/2) N / n)`` (exact integer arithmetic:
    ``((2k + 1) N) // (2n)``). A video with fewer than ``n`` frames repeats frames."""
    if num_frames_in_video < 1 or n < 1:
        raise ValueError(f"need a video of at least 1 frame and n >= 1, got {num_frames_in_video} frames and n={n}")
    return [((2 * k + 1) * num_frames_in_video) // (2 * n) for k in range(n)]


def _decode_at(path: Path, indices: list[int], transform: ImageTransform) -> tuple[dict[int, Tensor], int]:
    """The frames at ``indices`` (uint8 ``(3, S, S)``), decoding sequentially up to the last one, and how many frames
    were decoded (all of them when the video ended before the last index)."""
    wanted, last = set(indices), max(indices)
    picked: dict[int, Tensor] = {}
    count = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        for frame in container.decode(container.streams.video[0]):
            if count in wanted:
                picked[count] = transform.frame(frame.to_ndarray(format="rgb24"))
            count += 1
            if count > last:
                break
    return picked, count


def count_frames(path: str | Path) -> int:
    """Frames in the video's first stream: the container's count, else counted by decoding."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def load_clip(path: str | Path, n: int = 8, image_size: int = 224) -> Tensor | None:
    """``n`` frames of the video at ``path`` (at segment centres, :func:`sample_frame_indices`) as an ``(n, 3, S, S)``
    float tensor in [0, 1], through the library's one transform (``ImageTransform(S).frame``: the whole frame resized
    to the square, bicubic).

    The frame count is the container's when it declares one (else counted by decoding); if decoding ends cleanly
    before that count, the indices are recomputed on the frames that did decode. Returns ``None`` with a warning when
    the video is missing, does not open, fails to decode up to the last frame needed (a truncated file usually does),
    has no video stream or no frames (the evaluation counts it as skipped, as it does a missing image).
    """
    transform = ImageTransform(image_size)
    if n < 1:
        raise ValueError(f"n {n} must be >= 1")
    path = Path(path)
    if not path.is_file():
        warnings.warn(f"skipping video {str(path)!r}: it does not exist", stacklevel=2)
        return None
    try:
        total = count_frames(path)
        if total < 1:
            raise ValueError("no decodable frames")
        indices = sample_frame_indices(total, n)
        picked, decoded = _decode_at(path, indices, transform)
        if len(picked) < len(set(indices)):  # fewer frames than declared: sample again on those that decode
            if decoded < 1:
                raise ValueError("no decodable frames")
            indices = sample_frame_indices(decoded, n)
            picked, _ = _decode_at(path, indices, transform)
            if len(picked) < len(set(indices)):
                raise ValueError(f"frames {sorted(set(indices) - set(picked))} do not decode")
    except (av.FFmpegError, OSError, ValueError, IndexError, RuntimeError) as err:
        warnings.warn(f"skipping video {str(path)!r}: {type(err).__name__}: {err}", stacklevel=2)
        return None
    return torch.stack([picked[i] for i in indices]).float() / 255.0
