"""ShapesWorld video question answering: clips of moving shapes, questions only several frames answer, the three
video QA benchmarks' real layouts (MSVD-QA, MSRVTT-QA, NExT-QA open-ended) and an in-memory training set.

Each shape of a scene moves in one direction (:data:`~emu_lightning.shapesworld.writers.DIRECTIONS`) at a constant
speed, ``travel`` cells over the clip, on a board that wraps around (a shape leaving one edge comes back at the
opposite one). Its start is drawn uniformly over the whole board, so where a shape is in one frame says nothing about
its direction: the direction is read by comparing frames. Questions (:func:`video_questions`) ask which way a shape
moves, what moves a way, and how many; they carry NExT-QA question types (``TC``: temporal/what, scored by WUPS;
``DC`` counts and ``DB`` yes/no, scored by exact match). Everything is a pure function of the world's seed, the
split and the index.
"""

from __future__ import annotations

import csv
import functools
import json
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from emu_lightning.data.videoqa import read_msvd_mapping, sample_frame_indices
from emu_lightning.data.webvid import write_mp4
from emu_lightning.sequence import END_OF_CHUNK, SequenceBuilder
from emu_lightning.shapesworld.datamodule import ShapesWorldDataModule
from emu_lightning.shapesworld.world import BACKGROUND, SIZE_FRACTION, Scene, Shape, ShapesWorld
from emu_lightning.shapesworld.writers import DIRECTIONS

MOTION_STREAM = 31
"""``ShapesWorld.rng`` stream of the shapes' directions and trajectories."""
VIDEO_QA_STREAM = 32
"""Stream of the choices made while asking questions."""
VIDEO_SAMPLE_STREAM = 33
"""Stream of the training set's choice of question per clip."""
CLIP_NAME_STREAM = 34
"""Stream of the synthetic YouTube ids of MSVD clip names."""
LAYOUT_TRIES = 64
"""Trajectory layouts drawn per clip; the first whose shapes never overlap is kept (else the least overlapping)."""
TRAVEL = 0.8
"""Cells a shape moves over a clip: 13 pixels at the tiny model's 32 (two patches of its ViT), so that it can see the
motion; the board wraps around, so no single frame tells the direction however far shapes move."""
VIDEO_FRAMES = 16
"""Frames of a clip (2 s at the writers' 8 fps); the evaluation samples 8 of them at segment centres."""
_YOUTUBE_ALPHABET = string.ascii_letters + string.digits + "-_"


@dataclass(frozen=True, eq=False)
class MotionScene:
    """A scene's motion: each shape's direction and centre (in pixels) in every frame."""

    scene: Scene
    directions: tuple[str, ...]
    """Each shape's direction (``right``, ``left``, ``up``, ``down``), in the scene's order."""
    centres: np.ndarray
    """``(F, n, 2)`` shape centres ``(x, y)`` in pixels, frame by frame."""

    def movers(self, direction: str) -> list[Shape]:
        """The shapes that move ``direction``."""
        return _movers(self.scene, self.directions, direction)


def _movers(scene: Scene, directions: tuple[str, ...], direction: str) -> list[Shape]:
    return [s for s, d in zip(scene.shapes, directions) if d == direction]


@dataclass(frozen=True)
class VideoQA:
    """A question about a motion clip."""

    question: str
    answer: str
    qtype: str
    """NExT-QA's type: ``TC`` (which way / what moves; WUPS), ``DC`` (how many; exact match), ``DB`` (yes/no)."""
    question_id: int
    """``ShapesWorld.image_id(split, index) * 100 + k`` for the ``k``-th question of the clip: unique across splits."""
    alternatives: tuple[str, ...] = ()
    """Other right answers (``to the right`` for ``right``): NExT-QA's second reference answer."""


# ---------------------------------------------------------------------------------------------------- clips
def _overlap(centres: np.ndarray, radii: np.ndarray, period: float) -> float:
    """How much the shapes' bounding boxes overlap on the wrapped-around board (side ``period``), summed over frames
    and pairs (0: never)."""
    gap = np.abs(centres[:, :, None, :] - centres[:, None, :, :])  # (F, n, n, 2)
    gap = np.minimum(gap, period - gap)
    depth = np.min((radii[:, None] + radii[None, :])[None, :, :, None] - gap, axis=-1)
    return float(np.triu(np.clip(depth, 0, None), k=1).sum())


