import pytest
import torch

from emu_lightning.sequence import END_OF_CHUNK, IGNORE_INDEX, SequenceBuilder
from emu_lightning.shapesworld import ShapesWorldDataModule, ShapesWorldPairs
from emu_lightning.shapesworld.world import ShapesWorld


def test_pairs_are_deterministic_with_both_orders():
    ds = ShapesWorldPairs(ShapesWorld(), "train", 200, image_first_prob=0.5)
    firsts = [isinstance(ds[i]["items"][0], torch.Tensor) for i in range(200)]
    assert 70 < sum(firsts) < 130
    image = lambda sample: next(x for x in sample["items"] if isinstance(x, torch.Tensor))  # noqa: E731
    a, b = ds[7], ds[7]
    assert torch.equal(image(a), image(b)) and a["items"] != [] and a["references"] == b["references"]
    assert all(len(ds[i]["items"]) == 2 for i in range(20))
    with pytest.raises(IndexError):
        ds[200]


def test_questions_and_chained_examples(tokenizer):
    world = ShapesWorld()
    ds = ShapesWorldPairs(world, "train", 100, vqa_prob=1.0)
    image, prompt, answer = ds[3]["items"]
    assert prompt["text"].startswith("question: ") and prompt["loss"] is False and answer.endswith(".")
    assert answer.strip(" .") in {qa.answer for qa in world.questions("train", 3)}
    batch = SequenceBuilder(tokenizer, num_queries=2, max_length=128)([ds[3]])
    trained = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert tokenizer.decode(trained, skip_special_tokens=True) == answer  # loss on the answer only

    chained = ShapesWorldPairs(world, "train", 100, vqa_prob=0.3, examples_per_sample=3)
    counts = [sum(isinstance(x, torch.Tensor) for x in chained[i]["items"]) for i in range(100)]
    assert set(counts) == {3}
    questions = sum(isinstance(x, dict) and "text" in x for i in range(100) for x in chained[i]["items"])
    assert 60 < questions < 120  # about 30% of the 300 examples
    first, *_, last = [x for x in chained[5]["items"] if isinstance(x, torch.Tensor)]
    assert not torch.equal(first, last)  # different scenes
    # an EOS between examples: the model learns to stop after one
    assert sum(x is END_OF_CHUNK for x in chained[5]["items"]) == 2


def test_bad_mixture_arguments():
    with pytest.raises(ValueError, match="vqa_prob 1.5"):
        ShapesWorldDataModule(vqa_prob=1.5)
    with pytest.raises(ValueError, match="examples_per_sample 0"):
        ShapesWorldDataModule(examples_per_sample=0)


def test_caption_choice():
    world = ShapesWorld()
    ds = ShapesWorldPairs(world, "train", 60, image_first_prob=0.0, captions=[1, 2])
    for i in range(60):
        caption = ds[i]["items"][0]
        assert caption in world.captions(world.scene("train", i))[1:3]
    used = {ds[i]["items"][0].split(" ")[0] for i in range(60)}
    assert "there" in used and "a" in used or "an" in used  # both positional captions occur
    default = ShapesWorldPairs(world, "train", 60, image_first_prob=0.0)
    assert default.captions == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"captions \[5\] must be a non-empty list of indices below 5"):
        ShapesWorldDataModule(captions=[5])
    with pytest.raises(ValueError, match="non-empty"):
        ShapesWorldDataModule(captions=[])
