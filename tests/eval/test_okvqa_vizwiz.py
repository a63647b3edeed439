"""OK-VQA and VizWiz through the VQA machinery: VizWiz's unanswerable questions, Emu-I's two-prompt protocol (a fake
model that says when it does not know), skipped images, and both callbacks (and their ShapesWorld sets) in a tiny fit
and in `validate`."""

import json
import math
import statistics
from collections import defaultdict

import lightning as L
import pytest
import torch
from conftest import make_model
from eval_fakes import VQA_ANSWERS, Guesser

from emu_lightning.data.vqa import read_vizwiz
from emu_lightning.eval.metrics import vqa_accuracy
from emu_lightning.eval.okvqa import OKVQAEval
from emu_lightning.eval.tasks import EMU_I_SYSTEM, AnswerabilityPrompt, FewShotTask, PromptTemplate, from_vizwiz
from emu_lightning.eval.tasks import prompt_text as as_text
from emu_lightning.eval.vizwiz import (
    EMU_I_VIZWIZ_ANSWERABILITY,
    EMU_I_VIZWIZ_ANSWERABILITY_DEMO,
    EMU_I_VIZWIZ_DEMO,
    EMU_I_VIZWIZ_QUERY,
    VizWizEval,
)
from emu_lightning.shapesworld import ShapesWorldDataModule, ShapesWorldOKVQAEval, ShapesWorldVizWizEval
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import write_shapesworld_vizwiz

KNOWN = ", is the answer known? [ASSISTANT]:"
INSTRUCTION = (" [USER]: <image> based on the content of the image and common sense, please provide an accurate answer "
               "consisting of only one word or phrase. ")  # fmt: skip


class SaysWhenItDoesNotKnow:
    """A fake ``generate`` for the two-prompt protocol: to "is the answer known?" it replies "no." for the questions in
    ``unknown`` (and "yes." otherwise); to the answer prompt it replies with ``answers[question]``, or "Red." for a
    question it has no answer for. Records the batches it was given."""

    def __init__(self, unknown, answers):
        self.unknown, self.answers, self.batches = set(unknown), answers, []

    def __call__(self, prompts, **generation):
        self.batches.append([as_text(p) for p in prompts])
        out = []
        for text in self.batches[-1]:
            if text.endswith(KNOWN):
                out.append(" no." if text.removesuffix(KNOWN).split("phrase. ")[-1] in self.unknown else " yes.")
            else:
                question = text.removesuffix(" [ASSISTANT]: the answer is:").split("phrase. ")[-1]
                out.append(f" it is {self.answers[question]}." if question in self.answers else " Red.")
        return out


@pytest.fixture(scope="module")
def vizwiz(tmp_path_factory):
    """A ShapesWorld set in VizWiz's format, read back through the VizWiz reader: half its questions unanswerable."""
    root, world = tmp_path_factory.mktemp("vizwiz"), ShapesWorld(image_size=16)
    val = write_shapesworld_vizwiz(world, root, "val", num_questions=12, unanswerable_share=0.5)
    train = write_shapesworld_vizwiz(world, root, "train", num_questions=6, unanswerable_share=0.5)
    return from_vizwiz(read_vizwiz(val["annotations"], val["images"])), from_vizwiz(read_vizwiz(*train.values()))


def two_prompt_task(queries, support, **kwargs):
    return FewShotTask("vizwiz", queries, support, template=PromptTemplate(EMU_I_VIZWIZ_DEMO, EMU_I_VIZWIZ_QUERY,
                       EMU_I_SYSTEM), answerability=AnswerabilityPrompt(EMU_I_VIZWIZ_ANSWERABILITY,
                       EMU_I_VIZWIZ_ANSWERABILITY_DEMO), image_size=16, **kwargs)  # fmt: skip


