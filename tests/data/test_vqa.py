"""The question-answering readers on hand-made files in the released formats: OK-VQA (VQAv2's layout, stemmed answers
beside the raw ones) and VizWiz (one json list per split), with broken entries named."""

import json

import pytest

from emu_lightning.data.vqa import read_vizwiz, read_vqa
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import (
    shapesworld_vizwiz_entry,
    write_shapesworld_okvqa,
    write_shapesworld_vizwiz,
)


def _answers(*pairs):
    """VizWiz answers from (answer, confidence) pairs, repeated as given."""
    return [{"answer": a, "answer_confidence": c} for a, c in pairs]


# Entries as VizWiz's val.json writes them. The questions and answers of 0, 1 and 2 are those of VizWiz val
# VizWiz_val_00000000.jpg, ..._01.jpg, ..._02.jpg (as OpenFlamingo's conversion of val.json quotes them); the answer
# types and the third entry's image are hand-made.
VIZWIZ_VAL = [
    {
        "image": "VizWiz_val_00000000.jpg",
        "question": "Ok. There is another picture I hope it is a better one.",
        "answers": _answers(
            *[("unanswerable", "yes")] * 4,
            ("unanswerable", "maybe"),
            *[("unanswerable", "yes")] * 2,
            ("unanswerable", "no"),
            ("cannot repair this computer automatically", "maybe"),
            ("blank screen", "yes"),
        ),
        "answer_type": "unanswerable",
        "answerable": 0,
    },
    {
        "image": "VizWiz_val_00000001.jpg",
        "question": "Can you tell me what this medicine is please?",
        "answers": _answers(
            ("no", "yes"),
            ("unanswerable", "yes"),
            ("night time", "maybe"),
            ("unanswerable", "yes"),
            ("night time", "maybe"),
            ("night time cold medicine", "maybe"),
            *[("night time", "maybe")] * 3,
            ("night time medicine", "yes"),
        ),
        "answer_type": "other",
        "answerable": 1,
    },
    {
        "image": "VizWiz_val_00000002.jpg",
        "question": "What is the title of this book? ",
        "answers": _answers(("dog years", "yes"), ("dog years: memoir", "yes"), *[("dog years", "yes")] * 8),
        "answer_type": "other",
        "answerable": 1,
    },
]


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_read_vizwiz_released_format(tmp_path):
    path = _write(tmp_path / "val.json", VIZWIZ_VAL)
    examples = read_vizwiz(path, tmp_path / "val")
    assert [e.question_id for e in examples] == [0, 1, 2]  # the position in the file, as Emu's instance_id
    assert [e.image_id for e in examples] == [0, 1, 2]  # = the number in the released file names
    first = examples[0]
    assert first.image_name == "VizWiz_val_00000000.jpg" and first.image_path == tmp_path / "val" / first.image_name
    assert first.answerable == 0 and first.answer_type == "unanswerable"
    assert first.answers.count("unanswerable") == 8 and len(first.answers) == 10
    assert examples[2].question == "What is the title of this book? " and examples[2].answerable == 1
    # the test split: questions only, predicted and not scored
    test = [{"image": f"VizWiz_test_{i:08d}.jpg", "question": q} for i, q in enumerate(["What is this?", "Color?"])]
    unanswered = read_vizwiz(_write(tmp_path / "test.json", test), tmp_path / "test")
    assert [(e.answers, e.answerable, e.image_name) for e in unanswered] == [
        ((), None, "VizWiz_test_00000000.jpg"),
        ((), None, "VizWiz_test_00000001.jpg"),
    ]
    # two questions about one image share its image id; ids follow the first appearance of each file
    shared = [VIZWIZ_VAL[2], VIZWIZ_VAL[0], {**VIZWIZ_VAL[1], "image": VIZWIZ_VAL[2]["image"]}]
    assert [e.image_id for e in read_vizwiz(_write(tmp_path / "shared.json", shared), tmp_path)] == [0, 1, 0]
    # any number of answers when asked
    short = [{**VIZWIZ_VAL[2], "answers": VIZWIZ_VAL[2]["answers"][:3]}]
    assert len(read_vizwiz(_write(tmp_path / "short.json", short), tmp_path, num_answers=None)[0].answers) == 3


