"""Each evaluation callback runs inside a tiny fit and in `validate`, logs, and writes its reports and every
prediction."""

import csv
import json
import statistics
from collections import defaultdict

import lightning as L
import pytest
import torch
from conftest import make_model
from eval_fakes import VQA_ANSWERS, Guesser

from emu_lightning.eval.callbacks import CaptioningEval, TextToImageEval, VQAEval
from emu_lightning.eval.okvqa import OKVQAEval
from emu_lightning.eval.vizwiz import VizWizEval
from emu_lightning.shapesworld import (
    ShapesWorldCaptioningEval,
    ShapesWorldDataModule,
    ShapesWorldOKVQAEval,
    ShapesWorldTextToImageEval,
    ShapesWorldVizWizEval,
    ShapesWorldVQAEval,
)
from emu_lightning.shapesworld.world import ShapesWorld


def fit_with(tmp_path, callback, steps=2, answers=None):
    """A tiny fit with ``callback``; with ``answers``, the model's ``generate`` picks one of them per query (some right,
    some wrong), so that the scores are not all 0."""
    model = make_model(max_length=256)
    if answers is not None:
        model.generate = Guesser(answers)
    dm = ShapesWorldDataModule(image_size=16, batch_size=4, val_size=8, train_size=64)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=1, val_check_interval=steps, callbacks=[callback],
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, dm)
    return trainer, model, dm


FIELDS = ["task", "step", "shots", "seed", "key", "image_id", "prompt", "demonstrations", "prediction", "references",
          "score"]  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_predictions(path, result, task, runs, num_queries, text_demos=0):
    """The predictions file of one evaluation is complete (one line per query for each (shots, seed) of ``runs``) and
    the mean of its scores per (shots, seed) is the score returned (and logged)."""
    lines = read_jsonl(path)
    groups = defaultdict(list)
    for line in lines:
        assert set(FIELDS) <= set(line) and line["task"] == task and line["step"] == result["step"]
        groups[line["shots"], line["seed"]].append(line)
    assert list(groups) == runs and len(lines) == len(runs) * num_queries
    for (shots, seed), rows in groups.items():
        assert len({r["key"] for r in rows}) == num_queries
        assert all(len(r["demonstrations"]) == (shots or text_demos) for r in rows)
        if result["scored"]:
            seeds = [s for k, s in runs if k == shots]
            score = result["shots"][shots]["per_seed"][seeds.index(seed)]
            assert statistics.fmean(r["score"] for r in rows) == pytest.approx(score, abs=1e-9)
    return lines


def last_logged(tmp_path, name):
    """The last value of a metric in the CSV logger's metrics.csv."""
    with next((tmp_path / "lightning_logs").rglob("metrics.csv")).open() as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)][-1]