def test_two_prompt_protocol_answers_unanswerable_when_the_model_says_no(vizwiz):
    queries, support = vizwiz
    unknown = {q.question for q in queries if q.extra["answerable"] == 0}
    assert 3 <= len(unknown) < len(queries)
    majority = {q.question: statistics.mode(q.references) for q in queries if q.extra["answerable"] == 1}
    model = torch.nn.Module()
    model.generate = SaysWhenItDoesNotKnow(unknown, majority)
    task = two_prompt_task(queries, support, shots=(0, 1), batch_size=5)
    results = task.evaluate(model)
    records = results["records"]
    assert len(records) == 2 * len(queries)
    for r, q in zip(records, [*queries, *queries]):
        # both prompts, word for word the released ones (the image as <image>), and both replies
        assert r["prompt"].endswith(INSTRUCTION + q.question + " [ASSISTANT]: the answer is:")
        assert r["answerability_prompt"].endswith(INSTRUCTION + q.question + KNOWN)
        assert r["prompt"].startswith(EMU_I_SYSTEM + " [USER]: <image>") and r["image"] == q.extra["image"]
        if q.question in unknown:
            assert (r["answerability"], r["answer_known"], r["answer"]) == ("no.", False, "red")
            assert r["prediction"] == "unanswerable" and r["answerable"] == 0
        else:
            assert (r["answerability"], r["answer_known"]) == ("yes.", True)
            assert r["prediction"] == r["answer"] == majority[q.question]
        assert r["score"] == pytest.approx(100 * vqa_accuracy(r["prediction"], q.references))
        assert r["score"] == pytest.approx(100.0) if q.question in unknown else r["score"] > 50
    # one demonstration, the same one in both prompts, its answer or whether it is known
    for r in records[len(queries) :]:
        demo = support[[s.key for s in support].index(r["demonstrations"][0]["key"])]
        shown = f"phrase. {demo.question} [ASSISTANT]: the answer is: {statistics.mode(demo.references)}.<end>"
        assert shown in r["prompt"]
        known = "no" if demo.extra["answerable"] == 0 else "yes"
        assert f"phrase. {demo.question}, is the answer known? [ASSISTANT]: {known}.<end>" in r["answerability_prompt"]
    # both prompts of a query go through generate in the same batches of at most batch_size prompts
    batches = model.generate.batches
    assert all(len(b) <= 5 for b in batches) and len(batches) == 2 * math.ceil(2 * len(queries) / 5)
    # the same model under one prompt scores 0 on every unanswerable question (it answers "red")
    plain = FewShotTask("vizwiz", queries, support, template=PromptTemplate(EMU_I_VIZWIZ_DEMO, EMU_I_VIZWIZ_QUERY),
                        shots=(0,), image_size=16)  # fmt: skip
    one = plain.evaluate(model)
    assert all(r["score"] == 0.0 for r in one["records"] if r["question"] in unknown)
    assert "answerability" not in one["records"][0]
    assert one["shots"][0]["mean"] < results["shots"][0]["mean"]


@pytest.mark.parametrize("selection", ["random", "rices"])
def test_two_prompt_predictions_do_not_depend_on_how_queries_are_sharded(vizwiz, selection):
    """Under DDP each rank predicts a strided shard and the samples are gathered: both prompts of a query, their
    demonstrations and replies are the same whichever rank (and batch) predicts it."""
    queries, support = vizwiz
    model = torch.nn.Module()
    model.generate = TwoPromptGuesser(VQA_ANSWERS)
    encoder = make_model().vision if selection == "rices" else None
    task = two_prompt_task(queries, support, shots=(2,), selection=selection, rices_encoder=encoder, batch_size=3)
    whole = task.predict_samples(model, 2, seed=1)
    shards = [task.predict_samples(model, 2, seed=1, indices=range(rank, len(queries), 2)) for rank in (0, 1)]
    assert {**shards[0], **shards[1]} == whole
    assert {s["answer_known"] for s in whole.values()} == {True, False}


@pytest.mark.parametrize(
    "reply, unknown",
    [("no.", True), (" No.\n", True), ("no", True), ("NO. ", True), ("yes.", False), ("no, it is red", False),
     ("not sure", False), ("", False), ("unknown", False)],
)  # fmt: skip
def test_what_counts_as_no(reply, unknown):
    check = AnswerabilityPrompt(EMU_I_VIZWIZ_ANSWERABILITY, EMU_I_VIZWIZ_ANSWERABILITY_DEMO)
    assert check.says_unknown(reply) is unknown


