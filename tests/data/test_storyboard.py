"""Storyboard reader: WebVTT parsing, time-ordered merging, ShapesWorld storyboards, broken documents."""

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from emu_lightning import shapesworld
from emu_lightning.data import StreamingDataModule
from emu_lightning.data.storyboard import Cue, StoryboardVideos, interleave, parse_vtt
from emu_lightning.data.streaming import DataSourceError
from emu_lightning.sequence import SequenceBuilder, to_unit_range
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import write_shapesworld_storyboard

VTT = """\ufeffWEBVTT - a hand-written file
Kind: captions

NOTE a comment
that spans two lines

STYLE
::cue { color: yellow }

1
00:00:01.000 --> 00:00:02.500 align:start position:0%
<v Roger>Hello <c.colorE5E5E5>there</c>,
second line &amp; more

00:03.000 --> 00:04.000
no id, minutes only

broken
00:00:05.000 --> 00:00:04.000
ends before it starts

00:00:xx.000 --> 00:00:07.000
does not parse

00:00:06,000 --> 00:00:07,000
commas are SRT, not WebVTT

01:00:00.250 --> 01:00:01.000
<00:00:06.100>an hour in
"""


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(image_size=32)


def source(path: Path, **kwargs) -> StoryboardVideos:
    return StoryboardVideos(path, **{"image_size": 32, "shuffle": False, "repeat": False, **kwargs})


def test_parse_vtt():
    cues, broken = parse_vtt(VTT)
    assert cues == [
        Cue(1.0, 2.5, "Hello there, second line & more"),
        Cue(3.0, 4.0, "no id, minutes only"),
        Cue(3600.25, 3601.0, "an hour in"),
    ]
    assert broken == 3
    with pytest.raises(ValueError, match="no WEBVTT header"):
        parse_vtt("1\n00:00:01.000 --> 00:00:02.000\nhi\n")


def test_interleave_in_time_order():
    frames = [(0.0, "F0"), (2.0, "F1"), (5.0, "F2")]
    cues = [Cue(t, t + 1, text) for t, text in [(6, "f"), (1.5, "c"), (0, "a"), (1, "b"), (2, "d"), (4.9, "e")]]
    assert interleave(frames, cues) == ["F0", "a b c", "F1", "d e", "F2", "f"]  # ties: the frame first
    assert interleave([(1.0, "F")], [Cue(0.5, 1, "x"), Cue(3, 4, "y")]) == ["x", "F", "y"]


def write_document(root: Path, video_id: str, frames: list, subtitles, vtt: str | None = None) -> str:
    if vtt is not None:
        (root / subtitles).write_text(vtt)
    return json.dumps({"video_id": video_id, "frames": frames, "subtitles": subtitles})


def test_a_hand_written_document_merges_frames_and_cues(tmp_path, world):
    for k in range(3):
        Image.new("RGB", (32, 32), (40 * k, 0, 0)).save(tmp_path / f"{k}.png")
    frames = [{"time": t, "image": f"{k}.png"} for k, t in [(2, 3600.25), (0, 0.0), (1, 3.0)]]  # any order
    (tmp_path / "index.jsonl").write_text(write_document(tmp_path, "v", frames, "v.vtt", VTT) + "\n")
    (sample,) = list(source(tmp_path / "index.jsonl"))
    kinds = [
        item if isinstance(item, str) else int(to_unit_range(item)[0].max().mul(255).round()) // 40
        for item in sample["items"]
    ]
    assert kinds == [0, "Hello there, second line & more", 1, "no id, minutes only", 2, "an hour in"]
    assert sample["id"] == "v" and sample["times"] == [0.0, 3.0, 3600.25]
    assert sample["skipped"] == {"broken_timestamps": 3}