def _draw_directions(rng: np.random.Generator, n: int) -> tuple[str, ...]:
    """The first draws of a clip's motion stream: each shape's direction."""
    names = list(DIRECTIONS)
    return tuple(names[int(rng.integers(len(names)))] for _ in range(n))


def motion_directions(world: ShapesWorld, split: str, index: int) -> tuple[str, ...]:
    """Each shape's direction in clip ``index`` (those of :func:`motion_scene`, without laying out the paths)."""
    return _draw_directions(world.rng(split, index, stream=MOTION_STREAM), len(world.scene(split, index).shapes))


def motion_scene(
    world: ShapesWorld, split: str, index: int, num_frames: int = VIDEO_FRAMES, travel: float = TRAVEL
) -> MotionScene:
    """The motion of scene ``index`` (no pixels): each shape's direction and trajectory.

    Each shape moves ``travel`` cells (grid cells of the world) along its direction between the first and last frame,
    on a board that wraps around: a shape leaving one edge comes back at the opposite one (drawn on both sides while
    it crosses). Its start is drawn uniformly over the whole board, so in any one frame every shape is anywhere with
    the same chance whatever its direction: only comparing frames tells the direction. Of :data:`LAYOUT_TRIES` layouts
    the first where no two shapes' bounding boxes ever overlap is kept, else the least overlapping.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames {num_frames} must be at least 2: a motion needs two frames")
    if not 0 < travel < world.grid / 2:
        raise ValueError(f"travel {travel} must be in (0, {world.grid / 2}) cells: on a board that wraps around, a "
                         "longer move looks like a shorter one the other way")  # fmt: skip
    scene = world.scene(split, index)
    radii = np.array([SIZE_FRACTION[s.size] / 2 for s in scene.shapes])
    rng = world.rng(split, index, stream=MOTION_STREAM)
    directions = _draw_directions(rng, len(scene.shapes))
    unit = np.array([DIRECTIONS[d] for d in directions])  # (n, 2)
    progress = np.linspace(0.0, 1.0, num_frames)[:, None, None]
    best, best_overlap = None, float("inf")
    for _ in range(LAYOUT_TRIES):
        start = rng.uniform(0.0, world.grid, size=unit.shape)
        centres = (start[None] + unit[None] * travel * progress) % world.grid  # (F, n, 2) in cells
        overlap = _overlap(centres, radii, world.grid)
        if overlap < best_overlap:
            best, best_overlap = centres, overlap
        if overlap == 0:
            break
    cell = world.image_size / world.grid
    return MotionScene(scene, directions, best * cell)


def render_motion(world: ShapesWorld, motion: MotionScene, frames: list[int] | None = None) -> Tensor:
    """The frames (all by default) of ``motion`` as an ``(F, 3, S, S)`` float tensor in [0, 1]; a shape across an edge
    is drawn on both sides (the board wraps around)."""
    cell = world.image_size / world.grid
    home = np.array([[s.cell % world.grid + 0.5, s.cell // world.grid + 0.5] for s in motion.scene.shapes])
    copies = [np.array([dx, dy]) * world.grid for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
    out = []
    for k in frames if frames is not None else range(len(motion.centres)):
        image = Image.new("RGB", (world.image_size, world.image_size), BACKGROUND)
        for shift in copies:  # draw takes offsets from the cell centres; copies off the canvas draw nothing
            world.draw(motion.scene, image, motion.centres[k] / cell - home + shift)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def motion_clip(
    world: ShapesWorld, split: str, index: int, num_frames: int = VIDEO_FRAMES, travel: float = TRAVEL
) -> tuple[Tensor, MotionScene]:
    """The moving-shape clip of scene ``index``: ``(F, 3, S, S)`` frames in [0, 1] and its :class:`MotionScene`
    (see :func:`motion_scene` for the motion)."""
    motion = motion_scene(world, split, index, num_frames, travel)
    return render_motion(world, motion), motion


# ---------------------------------------------------------------------------------------------------- questions
def _unique_names(scene: Scene) -> dict[int, str]:
    """Shapes that a description names unambiguously: ``red circle`` when it is the only one, else ``small red
    circle`` when that is unique (as captions name shapes); shapes that neither singles out are left out."""
    short = Counter(s.name(with_size=False) for s in scene.shapes)
    full = Counter(s.name() for s in scene.shapes)
    names = {}
    for i, s in enumerate(scene.shapes):
        if short[s.name(with_size=False)] == 1:
            names[i] = s.name(with_size=False)
        elif full[s.name()] == 1:
            names[i] = s.name()
    return names


def direction_alternatives(direction: str) -> tuple[str, ...]:
    """Other ways to say a direction answer: ``to the right`` / ``to the left``, ``moving up`` / ``moving down``."""
    return (f"to the {direction}",) if direction in ("right", "left") else (f"moving {direction}",)


def video_questions(world: ShapesWorld, split: str, index: int) -> list[VideoQA]:
    """Questions about clip ``index`` that only several frames answer, in this order (each when it can be asked):

    * ``TC`` "which way does the red circle move?" -> "right" (a shape named unambiguously);
    * ``TC`` "what colour is the shape that moves left?" -> "blue" (a direction exactly one shape moves);
    * ``TC`` "what shape moves up?" -> "square" (likewise);
    * ``DC`` "how many shapes move down?" -> "1" (half the time a direction some shape moves, else any: "0" too);
    * ``DB`` "does the red circle move left?" -> "yes" / "no" (half the time about its true direction).
    """
    scene, directions = world.scene(split, index), motion_directions(world, split, index)  # who moves where: no paths
    movers = functools.partial(_movers, scene, directions)
    rng = world.rng(split, index, stream=VIDEO_QA_STREAM)
    names = _unique_names(scene)
    single = [d for d in DIRECTIONS if len(movers(d)) == 1]
    asked: list[tuple[str, str, str, tuple[str, ...]]] = []
    if names:
        i = list(names)[int(rng.integers(len(names)))]
        asked.append(
            (f"which way does the {names[i]} move?", directions[i], "TC", direction_alternatives(directions[i]))
        )
    if single:
        d = single[int(rng.integers(len(single)))]
        asked.append((f"what colour is the shape that moves {d}?", movers(d)[0].colour, "TC", ()))
        d = single[int(rng.integers(len(single)))]
        asked.append((f"what shape moves {d}?", movers(d)[0].shape, "TC", ()))
    pool = sorted(set(directions), key=list(DIRECTIONS).index) if rng.random() < 0.5 else list(DIRECTIONS)
    d = pool[int(rng.integers(len(pool)))]  # half the time a way some shape moves, else "0" would dominate
    asked.append((f"how many shapes move {d}?", str(len(movers(d))), "DC", ()))
    if names:
        i = list(names)[int(rng.integers(len(names)))]
        others = [o for o in DIRECTIONS if o != directions[i]]
        d = directions[i] if rng.random() < 0.5 else others[int(rng.integers(len(others)))]
        asked.append((f"does the {names[i]} move {d}?", "yes" if d == directions[i] else "no", "DB", ()))
    base = ShapesWorld.image_id(split, index) * 100
    return [VideoQA(q, a, t, base + k, alt) for k, (q, a, t, alt) in enumerate(asked)]


def video_corpus(world: ShapesWorld, num_scenes: int = 2000) -> list[str]:
    """Text for the tokenizer: the video questions and answers of training scenes, in the prompt format of the
    training examples and evaluation, the alternative answers, and every direction word."""
    qas = [qa for i in range(num_scenes) for qa in video_questions(world, "train", i)]
    texts = [f"question: {qa.question} answer: {qa.answer}." for qa in qas]
    texts += [a for d in DIRECTIONS for a in direction_alternatives(d)]
    texts.append(" ".join(list(DIRECTIONS) + ["which", "way", "does", "move", "moves", "moving", "what", "how"]))
    return texts


# ---------------------------------------------------------------------------------------------------- benchmark files
def _write_clip(world: ShapesWorld, split: str, index: int, path: Path, fps: int, codec: str | None) -> list[VideoQA]:
    """Encode clip ``index`` (:data:`VIDEO_FRAMES` frames) at ``path`` and return its questions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, motion_clip(world, split, index)[0], fps, codec)  # the container follows the file's extension
    return video_questions(world, split, index)