def test_a_missing_vizwiz_image_is_skipped_and_counted(vizwiz, tmp_path):
    queries, support = vizwiz
    gone = type(queries[0])(**{**queries[0].__dict__, "image_path": tmp_path / "VizWiz_val_00000000.png"})
    model = torch.nn.Module()
    model.generate = SaysWhenItDoesNotKnow(set(), {})
    task = two_prompt_task([gone, *queries[1:]], support, shots=(0,))
    with pytest.warns(UserWarning, match="VizWiz_val_00000000.png"):
        results = task.evaluate(model)
    skipped = results["records"][0]
    assert skipped["prediction"] is None and skipped["score"] is None
    assert "VizWiz_val_00000000.png" in skipped["skipped"]
    assert "answerability" not in skipped and results["skipped_images"] == 1
    assert results["shots"][0]["num_evaluated"] == len(queries) - 1
    assert statistics.fmean(r["score"] for r in results["records"][1:]) == pytest.approx(results["shots"][0]["mean"])


class TwoPromptGuesser(Guesser):
    """Guesser's answers to the answer prompt; "no." or "yes." to "is the answer known?", by the image's pixels."""

    def __call__(self, prompts, **generation):
        answers = super().__call__(prompts, **generation)
        return [(" no." if a in ("no", "1", "3", "blue") else " yes.") if as_text(p).endswith(KNOWN) else a
                for p, a in zip(prompts, answers)]  # fmt: skip


def fit(tmp_path, callbacks, model=None):
    model = model or make_model(max_length=512)
    model.generate = TwoPromptGuesser(VQA_ANSWERS)
    dm = ShapesWorldDataModule(image_size=16, batch_size=4, val_size=4, train_size=32)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=callbacks,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, dm)
    return trainer, model, dm


def lines_by_run(path):
    groups = defaultdict(list)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        groups[record["shots"], record["seed"]].append(record)
    return groups


def test_okvqa_and_vizwiz_callbacks_in_a_tiny_fit_and_in_validate(tmp_path):
    okvqa = ShapesWorldOKVQAEval(shots=[0, 2], num_queries=12, support=3, strict=True)
    vizwiz = ShapesWorldVizWizEval(protocol="two_prompt", shots=[0, 1], num_queries=12, support=6,
                                   unanswerable_share=0.5, generation={"max_new_tokens": 2}, strict=True)  # fmt: skip
    trainer, model, dm = fit(tmp_path, [okvqa, vizwiz])
    logs = next((tmp_path / "lightning_logs").rglob("metrics.csv")).read_text()
    for key in ("eval/okvqa_0shot", "eval/okvqa_2shot", "eval/vizwiz_0shot", "eval/vizwiz_1shot_std"):
        assert key in logs
    run = next((tmp_path / "lightning_logs").glob("version_*"))
    # the sets, written in the released layouts into the run folder
    assert (run / "eval_data/okvqa/OpenEnded_mscoco_val2014_questions.json").is_file()
    assert (run / "eval_data/okvqa/mscoco_train2014_annotations.json").is_file()
    assert (run / "eval_data/okvqa/val2014/COCO_val2014_000001000000.png").is_file()
    assert (run / "eval_data/vizwiz/annotations/val.json").is_file()
    assert (run / "eval_data/vizwiz/val/VizWiz_val_00000000.png").is_file()
    # every prediction; the mean of each run's scores is its logged score
    for callback in (okvqa, vizwiz):
        (result,) = callback.history
        groups = lines_by_run(run / "eval" / f"{callback.task_name}-step0000002-predictions.jsonl")
        assert list(groups) == [(0, 0), (1 if callback is vizwiz else 2, 0)]
        for (shots, _), rows in groups.items():
            assert len(rows) == 12 and all(r["task"] == callback.task_name for r in rows)
            assert statistics.fmean(r["score"] for r in rows) == pytest.approx(result["shots"][shots]["mean"])
    rows = [r for rs in lines_by_run(run / "eval/vizwiz-step0000002-predictions.jsonl").values() for r in rs]
    assert {r["answer_known"] for r in rows} == {True, False}  # the fake says "no" to some
    assert all((r["prediction"] == "unanswerable") == (not r["answer_known"]) for r in rows)
    assert all(r["answerability_prompt"].startswith(EMU_I_SYSTEM) and r["answerability_prompt"].endswith(KNOWN)
               for r in rows)  # fmt: skip
    assert {r["answerable"] for r in rows} == {0, 1} and all(r["image"].startswith("VizWiz_val_") for r in rows)
    for r in rows:  # VizWiz scoring: "unanswerable" scores 100 exactly on the unanswerable questions
        if r["prediction"] == "unanswerable":
            assert r["score"] == (100.0 if r["answerable"] == 0 else 0.0)
    trainer.validate(model, dm)  # and under validate, on the same files
    assert [len(c.history) for c in (okvqa, vizwiz)] == [2, 2]


