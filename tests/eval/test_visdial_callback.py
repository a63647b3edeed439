"""The VisDial callback in a tiny fit and in `validate` on the ShapesWorld dialogs: what it logs, the per-round file
(whose means are the logged metrics), the official ranks file, the ShapesWorld set read back through the real reader,
and the union of the DDP shards."""

import csv
import json
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_model
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image

import emu_lightning.eval.visdial_callback as visdial_callback
from emu_lightning.data.visdial import read_visdial
from emu_lightning.eval.visdial import PRETRAINED_TEMPLATE, evaluate_visdial
from emu_lightning.eval.visdial_callback import VisDialEval
from emu_lightning.shapesworld import ShapesWorldDataModule, ShapesWorldVisDialEval
from emu_lightning.shapesworld.dialog import answer_pool, short_answers, write_shapesworld_visdial
from emu_lightning.shapesworld.world import ShapesWorld


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def logged(folder, name):
    with (folder / "metrics.csv").open() as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def stub_trainer(root, rank=0, world_size=1):
    """What the callback reads of a trainer, under `validate` (the weights' step: 0)."""
    return SimpleNamespace(global_rank=rank, world_size=world_size, is_global_zero=rank == 0, log_dir=str(root),
                           default_root_dir=str(root), state=SimpleNamespace(fn=TrainerFn.VALIDATING), global_step=0,
                           datamodule=None)  # fmt: skip


# -------------------------------------------------------------------------------------------- the ShapesWorld set


def test_shapesworld_dialogs_read_back_by_the_visdial_reader(tmp_path):
    world = ShapesWorld(image_size=16)
    files = write_shapesworld_visdial(world, tmp_path, num_dialogs=4)
    assert files["image_template"] == "VisualDialog_val2018_{image_id:012d}.png"
    rounds = read_visdial(**files)
    scenes = [world.scene("val", i) for i in range(4)]
    per_dialog = [sum(r.image_id == world.image_id("val", i) for r in rounds) for i in range(4)]
    # a scene of n shapes: the count, colour and shape per cell, is there a ..., how many <colour>, and the colour of a
    # shape that appears once (when one does)
    assert [len(s.shapes) * 2 + 3 <= n <= len(s.shapes) * 2 + 4 for s, n in zip(scenes, per_dialog)] == [True] * 4
    assert len(rounds) == sum(per_dialog)
    assert len(read_visdial(**files, dense_only=True)) == 4  # one densely annotated round per dialog
    short = set(short_answers())
    for r in rounds:
        assert len(r.options) == len(set(r.options)) == 100 and set(r.options) <= set(answer_pool(world))
        assert short <= set(r.options)  # every colour, shape, count, yes and no: the plausible wrong answers
        assert r.caption == "a picture of shapes on a black background"  # names no shape: answers come from the image

    # by hand: val scene 0 is a small purple circle bottom left and a small orange triangle bottom right
    assert [(s.colour, s.shape, scenes[0].position(s)) for s in scenes[0].shapes] == [
        ("purple", "circle", "bottom left"), ("orange", "triangle", "bottom right")]  # fmt: skip
    first = [r for r in rounds if r.image_id == 1_000_000]
    assert [(r.question, r.answer) for r in first] == [
        ("how many shapes are there", "2"),
        ("what colour is the shape in the bottom right", "orange"),
        ("what colour is the triangle", "orange"),
        ("what shape is in the bottom right", "triangle"),
        ("is there a yellow square", "no"),
        ("what shape is in the bottom left", "circle"),
        ("how many purple shapes are there", "1"),
        ("what colour is the shape in the bottom left", "purple"),
    ]
    assert first[2].history == (("how many shapes are there", "2"), ("what colour is the shape in the bottom right",
                                                                     "orange"))  # fmt: skip
    (dense,) = [r for r in first if r.relevance is not None]
    relevant = {o for o, v in zip(dense.options, dense.relevance) if v}
    assert dense.round_id == 4 and relevant == {"triangle", "a triangle"}
    counts = [r for r in rounds if r.relevance is not None and r.answer.isdigit()]
    assert counts and all(sum(r.relevance) >= 2 for r in counts)  # "2" and "two" (and "none" for 0) are relevant
    # the image is the scene's, losslessly
    pixels = np.asarray(Image.open(first[0].image_path), dtype=np.float32) / 255
    assert first[0].image_path.name == "VisualDialog_val2018_000001000000.png"
    assert torch.allclose(torch.from_numpy(pixels).permute(2, 0, 1), world.image("val", 0), atol=1 / 255)


