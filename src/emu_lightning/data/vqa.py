"""Question answering files: VQAv2's format (questions and annotations json files; OK-VQA uses it too) and VizWiz's
(one json list per split, each entry an image file name, a question and its answers)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UNANSWERABLE = "unanswerable"
"""VizWiz's answer for a question the image does not let one answer (the annotators' word, scored as any answer)."""


@dataclass(frozen=True)
class VQAExample:
    """One question about one image, with the annotators' answers (empty when there are no annotations)."""

    question_id: int
    image_id: int
    question: str
    image_path: Path
    answers: tuple[str, ...] = ()
    answer_type: str = ""
    question_type: str = ""
    image_name: str = ""
    """The image as its file names it (VizWiz's ``image`` entry, what its results format asks for); ``""`` for
    VQAv2, whose files name images by ``image_id``."""
    answerable: int | None = None
    """VizWiz's ``answerable`` (1, or 0 when the annotators judged the question unanswerable); ``None`` elsewhere and
    in a split without answers."""


def _load_json(path: str | Path, what: str) -> Any:
    """A json file's content; a missing file or one that is not json is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with path.open() as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid json: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid json (not UTF-8 text: {err})") from None


def read_vqa(
    questions_json: str | Path,
    annotations_json: str | Path | None,
    image_root: str | Path,
    image_template: str = "COCO_val2014_{image_id:012d}.jpg",
) -> list[VQAExample]:
    """Read a VQAv2-format questions file and (for scoring) its annotations file: VQAv2 or OK-VQA.

    OK-VQA's files (``OpenEnded_mscoco_val2014_questions.json``, ``mscoco_val2014_annotations.json``, COCO val2014
    images; ``..._train2014_...`` for demonstrations) have this layout; its answers carry a ``raw_answer`` beside
    ``answer``, and ``answer`` (stemmed in OK-VQA v1.1) is the reference, as in its official evaluation.

    Args:
        questions_json: ``{"questions": [{image_id, question, question_id}]}``.
        annotations_json: ``{"annotations": [{question_id, image_id, answers: [{answer, ...}], answer_type,
            question_type, multiple_choice_answer}]}``; ``None`` for a split without answers (VQAv2 test-dev):
            every example then has ``answers == ()``.
        image_root: folder of the images.
        image_template: image file name from ``image_id`` (VQAv2 val: ``COCO_val2014_{image_id:012d}.jpg``).

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not json or not in the format above, a question id appears twice, or the annotations
            do not cover every question (the message names a missing id) or give a question no answers.
    """
    data = _load_json(questions_json, "VQA questions file")
    questions = data.get("questions") if isinstance(data, dict) else None
    if not questions or not isinstance(questions, list):
        raise ValueError(f"{questions_json} has no 'questions' list (a VQAv2 questions file has one)")
    annotations: dict[int, dict] = {}
    if annotations_json is not None:
        data = _load_json(annotations_json, "VQA annotations file")
        listed = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            raise ValueError(
                f"{annotations_json} has no 'annotations' list (a VQAv2 annotations file has one); for a split "
                "without answers (test-dev) give no annotations file"
            )
        for a in listed:
            annotations[int(a["question_id"])] = a
    examples = []
    seen: set[int] = set()
    for q in questions:
        qid, image_id = int(q["question_id"]), int(q["image_id"])
        if qid in seen:
            raise ValueError(f"question id {qid} appears twice in {questions_json}")
        seen.add(qid)
        ann = annotations.get(qid)
        if annotations_json is not None and ann is None:
            missing = sum(int(x["question_id"]) not in annotations for x in questions)
            raise ValueError(
                f"question {qid} of {questions_json} has no annotation in {annotations_json} ({missing} of the "
                f"{len(questions)} questions have none): give the annotations of the same split, or none for a "
                "split without answers"
            )
        answers = tuple(a["answer"] for a in ann.get("answers") or ()) if ann else ()
        if ann is not None and not answers:
            raise ValueError(f"question {qid} has no answers in {annotations_json}")
        examples.append(
            VQAExample(
                question_id=qid,
                image_id=image_id,
                question=q["question"],
                image_path=Path(image_root) / image_template.format(image_id=image_id),
                answers=answers,
                answer_type=ann.get("answer_type", "") if ann else "",
                question_type=ann.get("question_type", "") if ann else "",
            )
        )
    return examples


def read_vizwiz(annotations_json: str | Path, image_root: str | Path, num_answers: int | None = 10) -> list[VQAExample]:
    """Read one split of VizWiz-VQA in its released format (``train.json``, ``val.json``, ``test.json``).

    Each entry is ``{"image": "VizWiz_val_00000000.jpg", "question": str, "answers": [{"answer",
    "answer_confidence"}, ...], "answerable": 0 or 1, "answer_type": str}``; the test split's entries have no
    ``answers`` (nor ``answerable``, ``answer_type``), and its examples get ``answers == ()``. An unanswerable question
    keeps its annotators' answers (mostly ``"unanswerable"``), which are its references like any others.

    Ids: ``question_id`` is the entry's position in the file (0, 1, ...), as in Emu's released evaluation (its
    ``instance_id``) and OpenFlamingo's VQA-format conversion of VizWiz; ``image_id`` is the order in which the image
    file first appears. In the released files each entry has its own image, in order, so both equal the number in the
    file name (``VizWiz_val_00000123.jpg``: 123). ``image_name`` keeps the file's own ``image`` entry.

    The images are not opened here: a missing or unreadable one is skipped (and counted) by the evaluation, as for
    VQAv2.

    Args:
        annotations_json: the split's json file.
        image_root: folder of that split's images (``val/`` of the released ``val.zip``).
        num_answers: answers each entry must have (VizWiz: 10); ``None`` accepts any number but none.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not json, not a list of entries, or an entry is malformed (the message names it by
            position and image): no ``image`` or ``question`` text, ``answers`` not a list of ``num_answers``
            ``{"answer": str, ...}`` objects, ``answerable`` not 0 or 1.
    """
    data = _load_json(annotations_json, "VizWiz annotations file")
    if not isinstance(data, list):
        hint = (
            " (a VQAv2-format file, such as OpenFlamingo's converted VizWiz: read it with read_vqa / VQAEval)"
            if isinstance(data, dict) and ("questions" in data or "annotations" in data)
            else ""
        )
        got = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{annotations_json} is not a VizWiz annotations file: expected a list of {{image, question, answers, "
            f"...}} entries, got {got}{hint}"
        )
    if not data:
        raise ValueError(f"{annotations_json} has no entries")
    image_ids: dict[str, int] = {}
    examples = []
    for index, entry in enumerate(data):
        where = f"entry {index}" + (f" ({entry['image']})" if isinstance(entry, dict) and "image" in entry else "")
        where += f" of {annotations_json}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}, not an {{image, question, answers}} object")
        for key in ("image", "question"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise ValueError(f"{where} has no {key!r} text (got {entry.get(key)!r})")
        answers: tuple[str, ...] = ()
        if "answers" in entry:
            listed = entry["answers"]
            shape_ok = isinstance(listed, list) and all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in listed
            )
            count_ok = shape_ok and (len(listed) == num_answers if num_answers is not None else len(listed) > 0)
            if not count_ok:
                expected = f"{num_answers}" if num_answers is not None else "one or more"
                got = f"{len(listed)} items" if isinstance(listed, list) else type(listed).__name__
                shown = repr(listed)[:80]
                raise ValueError(
                    f"{where}: 'answers' must be a list of {expected} {{answer, answer_confidence}} objects "
                    f"(answer a string), got {got}: {shown}"
                )
            answers = tuple(a["answer"] for a in listed)
        answerable = entry.get("answerable")
        if answerable is not None and answerable not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"{where}: 'answerable' must be 0 or 1, got {answerable!r}")
        name = entry["image"]
        image_ids.setdefault(name, len(image_ids))
        examples.append(
            VQAExample(
                question_id=index,
                image_id=image_ids[name],
                question=entry["question"],
                image_path=Path(image_root) / name,
                answers=answers,
                answer_type=str(entry.get("answer_type", "")),
                image_name=name,
                answerable=None if answerable is None else int(answerable),
            )
        )
    return examples
