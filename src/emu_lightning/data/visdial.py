"""VisDial v1.0 (Visual Dialog) in its released format: the dialogs file, the dense annotations and the images.

- ``visdial_1.0_val.json``: ``{"data": {"questions": [str], "answers": [str], "dialogs": [{"image_id", "caption",
  "dialog": [{"question": i, "answer": j, "answer_options": [100 indices], "gt_index": k}, ...]}]}}``; questions
  and answers are indices into the two string lists, ``gt_index`` is the position of the true answer among the
  options.
- ``visdial_1.0_val_dense_annotations.json``: ``[{"image_id", "round_id", "gt_relevance": [100 floats]}]``, one
  round per image (``round_id`` counts from 1), each option's relevance in ``[0, 1]`` as judged by annotators.
- images: ``VisualDialog_val2018_{image_id:012d}.jpg`` in one folder.

Every round of every dialog is evaluated (20,640 on val): the model ranks its options given the image, the dialog
so far (the earlier questions with their true answers) and the question. As with the COCO and VQA readers, image
files are not opened here: an image that is missing or does not decode is skipped (and counted) by the evaluation
that loads it (:func:`emu_lightning.eval.visdial.evaluate_visdial`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VAL_IMAGE_TEMPLATE = "VisualDialog_val2018_{image_id:012d}.jpg"


@dataclass(frozen=True)
class VisDialRound:
    """One evaluated round of a dialog: the question to answer, its options, and what came before it."""

    image_id: int
    image_path: Path
    caption: str
    round_id: int
    """1-based, as in the dense annotations and the official ranks file."""
    history: tuple[tuple[str, str], ...]
    """The ``(question, true answer)`` pairs of the earlier rounds, oldest first."""
    question: str
    options: tuple[str, ...]
    gt_index: int
    """Position of the true answer in :attr:`options` (0-based)."""
    relevance: tuple[float, ...] | None = None
    """The dense annotation of this round (one relevance per option), when it has one."""

    @property
    def key(self) -> tuple[int, int]:
        """``(image_id, round_id)``, unique over a split."""
        return (self.image_id, self.round_id)

    @property
    def answer(self) -> str:
        return self.options[self.gt_index]


def read_json(path: str | Path, what: str) -> Any:
    """A json file's content; a missing file or malformed json is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not valid json: {err}") from None