def test_files_are_required_and_options_checked(tmp_path):
    with pytest.raises(ValueError, match="VisDialEval needs dialogs_json, image_root .*ShapesWorldVisDialEval"):
        VisDialEval()
    with pytest.raises(ValueError, match="writes its own ShapesWorld set.*dialogs_json.*use VisDialEval"):
        ShapesWorldVisDialEval(dialogs_json="x.json")
    with pytest.raises(ValueError, match="template 'chat'"):
        VisDialEval(dialogs_json="x", image_root="y", template="chat")
    with pytest.raises(ValueError, match="reduction"):
        ShapesWorldVisDialEval(reduction="max")
    assert ShapesWorldVisDialEval().template == PRETRAINED_TEMPLATE  # the tiny model never saw [USER]/[ASSISTANT]
    assert VisDialEval(dialogs_json="x", image_root="y").template_name == "emu-i"


# ---------------------------------------------------------------------------------------------------- the callback


def test_visdial_eval_in_a_tiny_fit_and_validate(tmp_path):
    cb = ShapesWorldVisDialEval(num_dialogs=3, num_rounds=12, strict=True)
    model = make_model(max_length=256)
    dm = ShapesWorldDataModule(image_size=16, batch_size=4, val_size=4, train_size=32)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=[cb],
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, logger=L.pytorch.loggers.CSVLogger(tmp_path))  # fmt: skip
    trainer.fit(model, dm)
    (result,) = cb.history
    m = result["metrics"]
    assert result["step"] == 2 and result["num_rounds"] == 12 and result["skipped_rounds"] == 0
    assert result["num_available"] > 12 and result["template"] == "pretrained"
    assert m["num_ranked"] == 12 and m["num_ndcg"] >= 1 and 1 <= m["mean_rank"] <= 100
    assert result["chance"]["r@1"] == pytest.approx(0.01) and result["chance"]["mean_rank"] == pytest.approx(50.5)
    assert result["chance"]["mrr"] == pytest.approx(sum(1 / i for i in range(1, 101)) / 100)

    folder = next(tmp_path.rglob("metrics.csv")).parent
    for name, key in visdial_callback.LOGGED.items():
        assert logged(folder, f"eval/visdial_{name}") == [pytest.approx(m[key], rel=1e-6)]
    # every round on its line; the means over the lines are the logged metrics
    eval_dir = folder / "eval"
    lines = read_jsonl(eval_dir / "visdial-step0000002-predictions.jsonl")
    keys = [(r.image_id, r.round_id) for r in cb.rounds]
    assert [(x["image_id"], x["round_id"]) for x in lines] == keys and len(set(keys)) == 12
    fields = {"task", "step", "image_id", "round_id", "question", "answer", "gt_index", "gt_rank", "top_option",
              "top_answer", "ndcg"}  # fmt: skip
    assert all(set(x) == fields and x["task"] == "visdial" and x["step"] == 2 for x in lines)
    ranks = [x["gt_rank"] for x in lines]
    assert statistics.fmean(r <= 1 for r in ranks) == pytest.approx(m["r@1"])
    assert statistics.fmean(r <= 5 for r in ranks) == pytest.approx(m["r@5"])
    assert statistics.fmean(r <= 10 for r in ranks) == pytest.approx(m["r@10"])
    assert statistics.fmean(1 / r for r in ranks) == pytest.approx(m["mrr"])
    assert statistics.fmean(ranks) == pytest.approx(m["mean_rank"])
    assert statistics.fmean(x["ndcg"] for x in lines if x["ndcg"] is not None) == pytest.approx(m["ndcg"])
    by_key = {r.key: r for r in cb.rounds}
    for x in lines:
        r = by_key[x["image_id"], x["round_id"]]
        assert x["answer"] == r.answer == r.options[x["gt_index"]] and x["top_answer"] == r.options[x["top_option"]]
    # the official result file: one entry per round, each option's rank (a permutation of 1..100)
    submitted = json.loads((eval_dir / "visdial-step0000002-ranks.json").read_text())
    assert [(e["image_id"], e["round_id"]) for e in submitted] == keys
    for e, x in zip(submitted, lines):
        assert set(e) == {"image_id", "round_id", "ranks"} and sorted(e["ranks"]) == list(range(1, 101))
        assert e["ranks"][x["gt_index"]] == x["gt_rank"] and e["ranks"][x["top_option"]] == 1
    summary = json.loads((eval_dir / "visdial-step0000002.json").read_text())
    assert summary["metrics"] == pytest.approx(m) and summary["files"]["ranks"] == "visdial-step0000002-ranks.json"
    assert len(summary["samples"]) == 8 and "records" not in summary
    assert "| image_id | round | question |" in next(folder.rglob("media/eval-visdial_samples-step*.md")).read_text()
    # the set was written into the run folder, as the other ShapesWorld evaluations write theirs
    assert (folder / "eval_data" / "visdial" / "visdial_1.0_val.json").is_file()

    # the same rounds scored directly give the same metrics; `validate` scores the same weights again
    direct = evaluate_visdial(model, cb.rounds, template=PRETRAINED_TEMPLATE)["metrics"]
    assert direct == pytest.approx(m)
    trainer.validate(model, dm)
    assert len(cb.history) == 2 and cb.history[-1]["metrics"] == pytest.approx(m)