def test_read_vizwiz_names_broken_files_and_entries(tmp_path):
    with pytest.raises(FileNotFoundError, match="VizWiz annotations file .*missing.json"):
        read_vizwiz(tmp_path / "missing.json", tmp_path)
    (tmp_path / "cut.json").write_text(json.dumps(VIZWIZ_VAL)[:-40])  # a download cut short
    with pytest.raises(ValueError, match=r"VizWiz annotations file .*cut.json' is not valid json: .*line 1 column"):
        read_vizwiz(tmp_path / "cut.json", tmp_path)
    # a VQAv2-format file (OpenFlamingo's converted VizWiz) is not the released format: the error says what to use
    vqa_format = _write(tmp_path / "converted.json", {"questions": [{"question_id": 0}]})
    with pytest.raises(ValueError, match=r"converted.json is not a VizWiz annotations file: .*read_vqa / VQAEval"):
        read_vizwiz(vqa_format, tmp_path)
    with pytest.raises(ValueError, match="empty.json has no entries"):
        read_vizwiz(_write(tmp_path / "empty.json", []), tmp_path)

    def broken(entry, position=1):
        data = [dict(e) for e in VIZWIZ_VAL]
        data[position] = entry
        return _write(tmp_path / "broken.json", data)

    nine = {**VIZWIZ_VAL[1], "answers": VIZWIZ_VAL[1]["answers"][:9]}
    with pytest.raises(ValueError, match=r"entry 1 \(VizWiz_val_00000001.jpg\) of .*broken.json: 'answers' must be "
                                         r"a list of 10 .*got 9 items"):  # fmt: skip
        read_vizwiz(broken(nine), tmp_path)
    strings = {**VIZWIZ_VAL[1], "answers": ["night time"] * 10}
    with pytest.raises(ValueError, match=r"entry 1 \(VizWiz_val_00000001.jpg\).*'answers' must be a list"):
        read_vizwiz(broken(strings), tmp_path)
    with pytest.raises(ValueError, match=r"entry 2 \(VizWiz_val_00000002.jpg\).*got dict"):
        read_vizwiz(broken({**VIZWIZ_VAL[2], "answers": {"answer": "dog years"}}, 2), tmp_path)
    with pytest.raises(ValueError, match=r"entry 1 \(VizWiz_val_00000001.jpg\).*answer a string"):
        read_vizwiz(broken({**VIZWIZ_VAL[1], "answers": _answers(*[(3, "yes")] * 10)}), tmp_path)
    with pytest.raises(ValueError, match=r"entry 1 \(VizWiz_val_00000001.jpg\).*'answers' must be a list of 10"):
        read_vizwiz(broken({**VIZWIZ_VAL[1], "answers": []}), tmp_path, num_answers=10)
    with pytest.raises(ValueError, match=r"entry 0 \(VizWiz_val_00000000.jpg\).*'answerable' must be 0 or 1, got 2"):
        read_vizwiz(broken({**VIZWIZ_VAL[0], "answerable": 2}, 0), tmp_path)
    with pytest.raises(ValueError, match=r"entry 1 of .*broken.json has no 'image' text"):
        read_vizwiz(broken({"question": "what?"}), tmp_path)
    with pytest.raises(ValueError, match=r"entry 1 \(x.jpg\) of .*has no 'question' text"):
        read_vizwiz(broken({"image": "x.jpg", "question": " "}), tmp_path)
    with pytest.raises(ValueError, match=r"entry 1 of .*broken.json is a list"):
        read_vizwiz(broken(["x.jpg", "what?"]), tmp_path)


