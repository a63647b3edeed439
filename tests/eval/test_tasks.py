import json
import math
import statistics

import pytest
import torch
from conftest import make_model
from eval_fakes import VQA_ANSWERS, Guesser

from emu_lightning.data.coco import read_karpathy
from emu_lightning.data.vqa import read_vqa
from emu_lightning.eval.metrics import vqa_accuracy
from emu_lightning.eval.tasks import FewShotTask, PromptTemplate, from_captions, from_vqa, prompt_text, render
from emu_lightning.sequence import END_OF_CHUNK
from emu_lightning.shapesworld.world import ShapesWorld


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    world = ShapesWorld(image_size=16)
    coco = world.write_coco_karpathy(root / "coco", {"train": 12, "test": 6})
    vqa_val = world.write_vqav2(root / "vqa", split="val", num_images=3)
    vqa_train = world.write_vqav2(root / "vqa", split="train", num_images=4)
    read = lambda p: read_vqa(p["questions"], p["annotations"], p["images"], p["image_template"])  # noqa: E731
    return {
        "cap_test": from_captions(read_karpathy(coco["karpathy"], coco["images"], "test")),
        "cap_train": from_captions(read_karpathy(coco["karpathy"], coco["images"], "train")),
        "vqa_val": from_vqa(read(vqa_val)),
        "vqa_train": from_vqa(read(vqa_train)),
    }


def test_render_places_images():
    img = torch.zeros(3, 2, 2)
    assert render("{image}Output:{caption}", img, caption="a dog") == [img, "Output:a dog"]
    assert render("Question:{question}{image}", None, question="why?") == ["Question:why?"]
    assert render("{image}{caption}{end}", img, caption="a dog.") == [img, "a dog.", END_OF_CHUNK]
    assert render("{caption}{end}{image}", None, caption="x") == ["x", END_OF_CHUNK]


def test_demonstrations_are_seeded_per_query_not_per_process(sets):
    task = FewShotTask("captioning", sets["cap_test"], sets["cap_train"], shots=(4,), image_size=16)
    full = [task.demonstrations(i, 4, seed=1) for i in range(6)]
    again = FewShotTask("captioning", sets["cap_test"], sets["cap_train"], shots=(4,), image_size=16)
    # a "rank" that sees only queries 3.. draws the same demonstrations for them
    assert [again.demonstrations(i, 4, seed=1) for i in range(3, 6)] == full[3:]
    assert all(len(set(d)) == 4 for d in full)
    assert full != [task.demonstrations(i, 4, seed=2) for i in range(6)]


def test_prompts_few_shot_and_zero_shot_star(sets):
    tmpl = PromptTemplate(demo="{image}Output:{caption}\n", query="{image}Output:")
    task = FewShotTask("captioning", sets["cap_test"], sets["cap_train"], template=tmpl, shots=(0, 2),
                       zero_shot_text_demos=2, image_size=16)  # fmt: skip
    few = task.prompt(0, 2, seed=0)
    assert sum(isinstance(x, torch.Tensor) for x in few) == 3 and few[-1] == "Output:"
    star = task.prompt(0, 0, seed=0)
    assert sum(isinstance(x, torch.Tensor) for x in star) == 1  # demos without their images
    assert sum(x.startswith("Output:") and len(x) > 8 for x in star if isinstance(x, str)) == 2


def test_vqa_task_end_to_end_on_a_tiny_model(sets):
    model = make_model(max_length=256)
    task = FewShotTask("vqa", sets["vqa_val"], sets["vqa_train"], shots=(0, 2), seeds=(0, 1), image_size=16,
                       template=PromptTemplate("{image}question: {question} answer: {answer}.", "{image}question: "
                                               "{question} answer:"), generation={"max_new_tokens": 3})  # fmt: skip
    results = task.evaluate(model)
    assert set(results["shots"]) == {0, 2}
    for shots, r in results["shots"].items():
        assert 0.0 <= r["mean"] <= 100.0 and r["num_evaluated"] == len(sets["vqa_val"])
        assert len(r["per_seed"]) == (2 if shots else 1)  # seeds only matter when demonstrations are drawn
    with pytest.raises(ValueError, match="unknown ids"):
        task.score({123456789: "yes"})