def test_vizwiz_test_split_writes_the_results_file(tmp_path):
    """VizWiz's test.json has no answers: predicted, not scored, and written in VizWiz's results format, plain
    protocol."""
    world = ShapesWorld(image_size=16)
    test = write_shapesworld_vizwiz(world, tmp_path / "vizwiz", "test", num_questions=5, answers=False)
    train = write_shapesworld_vizwiz(world, tmp_path / "vizwiz", "train", num_questions=4)
    cb = VizWizEval(annotations_json=str(test["annotations"]), image_root=str(test["images"]), shots=[1],
                    support_annotations_json=str(train["annotations"]), support_image_root=str(train["images"]),
                    num_queries=None, generation={"max_new_tokens": 2}, strict=True)  # fmt: skip
    fit(tmp_path / "run", [cb])
    (result,) = cb.history
    assert result["scored"] is False and result["shots"][1]["mean"] is None
    folder = next((tmp_path / "run").rglob("eval"))
    submission = json.loads((folder / "vizwiz-step0000002-submission.json").read_text())
    records = lines_by_run(folder / "vizwiz-step0000002-predictions.jsonl")[1, 0]
    expected = [{"image": f"VizWiz_test_{i:08d}.png", "answer": r["prediction"]} for i, r in enumerate(records)]
    assert submission == expected
    assert all(r["prompt"].endswith(f"question: {r['question']} answer:") and "answerability" not in r for r in records)


def test_okvqa_and_vizwiz_callbacks_need_their_files_and_a_known_protocol():
    with pytest.raises(ValueError, match=r"OKVQAEval needs questions_json, image_root, support_questions_json"):
        OKVQAEval()
    with pytest.raises(ValueError, match=r"VizWizEval needs annotations_json, image_root, support_annotations_json, "
                                         r"support_image_root \(your data files\).*ShapesWorldVizWizEval"):  # fmt: skip
        VizWizEval()
    with pytest.raises(ValueError, match=r"VizWiz protocol 'two-prompt' must be one of \['plain', 'two_prompt'\]"):
        ShapesWorldVizWizEval(protocol="two-prompt")
    with pytest.raises(ValueError, match="answerability_template and answerability_demo_template need protocol"):
        ShapesWorldVizWizEval(answerability_template="{image}{question} known?")
    with pytest.raises(ValueError, match=r"ShapesWorldVizWizEval writes its own ShapesWorld set; for your files "
                                         r"\['annotations_json'\] use VizWizEval"):  # fmt: skip
        ShapesWorldVizWizEval(annotations_json="val.json")
    with pytest.raises(ValueError, match=r"\['questions_json'\] use OKVQAEval"):
        ShapesWorldOKVQAEval(questions_json="q.json")
    # the released protocol's defaults; the plain protocol's are VQAEval's
    two = ShapesWorldVizWizEval(protocol="two_prompt")
    assert two.template == PromptTemplate(EMU_I_VIZWIZ_DEMO, EMU_I_VIZWIZ_QUERY, EMU_I_SYSTEM)
    assert two.answerability.query == EMU_I_VIZWIZ_ANSWERABILITY
    assert two.task_args["generation"] == {"num_beams": 5, "max_new_tokens": 20, "min_new_tokens": 1,
                                           "length_penalty": -1.0}  # fmt: skip
    plain = ShapesWorldVizWizEval()
    assert plain.answerability is None and plain.template.prefix == ""
    assert plain.template.query == "{image}question: {question} answer:"
    shorter = ShapesWorldVizWizEval(protocol="two_prompt", prefix="", query_template=" [USER]:{image} {question}",
                                    answerability_template=" [USER]:{image} {question} known?")  # fmt: skip
    assert shorter.template.prefix == "" and shorter.answerability.query == " [USER]:{image} {question} known?"
