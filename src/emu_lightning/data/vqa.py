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
            question_type, multiple_choice_answer}]}``; ``None`` for a test split without answers.
        image_root: folder of the images.
        image_template: image file name from ``image_id`` (VQAv2 val: ``COCO_val2014_{image_id:012d}.jpg``).
    """
    questions = _read_json(questions_json, "VQA questions file").get("questions")
    if not questions:
        raise ValueError(f"{questions_json} has no 'questions'")
    annotations: dict[int, dict] = {}
    if annotations_json is not None:
        for a in _read_json(annotations_json, "VQA annotations file").get("annotations", []):
            annotations[int(a["question_id"])] = a
    examples = []
    for q in questions:
        qid, image_id = int(q["question_id"]), int(q["image_id"])
        ann = annotations.get(qid)
        if annotations_json is not None and ann is None:
            raise ValueError(f"question {qid} of {questions_json} has no annotation in {annotations_json}")
        examples.append(
            VQAExample(
                question_id=qid,
                image_id=image_id,
                question=q["question"],
                image_path=Path(image_root) / image_template.format(image_id=image_id),
                answers=tuple(a["answer"] for a in ann["answers"]) if ann else (),
                answer_type=ann.get("answer_type", "") if ann else "",
                question_type=ann.get("question_type", "") if ann else "",
            )
        )
    return examples