def test_vqa_eval_runs_in_a_tiny_fit_and_in_validate(tmp_path):
    cb = ShapesWorldVQAEval(every_n_steps=1, shots=[0, 2], seeds=[0, 1], num_queries=12, support=4,
                            generation={"max_new_tokens": 2}, write_submission=True, strict=True)  # fmt: skip
    trainer, model, dm = fit_with(tmp_path, cb, answers=VQA_ANSWERS)
    # every 1 step (steps 1, 2) and at the validation run at step 2
    assert [h["step"] for h in cb.history] == [1, 2, 2]
    last = cb.history[-1]
    assert set(last["shots"]) == {0, 2} and last["shots"][2]["num_evaluated"] == 12
    assert 0.0 <= last["shots"][0]["mean"] <= 100.0
    reports = sorted((tmp_path / "lightning_logs").rglob("eval/vqa-step*.json"))
    assert reports and json.loads(reports[-1].read_text())["shots"]["2"]["per_seed"]
    assert (reports[-1].with_suffix(".md")).read_text().startswith("# vqa at step 2")
    metrics = (next((tmp_path / "lightning_logs").rglob("metrics.csv"))).read_text()
    assert "eval/vqa_2shot" in metrics and "eval/vqa_0shot_std" in metrics
    # every prediction of every (shots, seed), with the mean of its scores the logged score
    folder = reports[-1].parent
    lines = check_predictions(folder / "vqa-step0000002-predictions.jsonl", last, "vqa", [(0, 0), (2, 0), (2, 1)], 12)
    assert json.loads(reports[-1].read_text())["files"]["predictions"] == "vqa-step0000002-predictions.jsonl"
    for shots in (0, 2):
        assert last_logged(tmp_path, f"eval/vqa_{shots}shot") == pytest.approx(last["shots"][shots]["mean"], rel=1e-6)
    assert 0 < last["shots"][2]["mean"] < 100 and len({x["score"] for x in lines}) > 1  # some right, some wrong
    assert all(x["prompt"].endswith(f"question: {x['question']} answer:") for x in lines)
    # write_submission: the official results format beside them, one file per (shots, seed)
    for shots, seed in ((0, 0), (2, 0), (2, 1)):
        submission = json.loads((folder / f"vqa-step0000002-{shots}shot-seed{seed}-submission.json").read_text())
        answers = {x["key"]: x["prediction"] for x in lines if (x["shots"], x["seed"]) == (shots, seed)}
        assert submission == [{"question_id": k, "answer": a} for k, a in answers.items()]
    # the samples, as text through the logger (the CSV logger: a file beside metrics.csv)
    table = next((tmp_path / "lightning_logs").rglob("media/eval-vqa_samples-step0000002.md")).read_text()
    assert "| shots | seed | id | question | prediction | references | score |" in table
    assert f"| {last['samples'][0]['key']} |" in table
    trainer.validate(model, dm)
    assert len(cb.history) == 4


def test_captioning_eval_with_rices_and_text_only_zero_shot(tmp_path):
    cb = ShapesWorldCaptioningEval(shots=[0, 2], num_queries=4, support=10, selection="rices",
                                   zero_shot_text_demos=2, generation={"max_new_tokens": 4}, strict=True)  # fmt: skip
    world = ShapesWorld(image_size=16)
    fit_with(tmp_path, cb, answers=[world.captions(world.scene("train", i))[0] for i in range(6)])
    (result,) = cb.history
    assert result["selection"] == "rices" and result["shots"][0]["num_evaluated"] == 4
    assert result["shots"][2]["mean"] > 0.0
    # each image's CIDEr: their mean is the corpus CIDEr logged
    path = next(tmp_path.rglob("captioning-step0000002-predictions.jsonl"))
    lines = check_predictions(path, result, "captioning", [(0, 0), (2, 0)], 4, text_demos=2)
    # zero-shot*: two demonstrations without their images
    assert all(x["prompt"].count("<image>") == (3 if x["shots"] else 1) for x in lines)
    assert last_logged(tmp_path, "eval/captioning_2shot") == pytest.approx(result["shots"][2]["mean"], rel=1e-6)


def test_failures_are_logged_unless_strict(tmp_path):
    bad = CaptioningEval(karpathy_json=str(tmp_path / "missing.json"), image_root=str(tmp_path), shots=[0])
    with pytest.warns(UserWarning, match="missing.json"):
        fit_with(tmp_path, bad)  # training goes on
    strict = CaptioningEval(karpathy_json=str(tmp_path / "missing.json"), image_root=str(tmp_path), strict=True)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        fit_with(tmp_path / "strict", strict)


class SceneRenderer(L.LightningModule):
    """A stand-in generator for the test: draws the ShapesWorld scene a caption describes (or noise)."""

    def __init__(self, noise: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.world, self.noise = ShapesWorld(image_size=32), noise
        self.by_caption = {self.world.captions(self.world.scene("val", i))[1]: i for i in range(64)}
        self.calls: list[dict] = []

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def generate_image(self, items, guidance_scale=7.5, steps=50):
        self.calls.append({"n": len(items), "guidance_scale": guidance_scale, "steps": steps})
        if self.noise:
            return torch.rand(len(items), 3, 32, 32, generator=torch.Generator().manual_seed(len(self.calls)))
        return torch.stack([self.world.image("val", self.by_caption[text]) for (text,) in items])


def fit_generator(tmp_path, model, callback):
    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, callbacks=[callback], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, logger=False,
                        enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, data)
    return trainer