def msvd_clip_name(world: ShapesWorld, split: str, index: int, num_frames: int = VIDEO_FRAMES, fps: int = 8) -> str:
    """A YouTube-like MSVD clip name for clip ``index``, ``<11-character id>_<start>_<end>`` (seconds), seeded."""
    rng = world.rng(split, index, stream=CLIP_NAME_STREAM)
    youtube_id = "".join(_YOUTUBE_ALPHABET[int(i)] for i in rng.integers(len(_YOUTUBE_ALPHABET), size=11))
    start = int(rng.integers(0, 300))
    return f"{youtube_id}_{start}_{start + max(1, round(num_frames / fps))}"


def write_shapesworld_msvd_qa(
    world: ShapesWorld,
    root: str | Path,
    split: str = "test",
    num_videos: int = 100,
    fps: int = 8,
    codec: str | None = None,
) -> dict[str, Path]:
    """Write ShapesWorld video QA in MSVD-QA's layout: ``{root}/YouTubeClips/<clip name>.avi`` (PyAV writes AVI with
    the same codecs as mp4), ``{root}/youtube_mapping.txt`` (``<clip name> vid<N>``, merged with the file's lines when
    it exists, so several splits share it) and ``{root}/{split}_qa.json`` (``[{answer, id, question, video_id}]``).
    ``N`` is ``ShapesWorld.image_id(split, index)``.

    Args:
        world: the ShapesWorld generator.
        root: the benchmark's folder.
        split: the split written (any of ShapesWorld's; the file names follow it).
        num_videos: clips written, items ``0 .. num_videos - 1`` of ``split``.
        fps: frame rate of the videos.
        codec: PyAV codec; libx264 when PyAV has it, else mpeg4 (:func:`~emu_lightning.data.webvid.write_mp4`).

    Returns:
        ``qa_json``, ``video_root`` and ``mapping``: the arguments of
        :func:`~emu_lightning.data.videoqa.read_msvd_qa`.
    """
    root = Path(root)
    paths = {"qa_json": root / f"{split}_qa.json", "video_root": root / "YouTubeClips",
             "mapping": root / "youtube_mapping.txt"}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    mapping = read_msvd_mapping(paths["mapping"]) if paths["mapping"].is_file() else {}
    entries = []
    for index in range(num_videos):
        vid, clip = ShapesWorld.image_id(split, index), msvd_clip_name(world, split, index, fps=fps)
        mapping[vid] = clip
        for qa in _write_clip(world, split, index, paths["video_root"] / f"{clip}.avi", fps, codec):
            entries.append({"answer": qa.answer, "id": qa.question_id, "question": qa.question, "video_id": vid})
    paths["mapping"].write_text("".join(f"{mapping[vid]} vid{vid}\n" for vid in sorted(mapping)))
    paths["qa_json"].write_text(json.dumps(entries))
    return paths