def test_ddp_shards_are_disjoint_and_their_union_gives_the_one_process_metrics(tmp_path, monkeypatch):
    """Two ranks, simulated in one process (``gather_dicts`` stood in for): each ranks its strided shard, both compute
    the single-process metrics from the union, and only rank 0 writes."""
    model = make_model(max_length=256)

    single = ShapesWorldVisDialEval(num_dialogs=2, num_rounds=7, strict=True).evaluate(stub_trainer(tmp_path), model)

    class Stop(Exception):
        pass

    shards = {}
    callbacks = [ShapesWorldVisDialEval(num_dialogs=2, num_rounds=7, strict=True) for _ in range(2)]

    def rank_one_scores(work, what):  # rank 1 ranks its shard (and stops: rank 0's is not there yet)
        shards[1] = work()
        raise Stop

    monkeypatch.setattr(visdial_callback, "gather_dicts", rank_one_scores)
    with pytest.raises(Stop):
        callbacks[1].evaluate(stub_trainer(tmp_path / "two", 1, 2), model)

    def rank_zero_gathers(work, what):
        shards[0] = work()
        return {**shards[0], **shards[1]}

    monkeypatch.setattr(visdial_callback, "gather_dicts", rank_zero_gathers)
    zero = callbacks[0].evaluate(stub_trainer(tmp_path / "two", 0, 2), model)
    written = sorted(p.name for p in (tmp_path / "two" / "eval").iterdir())
    assert written == ["visdial-step0000000-predictions.jsonl", "visdial-step0000000-ranks.json",
                       "visdial-step0000000.json"]  # fmt: skip
    a = json.loads((tmp_path / "eval" / "visdial-step0000000-ranks.json").read_text())
    assert json.loads((tmp_path / "two" / "eval" / "visdial-step0000000-ranks.json").read_text()) == a
    shutil.rmtree(tmp_path / "two" / "eval")
    monkeypatch.setattr(visdial_callback, "gather_dicts", lambda work, what: {**shards[0], **shards[1]})
    one = callbacks[1].evaluate(stub_trainer(tmp_path / "two", 1, 2), model)  # what rank 1 receives
    assert not (tmp_path / "two" / "eval").exists()  # only rank 0 writes

    keys = [r.key for r in callbacks[0].rounds]
    assert sorted(shards[0]) == sorted(keys[0::2]) and sorted(shards[1]) == sorted(keys[1::2])
    assert zero["metrics"] == pytest.approx(single["metrics"]) and zero["records"] == single["records"]
    assert one["metrics"] == zero["metrics"] and zero["num_rounds"] == 7


