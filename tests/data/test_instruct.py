"""Instruction conversations: every format from files written here, broken entries, the ShapesWorld writer."""

import inspect
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from emu_lightning import shapesworld
from emu_lightning.conversation import ASSISTANT_TAG, SYSTEM, USER_TAG
from emu_lightning.data import StreamingDataModule
from emu_lightning.data.instruct import InstructionConversations
from emu_lightning.data.pairs import decode_image, encode_image
from emu_lightning.data.streaming import DataSourceError
from emu_lightning.data.webvid import read_clip, write_mp4
from emu_lightning.sequence import END_OF_CHUNK, IGNORE_INDEX, SequenceBuilder, to_unit_range
from emu_lightning.shapesworld import ShapesWorldWriter
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import DIALOGUE_KINDS, SAME_NUMBER, write_shapesworld_llava

U = {"text": USER_TAG, "loss": False}
A = {"text": ASSISTANT_TAG, "loss": False}
SYS = {"text": SYSTEM, "loss": False}
QUESTION_TYPES = {
    "count": r"how many shapes are there\?",
    "colour_at": r"what colour is the shape in the [a-z ]+\?",
    "shape_at": r"what shape is in the [a-z ]+\?",
    "colour_of": r"what colour is the (circle|square|triangle)\?",
    "exists": r"is there a [a-z]+ [a-z]+\?",
    "count_colour": r"how many [a-z]+ shapes are there\?",
}
"""The kinds of question :meth:`ShapesWorld.questions` asks."""


def ctx(text: str) -> dict:
    """A user turn's text item: spaced, without loss."""
    return {"text": " " + text, "loss": False}


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(image_size=32)


@pytest.fixture(scope="module")
def sequencer() -> SequenceBuilder:
    # No sequence-final EOS: each assistant turn already ends with one (END_OF_CHUNK).
    return SequenceBuilder(shapesworld.tokenizer(), num_queries=4, max_length=512, add_eos=False)


def counting_video(num_frames: int) -> torch.Tensor:
    """Frames whose grey level encodes their index (8 + 15 k), so a decoded frame says which one it is."""
    return torch.stack([torch.full((3, 32, 32), (8 + 15 * k) / 255) for k in range(num_frames)])


def frame_indices(video: torch.Tensor) -> list[int]:
    return ((to_unit_range(video).mean(dim=(1, 2, 3)) * 255 - 8) / 15).round().int().tolist()


@pytest.fixture(scope="module")
def media(world, tmp_path_factory) -> Path:
    """Images ``a.png`` / ``b.png`` (train scenes 0, 1), ``broken.png``; 16-frame counting clips ``clip.mp4`` and
    ``v_other.mkv``, and ``broken.mp4``."""
    root = tmp_path_factory.mktemp("media")
    for k, name in enumerate("ab"):
        (root / f"{name}.png").write_bytes(encode_image(world.image("train", k), "png"))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but no more")
    write_mp4(root / "clip.mp4", counting_video(16), fps=8)
    write_mp4(root / "v_other.mkv", counting_video(16), fps=8)
    (root / "broken.mp4").write_bytes(b"not an mp4 at all" * 20)
    return root


def image(media: Path, name: str) -> torch.Tensor:
    return decode_image((media / name).read_bytes(), 32)


def write_json(path: Path, entries: list) -> Path:
    path.write_text(json.dumps(entries, indent=1))
    return path


def write_jsonl(path: Path, entries: list, extra: str = "") -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + extra)
    return path


def reader(path, fmt: str, **kwargs) -> InstructionConversations:
    return InstructionConversations(path, fmt, image_size=32, shuffle=False, repeat=False, **kwargs)


def assert_items(items: list, expected: list) -> None:
    assert len(items) == len(expected), items
    for k, (got, want) in enumerate(zip(items, expected)):
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor) and torch.equal(got, want), f"item {k}"
        else:
            assert got == want, f"item {k}: {got!r} != {want!r}"