def write_shapesworld_msrvtt_qa(
    world: ShapesWorld,
    root: str | Path,
    split: str = "test",
    num_videos: int = 100,
    fps: int = 8,
    codec: str | None = None,
) -> dict[str, Path]:
    """Write ShapesWorld video QA in MSRVTT-QA's layout: ``{root}/videos/video<N>.mp4`` and ``{root}/{split}_qa.json``
    (``[{answer, category_id, id, question, video_id}]``; ``N`` is ``ShapesWorld.image_id(split, index)``; MSR-VTT's 20
    video categories mean nothing here, so ``category_id`` is the number of shapes minus one).

    Args:
        world: the ShapesWorld generator.
        root: the benchmark's folder.
        split: the split written (any of ShapesWorld's; the file names follow it).
        num_videos: clips written, items ``0 .. num_videos - 1`` of ``split``.
        fps: frame rate of the videos.
        codec: PyAV codec; libx264 when PyAV has it, else mpeg4 (:func:`~emu_lightning.data.webvid.write_mp4`).

    Returns:
        ``qa_json`` and ``video_root``: the arguments of :func:`~emu_lightning.data.videoqa.read_msrvtt_qa`.
    """
    root = Path(root)
    paths = {"qa_json": root / f"{split}_qa.json", "video_root": root / "videos"}
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(num_videos):
        vid = ShapesWorld.image_id(split, index)
        category = len(world.scene(split, index).shapes) - 1
        for qa in _write_clip(world, split, index, paths["video_root"] / f"video{vid}.mp4", fps, codec):
            entries.append({"answer": qa.answer, "category_id": category, "id": qa.question_id,
                            "question": qa.question, "video_id": vid})  # fmt: skip
    paths["qa_json"].write_text(json.dumps(entries))
    return paths


