"""VQAv2-format question answering (OK-VQA and VizWiz share it): a questions file and an annotations file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from emu_lightning.data.coco import _read_json


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


def read_vqa(
    questions_json: str | Path,
    annotations_json: str | Path | None,
    image_root: str | Path,
    image_template: str = "COCO_val2014_{image_id:012d}.jpg",
) -> list[VQAExample]:
    """Read a VQAv2 questions file and (for scoring) its annotations file.

    Args:
        questions_json: ``{"questions": [{image_id, question, question_id}]}``.
        annotations_json: ``{"annotations": [{question_id, image_id, answers: [{answer, ...}], answer_type,
            question_type, multiple_choice_answer}]}``; ``None`` for a split without answers (VQAv2 test-dev):
            every example then has ``answers == ()``.
        image_root: folder of the images.
        image_template: image file name from ``image_id`` (VQAv2 val: ``COCO_val2014_{image_id:012d}.jpg``).

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not in the format above, a question id appears twice, or the annotations do not
            cover every question (the message names a missing id) or give a question no answers.
    """
    data = _read_json(questions_json, "VQA questions file")
    questions = data.get("questions") if isinstance(data, dict) else None
    if not questions or not isinstance(questions, list):
        raise ValueError(f"{questions_json} has no 'questions' list (a VQAv2 questions file has one)")
    annotations: dict[int, dict] = {}
    if annotations_json is not None:
        data = _read_json(annotations_json, "VQA annotations file")
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