def test_text_to_image_eval_scores_a_perfect_and_a_noise_generator(tmp_path):
    good = ShapesWorldTextToImageEval(every_n_steps=2, on_validation=False, num_prompts=32, steps=3,
                                      guidance_scale=2.0, save_images=True, strict=True)  # fmt: skip
    model = SceneRenderer()
    fit_generator(tmp_path / "good", model, good)
    (result,) = good.history
    assert result["fid"]["metric"] == "FID[shapes-colour-hist-v1]"  # never labelled Inception
    assert result["fid"]["value"] < 0.01  # the generator reproduces the real images (sqrtm error only)
    assert result["attributes"]["colour_accuracy"] == 1.0 and result["attributes"]["shape_accuracy"] == 1.0
    assert model.calls[0] == {"n": 16, "guidance_scale": 2.0, "steps": 3}
    assert list((tmp_path / "good").rglob("text_to_image-step0000002.png"))
    assert list((tmp_path / "good").rglob("fid_stats/*.npz"))
    # a line per prompt: its cell in the grid, its own PNG (save_images) and its attribute scores
    folder = next((tmp_path / "good").rglob("text_to_image-step0000002.png")).parent
    lines = read_jsonl(folder / "text_to_image-step0000002-predictions.jsonl")
    assert [x["key"] for x in lines] == list(range(32)) and [x["grid_index"] for x in lines] == list(range(32))
    assert lines[5]["prompt"] == model.world.captions(model.world.scene("val", 5))[1]
    from emu_lightning.data.coco import load_image

    assert torch.allclose(load_image(folder / lines[5]["image"], 32), model.world.image("val", 5), atol=1 / 255)
    assert all(x["attributes"]["scene_correct"] and x["attributes"]["colour_accuracy"] == 1.0 for x in lines)
    assert {s["colour"] for x in lines for s in x["attributes"]["shapes"]} > {"red"}

    bad = ShapesWorldTextToImageEval(every_n_steps=2, on_validation=False, num_prompts=32, strict=True,
                                     stats_cache_dir=str(next((tmp_path / "good").rglob("fid_stats"))))  # fmt: skip
    fit_generator(tmp_path / "bad", SceneRenderer(noise=True), bad)
    (noisy,) = bad.history
    assert noisy["fid"]["value"] > 1.0
    assert noisy["attributes"]["colour_accuracy"] < 0.5
    lines = read_jsonl(next((tmp_path / "bad").rglob("text_to_image-step0000002-predictions.jsonl")))
    assert all(x["image"] is None for x in lines)  # no save_images: the grid only
    # scene_accuracy is the mean of the per-image scene_correct; colour accuracy pools every shape's judgement
    assert statistics.fmean(x["attributes"]["scene_correct"] for x in lines) == noisy["attributes"]["scene_accuracy"]
    judged = [s["colour_correct"] for x in lines for s in x["attributes"]["shapes"]]
    assert statistics.fmean(judged) == pytest.approx(noisy["attributes"]["colour_accuracy"])


def test_text_to_image_eval_skips_models_without_generate_image(tmp_path):
    cb = ShapesWorldTextToImageEval(every_n_steps=1, on_validation=False, strict=True)
    with pytest.warns(UserWarning, match="no generate_image or no decoder"):  # an EmuModel without a decoder
        fit_with(tmp_path, cb)
    assert cb.history == []


def test_demonstrations_need_no_annotations_of_the_evaluated_split(tmp_path):
    """As with real COCO: the annotation file (captions_val2014.json) has the evaluated split's images only; the
    demonstrations come from Karpathy's train split (train2014 images) with the Karpathy file's own sentences."""
    world = ShapesWorld(image_size=16)
    coco = world.write_coco_karpathy(tmp_path / "coco", {"train": 6, "test": 4})
    karpathy = json.loads(coco["karpathy"].read_text())
    test_ids = {img["cocoid"] for img in karpathy["images"] if img["split"] == "test"}
    annotations = json.loads(coco["annotations"].read_text())
    annotations["annotations"] = [a for a in annotations["annotations"] if a["image_id"] in test_ids]
    (tmp_path / "captions_test.json").write_text(json.dumps(annotations))
    cb = CaptioningEval(karpathy_json=str(coco["karpathy"]), image_root=str(coco["images"]), shots=[0, 2],
                        annotations_json=str(tmp_path / "captions_test.json"), num_queries=4,
                        generation={"max_new_tokens": 3}, strict=True)  # fmt: skip
    fit_with(tmp_path / "run", cb)
    assert cb.history and cb.history[-1]["shots"][2]["num_evaluated"] == 4