def write_shapesworld_nextqa(
    world: ShapesWorld,
    root: str | Path,
    split: str = "val",
    num_videos: int = 100,
    fps: int = 8,
    codec: str | None = None,
) -> dict[str, Path]:
    """Write ShapesWorld video QA in NExT-QA open-ended's layout: ``{root}/NExTVideo/<folder>/<video>.mp4``,
    ``{root}/map_vid_vidorID.json`` (``{video: "<folder>/<video>"}``, merged with the file's entries when it exists),
    ``{root}/{split}.csv`` (``video,frame_count,width,height,question,answer,qid,type``; ``qid`` counts within a video)
    and ``{root}/add_reference_answer_{split}.json`` (``{video: {qid: answer}}``: ``to the right`` beside ``right``).
    ``video`` is ``4000000000 + ShapesWorld.image_id(split, index)`` (NExT-QA's are 10-digit numbers) and ``folder``
    its thousands.

    Args:
        world: the ShapesWorld generator.
        root: the benchmark's folder.
        split: the split written (any of ShapesWorld's; the file names follow it).
        num_videos: clips written, items ``0 .. num_videos - 1`` of ``split``.
        fps: frame rate of the videos.
        codec: PyAV codec; libx264 when PyAV has it, else mpeg4 (:func:`~emu_lightning.data.webvid.write_mp4`).

    Returns:
        ``csv_path``, ``video_root``, ``map_json`` and ``extra_answers_json``: the arguments of
        :func:`~emu_lightning.data.videoqa.read_nextqa_oe`.
    """
    root = Path(root)
    paths = {"csv_path": root / f"{split}.csv", "video_root": root / "NExTVideo",
             "map_json": root / "map_vid_vidorID.json",
             "extra_answers_json": root / f"add_reference_answer_{split}.json"}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    folders = json.loads(paths["map_json"].read_text()) if paths["map_json"].is_file() else {}
    extra: dict[str, dict[str, str]] = {}
    with paths["csv_path"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "frame_count", "width", "height", "question", "answer", "qid", "type"])
        for index in range(num_videos):
            image_id = ShapesWorld.image_id(split, index)
            video = str(4_000_000_000 + image_id)
            folders[video] = f"{image_id // 1000:04d}/{video}"
            qas = _write_clip(world, split, index, paths["video_root"] / f"{folders[video]}.mp4", fps, codec)
            for qid, qa in enumerate(qas):
                size = world.image_size
                writer.writerow([video, VIDEO_FRAMES, size, size, qa.question, qa.answer, qid, qa.qtype])
                if qa.alternatives:
                    extra.setdefault(video, {})[str(qid)] = qa.alternatives[0]
    paths["map_json"].write_text(json.dumps(folders, indent=1, sort_keys=True))
    paths["extra_answers_json"].write_text(json.dumps(extra, indent=1))
    return paths


