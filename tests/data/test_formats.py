"""ShapesWorld writes the real on-disk formats, and the real readers read them back."""

import json

import pytest
import torch

from emu_lightning.data.coco import load_image, read_karpathy
from emu_lightning.data.vqa import read_vqa
from emu_lightning.shapesworld.world import ShapesWorld


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(image_size=32)


def test_karpathy_round_trip(world, tmp_path):
    paths = world.write_coco_karpathy(tmp_path, {"train": 6, "test": 4})
    test = read_karpathy(paths["karpathy"], paths["images"], split="test")
    assert [e.image_id for e in test] == [ShapesWorld.image_id("test", i) for i in range(4)]
    assert test[0].references == tuple(world.captions(world.scene("test", 0)))
    image = load_image(test[0].image_path, 32)
    assert torch.allclose(image, world.image("test", 0), atol=1 / 255)  # PNG: exact up to rounding
    with_ann = read_karpathy(paths["karpathy"], paths["images"], split="train", annotations_json=paths["annotations"])
    assert len(with_ann) == 6 and with_ann[2].references == tuple(world.captions(world.scene("train", 2)))
    raw = json.loads(paths["karpathy"].read_text())["images"][0]
    assert {"filepath", "filename", "cocoid", "split", "sentences"} <= set(raw)


def test_vqa_round_trip(world, tmp_path):
    paths = world.write_vqav2(tmp_path, split="val", num_images=3)
    examples = read_vqa(paths["questions"], paths["annotations"], paths["images"], paths["image_template"])
    expected = [qa for i in range(3) for qa in world.questions("val", i)]
    assert len(examples) == len(expected)
    assert [e.question for e in examples] == [qa.question for qa in expected]
    assert all(len(e.answers) == 10 for e in examples)
    assert examples[0].answers == expected[0].answers
    assert len({e.question_id for e in examples}) == len(examples)
    assert load_image(examples[-1].image_path, 32) is not None
    unanswered = read_vqa(paths["questions"], None, paths["images"], paths["image_template"])
    assert unanswered[0].answers == ()


def test_shapesworld_questions_have_true_and_disagreeing_answers(world):
    qas = [qa for i in range(50) for qa in world.questions("train", i)]
    assert {qa.answer_type for qa in qas} == {"yes/no", "number", "other"}
    agree = sum(a == qa.answer for qa in qas for a in qa.answers) / (10 * len(qas))
    assert 0.75 < agree < 0.97  # mostly right, some annotators disagree (number words count as disagreeing here)
    scene = world.scene("train", 0)
    count = next(qa for qa in world.questions("train", 0) if qa.question == "how many shapes are there?")
    assert count.answer == str(len(scene.shapes))


def test_bad_files_are_named(tmp_path, world):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_karpathy(tmp_path / "missing.json", tmp_path)
    paths = world.write_vqav2(tmp_path, num_images=1)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_vqa(paths["questions"], tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        assert load_image(bad, 32) is None
    karpathy = world.write_coco_karpathy(tmp_path / "k", {"train": 1})["karpathy"]
    with pytest.raises(ValueError, match="no images in split 'test'"):
        read_karpathy(karpathy, tmp_path)
