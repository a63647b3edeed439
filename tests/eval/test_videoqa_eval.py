"""Video QA evaluation (MSVD-QA, MSRVTT-QA, NExT-QA) on hand-made files in the released formats: clips as 8 image
blocks, top-1 accuracy and WUPS per answer, skipped videos counted, demonstrations, the chance level, a real model's
generate on clips."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model
from lightning.pytorch.trainer.states import TrainerFn
from test_wups import write_tiny_wordnet

from emu_lightning.data.webvid import write_mp4
from emu_lightning.eval.callbacks import VQAEval
from emu_lightning.eval.tasks import EvalExample, FewShotTask, ImageCache, PromptTemplate, prompt_text
from emu_lightning.eval.videoqa import MSRVTTQAEval, MSVDQAEval, NExTQAEval, from_videoqa, top1_accuracy
from emu_lightning.eval.wups import WordNetNotFoundError


def stub_trainer(root):
    return SimpleNamespace(global_rank=0, world_size=1, is_global_zero=True, log_dir=str(root),
                           default_root_dir=str(root), state=SimpleNamespace(fn=TrainerFn.VALIDATING),
                           global_step=0, datamodule=None)  # fmt: skip


def write_clip(path: Path, level: float, num_frames: int = 16) -> Path:
    """A grey clip whose frame k has brightness ``level + k / 100``: its 8 sampled frames are known exactly."""
    frames = torch.stack([torch.full((3, 16, 16), level + k / 100) for k in range(num_frames)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, frames, fps=8)
    return path


class ClipGuesser:
    """A fake ``generate``: answers by the query clip's brightness; records every prompt's media."""

    def __init__(self, answers):
        self.answers, self.media = answers, []

    def __call__(self, prompts, **generation):
        out = []
        for prompt in prompts:
            clips = [x for x in prompt if isinstance(x, torch.Tensor)]
            self.media.append([tuple(c.shape) for c in clips])
            out.append(self.answers[round(float(clips[-1][0].mean()) * 10) % len(self.answers)])
        return out


def fake_model(answers):
    return SimpleNamespace(vision=SimpleNamespace(image_size=16), generate=ClipGuesser(answers))


@pytest.fixture
def msrvtt(tmp_path):
    root = tmp_path / "msrvtt"
    for n, level in enumerate([0.1, 0.3, 0.5, 0.7]):
        write_clip(root / "videos" / f"video{n}.mp4", level)
    (root / "videos" / "video5.mp4").write_bytes(b"not a video at all")  # corrupt; video4 is missing
    test = [
        {"answer": a, "category_id": 3, "id": 100 + i, "question": f"what is it {i}?", "video_id": v}
        for i, (a, v) in enumerate([("dog", 0), ("two", 1), ("cat", 2), ("dog", 3), ("man", 4), ("dog", 5)])
    ]
    train = [{"answer": a, "category_id": 1, "id": i, "question": f"train {i}?", "video_id": v}
             for i, (a, v) in enumerate([("dog", 0), ("cat", 1), ("man", 2)])]  # fmt: skip
    (root / "test_qa.json").write_text(json.dumps(test))
    (root / "train_qa.json").write_text(json.dumps(train))
    return root


def test_top1_accuracy_after_the_vqa_answer_normalisation():
    assert top1_accuracy("Two", ["2"]) == 1.0  # number words as digits
    assert top1_accuracy("the cat.", ["cat"]) == 1.0  # articles and the period dropped
    assert top1_accuracy("cats", ["cat"]) == 0.0  # no stemming: top-1 is exact
    assert top1_accuracy("a dog", ["cat", "dog"]) == 1.0  # any reference
    assert top1_accuracy("", ["dog"]) == 0.0


def test_msrvtt_qa_end_to_end_on_hand_made_files(msrvtt, tmp_path):
    cb = MSRVTTQAEval(qa_json=str(msrvtt / "test_qa.json"), video_root=str(msrvtt / "videos"),
                      support_qa_json=str(msrvtt / "train_qa.json"), shots=[0, 1], num_queries=None,
                      generation={"max_new_tokens": 3}, strict=True)  # fmt: skip
    # the first sampled frame's brightness (frame 1 of 16: level + 0.01) x 10, rounded, picks the answer: the four
    # clips get "cat", "two", "cat", "man" (right on video2 only)
    model = fake_model(["dog", "cat", "x", "two", "x", "cat", "x", "man"])
    with pytest.warns(UserWarning, match="skipping video"):
        results = cb.evaluate(stub_trainer(tmp_path), model)
    # each prompt shows its clips as (8, 3, 16, 16): 8 image blocks each; 1-shot prompts have two clips
    assert all(shape == (8, 3, 16, 16) for media in model.generate.media for shape in media)
    assert sorted({len(m) for m in model.generate.media}) == [1, 2]
    rows = [json.loads(line) for line in (tmp_path / "eval/msrvttqa-step0000000-predictions.jsonl").open()]
    zero = [r for r in rows if r["shots"] == 0]
    assert [r["key"] for r in zero] == [100, 101, 102, 103, 104, 105]
    assert [r["video"] for r in zero] == [f"video{n}.mp4" for n in range(6)]
    # videos 4 (missing) and 5 (corrupt) are skipped and counted; the others scored by hand
    assert [r["prediction"] for r in zero[4:]] == [None, None] and "does not load" in zero[4]["skipped"]
    assert results["skipped_images"] == 2 and results["shots"][0]["num_evaluated"] == 4
    assert [r["prediction"] for r in zero[:4]] == ["cat", "two", "cat", "man"]
    assert [r["score"] for r in zero[:4]] == [0.0, 100.0, 100.0, 0.0]  # "two" is "2"... and the reference is "two"
    assert results["shots"][0]["mean"] == pytest.approx(statistics.fmean(r["score"] for r in zero[:4]))
    assert zero[0]["prompt"] == "<video:8 frames>question: what is it 0? answer:"
    one = [r for r in rows if r["shots"] == 1 and r["prediction"] is not None]
    assert all(r["prompt"].startswith("<video:8 frames>question: train ") for r in one)
    assert all(len(r["demonstrations"]) == 1 and isinstance(r["demonstrations"][0]["image_id"], str) for r in one)
    # the chance level: "dog" for every question is right on 3 of the 6 (the best constant answer)
    assert results["chance"] == {"prediction": "dog", "score": pytest.approx(50.0)}


def test_demonstrations_need_a_support_split(msrvtt, tmp_path):
    cb = MSRVTTQAEval(qa_json=str(msrvtt / "test_qa.json"), video_root=str(msrvtt / "videos"), shots=[0, 2],
                      strict=True)  # fmt: skip
    with pytest.raises(ValueError, match="2 demonstrations asked for, but no support split"):
        cb.evaluate(stub_trainer(tmp_path), fake_model(["dog"]))
    zero = MSRVTTQAEval(qa_json=str(msrvtt / "test_qa.json"), video_root=str(msrvtt / "videos"), shots=[0],
                        num_queries=2, strict=True)  # fmt: skip
    assert zero.evaluate(stub_trainer(tmp_path / "z"), fake_model(["dog"]))["shots"][0]["mean"] == 50.0
    with pytest.raises(ValueError, match=r"MSVDQAEval needs qa_json, video_root"):
        MSVDQAEval()
    with pytest.raises(ValueError, match="threshold 0.5 must be one of"):
        NExTQAEval(csv="val.csv", video_root="videos", threshold=0.5)


def test_msvd_qa_with_the_youtube_mapping(tmp_path):
    root = tmp_path / "msvd"
    write_clip(root / "YouTubeClips" / "abc_1_5.avi", 0.2)
    write_clip(root / "YouTubeClips" / "xyz_0_9.mp4", 0.4)  # only an mp4 of that clip: taken
    (root / "youtube_mapping.txt").write_text("abc_1_5 vid1\nxyz_0_9 vid2\n")
    qa = [{"answer": "run", "id": 7, "question": "what does it do?", "video_id": 1},
          {"answer": "cat", "id": 8, "question": "who is it?", "video_id": 2}]  # fmt: skip
    (root / "test_qa.json").write_text(json.dumps(qa))
    cb = MSVDQAEval(qa_json=str(root / "test_qa.json"), video_root=str(root / "YouTubeClips"),
                    mapping=str(root / "youtube_mapping.txt"), shots=[0], strict=True)  # fmt: skip
    model = fake_model(["x", "x", "run", "x", "cat"])  # first sampled frames 0.21 and 0.41: "run" and "cat"
    results = cb.evaluate(stub_trainer(tmp_path), model)
    assert results["shots"][0]["mean"] == 100.0 and results["skipped_images"] == 0
    assert results["chance"]["score"] == 50.0


def test_nextqa_wups_per_question_type_and_missing_wordnet(tmp_path, monkeypatch):
    root = tmp_path / "nextqa"
    write_clip(root / "NExTVideo" / "0000" / "111.mp4", 0.2)
    write_clip(root / "NExTVideo" / "0000" / "222.mp4", 0.5)
    (root / "map_vid_vidorID.json").write_text(json.dumps({"111": "0000/111", "222": "0000/222"}))
    (root / "val.csv").write_text("video,frame_count,width,height,question,answer,qid,type\n"
                                  "111,16,16,16,what is chased,cat,0,CW\n"
                                  "111,16,16,16,how many dogs,2,1,DC\n"
                                  "222,16,16,16,what does it ride,car,0,TN\n")  # fmt: skip
    (root / "add_reference_answer_val.json").write_text(json.dumps({"222": {"0": "puppy"}}))
    wordnet = write_tiny_wordnet(tmp_path / "wn")
    kwargs = dict(csv=str(root / "val.csv"), video_root=str(root / "NExTVideo"),
                  map_json=str(root / "map_vid_vidorID.json"),
                  extra_answers_json=str(root / "add_reference_answer_val.json"), shots=[0], strict=True)  # fmt: skip
    # first sampled frames 0.21 -> index 2 ("dog", for both questions of video 111), 0.51 -> 5 ("pooch")
    model = fake_model(["x", "x", "dog", "x", "x", "pooch"])
    results = NExTQAEval(wordnet=str(wordnet), **kwargs).evaluate(stub_trainer(tmp_path), model)
    rows = [json.loads(line) for line in (tmp_path / "eval/nextqa-step0000000-predictions.jsonl").open()]
    assert [r["key"] for r in rows] == ["111_0", "111_1", "222_0"]
    assert [r["question_type"] for r in rows] == ["CW", "DC", "TN"]
    # by hand on the tiny WordNet: wup(dog, cat) = 2*4/(5+5) = 0.8, below 0.9 but WUPS@0.0 keeps it: 80;
    # the count "dog" vs "2" is exact match: 0; "pooch" vs ["car", "puppy"]: max(wup(dog, car) = 2*3/(5+4) * 1,
    # wup(dog, puppy) = 2*5/(5+6)) = 10/11
    assert [r["score"] for r in rows] == pytest.approx([80.0, 0.0, 100.0 * 10 / 11])
    at_09 = NExTQAEval(wordnet=str(wordnet), threshold=0.9, **kwargs).evaluate(stub_trainer(tmp_path / "b"), model)
    assert at_09["shots"][0]["mean"] == pytest.approx((0.8 * 0.1 + 0 + 10 / 11) * 100 / 3)
    assert results["shots"][0]["mean"] == pytest.approx((80.0 + 0.0 + 1000 / 11) / 3)
    # without WordNet: a clear error before anything is generated
    monkeypatch.setenv("EMU_WORDNET_DIR", str(tmp_path / "nowhere"))
    generate = ClipGuesser(["x"])
    with pytest.raises(WordNetNotFoundError, match="wordnet-base"):
        NExTQAEval(wordnet=str(tmp_path / "nowhere"), **kwargs).evaluate(
            stub_trainer(tmp_path / "c"), SimpleNamespace(vision=SimpleNamespace(image_size=16), generate=generate)
        )
    assert generate.media == []


def test_clip_cache_keeps_the_recent_clips_and_never_retries_a_failed_one(tmp_path):
    calls = []

    def loader(path, image_size):
        calls.append(path.name)
        return None if path.name == "bad" else torch.zeros(8, 3, image_size, image_size)

    cache = ImageCache(4, loader, max_items=2)
    for name in ["a", "b", "a", "c", "b", "bad", "bad"]:
        cache(Path(name))
    assert calls == ["a", "b", "c", "b", "bad"]  # b was evicted by c (a was used more recently); bad loads once
    assert list(cache.images) == [Path("c"), Path("b")] and cache.skipped == {Path("bad")}


def test_a_real_model_generates_from_clips_and_rices_uses_the_middle_frame(msrvtt):
    from emu_lightning.data.videoqa import load_clip, read_msrvtt_qa

    queries = from_videoqa(read_msrvtt_qa(msrvtt / "test_qa.json", msrvtt / "videos"))[:2]
    support = from_videoqa(read_msrvtt_qa(msrvtt / "train_qa.json", msrvtt / "videos"))
    model = make_model(max_length=256)
    template = PromptTemplate(VQAEval.default_demo, VQAEval.default_query)
    task = FewShotTask("msrvttqa", queries, support, template=template, shots=(0, 1), image_size=16, selection="rices",
                       rices_encoder=model.vision, loader=lambda p, image_size: load_clip(p, 8, image_size),
                       generation={"max_new_tokens": 2, "num_beams": 1}, sample_score=lambda p, q: 0.5)  # fmt: skip
    results = task.evaluate(model)
    assert results["shots"][0]["mean"] == 50.0 and results["shots"][1]["num_evaluated"] == 2
    one = [r for r in results["records"] if r["shots"] == 1]
    assert all(r["prompt"].count("<video:8 frames>") == 2 for r in one)
    # RICES picks the support clip whose middle frame is nearest: query video0 (level 0.1) -> support video0
    assert one[0]["demonstrations"][0]["image_id"] == "0"
    assert prompt_text([torch.zeros(8, 3, 4, 4), "q", torch.zeros(3, 4, 4)]) == "<video:8 frames>q<image>"
    with pytest.raises(ValueError, match="task name 'videoqa' must be"):
        FewShotTask("videoqa", queries, support)
    assert EvalExample("a_1", "a", Path("x"), ("y",)).key == "a_1"


def test_shapesworld_video_qa_callbacks_in_a_tiny_fit_and_validate(tmp_path):
    """The ShapesWorld analogues write their clips in each benchmark's layout into the run folder, read them back
    through the real readers, log their scores during fit and evaluate again under validate."""
    import lightning as L

    from emu_lightning.shapesworld import (
        ShapesWorldDataModule,
        ShapesWorldMSRVTTQAEval,
        ShapesWorldMSVDQAEval,
        ShapesWorldNExTQAEval,
    )

    options = dict(shots=[0, 1], num_queries=6, support=3, generation={"max_new_tokens": 2, "num_beams": 1},
                   strict=True)  # fmt: skip
    callbacks = [ShapesWorldMSVDQAEval(**options), ShapesWorldMSRVTTQAEval(**options),
                 ShapesWorldNExTQAEval(**options)]  # fmt: skip
    model = make_model(max_length=256)
    dm = ShapesWorldDataModule(image_size=16, batch_size=4, val_size=4, train_size=32)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=callbacks,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, dm)
    logs = next(tmp_path.rglob("metrics.csv")).read_text()
    for key in ("eval/msvdqa_0shot", "eval/msrvttqa_1shot", "eval/nextqa_0shot"):
        assert key in logs
    run = next((tmp_path / "lightning_logs").glob("version_*"))
    data = run / "eval_data"
    assert (data / "msvdqa/youtube_mapping.txt").is_file() and list((data / "msvdqa/YouTubeClips").glob("*.avi"))
    assert (data / "msrvttqa/test_qa.json").is_file() and list((data / "msrvttqa/videos").glob("video*.mp4"))
    assert (data / "nextqa/val.csv").is_file() and (data / "nextqa/map_vid_vidorID.json").is_file()
    assert (data / "shapesworld-wordnet/data.noun").is_file()
    for callback in callbacks:
        (result,) = callback.history
        assert result["num_queries"] == 6 and result["skipped_images"] == 0
        assert 0.0 <= result["chance"]["score"] <= 100.0
        rows = [json.loads(line) for line in (run / f"eval/{callback.task_name}-step0000002-predictions.jsonl").open()]
        assert len(rows) == 12 and all(r["prompt"].startswith("<video:8 frames>question: ") for r in rows)
        for shots in (0, 1):
            mean = statistics.fmean(r["score"] for r in rows if r["shots"] == shots)
            assert mean == pytest.approx(result["shots"][shots]["mean"])
    assert {r["question_type"] for r in rows} <= {"TC", "DC", "DB"}  # NExT-QA's types
    trainer.validate(model, dm)
    assert [len(c.history) for c in callbacks] == [2, 2, 2]
    with pytest.raises(ValueError, match=r"its own ShapesWorld set; for your files \['qa_json'\] use MSVDQAEval"):
        ShapesWorldMSVDQAEval(qa_json="test_qa.json")


def test_video_predictions_do_not_depend_on_how_queries_are_sharded(msrvtt):
    """Under DDP each rank predicts a strided shard: a question's demonstrations (drawn from its text or int key) and
    prediction are the same whichever rank predicts it."""
    from emu_lightning.data.videoqa import load_clip, read_msrvtt_qa

    queries = from_videoqa(read_msrvtt_qa(msrvtt / "test_qa.json", msrvtt / "videos"))
    queries = [EvalExample(f"v_{q.key}", *list(vars(q).values())[1:]) for q in queries[:2]] + queries[2:]  # text keys
    support = from_videoqa(read_msrvtt_qa(msrvtt / "train_qa.json", msrvtt / "videos"))
    template = PromptTemplate(VQAEval.default_demo, VQAEval.default_query)
    task = FewShotTask("msrvttqa", queries, support, template=template, shots=(2,), image_size=16, batch_size=2,
                       loader=lambda p, image_size: load_clip(p, 8, image_size))  # fmt: skip
    model = fake_model(["dog", "cat", "x", "two", "x", "cat", "x", "man"])
    with pytest.warns(UserWarning, match="skipping video"):
        whole = task.predict_samples(model, 2, seed=1)
        shards = [task.predict_samples(model, 2, seed=1, indices=range(rank, len(queries), 2)) for rank in (0, 1)]
    assert {**shards[0], **shards[1]} == whole and "v_100" in whole
    assert len({tuple(s["demonstrations"]) for s in whole.values()}) > 1  # drawn per question
