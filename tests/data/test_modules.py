import json
from types import SimpleNamespace

import pytest
import torch

from emu_lightning.data import (
    ImageTextShards,
    InstructionConversations,
    MapStyleSource,
    MMC4Documents,
    StreamingDataModule,
    WebVidVideos,
)
from emu_lightning.data.pairs import shard_pattern
from emu_lightning.sequence import END_OF_CHUNK, IGNORE_INDEX, SequenceBuilder
from emu_lightning.shapesworld import ShapesWorldDataModule, ShapesWorldPairs, ShapesWorldWriter
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import write_shapesworld_pairs


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
        ShapesWorldDataModule(image_size=32, vqa_prob=1.5)
    with pytest.raises(ValueError, match="examples_per_sample 0"):
        ShapesWorldDataModule(image_size=32, examples_per_sample=0)


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
        ShapesWorldDataModule(image_size=32, captions=[5])
    with pytest.raises(ValueError, match="non-empty"):
        ShapesWorldDataModule(image_size=32, captions=[])


def attached(image_size):
    """A Trainer stand-in whose model's vision backbone takes ``image_size`` pixels."""
    return SimpleNamespace(lightning_module=SimpleNamespace(vision=SimpleNamespace(image_size=image_size)))


@pytest.fixture
def shards(tmp_path):
    """Two img2dataset shards of 16-pixel ShapesWorld pairs (3 + 1 samples) and their brace pattern."""
    write_shapesworld_pairs(ShapesWorld(image_size=16), tmp_path / "pairs", num_samples=4, shard_size=3)
    return shard_pattern(tmp_path / "pairs", 2)


def test_the_held_out_reader_is_the_reader_with_its_val_arguments(tmp_path):
    reader = MMC4Documents(
        str(tmp_path / "train" / "docs.jsonl"),
        16,
        image_dir=str(tmp_path / "images"),
        max_images=3,
        seed=5,
        name="docs",
    )
    dm = StreamingDataModule(reader, val={"paths": str(tmp_path / "val" / "docs.jsonl")})
    held = dm.val_reader
    assert type(held) is MMC4Documents and held is not reader
    assert (held.shuffle, held.repeat, held.name) == (False, False, "docs_val")
    assert held.init_args == {
        **reader.init_args,  # image_size (given by position), image_dir, max_images, seed: the same
        "paths": str(tmp_path / "val" / "docs.jsonl"),
        "name": "docs_val",
        "shuffle": False,
        "repeat": False,
    }
    assert (held.image_size, held.image_dir, held.max_images, held.seed) == (16, str(tmp_path / "images"), 3, 5)
    assert (held.sim_threshold, held.shuffle_buffer, held.split_by_node) == (0.32, 100, True)  # defaults kept
    assert dm.reader is reader and dm.train_source() is reader and (reader.shuffle, reader.repeat) == (True, True)
    assert reader.name == "docs" and reader.init_args["paths"] == str(tmp_path / "train" / "docs.jsonl")
    # a reader with a `train` switch (random frame times) reads its held-out copy at the segment centres
    videos = WebVidVideos(tmp_path / "results_train.csv", num_frames=4, image_size=16, seed=2)
    held = StreamingDataModule(videos, val={"csv": tmp_path / "results_val.csv"}).val_reader
    assert type(held) is WebVidVideos and (held.train, held.shuffle, held.repeat) == (False, False, False)
    assert held.name == "webvid_val" and (held.num_frames, held.image_size, held.seed) == (4, 16, 2)
    assert held.init_args == {**videos.init_args, "csv": tmp_path / "results_val.csv", "name": "webvid_val",
                              "train": False, "shuffle": False, "repeat": False}  # fmt: skip
    assert StreamingDataModule(videos).val_reader is None and StreamingDataModule(videos).val_dataloader() == []
    with pytest.raises(TypeError, match=r"MMC4Documents has no argument\(s\) \['pathz'\]"):
        StreamingDataModule(reader, val={"pathz": str(tmp_path / "val" / "docs.jsonl")})
    with pytest.raises(TypeError, match=r"\['urls'\]"):
        StreamingDataModule(videos, val={"urls": "elsewhere.tar"})


def test_readers_without_an_image_size_take_the_models(shards):
    dm = StreamingDataModule(ImageTextShards(shards), val={"urls": shards})
    assert dm.reader.image_size is None and dm.val_reader.image_size is None
    with pytest.raises(ValueError, match="ImageTextShards has no image_size: give it, or attach the DataModule"):
        dm.setup("fit")  # no model attached: nothing to take it from
    dm.trainer = attached(16)
    dm.setup("fit")
    assert dm.reader.image_size == 16 and dm.val_reader.image_size == 16
    sample = next(iter(dm.reader))
    assert [tuple(x.shape) for x in sample["items"] if isinstance(x, torch.Tensor)] == [(3, 16, 16)]
    assert len(list(dm.val_reader)) == 4
    given = StreamingDataModule(ImageTextShards(shards, image_size=16), val={"urls": shards})
    given.trainer = attached(16)
    given.setup("fit")  # the same size as the model's: fine
    assert given.reader.image_size == given.val_reader.image_size == 16