@pytest.mark.parametrize("subtitles", ["vtt", "json"])
def test_shapesworld_storyboards_round_trip(tmp_path, world, subtitles):
    index = write_shapesworld_storyboard(world, tmp_path, "val", num_videos=3, frames_per_video=4, subtitles=subtitles)
    docs = [json.loads(line) for line in index.read_text().splitlines()]
    assert len(docs) == 3 and isinstance(docs[0]["subtitles"], str if subtitles == "vtt" else list)
    samples = list(source(index))
    assert [s["id"] for s in samples] == ["val_000000", "val_000001", "val_000002"]
    for i, sample in enumerate(samples):
        assert sample["times"] == [0.0, 2.0, 4.0, 6.0] and len(sample["items"]) == 8
        for k in range(4):
            frame, text = sample["items"][2 * k : 2 * k + 2]
            scene = 4 * i + k
            assert torch.allclose(
                to_unit_range(frame), world.image("val", scene), atol=1 / 255
            )  # PNG: exact up to rounding
            assert text == world.captions(world.scene("val", scene))[1]


def test_max_frames_keeps_evenly_spaced_frames(tmp_path, world):
    index = write_shapesworld_storyboard(world, tmp_path, num_videos=1, frames_per_video=7, subtitles="json")
    (sample,) = list(source(index, max_frames=3))
    assert sample["times"] == [0.0, 6.0, 12.0]
    assert [type(item).__name__ for item in sample["items"]] == ["Tensor", "str"] * 3
    assert sample["items"][1] == " ".join(world.captions(world.scene("train", k))[1] for k in range(3))


def test_frames_are_resized_whole_to_the_square(tmp_path):
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :32] = (255, 0, 0)
    image[:, 32:] = (0, 0, 255)
    Image.fromarray(image).save(tmp_path / "wide.png")
    line = write_document(tmp_path, "w", [{"time": 0, "image": "wide.png"}], [{"start": 0, "end": 1, "text": "x"}])
    (tmp_path / "index.jsonl").write_text(line + "\n")
    (sample,) = list(source(tmp_path / "index.jsonl", image_size=16))
    frame = sample["items"][0]  # 64x32 -> 16x16, no crop: the left half red, the right half blue
    assert frame.shape == (3, 16, 16) and frame.dtype == torch.uint8
    frame = to_unit_range(frame)
    assert frame[0, :, :7].min() > 0.95 and frame[2, :, 9:].min() > 0.95 and frame[2, :, :6].max() < 0.05


def broken_index(root: Path, world: ShapesWorld) -> Path:
    """Two good ShapesWorld storyboards around one document per failure."""
    good = write_shapesworld_storyboard(world, root, num_videos=2, frames_per_video=2).read_text().splitlines()
    frames = json.loads(good[0])["frames"]
    (root / "garbage.png").write_bytes(b"not a png at all")
    cue = "00:00:00.000 --> 00:00:02.000\nsome text\n"
    (root / "good.vtt").write_text(f"WEBVTT\n\n{cue}")
    lines = [
        "{not json",
        json.dumps({"video_id": "no frames key", "subtitles": []}),
        write_document(root, "missing_vtt", frames, "nowhere.vtt"),
        write_document(root, "not_vtt", frames, "not.vtt", "1\n" + cue),
        write_document(root, "one_broken_cue", frames, "one.vtt", f"WEBVTT\n\n{cue}\n00:00:03 --> 00:00:04.000\nx\n"),
        write_document(root, "all_broken", frames, "all.vtt", "WEBVTT\n\n00:09.000 --> 00:08.000\nx\n\nnope\nx\n"),
        write_document(root, "empty_cues", frames, [{"start": 0, "end": 1, "text": " <c></c> "}]),
        write_document(root, "one_missing_frame", [*frames, {"time": 9, "image": "gone.png"}], "good.vtt"),
        write_document(root, "corrupt_frame", [{"time": 0, "image": "garbage.png"}], "good.vtt"),
        write_document(root, "frames_gone", [{"time": 0, "image": "gone.png"}], "good.vtt"),
        write_document(root, "no_frames", [], [{"start": 0, "end": 1, "text": "hi"}]),
        write_document(root, "inline_broken", frames, [{"start": 2, "end": 1, "text": "x"}, {"start": 0, "text": "y"}]),
    ]
    index = root / "broken.jsonl"
    index.write_text("\n".join([good[0], *lines, good[1]]) + "\n")
    return index