# OK-VQA's released layout: VQAv2's files, annotations with OK-VQA's fields; `answer` is the stemmed `raw_answer`.
OKVQA_QUESTIONS = {
    "license": {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"},
    "data_subtype": "val2014",
    "task_type": "Open-Ended",
    "data_type": "mscoco",
    "questions": [
        {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475},
        {"image_id": 1000, "question": "What are these people doing?", "question_id": 10005},
    ],
}
OKVQA_ANNOTATIONS = {
    "data_subtype": "val2014",
    "data_type": "mscoco",
    "annotations": [
        {"image_id": 297147, "answer_type": "other", "question_type": "four", "question_id": 2971475, "confidence": 3,
         "answers": [{"answer_id": k + 1, "raw_answer": r, "answer_confidence": "yes", "answer": a}
                     for k, (r, a) in enumerate([("racing", "race")] * 6 + [("motocross", "motocross")] * 4)]},
        {"image_id": 1000, "answer_type": "other", "question_type": "seven", "question_id": 10005, "confidence": 2,
         "answers": [{"answer_id": k + 1, "raw_answer": r, "answer_confidence": "yes", "answer": a}
                     for k, (r, a) in enumerate([("skiing", "ski")] * 8 + [("walking", "walk")] * 2)]},
    ],
}  # fmt: skip


def test_read_okvqa_released_format(tmp_path):
    questions = _write(tmp_path / "OpenEnded_mscoco_val2014_questions.json", OKVQA_QUESTIONS)
    annotations = _write(tmp_path / "mscoco_val2014_annotations.json", OKVQA_ANNOTATIONS)
    examples = read_vqa(questions, annotations, tmp_path / "val2014")
    assert [e.question_id for e in examples] == [2971475, 10005]
    assert examples[0].image_path == tmp_path / "val2014" / "COCO_val2014_000000297147.jpg"
    assert examples[0].answers == ("race",) * 6 + ("motocross",) * 4  # the stemmed answers are the references
    assert examples[1].question_type == "seven" and examples[1].answer_type == "other"
    (tmp_path / "bad.json").write_text('{"questions": [')
    with pytest.raises(ValueError, match=r"VQA questions file .*bad.json' is not valid json"):
        read_vqa(tmp_path / "bad.json", annotations, tmp_path)


def test_shapesworld_okvqa_and_vizwiz_sets_read_back(tmp_path):
    world = ShapesWorld(image_size=16)
    okvqa = write_shapesworld_okvqa(world, tmp_path / "okvqa", "val", num_images=2)
    assert okvqa["questions"].name == "OpenEnded_mscoco_val2014_questions.json"
    assert okvqa["annotations"].name == "mscoco_val2014_annotations.json"
    examples = read_vqa(okvqa["questions"], okvqa["annotations"], okvqa["images"], okvqa["image_template"])
    assert [e.question for e in examples] == [qa.question for i in range(2) for qa in world.questions("val", i)]
    assert all(e.image_path.is_file() for e in examples)
    raw = json.loads(okvqa["annotations"].read_text())["annotations"][0]["answers"][0]
    assert set(raw) == {"answer_id", "raw_answer", "answer_confidence", "answer"}

    vizwiz = write_shapesworld_vizwiz(world, tmp_path / "vizwiz", "val", num_questions=40, unanswerable_share=0.5)
    assert vizwiz["annotations"] == tmp_path / "vizwiz" / "annotations" / "val.json"
    examples = read_vizwiz(vizwiz["annotations"], vizwiz["images"])
    assert [e.image_name for e in examples] == [f"VizWiz_val_{i:08d}.png" for i in range(40)]
    assert all(e.image_path.is_file() for e in examples)
    unanswerable = [e for e in examples if e.answerable == 0]
    assert 10 <= len(unanswerable) <= 30  # about half, drawn per entry
    assert all(e.answers == ("unanswerable",) * 10 and e.answer_type == "unanswerable" for e in unanswerable)
    # an unanswerable question asks about what the scene does not have
    for e in unanswerable:
        scene = world.scene("val", e.question_id)
        cells = {scene.position(s) for s in scene.shapes}
        asked = e.question.removeprefix("what colour is the shape in the ").removeprefix("what shape is in the ")
        if asked != e.question:
            assert asked.removesuffix("?") not in cells
        else:
            kind = e.question.removeprefix("what colour is the ").removesuffix("?")
            assert kind not in {s.shape for s in scene.shapes}
    answerable = [e for e in examples if e.answerable == 1]
    assert all("unanswerable" not in e.answers for e in answerable)
    assert {e.question for e in answerable} <= {qa.question for i in range(40) for qa in world.questions("val", i)}
    # seeded per entry: any process writes the same entry; without answers, a test split
    assert shapesworld_vizwiz_entry(world, "val", 7, 0.5) == json.loads(vizwiz["annotations"].read_text())[7]
    assert set(shapesworld_vizwiz_entry(world, "test", 0, answers=False)) == {"image", "question"}
    with pytest.raises(ValueError, match="unanswerable_share 1.5 must be in"):
        write_shapesworld_vizwiz(world, tmp_path / "x", unanswerable_share=1.5)