def test_a_reader_with_another_image_size_than_the_model_is_refused(shards):
    dm = StreamingDataModule(ImageTextShards(shards, image_size=32))
    dm.trainer = attached(16)
    with pytest.raises(ValueError, match="data image_size 32 does not match the model.s: it needs 16 px images"):
        dm.setup("fit")
    held_out = StreamingDataModule(ImageTextShards(shards, image_size=16), val={"urls": shards, "image_size": 32})
    held_out.trainer = attached(16)
    with pytest.raises(ValueError, match="data image_size 32 does not match"):
        held_out.setup("fit")  # the held-out reader is checked too


def test_reading_a_reader_without_an_image_size_is_an_error(shards):
    with pytest.raises(ValueError, match="source 'pairs' has no image_size"):
        next(iter(ImageTextShards(shards)))
    with pytest.raises(ValueError, match="has no image_size"):
        next(iter(ImageTextShards(shards).held_out()))


def test_the_writer_writes_at_the_models_image_size(tmp_path):
    urls = str(tmp_path / "pairs" / "{00000..00001}.tar")
    dm = StreamingDataModule(ImageTextShards(urls), writer=ShapesWorldWriter(train=6))
    dm.trainer = attached(16)
    dm.prepare_data()
    dm.setup("fit")
    marker = json.loads((tmp_path / "pairs" / ".shapesworld-train.json").read_text())
    assert marker["spec"]["image_size"] == 16 and sorted(marker["files"]) == ["00000.tar", "00001.tar"]
    samples = list(ImageTextShards(urls, image_size=16, shuffle=False, repeat=False))
    assert [s["id"] for s in samples] == [f"{i:09d}" for i in range(6)]
    world = ShapesWorldWriter(train=6).world(16)
    for i, sample in enumerate(samples):
        image = next(x for x in sample["items"] if isinstance(x, torch.Tensor))
        assert image.shape == (3, 16, 16) and torch.equal(image, world.image("train", i).mul(255).round().byte())


def test_the_writer_refuses_a_reader_it_cannot_write_and_writes_nothing_for_zero(tmp_path):
    unknown = MapStyleSource(ShapesWorldPairs(ShapesWorld(image_size=16), "train", 4), "shapes")
    with pytest.raises(TypeError, match=r"ShapesWorld writes \[.*'ImageTextShards'.*\], not MapStyleSource"):
        ShapesWorldWriter(train=4).write(unknown, "train")
    with pytest.raises(TypeError, match="not MapStyleSource"):
        StreamingDataModule(unknown, writer=ShapesWorldWriter(train=4)).prepare_data()
    train, val = str(tmp_path / "train" / "00000.tar"), str(tmp_path / "val" / "00000.tar")
    ShapesWorldWriter(train=0).write(ImageTextShards(train, image_size=16), "train")
    dm = StreamingDataModule(ImageTextShards(train, image_size=16), val={"urls": val}, writer=ShapesWorldWriter(0, 0))
    dm.prepare_data()
    assert not (tmp_path / "train").exists() and not (tmp_path / "val").exists()  # nothing written, no marker
    with pytest.raises(ValueError, match="train -1 and val 0 must be >= 0"):
        ShapesWorldWriter(train=-1)


def test_held_out_shards_in_the_training_folder_are_refused_not_overwritten(tmp_path):
    train = str(tmp_path / "sw" / "{00000..00001}.tar")
    dm = StreamingDataModule(
        ImageTextShards(train, image_size=16), val={"urls": str(tmp_path / "sw" / "00000.tar")},
        writer=ShapesWorldWriter(train=8, val=4),
    )  # fmt: skip
    with pytest.raises(ValueError, match="the val files would overwrite the train files"):
        dm.prepare_data()
    first = [s["id"] for s in ImageTextShards(train, image_size=16, shuffle=False, repeat=False)]
    assert first == [f"{i:09d}" for i in range(8)]  # the training shards are intact
    # files named by their split (LLaVA json, WebVid csv, storyboard index) may share a folder
    llava = tmp_path / "llava"
    dm = StreamingDataModule(
        InstructionConversations(str(llava / "llava_train.json"), "llava", image_size=16),
        val={"paths": str(llava / "llava_val.json")}, writer=ShapesWorldWriter(train=3, val=2),
    )  # fmt: skip
    dm.prepare_data()
    assert sorted(p.name for p in llava.glob("llava_*.json")) == ["llava_train.json", "llava_val.json"]