def assert_trained_on(sequencer: SequenceBuilder, sample: dict, answers: list[str]) -> None:
    """The tokens with a label are exactly each answer (spaced) followed by one EOS."""
    encoded = sequencer.encode(sample)
    assert encoded.ids[0] == sequencer.tokenizer.bos_token_id and not encoded.truncated
    trained = [t for t, label in zip(encoded.ids, encoded.labels) if label != IGNORE_INDEX]
    eos = sequencer.tokenizer.eos_token_id
    expected = [t for a in answers for t in [*sequencer.tokenizer(" " + a, add_special_tokens=False).input_ids, eos]]
    assert trained == expected
    assert sequencer.tokenizer.decode(trained) == "".join(f" {a}</s>" for a in answers)
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(encoded.ids, encoded.labels))


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


# ---------------------------------------------------------------------- each format
LLAVA = [
    {"id": "e0", "image": "a.png", "conversations": [turn("human", "<image>\nwhat is this?"), turn("gpt", "a circle."),
                                                     turn("human", "and its colour?"), turn("gpt", "red.")]},
    {"id": "e1", "image": ["a.png", "b.png"],
     "conversations": [turn("human", "compare <image> with <image>, please."), turn("gpt", "the first has more.")]},
    {"id": 7, "conversations": [turn("human", "hello"), turn("gpt", "hi there.")]},
    {"id": "e3", "image": "b.png",
     "conversations": [turn("human", "what is this?\n<image>"), turn("gpt", "a square.")]},
]  # fmt: skip


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_images_at_their_tags(media, sequencer, tmp_path, suffix):
    path = (write_json if suffix == ".json" else write_jsonl)(tmp_path / f"llava{suffix}", LLAVA)
    samples = list(reader(path, "llava", image_dir=media))
    assert [s["id"] for s in samples] == ["e0", "e1", "7", "e3"] and {s["source"] for s in samples} == {"llava"}
    a, b = image(media, "a.png"), image(media, "b.png")
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    expected = [
        [SYS, U, a, ctx("what is this?"), A, " a circle.", END_OF_CHUNK, U, ctx("and its colour?"), A, " red.",
         END_OF_CHUNK],
        [SYS, U, ctx("compare"), a, ctx("with"), b, ctx(", please."), A, " the first has more.", END_OF_CHUNK],
        [SYS, U, ctx("hello"), A, " hi there.", END_OF_CHUNK],
        [SYS, U, ctx("what is this?"), b, A, " a square.", END_OF_CHUNK],
    ]  # fmt: skip
    for sample, items in zip(samples, expected):
        assert_items(sample["items"], items)
    answers = [["a circle.", "red."], ["the first has more."], ["hi there."], ["a square."]]
    for sample, trained in zip(samples, answers):
        assert_trained_on(sequencer, sample, trained)
    assert sequencer([samples[1]])["images"].shape == (2, 3, 32, 32)


def test_sharegpt_system_turns_and_leading_bot_turns(sequencer, tmp_path):
    path = write_json(
        tmp_path / "sharegpt.json",
        [
            {"id": "s0", "conversations": [turn("system", "you answer briefly."), turn("human", "hi"),
                                           turn("gpt", "hello."), turn("user", "how are you?"),
                                           turn("chatgpt", "fine.")]},
            {"id": "s1", "conversations": [turn("gpt", "i start."), turn("bard", "me too."), turn("human", "ok"),
                                           turn("assistant", "done.")]},
            {"id": "s2", "conversations": [turn("system", ""), turn("human", "x"), turn("gpt", "y.")]},
            {"id": "s3", "conversations": [turn("human", "a"), turn("gpt", "b."), turn("human", "unanswered?")]},
        ],
    )  # fmt: skip
    source = reader(path, "sharegpt")
    samples = list(source)
    assert [s["id"] for s in samples] == ["s0", "s1", "s2", "s3"]
    own = {"text": "you answer briefly.", "loss": False}
    assert_items(samples[0]["items"], [own, U, ctx("hi"), A, " hello.", END_OF_CHUNK, U, ctx("how are you?"), A,
                                       " fine.", END_OF_CHUNK])  # fmt: skip
    assert_items(samples[1]["items"], [SYS, U, ctx("ok"), A, " done.", END_OF_CHUNK])
    assert_items(samples[2]["items"], [U, ctx("x"), A, " y.", END_OF_CHUNK])  # an empty system turn: none
    assert_trained_on(sequencer, samples[0], ["hello.", "fine."])
    assert_trained_on(sequencer, samples[1], ["done."])
    # An unanswered last question is dropped (its EOS would teach stopping after a question), and counted.
    assert_items(samples[3]["items"], [SYS, U, ctx("a"), A, " b.", END_OF_CHUNK])
    assert_trained_on(sequencer, samples[3], ["b."])
    # The dropped turns are counted, and the conversations are still used.
    assert samples[1]["skipped"] == {"dropped_leading_turn": 2} and samples[2]["skipped"] is None
    assert samples[3]["skipped"] == {"dropped_trailing_turn": 1}
    reasons = {"dropped_leading_turn": 2, "dropped_trailing_turn": 1}
    assert source.check() == {"ok": 4, "skipped": 3, "reasons": reasons}
    quiet = list(reader(path, "sharegpt", system=""))
    assert_items(quiet[1]["items"], [U, ctx("ok"), A, " done.", END_OF_CHUNK])
    assert quiet[0]["items"][0] == own  # the conversation's own system turn still applies