def test_a_failing_evaluation_fails_validate(tmp_path):
    """In `validate` the evaluation is the point of the run: its error ends the run (a non-zero exit), instead of a
    warning and no scores."""
    bad = CaptioningEval(karpathy_json=str(tmp_path / "missing.json"), image_root=str(tmp_path), shots=[0])
    dm = ShapesWorldDataModule(image_size=16, batch_size=4, val_size=4)
    trainer = L.Trainer(limit_val_batches=1, callbacks=[bad], default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="missing.json"):
        trainer.validate(make_model(max_length=256), dm)


def test_eval_arguments_from_the_command_line(tmp_path):
    """`--eval '{...}'` sets shots (and the like) on every few-shot evaluation callback, e.g. for three real photos."""
    from pathlib import Path

    from emu_lightning.cli import cli
    from emu_lightning.eval.callbacks import FewShotEval

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    run = cli(["--config", tiny, "--eval", "{shots: [0, 1], zero_shot_text_demos: 1, num_queries: 3}",
               f"--trainer.default_root_dir={tmp_path}"], run=False)  # fmt: skip
    evals = [c for c in run.trainer.callbacks if isinstance(c, FewShotEval)]
    assert len(evals) == 2
    assert all(c.task_args["shots"] == (0, 1) and c.task_args["zero_shot_text_demos"] == 1 for c in evals)
    assert all(c.num_queries == 3 for c in evals)
    with pytest.raises(ValueError, match=r"unknown keys \['shot'\]"):
        evals[0].override(shot=[1])


def test_evaluations_need_their_data_files():
    """A real `validate` without data paths must not quietly score the toy world: each callback names the files it
    misses and the ShapesWorld class that writes its own set."""
    for make, missing in (
        (CaptioningEval, ["karpathy_json", "image_root"]),
        (VQAEval, ["questions_json", "image_root", "support_questions_json", "support_annotations_json",
                   "support_image_root"]),  # the evaluated split may lack answers (test-dev)
        (TextToImageEval, ["captions_json", "image_root"]),
        (OKVQAEval, ["questions_json", "image_root", "support_questions_json", "support_annotations_json",
                     "support_image_root"]),
        (VizWizEval, ["annotations_json", "image_root", "support_annotations_json", "support_image_root"]),
    ):  # fmt: skip
        with pytest.raises(ValueError) as error:
            make()
        message = str(error.value)
        assert f"{make.__name__} needs {', '.join(missing)} (your data files)" in message
        assert f"emu_lightning.shapesworld.ShapesWorld{make.__name__}" in message
    # Only what is missing is named
    with pytest.raises(ValueError, match=r"CaptioningEval needs image_root \(your data files\)"):
        CaptioningEval(karpathy_json="data.json")
    with pytest.raises(ValueError, match=r"VQAEval needs support_questions_json, support_annotations_json, "
                                         r"support_image_root \(your data files\)"):  # fmt: skip
        VQAEval(questions_json="q.json", annotations_json="a.json", image_root="images")
    with pytest.raises(ValueError, match=r"TextToImageEval needs captions_json \(your data files\)"):
        TextToImageEval(image_root="images")


