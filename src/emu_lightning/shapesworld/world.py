"""ShapesWorld: a seeded synthetic world of coloured shapes, the library's offline default data.

A scene is a few shapes, each with a shape, colour, size and grid cell. Everything is a pure function of
``(seed, split, index)``, so any process, worker or rank draws the same scene for the same index, and the
held-out splits come from other seed streams than training. The world renders images and writes
several reference captions per scene; later formats (videos, documents, QA, dialogues) are built on the
same :class:`Scene` objects.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.5, "large": 0.9}
"""Shape extent as a fraction of its grid cell."""
CELL_NAMES = {
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"),
}
SPLITS = {"train": 0, "val": 1, "test": 2}
BACKGROUND = (16, 16, 16)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Shape:
    """One object in a scene."""

    shape: str
    colour: str
    size: str
    cell: int
    """Grid cell in reading order (0 = top left)."""

    def name(self, with_size: bool = True) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A set of shapes in distinct cells, in reading order."""

    shapes: tuple[Shape, ...]
    grid: int

    def position(self, shape: Shape) -> str:
        return CELL_NAMES[self.grid][shape.cell]


@dataclass(frozen=True)
class QA:
    """A question about a scene with its annotators' answers (VQAv2 style)."""

    question: str
    answer: str
    """The true answer (VQAv2's ``multiple_choice_answer``)."""
    answers: tuple[str, ...]
    """What each annotator answered; some disagree."""
    answer_type: str
    """``yes/no``, ``number`` or ``other``, as in VQAv2."""
    question_id: int


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class ShapesWorld:
    """The generator: scenes, images, captions and a parser that reads shapes back out of text.

    Args:
        image_size: side of the rendered square images in pixels.
        min_shapes: fewest shapes in a scene.
        max_shapes: most shapes in a scene (at most ``grid * grid``).
        grid: the scene is a ``grid x grid`` board of cells (2 or 3); each shape takes one cell.
        seed: the world's seed; scenes are a pure function of (seed, split, index).
        jitter: random offset of a shape inside its cell, as a fraction of the cell.
    """

    def __init__(
        self,
        image_size: int = 32,
        min_shapes: int = 1,
        max_shapes: int = 3,
        grid: int = 2,
        seed: int = 0,
        jitter: float = 0.05,
    ) -> None:
        if grid not in CELL_NAMES:
            raise ValueError(f"grid {grid} is not supported (expected one of {sorted(CELL_NAMES)})")
        if not 1 <= min_shapes <= max_shapes <= grid * grid:
            raise ValueError(f"need 1 <= min_shapes ({min_shapes}) <= max_shapes ({max_shapes}) <= {grid * grid}")
        if image_size < 8 * grid:
            raise ValueError(f"image_size {image_size} is too small for a {grid}x{grid} grid (at least {8 * grid})")
        self.image_size, self.min_shapes, self.max_shapes = image_size, min_shapes, max_shapes
        self.grid, self.seed, self.jitter = grid, seed, jitter

    # ---------------------------------------------------------------- scenes
    def rng(self, split: str, index: int, stream: int = 0) -> np.random.Generator:
        """The random stream of one item; ``stream`` separates independent draws (scene, caption, layout)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}")
        return np.random.default_rng([self.seed, SPLITS[split], index, stream])

    def scene(self, split: str, index: int) -> Scene:
        rng = self.rng(split, index)
        n = int(rng.integers(self.min_shapes, self.max_shapes + 1))
        cells = sorted(rng.choice(self.grid * self.grid, size=n, replace=False).tolist())
        shapes = tuple(
            Shape(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=list(COLOURS)[rng.integers(len(COLOURS))],
                size=SIZES[rng.integers(len(SIZES))],
                cell=c,
            )
            for c in cells
        )
        return Scene(shapes=shapes, grid=self.grid)

    # ---------------------------------------------------------------- pixels
    def draw(self, scene: Scene, image: Image.Image, offsets: np.ndarray | None = None) -> None:
        """Draw ``scene`` onto a PIL image; ``offsets`` (n, 2) shift shapes inside their cells (in cells)."""
        draw = ImageDraw.Draw(image)
        cell = image.size[0] / self.grid
        for i, s in enumerate(scene.shapes):
            row, col = divmod(s.cell, self.grid)
            dx, dy = offsets[i] if offsets is not None else (0.0, 0.0)
            cx, cy = (col + 0.5 + dx) * cell, (row + 0.5 + dy) * cell
            r = SIZE_FRACTION[s.size] * cell / 2
            box = [cx - r, cy - r, cx + r, cy + r]
            colour = COLOURS[s.colour]
            if s.shape == "circle":
                draw.ellipse(box, fill=colour)
            elif s.shape == "square":
                draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)

    def render(self, scene: Scene, rng: np.random.Generator | None = None) -> Tensor:
        """A ``(3, S, S)`` float image in ``[0, 1]``; ``rng`` jitters the shapes inside their cells."""
        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        offsets = None
        if rng is not None and self.jitter > 0:
            offsets = rng.uniform(-self.jitter, self.jitter, size=(len(scene.shapes), 2))
        self.draw(scene, image, offsets)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def image(self, split: str, index: int) -> Tensor:
        """The rendered image of item ``index`` of ``split``."""
        return self.render(self.scene(split, index), self.rng(split, index, stream=1))

    # ---------------------------------------------------------------- text
    def captions(self, scene: Scene) -> list[str]:
        """Five reference captions that all name every shape (size, colour, shape) in reading order."""
        names = [s.name() for s in scene.shapes]
        objs = [f"{_article(n)} {n}" for n in names]
        placed_in = [f"{o} in the {scene.position(s)}" for o, s in zip(objs, scene.shapes)]
        placed_at = [f"{o} at the {scene.position(s)}" for o, s in zip(objs, scene.shapes)]
        n = len(names)
        count = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
        return [
            f"{_join(objs)}.",
            f"{_join(placed_in)}.",
            f"there is {_join(placed_at)}.",
            f"{count}: {_join(objs)}.",
            f"a picture of {_join(objs)} on a black background.",
        ]

    def corpus(self, num_scenes: int = 2000) -> list[str]:
        """Text for training the default tokenizer: captions and VQA questions and answers of training
        scenes (in the prompt format the VQA examples and evaluation use), plus every word, and the video questions
        of as many clips (:func:`~emu_lightning.shapesworld.videoqa.video_corpus`)."""
        texts = [c for i in range(num_scenes) for c in self.captions(self.scene("train", i))]
        qas = [qa for i in range(num_scenes) for qa in self.questions("train", i)]
        texts += [f"question: {qa.question} answer: {qa.answer}." for qa in qas]
        words = list(COLOURS) + list(SHAPES) + list(SIZES) + [n for names in CELL_NAMES.values() for n in names]
        texts.append(" ".join(words + list(NUMBER_WORDS) + ["yes", "no"]))
        from emu_lightning.shapesworld.videoqa import video_corpus  # imported here: videoqa imports this module

        texts += video_corpus(self, num_scenes)
        return texts

    # ---------------------------------------------------------------- questions
    def questions(self, split: str, index: int, num_answers: int = 10, disagreement: float = 0.1) -> list[QA]:
        """VQA items about scene ``index``: each question with ``num_answers`` annotator answers.

        Most annotators give the true answer; each one, with probability ``disagreement``, gives a
        plausible wrong one (another colour, shape or count), as real annotators sometimes disagree.
        Numbers are written as digits or words at random ("2" / "two"), which the VQA normalisation unifies.
        """
        scene = self.scene(split, index)
        rng = self.rng(split, index, stream=3)
        shapes = scene.shapes
        kinds = Counter(s.shape for s in shapes)
        colours = Counter(s.colour for s in shapes)
        asked: list[tuple[str, str, str, list[str]]] = [
            ("how many shapes are there?", str(len(shapes)), "number", [str(n) for n in range(1, 10)]),
        ]
        target = shapes[int(rng.integers(len(shapes)))]
        position = scene.position(target)
        asked.append((f"what colour is the shape in the {position}?", target.colour, "other", list(COLOURS)))
        asked.append((f"what shape is in the {position}?", target.shape, "other", list(SHAPES)))
        if kinds[target.shape] == 1:
            asked.append((f"what colour is the {target.shape}?", target.colour, "other", list(COLOURS)))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        present = any(s.colour == colour and s.shape == shape for s in shapes)
        asked.append((f"is there a {colour} {shape}?", "yes" if present else "no", "yes/no", ["yes", "no"]))
        asked.append(
            (f"how many {colour} shapes are there?", str(colours[colour]), "number", [str(n) for n in range(0, 10)])
        )
        items = []
        for qid, (question, truth, answer_type, options) in enumerate(asked):
            wrong = [o for o in options if o != truth]
            answers = []
            for _ in range(num_answers):
                answer = truth if rng.random() >= disagreement else wrong[int(rng.integers(len(wrong)))]
                if answer_type == "number" and rng.random() < 0.3:
                    answer = NUMBER_WORDS[int(answer)]
                answers.append(answer)
            items.append(
                QA(
                    question=question,
                    answer=truth,
                    answers=tuple(answers),
                    answer_type=answer_type,
                    question_id=self.image_id(split, index) * 100 + qid,
                )
            )
        return items

    # ---------------------------------------------------------------- real on-disk formats
    @staticmethod
    def image_id(split: str, index: int) -> int:
        """A COCO-style integer id, unique across splits."""
        return SPLITS[split] * 10**6 + index

    def _save_image(self, folder: Path, split: str, index: int) -> str:
        name = f"shapes_{split}_{self.image_id(split, index):012d}.png"  # PNG: no JPEG colour shifts
        Image.fromarray((self.image(split, index).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            folder / name
        )
        return name

    def write_coco_karpathy(self, root: str | Path, sizes: dict[str, int] | None = None) -> dict[str, Path]:
        """Write a captioning set in COCO's formats: Karpathy's ``dataset_coco.json`` (with ``train`` / ``val`` /
        ``test`` splits), the COCO captions annotation file, and the images. Returns the paths."""
        root = Path(root)
        sizes = sizes or {"train": 500, "val": 0, "test": 100}
        images, annotations, coco_images = [], [], []
        sentid = 0
        for split, n in sizes.items():
            folder = root / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(n):
                image_id = self.image_id(split, index)
                name = self._save_image(folder, split, index)
                sentences = []
                for caption in self.captions(self.scene(split, index)):
                    sentences.append(
                        {"raw": caption, "tokens": re.findall(r"\w+", caption), "imgid": image_id, "sentid": sentid}
                    )
                    annotations.append({"image_id": image_id, "id": sentid, "caption": caption})
                    sentid += 1
                images.append(
                    {
                        "filepath": f"images/{split}",
                        "filename": name,
                        "imgid": image_id,
                        "cocoid": image_id,
                        "split": split,
                        "sentences": sentences,
                        "sentids": [x["sentid"] for x in sentences],
                    }
                )
                coco_images.append({"id": image_id, "file_name": name})
        paths = {"karpathy": root / "dataset_coco.json", "annotations": root / "captions.json", "images": root}
        paths["karpathy"].write_text(json.dumps({"images": images, "dataset": "coco"}))
        paths["annotations"].write_text(json.dumps({"images": coco_images, "annotations": annotations}))
        return paths

    def write_vqav2(self, root: str | Path, split: str = "val", num_images: int = 100) -> dict[str, Any]:
        """Write a VQAv2-format set: questions and annotations json files and the images. Returns the paths
        and the ``image_template`` that maps an ``image_id`` to its file name."""
        root = Path(root)
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for index in range(num_images):
            image_id = self.image_id(split, index)
            self._save_image(folder, split, index)
            for qa in self.questions(split, index):
                questions.append({"image_id": image_id, "question": qa.question, "question_id": qa.question_id})
                annotations.append({
                    "question_id": qa.question_id, "image_id": image_id, "answer_type": qa.answer_type,
                    "question_type": " ".join(qa.question.split()[:2]), "multiple_choice_answer": qa.answer,
                    "answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"}
                                for i, a in enumerate(qa.answers)],
                })  # fmt: skip
        paths: dict[str, Any] = {
            "questions": root / f"questions_{split}.json",
            "annotations": root / f"annotations_{split}.json",
            "images": folder,
            "image_template": f"shapes_{split}_{{image_id:012d}}.png",
        }
        paths["questions"].write_text(json.dumps({"questions": questions, "data_subtype": split}))
        paths["annotations"].write_text(json.dumps({"annotations": annotations, "data_subtype": split}))
        return paths

    @staticmethod
    def mentioned(text: str) -> Counter:
        """The (colour, shape) pairs a text names, as a multiset: ``"a small red circle"`` -> {(red, circle)}."""
        pattern = r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b"
        return Counter(re.findall(pattern, text.lower()))

    @classmethod
    def caption_correct(cls, text: str, scene: Scene) -> bool:
        """True when ``text`` names exactly the scene's coloured shapes (sizes and positions not checked)."""
        return cls.mentioned(text) == Counter((s.colour, s.shape) for s in scene.shapes)
