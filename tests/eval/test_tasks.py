import pytest
import torch
from conftest import make_model

from emu_lightning.data.coco import read_karpathy
from emu_lightning.data.vqa import read_vqa
from emu_lightning.eval.tasks import FewShotTask, PromptTemplate, from_captions, from_vqa, render
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
