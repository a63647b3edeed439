import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_model
from PIL import Image

from emu_lightning.data.visdial import VisDialRound, read_visdial
from emu_lightning.eval.visdial import (
    EMU_I_SYSTEM,
    DialogTemplate,
    OptionScorer,
    OptionScores,
    chance_metrics,
    dialog_prompt,
    evaluate_visdial,
    expand_cache,
    metrics_from_records,
    ndcg,
    retrieval_metrics,
    scores_to_ranks,
)
from emu_lightning.sequence import END_OF_CHUNK, SequenceBuilder
from emu_lightning.tokenizer import load_tokenizer

SHORT = DialogTemplate(prefix="", image="{image}", turn=" q: {question} a: {answer}.", query=" q: {question} a:")
"""A short template: the tiny model has 256 positions."""


# ------------------------------------------------------------------------------------------------------- metrics


def test_scores_to_ranks_by_hand_with_ties():
    # higher is better; the two 0.5 tie and rank in option order
    assert scores_to_ranks(torch.tensor([0.1, 0.5, 0.5, -1.0])).tolist() == [3, 1, 2, 4]
    batch = torch.tensor([[0.0, 2.0, 1.0], [5.0, 5.0, 5.0]])
    assert scores_to_ranks(batch).tolist() == [[3, 1, 2], [1, 2, 3]]
    with pytest.raises(ValueError, match="NaN"):
        scores_to_ranks(torch.tensor([0.0, math.nan]))


def test_retrieval_metrics_by_hand():
    m = retrieval_metrics([1, 3, 7, 12])
    assert m["r@1"] == 0.25 and m["r@5"] == 0.5 and m["r@10"] == 0.75
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7 + 1 / 12) / 4)
    assert m["mean_rank"] == pytest.approx(23 / 4)


def test_ndcg_by_hand():
    relevance = [0.0, 1.0, 0.5, 0.0, 0.5]  # k = 3 relevant options
    ranks = [1, 2, 5, 3, 4]  # ranked order: options 0, 1, 3, 4, 2 -> the top 3 have relevance 0, 1, 0
    dcg = 0 / math.log2(2) + 1 / math.log2(3) + 0 / math.log2(4)
    ideal = 1 / math.log2(2) + 0.5 / math.log2(3) + 0.5 / math.log2(4)
    assert ndcg(ranks, relevance) == pytest.approx(dcg / ideal)  # 0.4030...
    assert ndcg(ranks, relevance) == pytest.approx(0.40303, abs=1e-5)
    # options 1, 0, 2 first: relevance 1, 0, 0.5
    assert ndcg([2, 1, 3, 5, 4], relevance) == pytest.approx((1 + 0.5 / math.log2(4)) / ideal)
    assert ndcg([5, 1, 3, 4, 2], relevance) == pytest.approx(1.0)  # the ideal order
    assert ndcg([4, 1, 2, 5, 3], relevance) == pytest.approx(1.0)  # options 2 and 4 tie: either order is ideal
    assert math.isnan(ndcg([1, 2], [0.0, 0.0]))


def test_metrics_from_records_skips_and_ndcg():
    records = [
        {"gt_rank": 1, "ndcg": 0.5},
        {"gt_rank": 4, "ndcg": None},
        {"gt_rank": None, "skipped": "image 'x' does not load"},
        {"gt_rank": 20, "ndcg": 1.0},
        {"gt_rank": 2, "ndcg": math.nan},  # no relevant option: no NDCG
    ]
    m = metrics_from_records(records)
    assert m["num_ranked"] == 4 and m["num_ndcg"] == 2 and m["ndcg"] == pytest.approx(0.75)
    assert m["r@1"] == 0.25 and m["r@5"] == 0.75 and m["mean_rank"] == pytest.approx(27 / 4)
    assert metrics_from_records([{"gt_rank": 3, "ndcg": None}])["ndcg"] is None