def test_skips_broken_images_and_counts_them(sets, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    queries = [*sets["vqa_val"][:2]]
    queries.append(type(queries[0])(key=-1, image_id=-1, image_path=broken, references=("yes",) * 10, question="x?"))
    task = FewShotTask("vqa", queries, sets["vqa_train"], shots=(0,), image_size=16,
                       generation={"max_new_tokens": 2})  # fmt: skip
    with pytest.warns(UserWarning, match="broken.png"):
        preds = task.predict(make_model(), 0, 0)
    assert set(preds) == {q.key for q in queries[:2]} and len(task.images.skipped) == 1


def test_bad_task_arguments(sets):
    with pytest.raises(ValueError, match="support set has 12"):
        FewShotTask("captioning", sets["cap_test"], sets["cap_train"], shots=(16,))
    with pytest.raises(ValueError, match="'retrieval'"):
        FewShotTask("captioning", sets["cap_test"], sets["cap_train"], selection="retrieval")
    with pytest.raises(ValueError, match="RICES selector or a rices_encoder"):
        FewShotTask("captioning", sets["cap_test"], sets["cap_train"], selection="rices")
    # RICES shows each support image once: the questions of 4 images allow at most 4 demonstrations
    with pytest.raises(ValueError, match="5 demonstrations asked for with RICES.* 4 different images \\(2\\d items\\)"):
        FewShotTask("vqa", sets["vqa_val"], sets["vqa_train"], shots=(5,), selection="rices",
                    rices_encoder=torch.nn.Identity())  # fmt: skip


def test_rices_selection_shows_the_most_similar_support_image_last(sets):
    model = make_model(max_length=256)
    # Queries taken from the support set itself: the nearest support image is the query's own image.
    support = sets["cap_train"]
    task = FewShotTask("captioning", support[:3], support, shots=(2,), image_size=16, selection="rices",
                       rices_encoder=model.vision)  # fmt: skip
    for i in range(3):
        demos = task.demonstrations(i, 2, seed=0)
        assert demos[-1] == i and len(demos) == 2
    assert task.rices.encoder_calls == len(support) + 3


def test_prompt_text_shows_images_and_ends():
    img = torch.zeros(3, 2, 2)
    assert prompt_text(["sys.", img, "a dog.", END_OF_CHUNK, img, "Output:"]) == "sys.<image>a dog.<end><image>Output:"


VQA = PromptTemplate("{image}q: {question} a: {answer}.{end}", "{image}q: {question} a:")


def check_records(task, results):
    """Every (shots, seed) has one record per query, in query order; the mean of its scores is its score."""
    records = results["records"]
    assert [(r["shots"], r["seed"]) for r in records] == [run for run in task.runs() for _ in task.queries]
    for shots, seed in task.runs():
        mine = [r for r in records if (r["shots"], r["seed"]) == (shots, seed)]
        assert [r["key"] for r in mine] == [q.key for q in task.queries]
        assert [r["image_id"] for r in mine] == [q.image_id for q in task.queries]
        assert all(r["references"] == list(q.references) for r, q in zip(mine, task.queries))
        logged = results["shots"][shots]["per_seed"][list(task.seeds).index(seed)]
        assert statistics.fmean(r["score"] for r in mine) == pytest.approx(logged, rel=1e-9, abs=1e-9)
        assert logged > 0.0 and len({r["score"] for r in mine}) > 1  # some right, some wrong
        shown = shots or task.zero_shot_text_demos
        support = {e.key: e.image_id for e in task.support}
        for r in mine:
            assert len(r["demonstrations"]) == shown
            assert all(support[d["key"]] == d["image_id"] for d in r["demonstrations"])
            assert r["prompt"].count("<image>") == shots + 1 and r["prompt"].count("<end>") == shown
            assert isinstance(r["prediction"], str) and r["score"] >= 0.0  # CIDEr-D x100 may pass 100
    return records


def test_every_vqa_prediction_is_recorded_with_its_prompt_demonstrations_and_score(sets):
    model = torch.nn.Module()
    model.generate = Guesser(VQA_ANSWERS)  # some answers right, some wrong
    task = FewShotTask("vqa", sets["vqa_val"], sets["vqa_train"], shots=(0, 2), seeds=(0, 1), image_size=16,
                       template=VQA, generation={"max_new_tokens": 3})  # fmt: skip
    results = task.evaluate(model)
    records = check_records(task, results)
    assert task.runs() == [(0, 0), (2, 0), (2, 1)]  # no demonstrations: one seed
    first = records[0]
    assert first["question"] == task.queries[0].question and first["prompt"].endswith(f"q: {first['question']} a:")
    # the score of each record is the official accuracy of its own answer
    assert all(r["score"] == pytest.approx(100 * vqa_accuracy(r["prediction"], r["references"])) for r in records)
    # the demonstrations are those the task draws, in the order shown
    two_shot = next(r for r in records if r["shots"] == 2 and r["seed"] == 1)
    drawn = task.demonstrations(0, 2, seed=1)
    assert [d["key"] for d in two_shot["demonstrations"]] == [task.support[d].key for d in drawn]
    assert all(f"q: {task.support[d].question} a:" in two_shot["prompt"] for d in drawn)
    # one generate call per batch of 16: recording costs no generation pass
    assert model.generate.calls == len(task.runs()) * math.ceil(len(task.queries) / 16)
    recorded = {r["key"]: r["prediction"] for r in records if (r["shots"], r["seed"]) == (2, 1)}
    assert recorded == task.predict(model, 2, 1)


def test_every_caption_is_recorded_and_the_mean_per_image_cider_is_the_corpus_cider(sets):
    model = torch.nn.Module()
    model.generate = Guesser([e.references[0] for e in sets["cap_train"]])  # ShapesWorld captions, of other images
    task = FewShotTask("captioning", sets["cap_test"], sets["cap_train"], shots=(0, 1), seeds=(3,),
                       zero_shot_text_demos=1, image_size=16, generation={"max_new_tokens": 6})  # fmt: skip
    results = task.evaluate(model)
    records = check_records(task, results)
    assert "question" not in records[0]
    star = records[0]  # zero-shot*: a demonstration without its image
    assert star["shots"] == 0 and len(star["demonstrations"]) == 1 and star["prompt"].count("<image>") == 1
    assert results["samples"][0]["score"] == records[len(task.queries)]["score"]  # reports show the last pair's


def test_queries_without_references_are_predicted_not_scored(sets):
    """A test split (VQAv2 test-dev): no answers, so predictions are recorded without scores."""
    import dataclasses

    unanswered = [dataclasses.replace(q, references=()) for q in sets["vqa_val"]]
    task = FewShotTask("vqa", unanswered, sets["vqa_train"], shots=(0, 1), image_size=16, template=VQA,
                       generation={"max_new_tokens": 2})  # fmt: skip
    assert not task.scored
    results = task.evaluate(make_model(max_length=256))
    assert results["scored"] is False
    for r in results["shots"].values():
        assert r["mean"] is None and r["per_seed"] == [] and r["num_evaluated"] == len(unanswered)
    assert len(results["records"]) == 2 * len(unanswered)
    assert all(r["score"] is None and r["references"] == [] and isinstance(r["prediction"], str)
               for r in results["records"])  # fmt: skip
    with pytest.raises(ValueError, match="no references: nothing to score"):
        task.score({unanswered[0].key: "yes"})
    # some queries with references and some without is a mistake, named
    mixed = [*sets["vqa_val"][:2], unanswered[2]]
    with pytest.raises(ValueError, match=rf"1 of 3 queries have no references \(e.g. {unanswered[2].key}\)"):
        FewShotTask("vqa", mixed, sets["vqa_train"], shots=(0,))
    # demonstrations show the support set's answers: it must have them
    bare = [dataclasses.replace(q, references=()) for q in sets["vqa_train"]]
    with pytest.raises(ValueError, match="support example .* has no references"):
        FewShotTask("vqa", sets["vqa_val"], bare, shots=(0, 2))
    FewShotTask("vqa", sets["vqa_val"], bare, shots=(0,))  # 0-shot shows none
    with pytest.raises(ValueError, match="no vqa queries"):
        FewShotTask("vqa", [], sets["vqa_train"], shots=(0,))


def test_skipped_queries_are_recorded_with_the_reason(sets, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    queries = [*sets["vqa_val"][:2]]
    queries.append(type(queries[0])(key=-1, image_id=-1, image_path=broken, references=("yes",) * 10, question="x?"))
    task = FewShotTask("vqa", queries, sets["vqa_train"], shots=(0,), image_size=16, generation={"max_new_tokens": 2})
    with pytest.warns(UserWarning, match="broken.png"):
        results = task.evaluate(make_model())
    skipped = results["records"][-1]
    assert skipped["key"] == -1 and skipped["prediction"] is None and skipped["score"] is None
    assert skipped["prompt"] is None and "broken.png" in skipped["skipped"]
    scored = [r["score"] for r in results["records"] if r["score"] is not None]
    assert statistics.fmean(scored) == pytest.approx(results["shots"][0]["mean"]) and len(scored) == 2


def test_read_vqa_errors_name_the_problem(tmp_path):
    world = ShapesWorld(image_size=16)
    paths = world.write_vqav2(tmp_path, split="val", num_images=2)
    with pytest.raises(FileNotFoundError, match="VQA annotations file .*missing.json"):
        read_vqa(paths["questions"], tmp_path / "missing.json", paths["images"])
    with pytest.raises(FileNotFoundError, match="VQA questions file"):
        read_vqa(tmp_path / "nope.json", None, paths["images"])
    annotations = json.loads(paths["annotations"].read_text())
    dropped = annotations["annotations"].pop(3)["question_id"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=rf"question {dropped} of .* has no annotation in .*partial.json \(1 of"):
        read_vqa(paths["questions"], partial, paths["images"])
    (tmp_path / "wrong.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="wrong.json has no 'annotations' list"):
        read_vqa(paths["questions"], tmp_path / "wrong.json", paths["images"])
    with pytest.raises(ValueError, match="wrong.json has no 'questions' list"):
        read_vqa(tmp_path / "wrong.json", None, paths["images"])
    annotations["annotations"][0]["answers"] = []
    partial.write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=f"question {annotations['annotations'][0]['question_id']} has no answers"):
        read_vqa(paths["questions"], partial, paths["images"])
    assert all(e.answers == () for e in read_vqa(paths["questions"], None, paths["images"]))