# ---------------------------------------------------------------------------------------------------- training
class ShapesWorldVideoQA(Dataset):
    """Video questions about ShapesWorld motion clips; item ``i`` of ``split`` never changes.

    An example is ``[clip, {"text": "question: {q} answer:", "loss": False}, " {answer}."]``, the clip being the
    ``clip_frames`` frames of a ``num_frames``-frame clip at segment centres (:func:`sample_frame_indices`, as the
    evaluation samples them with ``load_clip``), and the question one of :func:`video_questions` drawn at random.
    With ``examples_per_sample > 1`` a sample chains that many examples of different clips, separated by
    ``END_OF_CHUNK``, as :class:`~emu_lightning.shapesworld.datamodule.ShapesWorldPairs` does.

    Args:
        world: the ShapesWorld generator.
        split: ``train``, ``val`` or ``test``.
        size: number of samples.
        examples_per_sample: examples chained in one sample.
        num_frames: frames of the whole clip.
        clip_frames: frames of the clip an example shows.
    """

    def __init__(
        self,
        world: ShapesWorld,
        split: str,
        size: int,
        examples_per_sample: int = 1,
        num_frames: int = VIDEO_FRAMES,
        clip_frames: int = 8,
    ) -> None:
        if examples_per_sample < 1:
            raise ValueError(f"examples_per_sample {examples_per_sample} must be at least 1")
        if not 2 <= clip_frames <= num_frames:
            raise ValueError(f"need 2 <= clip_frames ({clip_frames}) <= num_frames ({num_frames})")
        world.rng(split, 0)  # a bad split fails here
        self.world, self.split, self.size, self.examples_per_sample = world, split, size, examples_per_sample
        self.num_frames, self.frames = num_frames, sample_frame_indices(num_frames, clip_frames)

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> tuple[list[Any], list[str]]:
        """Clip ``index``'s example and the question's reference answers."""
        qas = video_questions(self.world, self.split, index)
        qa = qas[int(self.world.rng(self.split, index, stream=VIDEO_SAMPLE_STREAM).integers(len(qas)))]
        clip = render_motion(self.world, motion_scene(self.world, self.split, index, self.num_frames), self.frames)
        prompt = {"text": f"question: {qa.question} answer:", "loss": False}
        return [clip, prompt, f" {qa.answer}."], [qa.answer, *qa.alternatives]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        items: list[Any] = []
        references: list[str] = []
        for j in range(self.examples_per_sample):
            example, refs = self.example(index * self.examples_per_sample + j)  # distinct clips when chained
            items += [END_OF_CHUNK, *example] if items else example
            references = references or refs
        return {"items": items, "id": f"{self.split}-{index}", "index": index, "references": references}


class ShapesWorldVideoQADataModule(ShapesWorldDataModule):
    """ShapesWorld video questions generated in memory (:class:`ShapesWorldVideoQA`): seeded, with a held-out split,
    the training stream resumable as :class:`~emu_lightning.shapesworld.datamodule.ShapesWorldDataModule`'s is; usable
    as a source of :class:`~emu_lightning.data.MixtureDataModule`.

    Args:
        image_size: rendered frame side in pixels; by default the attached model's vision backbone's.
        min_shapes: fewest shapes per scene.
        max_shapes: most shapes per scene.
        grid: scenes are a grid x grid board (2 or 3).
        seed: the world's seed; clips are a pure function of (seed, split, index).
        train_size: training clips per epoch.
        val_size: held-out clips (the ``val`` split).
        examples_per_sample: examples chained in one sample.
        num_frames: frames of a whole clip.
        clip_frames: frames an example shows (at segment centres, as the evaluation samples videos).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        sequencer: a SequenceBuilder; by default the trained model's.
    """

    def __init__(
        self,
        image_size: int | None = None,
        min_shapes: int = 1,
        max_shapes: int = 3,
        grid: int = 2,
        seed: int = 0,
        train_size: int = 100_000,
        val_size: int = 256,
        examples_per_sample: int = 1,
        num_frames: int = VIDEO_FRAMES,
        clip_frames: int = 8,
        batch_size: int = 32,
        num_workers: int = 0,
        sequencer: SequenceBuilder | None = None,
    ) -> None:
        super().__init__(image_size, min_shapes, max_shapes, grid, seed, train_size, val_size,
                         batch_size=batch_size, num_workers=num_workers, sequencer=sequencer)  # fmt: skip
        self.video_args = dict(examples_per_sample=examples_per_sample, num_frames=num_frames, clip_frames=clip_frames)
        ShapesWorldVideoQA(ShapesWorld(image_size=image_size or 8 * grid, **self.world_args), "train", 1,
                           **self.video_args)  # fmt: skip  # bad arguments fail here, not at the first batch

    @property
    def world(self) -> ShapesWorld:
        """The world, rendered at ``image_size`` (by default the attached model's vision backbone's)."""
        if self._world is None:
            size = self.image_size or self.model_image_size()
            if size is None:
                raise ValueError("ShapesWorldVideoQADataModule has no image_size: give it, or attach it to a model")
            self._world = ShapesWorld(image_size=size, **self.world_args)
            self._sets = {s: ShapesWorldVideoQA(self._world, s, n, **self.video_args) for s, n in self.sizes.items()}
        return self._world
