"""ShapesWorld video QA: motion clips, questions, the three benchmarks' real layouts read back by their readers, the
training set / DataModule and the ShapesWorld WordNet."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_model

from emu_lightning.data.mixture import MixtureDataModule
from emu_lightning.data.videoqa import (
    load_clip,
    read_msrvtt_qa,
    read_msvd_mapping,
    read_msvd_qa,
    read_nextqa_oe,
    sample_frame_indices,
)
from emu_lightning.eval.wups import load_wordnet, wup, wups, wups_scores
from emu_lightning.sequence import END_OF_CHUNK, SequenceBuilder
from emu_lightning.shapesworld import ShapesWorldDataModule
from emu_lightning.shapesworld.videoqa import (
    TRAVEL,
    ShapesWorldVideoQA,
    ShapesWorldVideoQADataModule,
    motion_clip,
    motion_scene,
    render_motion,
    video_corpus,
    video_questions,
    write_shapesworld_msrvtt_qa,
    write_shapesworld_msvd_qa,
    write_shapesworld_nextqa,
)
from emu_lightning.shapesworld.wordnet import write_shapesworld_wordnet
from emu_lightning.shapesworld.world import BACKGROUND, COLOURS, SIZE_FRACTION, ShapesWorld

FRAMES = sample_frame_indices(16, 8)


def circular_centroids(frames: torch.Tensor) -> np.ndarray:
    """``(F, 2)`` centroid ``(x, y)`` of the non-background pixels of each frame on the wrapped-around board (the
    circular mean of the pixel coordinates, in pixels)."""
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 255
    mask = ((frames - background).abs().sum(dim=1) > 0.1).numpy()  # (F, S, S)
    size = mask.shape[1]
    ys, xs = np.mgrid[:size, :size]
    out = []
    for m in mask:
        angles = [2 * np.pi * (c[m] + 0.5) / size for c in (xs, ys)]
        out.append([np.angle(np.exp(1j * a).mean()) % (2 * np.pi) * size / (2 * np.pi) - 0.5 for a in angles])
    return np.array(out)


def test_motion_is_seen_only_by_comparing_frames():
    world = ShapesWorld(image_size=64, min_shapes=1, max_shapes=1)
    first = {"right": [], "left": []}
    for index in range(160):
        motion = motion_scene(world, "train", index)
        frames = render_motion(world, motion, FRAMES)
        assert frames.shape == (8, 3, 64, 64) and 0 <= frames.min() and frames.max() <= 1
        (direction,) = motion.directions
        c = circular_centroids(frames)
        axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[direction]
        steps = (np.diff(c[:, axis]) * sign + 32) % 64 - 32  # the shortest way around the board
        # between sampled frames the shape moves the right way, 2/15 of travel (3.4 px; to the pixel grid)
        assert np.allclose(steps, TRAVEL * 32 * (FRAMES[1] - FRAMES[0]) / 15, atol=1.3), (index, direction, steps)
        across = (np.diff(c[:, 1 - axis]) + 32) % 64 - 32
        assert np.abs(across).max() < 0.5  # and not across
        shape = motion.scene.shapes[0]  # a triangle's centroid is a third of its half-height below its centre
        expected = motion.centres[FRAMES, 0] + [0, SIZE_FRACTION[shape.size] * 16 / 3 * (shape.shape == "triangle")]
        assert np.abs((c - expected + 32) % 64 - 32).max() < 1.0  # where the motion says (to a pixel), wrapped around
        if direction in first:
            first[direction].append(c[0, 0])
    right, left = np.array(first["right"]), np.array(first["left"])
    assert len(right) > 20 and len(left) > 20
    # one frame tells nothing: where right movers and left movers are in the first frame is spread over the whole
    # board alike, so no threshold on it picks the direction much better than a coin
    assert right.min() < 8 and left.min() < 8 and right.max() > 56 and left.max() > 56
    n = len(right) + len(left)
    best = max(max((right < t).sum() + (left >= t).sum(), (right >= t).sum() + (left < t).sum()) / n
               for t in np.linspace(0, 64, 257))  # fmt: skip
    assert best < 0.7, best


def test_clips_are_deterministic_and_shapes_stay_visible():
    world = ShapesWorld(image_size=32)
    a, motion = motion_clip(world, "val", 5)
    b, _ = motion_clip(world, "val", 5)
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, motion_clip(ShapesWorld(image_size=32, seed=1), "val", 5)[0])
    assert motion.centres.shape == (16, len(motion.scene.shapes), 2)
    for frame in a:  # every colour of the scene shows in every frame
        pixels = (frame * 255).round().permute(1, 2, 0).reshape(-1, 3).tolist()
        for shape in motion.scene.shapes:
            assert list(COLOURS[shape.colour]) in pixels


def _named(scene, name):
    matches = [i for i, s in enumerate(scene.shapes) if name in (s.name(), s.name(with_size=False))]
    assert len(matches) == 1, (name, scene)  # questions only name shapes unambiguously
    return matches[0]


def test_questions_are_answered_by_the_motion():
    world = ShapesWorld(image_size=32)
    qtypes = Counter()
    for index in range(80):
        motion = motion_scene(world, "test", index)
        scene, directions = motion.scene, motion.directions
        qas = video_questions(world, "test", index)
        assert qas == video_questions(world, "test", index)  # deterministic
        assert [qa.question_id for qa in qas] == [
            ShapesWorld.image_id("test", index) * 100 + k for k in range(len(qas))
        ]
        for qa in qas:
            qtypes[qa.qtype] += 1
            if m := re.fullmatch(r"which way does the (.+) move\?", qa.question):
                assert qa.qtype == "TC" and qa.answer == directions[_named(scene, m[1])]
                assert qa.alternatives in (("to the right",), ("to the left",), ("moving up",), ("moving down",))
            elif m := re.fullmatch(r"what colour is the shape that moves (\w+)\?", qa.question):
                (mover,) = motion.movers(m[1])
                assert qa.qtype == "TC" and qa.answer == mover.colour
            elif m := re.fullmatch(r"what shape moves (\w+)\?", qa.question):
                (mover,) = motion.movers(m[1])
                assert qa.qtype == "TC" and qa.answer == mover.shape
            elif m := re.fullmatch(r"how many shapes move (\w+)\?", qa.question):
                assert qa.qtype == "DC" and qa.answer == str(directions.count(m[1]))
            elif m := re.fullmatch(r"does the (.+) move (\w+)\?", qa.question):
                assert qa.qtype == "DB" and qa.answer == ("yes" if directions[_named(scene, m[1])] == m[2] else "no")
            else:
                raise AssertionError(f"unexpected question {qa.question!r}")
    assert set(qtypes) == {"TC", "DC", "DB"} and qtypes["TC"] > qtypes["DC"]
    answers = Counter(qa.answer for i in range(80) for qa in video_questions(world, "test", i) if qa.qtype == "DB")
    assert answers["yes"] > 10 and answers["no"] > 10
    corpus = " ".join(video_corpus(world, num_scenes=20))
    assert "question: which way does the" in corpus and "to the right" in corpus


def test_msvd_qa_layout_reads_back(tmp_path):
    world = ShapesWorld(image_size=32)
    train = write_shapesworld_msvd_qa(world, tmp_path, split="train", num_videos=2)
    paths = write_shapesworld_msvd_qa(world, tmp_path, split="test", num_videos=3)
    assert paths == {"qa_json": tmp_path / "test_qa.json", "video_root": tmp_path / "YouTubeClips",
                     "mapping": tmp_path / "youtube_mapping.txt"}  # fmt: skip
    mapping = read_msvd_mapping(paths["mapping"])  # both splits' videos, ids unique across splits
    assert sorted(mapping) == [0, 1, 2_000_000, 2_000_001, 2_000_002]
    assert all(re.fullmatch(r"[\w-]{11}_\d+_\d+", name) for name in mapping.values())
    examples = read_msvd_qa(**paths)
    expected = [qa for i in range(3) for qa in video_questions(world, "test", i)]
    assert [(e.key, e.question, e.answers) for e in examples] == [
        (str(qa.question_id), qa.question, (qa.answer,)) for qa in expected
    ]
    assert examples[0].video_path.suffix == ".avi" and examples[0].video_path.is_file()
    clip = load_clip(examples[0].video_path, 8, 32)
    assert clip.shape == (8, 3, 32, 32)
    reference = motion_clip(world, "test", 0)[0][FRAMES]
    assert (clip - reference).abs().mean() < 0.03  # the encoded frames are the clip's sampled frames
    assert len(read_msvd_qa(**train)) == sum(len(video_questions(world, "train", i)) for i in range(2))


def test_msrvtt_qa_layout_reads_back(tmp_path):
    world = ShapesWorld(image_size=32)
    paths = write_shapesworld_msrvtt_qa(world, tmp_path, split="test", num_videos=2)
    examples = read_msrvtt_qa(**paths)
    assert examples[0].video_path == tmp_path / "videos" / "video2000000.mp4"
    assert [e.answers[0] for e in examples] == [qa.answer for i in range(2) for qa in video_questions(world, "test", i)]
    assert load_clip(examples[-1].video_path, 8, 16).shape == (8, 3, 16, 16)


def test_nextqa_layout_reads_back(tmp_path):
    world = ShapesWorld(image_size=32)
    write_shapesworld_nextqa(world, tmp_path, split="test", num_videos=1)
    paths = write_shapesworld_nextqa(world, tmp_path, split="val", num_videos=2)
    assert paths["csv_path"].read_text().splitlines()[0] == "video,frame_count,width,height,question,answer,qid,type"
    examples = read_nextqa_oe(**paths)
    qas = [(i, k, qa) for i in range(2) for k, qa in enumerate(video_questions(world, "val", i))]
    assert [e.key for e in examples] == [f"{4_000_000_000 + 1_000_000 + i}_{k}" for i, k, _ in qas]
    assert [e.question_type for e in examples] == [qa.qtype for *_, qa in qas]
    assert [e.answers for e in examples] == [(qa.answer, *qa.alternatives) for *_, qa in qas]
    assert any(len(e.answers) == 2 for e in examples)
    assert examples[0].video_path == tmp_path / "NExTVideo" / "1000" / "4001000000.mp4"
    assert load_clip(examples[0].video_path, 8, 32).shape == (8, 3, 32, 32)
    test = read_nextqa_oe(tmp_path / "test.csv", paths["video_root"], paths["map_json"])  # the map kept both splits
    assert test[0].video_path.is_file()


def test_training_set_datamodule_and_mixture(tokenizer):
    world = ShapesWorld(image_size=16)
    data = ShapesWorldVideoQA(world, "train", 4, examples_per_sample=2)
    sample = data[1]
    clip, prompt, answer, eoc, clip2, *_ = sample["items"]
    assert sample["id"] == "train-1" and sample["index"] == 1
    assert clip.shape == (8, 3, 16, 16) and torch.equal(clip, motion_clip(world, "train", 2)[0][FRAMES])
    assert re.fullmatch(r"question: .+\? answer:", prompt["text"]) and prompt["loss"] is False
    assert eoc == END_OF_CHUNK and clip2.shape == (8, 3, 16, 16)
    assert answer == f" {sample['references'][0]}."
    with pytest.raises(ValueError, match="clip_frames"):
        ShapesWorldVideoQA(world, "train", 4, clip_frames=20)

    sequencer = SequenceBuilder(tokenizer, num_queries=2, max_length=96)
    dm = ShapesWorldVideoQADataModule(image_size=16, train_size=6, val_size=2, batch_size=2, sequencer=sequencer)
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].shape == (16, 3, 16, 16)  # 2 samples x 8 frames, one image block each
    first = [next(iter(dm.train_dataloader()))["id"] for _ in range(2)]
    assert first[0] == first[1]  # a seeded stream
    mixture = MixtureDataModule(
        {"video": dm, "pairs": ShapesWorldDataModule(image_size=16, train_size=6)},
        batch_sizes={"video": 1, "pairs": 2},
        sequencer=sequencer,
    )
    batch = next(iter(mixture.train_dataloader()))
    assert Counter(batch["source"]) == {"video": 1, "pairs": 2}
    assert batch["images"].shape[0] == 8 + 2


def test_a_batch_trains_the_tiny_model():
    model = make_model(num_queries=2, max_length=96)  # 8 frames x 4 tokens + the question and answer
    dm = ShapesWorldVideoQADataModule(image_size=16, train_size=4, val_size=2, batch_size=2, sequencer=model.sequencer)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image_counts"].tolist() == [8, 8]  # no frame was cut
    losses = model.losses(batch)
    assert torch.isfinite(losses["loss"]) and losses["ce"] > 0


def test_shapesworld_wordnet(tmp_path):
    wn = load_wordnet(write_shapesworld_wordnet(tmp_path / "dict"))
    assert wup("right", "left", 0.0, wn) == pytest.approx(0.75)
    assert wup("red", "blue", 0.0, wn) == pytest.approx(5 / 6)  # lcs colour: D=5, d=6,6
    assert wup("circle", "square", 0.0, wn) == pytest.approx(5 / 6)
    assert wup("right", "red", 0.0, wn) == pytest.approx(0.4)  # lcs abstraction: D=2, d=4,6
    assert wup("right", "red", 0.0, wn) < wup("right", "left", 0.0, wn) < wup("red", "blue", 0.0, wn)
    assert wups("to the right", "right", 0.0, wn) == 1.0  # NExT-OE's stopwords drop "to the"
    assert wups("2", "two", 0.0, wn) == 1.0  # digits and number words are one synset
    res = wups_scores(["left", "red", "up", "3"], [["right", "to the right"], "red", "down", "2"], wn,
                      question_types=["TC", "TC", "TC", "DC"])  # fmt: skip
    assert res.per_sample_0 == pytest.approx([0.75, 1.0, 0.75, 0.0])