def test_chance_metrics_are_the_mean_over_every_ranking():
    """The chance levels are exact: the mean of each metric over all 24 rankings of four options equals them."""
    import itertools

    dense = VisDialRound(1, Path("x.jpg"), "", 1, (), "q", ("a", "b", "c", "d"), 2, (1.0, 0.5, 0.0, 0.0))
    plain = VisDialRound(1, Path("x.jpg"), "", 2, (), "q", ("a", "b", "c", "d", "e"), 0)
    chance = chance_metrics([dense, plain])
    perms = list(itertools.permutations(range(1, 5)))
    assert chance["ndcg"] == pytest.approx(sum(ndcg(list(p), dense.relevance) for p in perms) / len(perms))
    assert chance["mrr"] == pytest.approx(
        ((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4 + (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5) / 2
    )
    assert chance["r@1"] == pytest.approx((1 / 4 + 1 / 5) / 2) and chance["r@5"] == pytest.approx((1 + 1) / 2)
    assert chance["mean_rank"] == pytest.approx((2.5 + 3) / 2)
    hundred = chance_metrics([VisDialRound(1, Path("x"), "", 1, (), "q", tuple(map(str, range(100))), 0)])
    assert hundred == pytest.approx({"r@1": 0.01, "r@5": 0.05, "r@10": 0.1, "mrr": 0.05187, "mean_rank": 50.5,
                                     "ndcg": None}, abs=1e-5)  # fmt: skip


def test_option_score_reductions():
    s = OptionScores(torch.tensor([-2.0, -3.0]), torch.tensor([1, 3]), prompt_length=5)
    assert s.scores("sum").tolist() == [-2.0, -3.0]
    assert s.scores("mean").tolist() == [-2.0, -1.0]
    assert s.scores("sequence_mean").tolist() == pytest.approx([-2 / 5, -3 / 7])  # over P + L - 1 positions
    with pytest.raises(ValueError, match="reduction"):
        s.scores("max")


# --------------------------------------------------------------------------------------------------- prompts


def _round(history=(("is it red", "yes"),), options=("yes", "no", "a big red circle")) -> VisDialRound:
    return VisDialRound(7, Path("x.jpg"), "a red circle", len(history) + 1, tuple(history), "is it big",
                        tuple(options), 0)  # fmt: skip


def test_released_emu_i_prompt():
    image = torch.zeros(3, 16, 16)
    items = dialog_prompt(_round(history=(("q1", "a1"), ("q2", "a2"))), image)
    assert items == [EMU_I_SYSTEM, " [USER]:", image, END_OF_CHUNK, " [USER]: q1? [ASSISTANT]: a1.", END_OF_CHUNK,
                     " [USER]: q2? [ASSISTANT]: a2.", END_OF_CHUNK, " [USER]: is it big? [ASSISTANT]:"]  # fmt: skip
    first = dialog_prompt(_round(history=()), image)  # round 1: no history, and no caption in the released prompt
    assert first[-1] == " [USER]: is it big? [ASSISTANT]:" and len(first) == 5


def test_emu_i_prompt_and_options_tokenize_as_the_released_strings(tmp_path):
    """With LLaMA's tokenizer (the fixture of test_released_tokens.py), the prompt's ids are those of the released
    prompt string (mm_eval/datasets/visdial.py, 32 image slots) and each option's those of the bare option."""
    from test_released_tokens import FIXTURE, write_tokenizer

    tok = load_tokenizer(write_tokenizer(tmp_path / "llama", json.loads(FIXTURE.read_text()), "legacy"), instruct=True)
    r = _round(history=(("is the photo in color", "yes"), ("how many people are there", "two")))
    ours = SequenceBuilder(tok, num_queries=32, max_length=4096, add_eos=False).encode(
        dialog_prompt(r, torch.zeros(3, 4, 4))
    )
    placeholder = "[IMG]" + "<image>" * 32 + "[/IMG]"
    released = EMU_I_SYSTEM + f" [USER]: {placeholder}</s>"
    released += "".join(f" [USER]: {q}? [ASSISTANT]: {a}.</s>" for q, a in r.history)
    released += f" [USER]: {r.question}? [ASSISTANT]:"
    assert ours.ids == tok(released)["input_ids"]
    option = DialogTemplate().option.format(option="a big red circle")
    assert (
        tok(option, add_special_tokens=False)["input_ids"]
        == tok("a big red circle", add_special_tokens=False)["input_ids"]
    )


# --------------------------------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def model():
    return make_model()


OPTIONS = ("yes", "no", "a big red circle", "no, it is small", "maybe", "yes", "the circle is on the left", "two")


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_cached_scores_equal_naive(model, chunk):
    torch.manual_seed(0)
    prompt = dialog_prompt(_round(), torch.rand(3, 16, 16), SHORT)
    scorer = OptionScorer(model, option_batch_size=chunk)
    cached, naive = scorer.score(prompt, OPTIONS), scorer.score_naive(prompt, OPTIONS)
    assert cached.num_tokens.tolist() == naive.num_tokens.tolist() and max(cached.num_tokens) > 3
    torch.testing.assert_close(cached.log_likelihood, naive.log_likelihood, atol=1e-4, rtol=0)
    for reduction in ("sum", "mean", "sequence_mean"):
        torch.testing.assert_close(cached.scores(reduction), naive.scores(reduction), atol=1e-4, rtol=0)
    assert cached.log_likelihood[0] == pytest.approx(float(cached.log_likelihood[5]), abs=1e-5)  # "yes" twice
    assert (cached.log_likelihood < 0).all()


def test_score_options_is_the_option_scorer(model):
    """EmuModel.score_options, the public entry point: the OptionScorer's scores by each reduction (options after a
    space, the prompt's KV cache shared), on the CPU, with the model's training mode left as it was."""
    torch.manual_seed(0)
    prompt = dialog_prompt(_round(), torch.rand(3, 16, 16), SHORT)
    expected = OptionScorer(model).score(prompt, OPTIONS)
    model.train()
    for reduction in ("sum", "mean", "sequence_mean"):
        scores = model.score_options(prompt, OPTIONS, option_batch_size=3, reduction=reduction)
        assert scores.shape == (len(OPTIONS),) and scores.device.type == "cpu"
        torch.testing.assert_close(scores, expected.scores(reduction), atol=1e-5, rtol=0)
    assert model.training
    torch.testing.assert_close(model.score_options(prompt, OPTIONS), expected.scores("sequence_mean"), atol=0, rtol=0)
    with pytest.raises(ValueError, match="reduction 'max'"):
        model.score_options(prompt, OPTIONS, reduction="max")


def test_naive_scores_match_the_whole_sequence(model):
    """The reference itself: the option's log-probabilities read off one forward of prompt + option token ids."""
    image = torch.rand(3, 16, 16)
    prompt = dialog_prompt(_round(), image, SHORT)
    scorer = OptionScorer(model)
    ids, images = scorer.encode(prompt)
    naive = scorer.score_naive(prompt, OPTIONS[:3])
    for k, option in enumerate(scorer.option_ids(OPTIONS[:3])):
        full = torch.cat([ids, torch.tensor([option])], dim=1)
        with torch.no_grad():
            logits = model.llm(model.embed(full, images), torch.ones_like(full)).logits[0]
        logprobs = logits[ids.shape[1] - 1 : -1].log_softmax(-1)
        expected = logprobs.gather(-1, torch.tensor(option)[:, None]).sum()
        assert float(naive.log_likelihood[k]) == pytest.approx(float(expected), abs=1e-4)


def test_expand_cache_leaves_the_prompt_cache_alone(model):
    embeds = model.llm.embed(torch.tensor([[1, 2, 3]]))
    cache = model.llm(embeds, torch.ones(1, 3, dtype=torch.long), use_cache=True).past_key_values
    before = [layer.keys.clone() for layer in cache.layers]
    wide = expand_cache(cache, 4)
    assert wide.get_seq_length() == 3 and wide.layers[0].keys.shape[0] == 4
    model.llm(model.llm.embed(torch.ones(4, 2, dtype=torch.long)), torch.ones(4, 5, dtype=torch.long),
              past_key_values=wide)  # fmt: skip
    assert wide.get_seq_length() == 5 and cache.get_seq_length() == 3
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, cache.layers))