EXPECTED_SKIPS = {
    "malformed_json": 2,  # not json; no 'frames'
    "missing_subtitles": 1,
    "malformed_subtitles": 1,  # no WEBVTT header
    "broken_timestamps": 5,  # cues: 1 in one.vtt, 2 in all.vtt, 2 inline
    "no_text": 3,  # all.vtt, empty_cues, inline_broken
    "missing_frame": 2,  # one_missing_frame, frames_gone
    "corrupt_frame": 1,
    "no_frames": 3,  # corrupt_frame, frames_gone, no_frames
}


def test_skip_reasons_are_counted_exactly(tmp_path, world):
    reader = source(broken_index(tmp_path, world), lines_per_unit=5)
    assert reader.check() == {"ok": 4, "skipped": 18, "reasons": EXPECTED_SKIPS}
    samples = list(reader)
    assert [s["id"] for s in samples] == ["train_000000", "one_broken_cue", "one_missing_frame", "train_000001"]
    assert [type(item).__name__ for item in samples[1]["items"]] == ["Tensor", "str", "Tensor"]
    assert samples[1]["items"][1] == "some text" and samples[2]["times"] == [0.0, 2.0]  # dropped, the doc kept
    assert dict(reader.skipped) == EXPECTED_SKIPS
    carried: dict[str, int] = {}
    for sample in samples:
        for reason, n in (sample["skipped"] or {}).items():
            carried[reason] = carried.get(reason, 0) + n
    assert carried == EXPECTED_SKIPS  # the last document is good, so every skip rides on a sample


def test_a_source_with_no_usable_document_raises_with_its_reasons(tmp_path, world):
    lines = broken_index(tmp_path, world).read_text().splitlines()
    bad = [line for line in lines if not re.search(r'"(train_\d+|one_broken_cue|one_missing_frame)"', line)]
    (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n")
    with pytest.raises(DataSourceError, match="malformed_json: 2") as error:
        next(iter(StoryboardVideos(tmp_path / "bad.jsonl", image_size=32)))
    assert "missing_subtitles: 1" in str(error.value) and "no_frames: 3" in str(error.value)


def test_an_empty_index_is_an_error_for_training(tmp_path):
    (tmp_path / "index.jsonl").write_text("\n")
    reader = StoryboardVideos(tmp_path / "index.jsonl", image_size=32)  # the index is read on first use
    with pytest.raises(DataSourceError, match=r"storyboard index \[.*index.jsonl'\] lists no videos"):
        reader.units()


def test_two_workers_read_the_same_documents_as_one_process(tmp_path, world):
    index = write_shapesworld_storyboard(world, tmp_path, num_videos=6, frames_per_video=2, subtitles="json")
    single = [s["id"] for s in StoryboardVideos(index, image_size=32, lines_per_unit=2, repeat=False)]
    reader = StoryboardVideos(index, image_size=32, lines_per_unit=2, repeat=False)
    parallel = [s["id"] for s in DataLoader(reader, batch_size=None, num_workers=2)]
    assert len(parallel) == 6 and sorted(parallel) == sorted(single) == [f"train_{i:06d}" for i in range(6)]
    again = [s["id"] for s in StoryboardVideos(index, image_size=32, lines_per_unit=2, repeat=False)]
    assert again == single and single != sorted(single)  # seeded shuffling


def test_datamodule(tmp_path, world):
    train = write_shapesworld_storyboard(world, tmp_path, "train", num_videos=3, frames_per_video=3)
    val = write_shapesworld_storyboard(world, tmp_path, "val", num_videos=2, frames_per_video=3)
    sequencer = SequenceBuilder(shapesworld.tokenizer(), num_queries=2, max_length=256)
    reader = StoryboardVideos(str(train), image_size=32)
    data = StreamingDataModule(reader, val={"paths": str(val)}, batch_size=2, sequencer=sequencer)
    batches = iter(data.train_dataloader())
    for _ in range(3):  # 6 documents from 3: the training reader repeats
        assert next(batches)["image_counts"].tolist() == [3, 3]
    assert [i for b in data.val_dataloader() for i in b["id"]] == ["val_000000", "val_000001"]
    for documented in (StreamingDataModule, StoryboardVideos):  # the DataModule's and the reader's arguments
        doc = inspect.getdoc(documented)
        for name in inspect.signature(documented).parameters:
            assert re.search(rf"^\s+{name}: \S", doc, re.M), f"{documented.__name__}: {name} lacks a line in Args"