def test_alpaca_with_and_without_input(sequencer, tmp_path):
    entries = [
        {"instruction": "name a colour.", "input": "", "output": "red."},
        {"instruction": "add the numbers.", "input": "2 and 3", "output": "5."},
        {"instruction": "say hi.", "output": "hi."},
    ]
    samples = list(reader(write_jsonl(tmp_path / "alpaca.jsonl", entries), "alpaca"))
    assert [s["id"] for s in samples] == ["alpaca.jsonl:0", "alpaca.jsonl:1", "alpaca.jsonl:2"]
    assert_items(samples[0]["items"], [SYS, U, ctx("name a colour."), A, " red.", END_OF_CHUNK])
    assert_items(samples[1]["items"], [SYS, U, ctx("add the numbers.\n\n2 and 3"), A, " 5.", END_OF_CHUNK])
    assert_items(samples[2]["items"], [SYS, U, ctx("say hi."), A, " hi.", END_OF_CHUNK])
    for sample, entry in zip(samples, entries):
        assert_trained_on(sequencer, sample, [entry["output"]])


def test_videochat_multi_qa_with_the_video_first(media, sequencer, tmp_path):
    entry = {
        "video": "clip.mp4",
        "QA": [{"i": "watch the clip.", "q": "what changes?", "a": "the grey level."},
               {"q": "how many frames?", "a": "sixteen."}],
    }  # fmt: skip
    path = write_json(tmp_path / "videochat.json", [entry])
    (sample,) = reader(path, "videochat", video_dir=media, train=False)
    video = sample["items"][2]
    assert video.shape == (8, 3, 32, 32) and video.dtype == torch.uint8
    assert frame_indices(video) == [1, 3, 5, 7, 9, 11, 13, 15]  # segment centres
    assert torch.equal(video, read_clip(media / "clip.mp4", 8, 32)[0])
    assert_items(sample["items"], [SYS, U, video, ctx("watch the clip.\nwhat changes?"), A, " the grey level.",
                                   END_OF_CHUNK, U, ctx("how many frames?"), A, " sixteen.", END_OF_CHUNK])  # fmt: skip
    assert_trained_on(sequencer, sample, ["the grey level.", "sixteen."])
    assert sequencer([sample])["images"].shape == (8, 3, 32, 32)
    # Training draws a random frame inside each segment.
    (train,) = reader(path, "videochat", video_dir=media, train=True, seed=1)
    assert [i // 2 for i in frame_indices(train["items"][2])] == list(range(8))


def test_video_chatgpt_finds_mp4_and_mkv(media, sequencer, tmp_path):
    entries = [
        {"video_id": "clip", "q": "what happens?", "a": "it gets brighter."},
        {"video_id": "v_other", "q": "and here?", "a": "the same."},
    ]
    path = write_jsonl(tmp_path / "vcg.jsonl", entries)
    first, second = reader(path, "video_chatgpt", video_dir=media, train=False, num_frames=4)
    video = read_clip(media / "clip.mp4", 4, 32)[0]
    assert_items(first["items"], [SYS, U, video, ctx("what happens?"), A, " it gets brighter.", END_OF_CHUNK])
    assert frame_indices(second["items"][2]) == [2, 6, 10, 14]
    assert_trained_on(sequencer, second, ["the same."])


# ---------------------------------------------------------------------- bad input
BAD_LLAVA = [
    {"id": "good0", "image": "a.png", "conversations": [turn("human", "<image>\nwhat?"), turn("gpt", "a shape.")]},
    {"id": "m0", "image": "gone.png", "conversations": [turn("human", "<image>\nwhat?"), turn("gpt", "x.")]},
    {"id": "c0", "image": "broken.png", "conversations": [turn("human", "<image>\nwhat?"), turn("gpt", "x.")]},
    {"id": "t0", "conversations": [turn("human", "<image>\nwhat?"), turn("gpt", "x.")]},
    {"id": "t1", "image": "a.png", "conversations": [turn("human", "what?"), turn("gpt", "x.")]},
    {"id": "t2", "image": "a.png", "conversations": [turn("human", "<image> and <image>?"), turn("gpt", "x.")]},
    {"id": "n0", "image": "a.png", "conversations": [turn("human", "<image>\nwhat?")]},
    {"id": "r0", "conversations": [turn("narrator", "once"), turn("gpt", "x.")]},
    {"id": "r1", "conversations": [turn("human", "a"), turn("human", "b"), turn("gpt", "x.")]},
    {"id": "r2", "conversations": [turn("human", "a"), turn("system", "b"), turn("gpt", "x.")]},
    {"id": "e0", "conversations": [turn("human", "a"), turn("gpt", "  ")]},
    {"id": "f0"},
    {"id": "f1", "conversations": [turn("human", "a"), {"from": "gpt"}]},
    {"id": "f2", "image": 5, "conversations": [turn("human", "<image>a"), turn("gpt", "x.")]},
    "not an object",
    {"id": "b0", "conversations": [turn("human", "a [USER]: b"), turn("gpt", "x.")]},
    {"id": "good1", "conversations": [turn("human", "hi"), turn("gpt", "hello.")]},
]
LLAVA_REASONS = {
    "missing_image": 1,
    "corrupt_image": 1,
    "image_tag_mismatch": 3,
    "no_assistant_turn": 1,
    "bad_roles": 3,
    "empty_turn": 1,
    "missing_field": 3,
    "malformed_json": 1,
    "bad_conversation": 1,
}


def test_bad_llava_entries_are_skipped_by_reason(media, tmp_path):
    path = write_json(tmp_path / "bad.json", BAD_LLAVA)
    source = reader(path, "llava", image_dir=media, conversations_per_unit=4)
    assert source.check() == {"ok": 2, "skipped": 15, "reasons": LLAVA_REASONS}
    samples = list(source)
    assert [s["id"] for s in samples] == ["good0", "good1"]
    assert samples[1]["skipped"] == LLAVA_REASONS and dict(source.skipped) == LLAVA_REASONS


def test_malformed_json_lines_and_files(media, tmp_path):
    good = {"id": "g", "conversations": [turn("human", "hi"), turn("gpt", "hello.")]}
    lines = write_jsonl(tmp_path / "a.jsonl", [good], extra='{"id": "h", "conver\n\n  \n[1, 2\n')
    truncated = tmp_path / "b.json"
    truncated.write_text(json.dumps([good, good])[:-30])
    not_a_list = write_json(tmp_path / "c.json", {"data": [good]})
    trailing = tmp_path / "d.json"
    trailing.write_text(json.dumps([good]) + " []")
    files = [str(p) for p in (lines, truncated, not_a_list, trailing)]
    source = reader(files, "sharegpt")
    assert source.check() == {"ok": 1, "skipped": 5, "reasons": {"malformed_json": 5}}
    assert [s["id"] for s in source] == ["g"]
    empty = write_json(tmp_path / "e.json", [])
    assert reader(str(empty), "sharegpt").units() == []
    with pytest.raises(FileNotFoundError, match="gone.json"):  # files are indexed on first use
        reader(str(tmp_path / "gone.json"), "sharegpt").units()
    with pytest.raises(ValueError, match=r"expected \.json or \.jsonl"):
        reader(str(tmp_path / "x.csv"), "sharegpt")
    with pytest.raises(ValueError, match="format 'vicuna' is not one of"):
        reader(str(empty), "vicuna")


def test_bad_video_entries_are_skipped_by_reason(media, tmp_path):
    qa = [{"q": "what?", "a": "a clip."}]
    videochat = [
        {"video": "clip.mp4", "QA": qa},
        {"video": "gone.mp4", "QA": qa},
        {"video": "broken.mp4", "QA": qa},
        {"video": "clip.mp4"},
        {"video": "clip.mp4", "QA": []},
        {"video": "clip.mp4", "QA": [{"i": "look.", "a": "x."}]},
        {"video": "clip.mp4", "QA": [{"q": "<image> what?", "a": "x."}]},
        {"video": "clip.mp4", "QA": [{"q": "", "i": " ", "a": "x."}]},
    ]
    source = reader(write_json(tmp_path / "vc.json", videochat), "videochat", video_dir=media, num_frames=4)
    assert source.check() == {
        "ok": 1,
        "skipped": 7,
        "reasons": {"missing_video": 1, "corrupt_video": 1, "missing_field": 2, "no_assistant_turn": 1,
                    "image_tag_mismatch": 1, "empty_turn": 1},
    }  # fmt: skip
    chatgpt = [{"video_id": "clip", "q": "a?", "a": "b."}, {"video_id": "gone", "q": "a?", "a": "b."}, {"q": "a?"}]
    source = reader(write_jsonl(tmp_path / "vcg.jsonl", chatgpt), "video_chatgpt", video_dir=media, num_frames=4)
    assert source.check() == {"ok": 1, "skipped": 2, "reasons": {"missing_video": 1, "missing_field": 1}}


def test_a_file_of_only_bad_conversations_raises(media, tmp_path):
    path = write_json(tmp_path / "bad.json", BAD_LLAVA[1:-1])
    with pytest.raises(DataSourceError, match="15 skipped") as error:
        list(reader(path, "llava", image_dir=media, conversations_per_unit=4))
    for reason, n in LLAVA_REASONS.items():
        assert f"{reason}: {n}" in str(error.value)


# ---------------------------------------------------------------------- ShapesWorld writer
def question_type(question: str) -> str:
    (kind,) = [k for k, pattern in QUESTION_TYPES.items() if re.fullmatch(pattern, question)]
    return kind


def test_shapesworld_writer(world, tmp_path):
    path = write_shapesworld_llava(world, tmp_path / "one", "train", num_dialogues=200)
    again = write_shapesworld_llava(world, tmp_path / "two", "train", num_dialogues=200)
    assert path == tmp_path / "one" / "llava_train.json" and path.read_text() == again.read_text()
    entries = json.loads(path.read_text())
    named = {n for e in entries for n in ([e["image"]] if isinstance(e["image"], str) else e["image"])}
    images = sorted(f"images/{p.name}" for p in (tmp_path / "one" / "images").iterdir())
    assert images == sorted(named) and len(images) in (200, 201)  # the last compare dialogue shows scene 200
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in images)
    assert Counter(e["kind"] for e in entries).keys() == DIALOGUE_KINDS.keys()
    assert Counter(len(e["conversations"]) // 2 for e in entries).keys() == {1, 2, 3}
    first_types = Counter()
    for index, entry in enumerate(entries):
        turns = entry["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        names = [entry["image"]] if isinstance(entry["image"], str) else entry["image"]
        assert turns[0]["value"].startswith("<image>\n" * len(names))
        assert "<image>" not in turns[0]["value"][len("<image>\n") * len(names) :]
        assert all("<image>" not in t["value"] for t in turns[1:])
        question, answer = turns[0]["value"].split("\n")[-1], turns[1]["value"]
        if entry["kind"] == "compare":
            assert len(names) == 2 and answer in ("the first image.", "the second image.", SAME_NUMBER)
            continue
        assert names == [f"images/shapes_train_{index:012d}.png"]
        qas = {qa.question: qa for qa in world.questions("train", index)}
        if entry["kind"] == "answer":
            assert answer == qas[question].answer + "."
        if entry["kind"] in ("answer", "count"):
            first_types[question_type(question)] += 1
        if entry["kind"] == "describe":
            assert answer == world.captions(world.scene("train", index))[1]
    assert set(first_types) == set(QUESTION_TYPES) and min(first_types.values()) >= 5, first_types
    every = {question_type(qa.question) for i in range(200) for qa in world.questions("train", i)}
    assert every == set(QUESTION_TYPES)  # the patterns cover every question the world asks
    source = reader(path, "llava")  # images named relative to the json's folder
    assert source.check() == {"ok": 200, "skipped": 0, "reasons": {}}


def test_datamodule_writes_and_loads(tmp_path):
    sequencer = SequenceBuilder(shapesworld.tokenizer(), num_queries=4, max_length=256)
    data = StreamingDataModule(
        InstructionConversations(str(tmp_path / "llava_train.json"), "llava", image_size=32, conversations_per_unit=5),
        val={"paths": str(tmp_path / "llava_val.json")},
        writer=ShapesWorldWriter(train=20, val=8),
        batch_size=4,
        sequencer=sequencer,
    )
    data.prepare_data()
    data.setup("fit")
    assert json.loads((tmp_path / ".shapesworld-train.json").read_text())["spec"]["image_size"] == 32
    batch = next(iter(data.train_dataloader()))
    counts = batch["image_counts"].tolist()
    assert len(counts) == 4 and set(counts) <= {1, 2}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["images"].shape == (sum(counts), 3, 32, 32)
    assert batch["images"].dtype == torch.uint8 and set(batch["source"]) == {"llava"}
    eos = sequencer.tokenizer.eos_token_id
    trained = batch["labels"] != IGNORE_INDEX
    assert (batch["labels"][trained] == batch["input_ids"][trained]).all()
    assert ((batch["labels"] == eos).sum(1) >= 1).all()  # each answer ends with a trained EOS
    val = list(data.val_dataloader())
    assert [i for b in val for i in b["id"]] == [f"shapesworld_val_{i:06d}" for i in range(8)]
    assert {s for b in val for s in b["source"]} == {"llava_val"}
    sharegpt = InstructionConversations(str(tmp_path / "sharegpt" / "x.json"), format="sharegpt", image_size=32)
    with pytest.raises(ValueError, match="ShapesWorld writes LLaVA dialogues only"):
        StreamingDataModule(sharegpt, writer=ShapesWorldWriter(train=4)).prepare_data()
    assert not (tmp_path / "sharegpt").exists()  # nothing written
    with pytest.raises(ValueError, match="format 'llava2'"):
        InstructionConversations(str(tmp_path / "x.json"), format="llava2")
    for documented in (StreamingDataModule, InstructionConversations):  # the DataModule's and the reader's arguments
        doc = inspect.getdoc(documented)
        for name in inspect.signature(documented).parameters:
            assert re.search(rf"^\s+{name}: \S", doc, re.M), f"{documented.__name__}: {name} lacks a line in Args"


def test_two_workers_read_every_conversation_once(world, tmp_path):
    path = write_shapesworld_llava(world, tmp_path, "val", num_dialogues=20)

    def source() -> InstructionConversations:
        return reader(path, "llava", conversations_per_unit=3)

    assert [(u.first, u.count) for u in source().units()] == [(k, min(3, 20 - k)) for k in range(0, 20, 3)]
    single = [s["id"] for s in source()]
    parallel = [s["id"] for s in DataLoader(source(), batch_size=None, num_workers=2)]
    assert len(parallel) == 20 and sorted(parallel) == sorted(single) == [f"shapesworld_val_{i:06d}" for i in range(20)]