def test_shapesworld_evaluations_build_without_files():
    captioning = ShapesWorldCaptioningEval(support=12, shots=[0])
    assert isinstance(captioning, CaptioningEval) and captioning.support == 12
    assert captioning.files == (None, None, None)
    assert ShapesWorldCaptioningEval().support == 200
    vqa = ShapesWorldVQAEval(support=7, shots=[0])
    assert isinstance(vqa, VQAEval) and vqa.support == 7 and ShapesWorldVQAEval().support == 50
    okvqa, vizwiz = ShapesWorldOKVQAEval(support=5), ShapesWorldVizWizEval(support=6, unanswerable_share=0.5)
    assert isinstance(okvqa, OKVQAEval) and okvqa.task_name == "okvqa" and okvqa.support == 5
    assert isinstance(vizwiz, VizWizEval) and vizwiz.task_name == "vizwiz" and vizwiz.unanswerable_share == 0.5
    t2i = ShapesWorldTextToImageEval(num_prompts=4)
    assert isinstance(t2i, TextToImageEval) and t2i.captions_json is None and t2i.num_prompts == 4
    # and data files given to one are an error, not silently ignored for the toy set
    for make, what in (
        (ShapesWorldCaptioningEval, "karpathy_json"),
        (ShapesWorldVQAEval, "questions_json"),
        (ShapesWorldTextToImageEval, "captions_json"),
        (ShapesWorldOKVQAEval, "annotations_json"),
        (ShapesWorldVizWizEval, "support_image_root"),
    ):
        base = make.__name__.removeprefix("ShapesWorld")
        expected = rf"{make.__name__} writes its own ShapesWorld set; for your files \['{what}'\] use {base}"
        with pytest.raises(ValueError, match=expected):
            make(**{what: "data.json"})


def test_vqa_test_dev_without_answers_writes_the_submission_file(tmp_path):
    """VQAv2 test-dev has questions and no annotations: the evaluation predicts, scores nothing, logs no score and
    writes the official results format."""
    world = ShapesWorld(image_size=16)
    test = world.write_vqav2(tmp_path / "vqa", split="val", num_images=2)
    train = world.write_vqav2(tmp_path / "vqa", split="train", num_images=3)
    files = dict(questions_json=str(test["questions"]), image_root=str(test["images"]),
                 image_template=test["image_template"], support_questions_json=str(train["questions"]),
                 support_annotations_json=str(train["annotations"]), support_image_root=str(train["images"]),
                 support_image_template=train["image_template"])  # fmt: skip
    cb = VQAEval(**files, shots=[0, 1], seeds=[0, 1], num_queries=None, generation={"max_new_tokens": 2}, strict=True)
    trainer, model, dm = fit_with(tmp_path / "run", cb, answers=VQA_ANSWERS)
    (result,) = cb.history
    assert result["scored"] is False and all(r["mean"] is None for r in result["shots"].values())
    questions = [q["question_id"] for q in json.loads(test["questions"].read_text())["questions"]]
    folder = next((tmp_path / "run").rglob("eval"))
    runs = [(0, 0), (1, 0), (1, 1)]
    lines = check_predictions(folder / "vqa-step0000002-predictions.jsonl", result, "vqa", runs, len(questions))
    assert all(x["score"] is None and x["references"] == [] for x in lines)
    # one file per (shots, seed), in the official format: every question, in order, with the recorded answer
    names = sorted(p.name for p in folder.glob("*submission.json"))
    assert names == [f"vqa-step0000002-{k}shot-seed{s}-submission.json" for k, s in runs]
    assert result["files"]["submissions"] == names
    for name in names:
        shots, seed = int(name.split("-")[2][0]), int(name.split("seed")[1][0])
        submission = json.loads((folder / name).read_text())
        assert [s["question_id"] for s in submission] == questions
        assert all(type(s["question_id"]) is int and isinstance(s["answer"], str) for s in submission)
        recorded = {x["key"]: x["prediction"] for x in lines if (x["shots"], x["seed"]) == (shots, seed)}
        assert {s["question_id"]: s["answer"] for s in submission} == recorded
    assert "eval/vqa_0shot" not in next((tmp_path / "run").rglob("metrics.csv")).read_text()  # nothing scored
    report = (folder / "vqa-step0000002.md").read_text()
    assert "Not scored: the evaluated split has no references." in report and names[0] in report
    # one (shots, seed): the file is vqa-step<N>-submission.json; fewer questions than the file has: a warning
    cb.override(shots=[0], num_queries=5)
    with pytest.warns(UserWarning, match=f"5 of the {len(questions)} questions are predicted"):
        trainer.validate(model, dm)
    submission = json.loads((folder / "vqa-step0000002-submission.json").read_text())
    assert [s["question_id"] for s in submission] == questions[:5]