def read_visdial(
    dialogs_json: str | Path,
    image_root: str | Path,
    dense_json: str | Path | None = None,
    image_template: str = VAL_IMAGE_TEMPLATE,
    dense_only: bool = False,
) -> list[VisDialRound]:
    """Read VisDial v1.0 val (the format above) into one :class:`VisDialRound` per round, dialog by dialog.

    Args:
        dialogs_json: ``visdial_1.0_val.json``.
        image_root: the folder of the images (``VisualDialog_val2018``).
        dense_json: ``visdial_1.0_val_dense_annotations.json``: its relevances go to the rounds they annotate
            (NDCG is computed over those); ``None``: no round has relevances.
        image_template: an image's file name from its ``image_id``.
        dense_only: keep only the rounds with a dense annotation (2,064 on val, one per image): enough for NDCG,
            a tenth of the work.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: malformed json, or an entry that breaks the format (a question, answer or option index outside
            its list, a ``gt_index`` outside the options, a dense annotation of an unknown round, of the wrong
            length, or twice the same round); the message names the file and the entry.
    """
    data = read_json(dialogs_json, "VisDial dialogs file")
    body = data.get("data") if isinstance(data, dict) else None
    lists = ("questions", "answers", "dialogs")
    if not isinstance(body, dict) or not all(isinstance(body.get(k), list) for k in lists):
        raise ValueError(
            f"{str(dialogs_json)!r} is not a VisDial dialogs file: expected {{'data': {{'questions': [...], "
            "'answers': [...], 'dialogs': [...]}}}}"
        )
    questions, answers = body["questions"], body["answers"]
    relevance = {} if dense_json is None else _read_dense(dense_json)
    rounds: list[VisDialRound] = []
    seen: set[int] = set()
    for d, dialog in enumerate(body["dialogs"]):
        where = f"{str(dialogs_json)!r} dialog {d}"
        try:
            image_id, caption, turns = int(dialog["image_id"]), str(dialog["caption"]), dialog["dialog"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where} lacks a valid image_id, caption or dialog list ({err!r})") from None
        if image_id in seen:
            raise ValueError(f"{where}: image {image_id} has a second dialog")
        seen.add(image_id)
        if not isinstance(turns, list):
            raise ValueError(f"{where} (image {image_id}): 'dialog' is not a list of rounds")
        path = Path(image_root) / image_template.format(image_id=image_id)
        history: list[tuple[str, str]] = []
        for r, turn in enumerate(turns, 1):
            at = f"{where} (image {image_id}) round {r}"
            question = _lookup(questions, turn, "question", at)
            indices = turn.get("answer_options") if isinstance(turn, dict) else None
            if not isinstance(indices, list) or not indices:
                raise ValueError(f"{at}: 'answer_options' is not a non-empty list of answer indices")
            options = tuple(_lookup(answers, {"answer_option": i}, "answer_option", at) for i in indices)
            gt = turn.get("gt_index")
            if isinstance(gt, bool) or not isinstance(gt, int) or not 0 <= gt < len(options):
                raise ValueError(f"{at}: gt_index {gt!r} is not an index into its {len(options)} answer options")
            answer = _lookup(answers, turn, "answer", at)
            if options[gt] != answer:
                raise ValueError(f"{at}: the option at gt_index {gt} ({options[gt]!r}) is not the answer {answer!r}")
            rel = relevance.pop((image_id, r), None)
            if rel is not None and len(rel) != len(options):
                raise ValueError(
                    f"{str(dense_json)!r}: image {image_id} round {r} has {len(rel)} relevances for "
                    f"{len(options)} options"
                )
            if rel is not None or not dense_only:
                rounds.append(VisDialRound(image_id, path, caption, r, tuple(history), question, options, gt, rel))
            history.append((question, answer))
    if relevance:
        (image_id, r), n = next(iter(relevance)), len(relevance)
        raise ValueError(
            f"{str(dense_json)!r} annotates {n} round(s) that {str(dialogs_json)!r} does not have, e.g. image "
            f"{image_id} round {r}: give the dense annotations of the same split"
        )
    if not rounds:
        raise ValueError(f"{str(dialogs_json)!r} has no rounds to evaluate" + (" with a dense annotation" * dense_only))
    return rounds


def _lookup(table: list[str], turn: Any, field: str, at: str) -> str:
    index = turn.get(field) if isinstance(turn, dict) else None
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(table):
        plural = "answers" if field.startswith("answer") else "questions"
        raise ValueError(f"{at}: {field} {index!r} is not an index into the {len(table)} {plural}")
    return table[index]


def _read_dense(path: str | Path) -> dict[tuple[int, int], tuple[float, ...]]:
    data = read_json(path, "VisDial dense annotations file")
    if not isinstance(data, list):
        raise ValueError(
            f"{str(path)!r} is not a VisDial dense annotations file: expected a list of "
            "{'image_id', 'round_id', 'gt_relevance'}"
        )
    out: dict[tuple[int, int], tuple[float, ...]] = {}
    for n, entry in enumerate(data):
        try:
            key = (int(entry["image_id"]), int(entry["round_id"]))
            values = entry["gt_relevance"] if "gt_relevance" in entry else entry["relevance"]
            rel = tuple(float(v) for v in values)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{str(path)!r} entry {n} lacks a valid image_id, round_id or gt_relevance list ({err!r})"
            ) from None
        if not all(math.isfinite(v) and v >= 0 for v in rel):
            raise ValueError(f"{str(path)!r} entry {n} (image {key[0]} round {key[1]}) has a negative or non-finite "
                             "relevance")  # fmt: skip
        if key in out:
            raise ValueError(f"{str(path)!r} annotates image {key[0]} round {key[1]} twice")
        out[key] = rel
    return out