def test_too_long_prompt_is_an_error(model):
    long = _round(history=[("is it red " * 10, "yes " * 10)] * 20)
    with pytest.raises(ValueError, match="positions"):
        OptionScorer(model).score(dialog_prompt(long, torch.rand(3, 16, 16), SHORT), OPTIONS)


# ---------------------------------------------------------------------------------------------------- reader


def _write_visdial(root: Path, images: tuple[int, ...] = (11, 12), dense: list | None = None) -> dict[str, Path]:
    """Two dialogs of three rounds, four options each, in the released format; images for ``images`` only."""
    questions = ["is it red", "is it big", "how many", "where is it"]
    answers = ["yes", "no", "two", "on the left", "maybe"]
    rounds = lambda a: [  # noqa: E731
        {"question": 0, "answer": a, "answer_options": [1, 0, 2, 4], "gt_index": [1, 0, 2, 4].index(a)},
        {"question": 1, "answer": 1, "answer_options": [1, 0, 3, 4], "gt_index": 0},
        {"question": 2, "answer": 2, "answer_options": [4, 3, 1, 2], "gt_index": 3},
    ]
    data = {"version": "1.0", "split": "val", "data": {"questions": questions, "answers": answers, "dialogs": [
        {"image_id": 11, "caption": "a red circle", "dialog": rounds(0)},
        {"image_id": 12, "caption": "two squares", "dialog": rounds(1)},
    ]}}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for image_id in images:
        Image.new("RGB", (20, 20), (200, 30, 30)).save(root / "images" / f"VisualDialog_val2018_{image_id:012d}.jpg")
    paths = {"dialogs": root / "visdial_1.0_val.json", "dense": root / "dense.json", "images": root / "images"}
    paths["dialogs"].write_text(json.dumps(data))
    if dense is None:
        dense = [{"image_id": 11, "round_id": 2, "gt_relevance": [1.0, 0.5, 0.0, 0.0]},
                 {"image_id": 12, "round_id": 1, "gt_relevance": [0.0, 1.0, 0.5, 0.0]}]  # fmt: skip
    paths["dense"].write_text(json.dumps(dense))
    return paths


