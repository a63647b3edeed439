"""Visual dialogs about held-out ShapesWorld scenes, written in VisDial v1.0's released format, and the VisDial
evaluation on them (:class:`ShapesWorldVisDialEval`).

A dialog asks up to ten questions about one scene, in the words of ShapesWorld's VQA questions
(:meth:`~emu_lightning.shapesworld.world.ShapesWorld.questions`), which the tiny model is trained to answer after
``question: ... answer:``: how many shapes there are, then, in a seeded order, the colour and the shape in each
occupied cell, the colour of a shape that appears once, whether there is a given coloured shape (present in half of
the dialogs, where the VQA questions draw the colour and shape at random, so mostly absent) and how many shapes of a
colour there are (a colour of the scene in half of the dialogs). The answers are the true ones, as the VQA training
targets write them (digits for counts). The caption names no shape (VisDial's captions describe the image; here
every description would give answers away), so that the answers come from the image.

Each round has 100 answer options from the answer pool: the true answer, every short answer of the world (the six
colours, the three shapes, the counts 0 to 9 as digits and as words, "none", "yes" and "no"), so that the other
colours, shapes and counts are always there to be mistaken for the right one, and seeded picks among longer answers
("a large red circle", "blue square", "top left", ...) to make up the hundred. Each dialog has one round with a dense
annotation (VisDial's val has one per image): relevance 1 for the options equivalent to the true answer under the
VQA answer normalisation (``"2"`` and ``"two"``; ``"0"``, ``"zero"`` and ``"none"``; ``"circle"`` and ``"a circle"``)
and 0 for the others.

Files (:func:`write_shapesworld_visdial`): ``visdial_1.0_val.json``, ``visdial_1.0_val_dense_annotations.json`` and
the images ``images/VisualDialog_val2018_{image_id:012d}.png`` (PNG by default: JPEG shifts ShapesWorld's colours),
read back by :func:`~emu_lightning.data.visdial.read_visdial` as real VisDial files are.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image

from emu_lightning.data.visdial import VisDialRound, read_visdial
from emu_lightning.eval.metrics import normalize_vqa_answer
from emu_lightning.eval.visdial_callback import VisDialEval
from emu_lightning.shapesworld.eval import _no_files, _world
from emu_lightning.shapesworld.owned import write_once
from emu_lightning.shapesworld.world import CELL_NAMES, COLOURS, NUMBER_WORDS, SHAPES, SIZES, ShapesWorld, _article

DIALOG_STREAM = 21
"""The :meth:`ShapesWorld.rng` stream of a dialog (its questions, options and dense round)."""
CAPTION = "a picture of shapes on a black background"
MAX_ROUNDS = 10
"""Rounds per dialog at most, as in VisDial."""
NUM_OPTIONS = 100
IMAGE_TEMPLATE = "VisualDialog_val2018_{image_id:012d}.{ext}"


def short_answers() -> list[str]:
    """The answers every round offers: each colour, shape and count (digits and words, and "none"), yes and no."""
    counts = [str(n) for n in range(10)] + list(NUMBER_WORDS) + ["none"]
    return [*COLOURS, *SHAPES, *counts, "yes", "no"]


def answer_pool(world: ShapesWorld) -> list[str]:
    """Every answer a round may offer, in a fixed order: :func:`short_answers`, then sizes, cell names, and shapes
    named with an article, a colour and a size, and counts of shapes."""
    longer = [*SIZES, *CELL_NAMES[world.grid], *(f"a {s}" for s in SHAPES)]
    longer += [f"{c} {s}" for c in COLOURS for s in SHAPES]
    longer += [f"{_article(z)} {z} {c} {s}" for z in SIZES for c in COLOURS for s in SHAPES]
    longer += [f"{NUMBER_WORDS[n]} shapes" for n in range(2, 10)]
    pool = short_answers() + longer
    assert len(set(pool)) == len(pool) >= NUM_OPTIONS
    return pool


def dialog_turns(world: ShapesWorld, split: str, index: int) -> list[tuple[str, str]]:
    """The ``(question, answer)`` rounds of scene ``index`` of ``split``; questions without their question mark (as
    VisDial stores them; the prompt adds it)."""
    scene = world.scene(split, index)
    rng = world.rng(split, index, stream=DIALOG_STREAM)
    shapes = scene.shapes
    kinds, colours = Counter(s.shape for s in shapes), Counter(s.colour for s in shapes)
    rest: list[tuple[str, str]] = []
    for s in shapes:
        rest.append((f"what colour is the shape in the {scene.position(s)}", s.colour))
        rest.append((f"what shape is in the {scene.position(s)}", s.shape))
    unique = [s for s in shapes if kinds[s.shape] == 1]
    if unique:
        s = unique[int(rng.integers(len(unique)))]
        rest.append((f"what colour is the {s.shape}", s.colour))
    if rng.random() < 0.5:  # present
        s = shapes[int(rng.integers(len(shapes)))]
        colour, shape = s.colour, s.shape
    else:
        colour, shape = list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]
    present = any(s.colour == colour and s.shape == shape for s in shapes)
    rest.append((f"is there a {colour} {shape}", "yes" if present else "no"))  # the VQA questions' words
    colour = shapes[int(rng.integers(len(shapes)))].colour if rng.random() < 0.5 else list(COLOURS)[
        int(rng.integers(len(COLOURS)))]  # fmt: skip
    rest.append((f"how many {colour} shapes are there", str(colours[colour])))
    order = rng.permutation(len(rest)).tolist()
    return [("how many shapes are there", str(len(shapes)))] + [rest[i] for i in order][: MAX_ROUNDS - 1]


def round_options(answer: str, pool: list[str], rng: np.random.Generator) -> list[str]:
    """:data:`NUM_OPTIONS` distinct options in a seeded order: ``answer``, the other :func:`short_answers` and picks
    among the rest of ``pool``."""
    short = [a for a in short_answers() if a != answer]
    others = [a for a in pool if a != answer and a not in short]
    picked = rng.choice(len(others), size=NUM_OPTIONS - 1 - len(short), replace=False)
    options = [answer, *short, *(others[i] for i in sorted(picked.tolist()))]
    return [options[i] for i in rng.permutation(len(options)).tolist()]


def relevance(options: list[str], answer: str) -> list[float]:
    """1 for each option equivalent to ``answer`` under the VQA answer normalisation, 0 for the others."""
    truth = normalize_vqa_answer(answer)
    return [float(normalize_vqa_answer(o) == truth) for o in options]


def write_shapesworld_visdial(
    world: ShapesWorld, root: str | Path, num_dialogs: int = 100, split: str = "val", image_format: str = "png"
) -> dict[str, str]:
    """Write dialogs about scenes ``0 .. num_dialogs - 1`` of ``split`` in VisDial v1.0's format under ``root`` (the
    module docstring says what). Returns the arguments of :func:`~emu_lightning.data.visdial.read_visdial`:
    ``dialogs_json``, ``image_root``, ``dense_json`` and ``image_template``."""
    if num_dialogs < 1:
        raise ValueError(f"num_dialogs {num_dialogs} must be positive")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format {image_format!r} must be 'png' or 'jpg'")
    root = Path(root)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    template = IMAGE_TEMPLATE.replace("{ext}", image_format)
    pool = answer_pool(world)
    answer_index = {a: i for i, a in enumerate(pool)}
    questions: list[str] = []
    question_index: dict[str, int] = {}
    dialogs, dense = [], []
    for index in range(num_dialogs):
        image_id = world.image_id(split, index)
        pixels = (world.image(split, index).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / template.format(image_id=image_id), quality=95)
        rng = world.rng(split, index, stream=DIALOG_STREAM + 1)
        turns = []
        for question, answer in dialog_turns(world, split, index):
            options = round_options(answer, pool, rng)
            if question not in question_index:
                question_index[question] = len(questions)
                questions.append(question)
            turns.append({"question": question_index[question], "answer": answer_index[answer],
                          "answer_options": [answer_index[o] for o in options],
                          "gt_index": options.index(answer)})  # fmt: skip
        dense_round = int(rng.integers(len(turns)))
        options = [pool[i] for i in turns[dense_round]["answer_options"]]
        dense.append({"image_id": image_id, "round_id": dense_round + 1,
                      "gt_relevance": relevance(options, pool[turns[dense_round]["answer"]])})  # fmt: skip
        dialogs.append({"image_id": image_id, "caption": CAPTION, "dialog": turns})
    data = {"version": "1.0", "split": split, "data": {"questions": questions, "answers": pool, "dialogs": dialogs}}
    paths = {"dialogs_json": root / f"visdial_1.0_{split}.json",
             "dense_json": root / f"visdial_1.0_{split}_dense_annotations.json"}  # fmt: skip
    paths["dialogs_json"].write_text(json.dumps(data))
    paths["dense_json"].write_text(json.dumps(dense))
    return {**{k: str(v) for k, v in paths.items()}, "image_root": str(folder), "image_template": template}


class ShapesWorldVisDialEval(VisDialEval):
    """:class:`~emu_lightning.eval.visdial_callback.VisDialEval` on ShapesWorld dialogs written in VisDial v1.0's
    format into the run folder (``<run dir>/eval_data/visdial``; the module docstring says what they hold), with
    the world of the training data (:func:`~emu_lightning.shapesworld.eval.find_world`); it needs no files.

    Chance, a random ranking of the 100 options: R@1 = 0.01, R@5 = 0.05, R@10 = 0.10, MRR = 0.0519 (the harmonic
    number H_100 / 100), mean rank 50.5, and NDCG = k / 100 on a round with k relevant options (0.01 for colours and
    yes/no, 0.02 for shapes and counts, 0.03 for zero; 0.015 over the default set): each evaluation's summary has
    them under ``chance``.

    Stronger baselines than chance, on the default 100 dialogs (782 rounds): the true answers are short, and the
    released ``sequence_mean`` reduction favours short options, so the untrained model of ``configs/tiny.yaml``
    already ranks the true answer at 15 on average (MRR 0.10, R@1 0.001); a ranker that knows each question's
    answer type but not the image (a colour, a shape, yes or no, a count, picked at random) has R@1 0.235, and one
    that always gives the most frequent answer of the type 0.39. R@1 above that needs the image.

    Args:
        num_dialogs: dialogs written (held-out scenes ``0 .. num_dialogs - 1`` of the ``val`` split), up to ten
            rounds each (a scene of n shapes: 2 n + 3 or 2 n + 4).
        template: ``pretrained`` (``{image}{caption}. question: {question}? answer: {answer}.``, the
            ``question: ... answer:`` the tiny model is trained on: it has never seen Emu-I's ``[USER]`` /
            ``[ASSISTANT]``) or ``emu-i``.
        kwargs: the schedule and scoring options of :class:`~emu_lightning.eval.visdial_callback.VisDialEval`
            (``num_rounds``, ``dense_only``, ``reduction``, ``option_batch_size``, ``every_n_steps``, ...).
    """

    writes_own_data = True

    def __init__(self, num_dialogs: int = 100, template: str = "pretrained", **kwargs: Any) -> None:
        _no_files(self, kwargs, ("dialogs_json", "image_root", "dense_json"))
        super().__init__(template=template, **kwargs)
        if num_dialogs < 1:
            raise ValueError(f"num_dialogs {num_dialogs} must be positive")
        self.num_dialogs = num_dialogs

    def read_rounds(self, trainer: L.Trainer, pl_module: Any, root: Path) -> list[VisDialRound]:
        world = _world(trainer, pl_module)
        files = write_once(root / "visdial", "visdial", {**vars(world), "dialogs": self.num_dialogs},
                           functools.partial(write_shapesworld_visdial, world, root / "visdial",
                                             self.num_dialogs))  # fmt: skip
        return read_visdial(**files, dense_only=self.dense_only)