def _ddp_rank(rank, root, port, outs):
    """Rank ``rank`` of a real two-process (gloo) evaluation of the first 7 rounds; writes its result to ``outs``."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cb = ShapesWorldVisDialEval(num_dialogs=2, num_rounds=7, strict=True)
        result = cb.evaluate(stub_trainer(root, rank, 2), make_model(max_length=256))
        Path(outs[rank]).write_text(json.dumps({"metrics": result["metrics"], "records": result["records"]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 30 s on two shared cores (`make test-slow`)
def test_two_process_gloo_evaluation_equals_one_process(tmp_path):
    """Real collectives: two spawned CPU processes (gloo) rank their shards and gather them; both get the metrics of
    one process, and rank 0's ranks file is the one-process file."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    mp.start_processes(_ddp_rank, args=(str(tmp_path / "two"), port, outs), nprocs=2, start_method="spawn")
    cb = ShapesWorldVisDialEval(num_dialogs=2, num_rounds=7, strict=True)
    single = cb.evaluate(stub_trainer(tmp_path / "one"), make_model(max_length=256))
    for out in outs:
        rank = json.loads(Path(out).read_text())
        assert rank["metrics"] == pytest.approx(single["metrics"], abs=1e-9) and len(rank["records"]) == 7
        assert [x["gt_rank"] for x in rank["records"]] == [x["gt_rank"] for x in single["records"]]
    name = "eval/visdial-step0000000-ranks.json"
    assert json.loads((tmp_path / "two" / name).read_text()) == json.loads((tmp_path / "one" / name).read_text())


def test_real_files_with_a_missing_image(tmp_path):
    """VisDialEval on files in the released format (the reader test's two dialogs, image 11 missing): the skipped
    rounds are on their lines with the reason, count nowhere and have no entry in the ranks file (a warning says so)."""
    from test_visdial import SHORT, _write_visdial

    p = _write_visdial(tmp_path / "data", images=(12,))
    cb = VisDialEval(dialogs_json=str(p["dialogs"]), image_root=str(p["images"]), dense_json=str(p["dense"]),
                     template=SHORT, option_batch_size=2, strict=True)  # fmt: skip
    with pytest.warns(UserWarning, match="3 round.*no ranks in the file"):
        result = cb.evaluate(stub_trainer(tmp_path / "run"), make_model(max_length=256))
    assert result["template"] == "custom" and result["num_rounds"] == 6 and result["skipped_rounds"] == 3
    assert result["skipped_images"] == 1 and result["metrics"]["num_ranked"] == 3
    assert result["metrics"]["num_ndcg"] == 1 and result["chance"]["r@1"] == pytest.approx(0.25)
    lines = read_jsonl(tmp_path / "run" / "eval" / "visdial-step0000000-predictions.jsonl")
    assert [x["gt_rank"] is None for x in lines] == [True] * 3 + [False] * 3 and "does not load" in lines[0]["skipped"]
    ranks = json.loads((tmp_path / "run" / "eval" / "visdial-step0000000-ranks.json").read_text())
    assert [(e["image_id"], e["round_id"]) for e in ranks] == [(12, 1), (12, 2), (12, 3)]
    assert all(sorted(e["ranks"]) == [1, 2, 3, 4] for e in ranks)