def test_reader_on_the_released_format(tmp_path):
    p = _write_visdial(tmp_path)
    rounds = read_visdial(p["dialogs"], p["images"], p["dense"])
    assert [r.key for r in rounds] == [(11, 1), (11, 2), (11, 3), (12, 1), (12, 2), (12, 3)]
    r = rounds[2]
    assert r.history == (("is it red", "yes"), ("is it big", "no")) and r.question == "how many"
    assert r.options == ("maybe", "on the left", "no", "two") and r.gt_index == 3 and r.answer == "two"
    assert r.caption == "a red circle" and r.image_path == p["images"] / "VisualDialog_val2018_000000000011.jpg"
    assert rounds[3].history == () and rounds[3].answer == "no"
    assert rounds[1].relevance == (1.0, 0.5, 0.0, 0.0) and rounds[3].relevance == (0.0, 1.0, 0.5, 0.0)
    assert rounds[0].relevance is None
    dense = read_visdial(p["dialogs"], p["images"], p["dense"], dense_only=True)
    assert [r.key for r in dense] == [(11, 2), (12, 1)] and dense[0].history == (("is it red", "yes"),)


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_reader_errors_name_the_file_and_entry(tmp_path):
    p = _write_visdial(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_visdial(tmp_path / "nope.json", p["images"])
    with pytest.raises(FileNotFoundError, match="dense annotations file .*missing.json"):
        read_visdial(p["dialogs"], p["images"], tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": {"questions": [')
    with pytest.raises(ValueError, match="bad.json.*not valid json"):
        read_visdial(bad, p["images"])
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="bad.json.*not a VisDial dialogs file"):
        read_visdial(bad, p["images"])

    _edit(p["dialogs"], lambda d: d["data"]["dialogs"][1]["dialog"][2].update(gt_index=4))
    with pytest.raises(ValueError, match=r"dialog 1 \(image 12\) round 3: gt_index 4 is not an index into its 4"):
        read_visdial(p["dialogs"], p["images"])
    p = _write_visdial(tmp_path)
    _edit(p["dialogs"], lambda d: d["data"]["dialogs"][0]["dialog"][1].update(gt_index=1))
    with pytest.raises(ValueError, match="round 2: the option at gt_index 1"):
        read_visdial(p["dialogs"], p["images"])
    p = _write_visdial(tmp_path)
    _edit(p["dialogs"], lambda d: d["data"]["dialogs"][0]["dialog"][0].update(answer_options=[1, 0, 9]))
    with pytest.raises(ValueError, match="round 1: answer_option 9 is not an index into the 5 answers"):
        read_visdial(p["dialogs"], p["images"])
    p = _write_visdial(tmp_path)
    _edit(p["dialogs"], lambda d: d["data"]["dialogs"][0]["dialog"][0].update(question=-1))
    with pytest.raises(ValueError, match="question -1 is not an index into the 4 questions"):
        read_visdial(p["dialogs"], p["images"])

    p = _write_visdial(tmp_path, dense=[{"image_id": 11, "round_id": 4, "gt_relevance": [1, 0, 0, 0]}])
    with pytest.raises(ValueError, match="dense.json.*1 round.*image 11 round 4"):
        read_visdial(p["dialogs"], p["images"], p["dense"])
    p = _write_visdial(tmp_path, dense=[{"image_id": 11, "round_id": 1, "gt_relevance": [1, 0]}])
    with pytest.raises(ValueError, match="image 11 round 1 has 2 relevances for 4 options"):
        read_visdial(p["dialogs"], p["images"], p["dense"])
    p = _write_visdial(tmp_path, dense=[{"image_id": 11, "gt_relevance": [1, 0, 0, 0]}])
    with pytest.raises(ValueError, match="entry 0 lacks a valid image_id, round_id"):
        read_visdial(p["dialogs"], p["images"], p["dense"])


# ------------------------------------------------------------------------------------------------------ task


def test_evaluate_skips_missing_images_and_scores_the_rest(model, tmp_path):
    p = _write_visdial(tmp_path, images=(12,))  # image 11 is missing: its three rounds are skipped
    rounds = read_visdial(p["dialogs"], p["images"], p["dense"])
    seen = []
    with pytest.warns(UserWarning, match="skipping image"):
        out = evaluate_visdial(model, rounds, template=SHORT, option_batch_size=3, keep_scores=True,
                               keep_ranks=True, on_record=seen.append)  # fmt: skip
    assert out["num_rounds"] == 6 and out["skipped_rounds"] == 3 and out["skipped_images"] == 1
    assert seen == out["records"] and out["reduction"] == "sequence_mean"
    skipped, scored = out["records"][:3], out["records"][3:]
    assert all(r["gt_rank"] is None and "does not load" in r["skipped"] for r in skipped)
    for r, source in zip(scored, rounds[3:]):
        assert (r["image_id"], r["round_id"]) == source.key
        assert sorted(r["ranks"]) == [1, 2, 3, 4] and r["ranks"][source.gt_index] == r["gt_rank"]
        assert r["ranks"][r["top_option"]] == 1 and r["top_answer"] == source.options[r["top_option"]]
        assert scores_to_ranks(torch.tensor(r["scores"])).tolist() == r["ranks"]
    assert scored[0]["ndcg"] == pytest.approx(ndcg(scored[0]["ranks"], rounds[3].relevance))
    assert scored[1]["ndcg"] is None
    m = out["metrics"]
    assert m["num_ranked"] == 3 and m["num_ndcg"] == 1 and m["ndcg"] == scored[0]["ndcg"]
    assert m["mean_rank"] == pytest.approx(sum(r["gt_rank"] for r in scored) / 3)
    naive = evaluate_visdial(model, rounds[3:], template=SHORT, naive=True, keep_ranks=True)
    assert [r["ranks"] for r in naive["records"]] == [r["ranks"] for r in scored]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"all 3 rounds failed to load \(1 file"):
        evaluate_visdial(model, rounds[:3], template=SHORT)
