import numpy as np
import pytest
import torch
from scipy import linalg

from emu_lightning.eval import metrics
from emu_lightning.eval.metrics import (
    cached_feature_stats,
    cider,
    cider_score,
    coco30k_prompts,
    feature_stats,
    fid_result,
    frechet_distance,
    frechet_distance_from_stats,
    load_stats,
    make_fid,
    normalize_vqa_answer,
    postprocess_vqa_answer,
    save_stats,
    vqa_accuracy,
)
from emu_lightning.eval.okvqa import okvqa_stem, postprocess_okvqa_answer
from emu_lightning.shapesworld.metrics import shapes_attribute_accuracy, shapes_attribute_accuracy_batch
from emu_lightning.shapesworld.world import ShapesWorld

# ---------------------------------------------------------------------------------------------------------- CIDEr

REFS = {
    1: [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.",
        "Surfer in a black wetsuit riding a wave.",
        "a man is surfing on a big wave",
    ],
    2: [
        "Two dogs playing with a frisbee in the park.",
        "A pair of dogs chase a frisbee on the grass.",
        "Two dogs running on grass after a frisbee.",
        "dogs playing in a grassy field",
        "Two brown dogs play with a red frisbee.",
    ],
    "k3": [
        "A plate of food with broccoli and rice.",
        "A meal of rice, chicken and broccoli on a plate.",
        "Broccoli and rice on a white plate.",
        "a white plate topped with rice and vegetables",
        "Food on a plate: rice, meat, broccoli.",
    ],
    4: [
        "A red double decker bus on a city street.",
        "A bus drives down the street past buildings.",
        "A double-decker bus in London.",
        "Red bus parked on the side of a road.",
        "a large red bus driving down a street",
    ],
}
PREDS = {
    1: "a man riding a wave on a surfboard",
    2: "",  # empty: allowed, scores 0, but counts in the mean
    "k3": "A plate with rice and broccoli.",
    4: "a red bus driving down a city street",
}


def test_cider_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in PREDS.items()})
    expected, per_image = Cider().compute_score(gts, res)

    result = cider_score(PREDS, REFS)
    assert result.score == pytest.approx(100 * expected, rel=1e-12)
    assert result.num_images == 4 and result.num_empty == 1
    assert result.per_image == pytest.approx({k: 100 * s for k, s in zip(gts, per_image)}, rel=1e-12)
    assert result.per_image[2] == 0.0
    assert 0 < result.score < result.per_image[1]
    # The empty prediction counts: the mean is over all four images.
    assert result.score == pytest.approx(sum(result.per_image.values()) / 4)


def test_cider_drops_only_the_java_tokenizer_progress_line(capfd):
    cider_score(PREDS, REFS)
    assert "PTBTokenizer tokenized" not in capfd.readouterr().err
    # anything else the tokenizer prints still reaches stderr (U+FFFD is what untrained models emit)
    cider_score({1: "a man \ufffd riding"}, {1: REFS[1]})
    assert "Untokenizable" in capfd.readouterr().err


def test_cider_float_face_and_subset_changes_idf():
    sub = {k: REFS[k] for k in (1, 4)}
    # Same predictions, fewer images: IDF changes, so the per-image score of image 1 changes too.
    full = cider_score(PREDS, REFS)
    score = cider({k: PREDS[k] for k in sub}, sub)
    assert isinstance(score, float)
    assert score != pytest.approx((full.per_image[1] + full.per_image[4]) / 2)


def test_cider_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="'extra'"):
        cider_score({**PREDS, "extra": "a cat"}, REFS)
    with pytest.raises(ValueError, match="1 image"):
        cider_score({k: v for k, v in PREDS.items() if k != 4}, REFS)
    with pytest.raises(ValueError, match="non-empty list"):
        cider_score({1: "a cat"}, {1: []})
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="default-jre-headless"):
        cider_score(PREDS, REFS)


def test_cider_without_java_names_the_problem_and_the_fix(monkeypatch, tmp_path):
    # No `java` on PATH (an empty folder is the whole PATH): a clear error before pycocoevalcap's subprocess call.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"CIDEr scoring needs Java") as info:
        cider_score(PREDS, REFS)
    message = str(info.value)
    assert "`java`" in message and "not on PATH" in message
    assert "openjdk-17-jre-headless" in message
    with pytest.raises(RuntimeError, match="CIDEr scoring needs Java"):
        cider(PREDS, REFS)


# ------------------------------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    "text, expected",
    [
        ("yes.", "yes"),  # period not followed by a digit: removed
        ("yes!", "yes"),  # "!" touches no space: replaced by a space, then whitespace is collapsed
        ("Yes !", "yes"),  # " !" touches a space: removed
        ("1,000", "1000"),  # digit,comma,digit: every punctuation mark is removed, not spaced
        ("red,blue", "red blue"),  # no digit,comma,digit pattern: the comma becomes a space
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("Two", "2"),
        ("none", "0"),
        ("the A dog", "dog"),
        ("dont", "don't"),
        ("Im", "im"),  # the official table's capitalised keys never match lower-cased text
        ("  a\tdog\n", "dog"),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_vqa_accuracy_hand_computed():
    # Ten annotators all say "2"; "two" normalises to "2": each leave-one-out subset has 9 matches -> 1.
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0  # article dropped from the prediction
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes!", ["yes"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    # 2 of 10 agree: leaving out one of the 2 leaves 1 match (1/3), leaving out one of the 8 leaves 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    # 3 agree: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    assert vqa_accuracy("cat", ["dog"] * 7 + ["cat"] * 3) == pytest.approx(0.9)
    # 4 agree: every subset keeps >= 3 matches -> 1.
    assert vqa_accuracy("cat", ["cat", "dog"] * 4 + ["dog"] * 2) == 1.0
    # 1 agrees: (1 * 0 + 9 * 1/3) / 10 = 0.3; none agrees: 0.
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("bird", ["cat"] * 2 + ["dog"] * 8) == 0.0
    # Duplicates are distinct annotators; other answer counts use the same leave-one-out: (2 * 1/3 + 1 * 2/3) / 3.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)


def test_vqa_accuracy_follows_official_reference_handling():
    # Mixed references get only the punctuation step (no lower-casing, no number words), as in vqaEval.py:
    # "Cat!" -> "Cat " never equals the normalised prediction "cat", "cat?" -> "cat " neither.
    assert vqa_accuracy("cat", ["Cat!"] * 5 + ["cat?"] * 5) == 0.0
    # Identical references get no processing at all: "two" (never normalised) does not match "2".
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    # Mixed references do get punctuation handling: "1,000" -> "1000" matches (3 such + 7 others -> 0.9).
    assert vqa_accuracy("1,000", ["1,000"] * 3 + ["many"] * 7) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "yes"),
        ("two. There are two dogs.", "two"),
        ("It is a red circle, I think", "red circle"),
        ("it's the blue one\nsecond line", "blue one"),
        ('red" and more', "red"),
        ("An apple", "apple"),
        ("theatre", "theatre"),  # "the" only as a whole word
        ("   green  ", "green"),
    ],
)
def test_postprocess_vqa_answer(text, expected):
    assert postprocess_vqa_answer(text) == expected


# VizWiz val VizWiz_val_00000000.jpg and VizWiz_val_00000001.jpg (as OpenFlamingo's conversion of val.json quotes them)
VIZWIZ_UNANSWERABLE = ["unanswerable"] * 8 + ["cannot repair this computer automatically", "blank screen"]
VIZWIZ_MEDICINE = ["no", "unanswerable", "night time", "unanswerable", "night time", "night time cold medicine",
                   "night time", "night time", "night time", "night time medicine"]  # fmt: skip


def test_vqa_accuracy_scores_unanswerable_as_vizwiz_does():
    """VizWiz's official evaluation scores "unanswerable" like any answer, against the 10 annotators' answers."""
    assert vqa_accuracy("unanswerable", VIZWIZ_UNANSWERABLE) == 1.0  # 7 or 8 matches among the other 9
    assert vqa_accuracy("Unanswerable.", VIZWIZ_UNANSWERABLE) == 1.0  # normalised like any prediction
    assert vqa_accuracy("blank screen", VIZWIZ_UNANSWERABLE) == pytest.approx(0.3)  # 9 x 1/3, and 0 when left out
    # 2 of 10 said unanswerable: left out, 1 match among the other 9 (1/3), else 2 (2/3): (2/3 + 16/3) / 10
    assert vqa_accuracy("unanswerable", VIZWIZ_MEDICINE) == pytest.approx(0.6)
    assert vqa_accuracy("night time", VIZWIZ_MEDICINE) == 1.0  # 5 say it
    assert vqa_accuracy("unanswerable", ["white"] * 10) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("riding", "ride"),  # the dataset's own table
        ("clothes", "cloth"),
        ("men's", "men"),
        ("tennis", "tennis"),
        ("running", "run"),  # -ing: its verb
        ("making", "make"),
        ("skiing", "ski"),
        ("surfing", "surf"),
        ("dancing", "dance"),
        ("something", "something"),
        ("thing", "thing"),
        ("dogs", "dog"),  # plural nouns: singular
        ("boxes", "box"),
        ("berries", "berry"),
        ("knives", "knife"),
        ("people", "person"),
        ("buses", "bus"),
        ("potatoes", "potato"),
        ("yes", "yes"),  # not plurals
        ("glass", "glass"),
        ("bus", "bus"),
        ("sheep", "sheep"),
        ("two dogs playing", "two dog play"),
        ("3", "3"),
    ],
)
def test_okvqa_stem(text, expected):
    assert okvqa_stem(text) == expected


def test_okvqa_answers_are_stemmed_before_scoring():
    """OK-VQA's references are stemmed ("racing" is annotated "race"): so is the prediction, after Emu's short
    answer."""
    references = ["race"] * 6 + ["motocross"] * 4
    assert postprocess_okvqa_answer("Racing. It is a race bike") == "race"
    assert vqa_accuracy(postprocess_okvqa_answer("racing"), references) == 1.0
    assert vqa_accuracy(postprocess_vqa_answer("racing"), references) == 0.0  # VQAv2's post-processing misses it
    assert postprocess_okvqa_answer("the dogs") == "dog"


# ---------------------------------------------------------------------------------------------- Frechet distances


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    # Independent of sqrtm: Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2.
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr = np.sqrt(linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_frechet_distance_matches_reference():
    g = np.random.default_rng(0)
    a = g.normal(size=(300, 8)) @ g.normal(size=(8, 8))
    b = g.normal(size=(200, 8)) * 1.5 + 0.3
    assert abs(frechet_distance(torch.from_numpy(a), torch.from_numpy(a))) < 1e-6
    assert frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(
        _reference_fd(a.astype(np.float32), b), rel=1e-6
    )
    assert frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-6)
    shift = np.arange(8) / 4.0
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(a[:1], b)


def test_stats_round_trip_and_cache(tmp_path):
    g = np.random.default_rng(1)
    feats = g.normal(size=(50, 4))
    mu, sigma = feature_stats(feats)
    path = save_stats(tmp_path / "ref", mu, sigma, {"extractor": "x", "n": 50})
    mu2, sigma2, meta = load_stats(path)
    assert path.suffix == ".npz" and meta == {"extractor": "x", "n": 50}
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert frechet_distance_from_stats(mu, sigma, mu2, sigma2) == pytest.approx(0, abs=1e-9)

    calls = []

    def compute():
        calls.append(1)
        return torch.from_numpy(feats)

    first = cached_feature_stats(tmp_path, "real-x", compute, {"extractor": "x"})
    second = cached_feature_stats(tmp_path, "real-x", compute, {"extractor": "x"})
    assert len(calls) == 1
    np.testing.assert_allclose(first[1], second[1])
    assert load_stats(tmp_path / "real-x.npz")[2]["num_samples"] == 50
    with pytest.raises(ValueError, match="computed with"):
        cached_feature_stats(tmp_path, "real-x", compute, {"extractor": "y"})
    with pytest.raises(ValueError, match="letters"):
        cached_feature_stats(tmp_path, "../x", compute)


def _renders(split: str, n: int, size: int = 32, grid: int = 2):
    world = ShapesWorld(image_size=size, grid=grid, max_shapes=grid * grid)
    return torch.stack([world.image(split, i) for i in range(n)]), [world.scene(split, i) for i in range(n)]


def test_offline_fid_on_shapes_world():
    real, _ = _renders("val", 120)
    other, _ = _renders("test", 120)
    fid = make_fid()
    assert fid.inception.num_features == 112
    fid.update(real, real=True)
    fid.update(real, real=False)
    same = fid_result(fid)
    assert same["metric"] == "FID[shapes-colour-hist-v1]" and "Inception" not in same["metric"]
    assert abs(same["value"]) < 1e-6 and same["num_real"] == same["num_fake"] == 120

    fid.reset()  # keeps the real statistics
    fid.update(other, real=False)
    held_out = fid_result(fid)
    assert held_out["num_real"] == 120
    # torchmetrics' eigenvalue route agrees with the scipy sqrtm route on the same features.
    feats = fid.inception
    assert held_out["value"] == pytest.approx(frechet_distance(feats(real), feats(other)), rel=1e-5)

    fid.reset()
    fid.update(torch.rand(120, 3, 32, 32, generator=torch.Generator().manual_seed(0)), real=False)
    noise = fid_result(fid)
    assert noise["value"] > 1.0 and noise["value"] > 20 * held_out["value"]


def test_make_fid_extractors_and_errors(tmp_path):
    class Mean(torch.nn.Module):
        name = "mean-colour"
        num_features = 3

        def forward(self, x):
            return x.mean(dim=(2, 3))

    fid = make_fid(Mean())
    g = torch.Generator().manual_seed(0)
    fid.update(torch.rand(8, 3, 8, 8, generator=g), real=True)
    fid.update(torch.rand(8, 3, 8, 8, generator=g), real=False)
    assert fid_result(fid)["metric"] == "FID[mean-colour]"
    with pytest.raises(ValueError, match="unknown extractor"):
        make_fid("inception")
    with pytest.raises(FileNotFoundError):
        make_fid(inception_path=tmp_path / "missing.pth")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
        weights.write_bytes(b"")
        with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
            make_fid(inception_path=weights)


def test_coco30k_prompts():
    caps = {i: [f"image {i} caption {j}" for j in range(5)] for i in range(100, 160)}
    a = coco30k_prompts(caps, n=20, seed=3)
    assert a == coco30k_prompts(dict(reversed(list(caps.items()))), n=20, seed=3)  # not dict-order dependent
    assert a != coco30k_prompts(caps, n=20, seed=4)
    ids = [i for i, _ in a]
    assert len(set(ids)) == 20 and all(c in caps[i] for i, c in a)
    assert len({c.split()[-1] for _, c in a}) > 1  # captions are drawn, not always the first
    assert len(coco30k_prompts(caps, n=60)) == 60
    with pytest.raises(ValueError, match="n=61"):
        coco30k_prompts(caps, n=61)


# ------------------------------------------------------------------------------------- ShapesWorld attributes


@pytest.mark.parametrize("size, grid", [(32, 2), (64, 3)])
def test_attribute_accuracy_on_clean_renders(size, grid):
    images, scenes = _renders("val", 60, size, grid)
    result = shapes_attribute_accuracy_batch(images, scenes)
    assert result["colour_accuracy"] == result["shape_accuracy"] == result["size_accuracy"] == 1.0
    assert result["num_shape_undecided"] == 0 and result["scene_accuracy"] == 1.0
    one = shapes_attribute_accuracy(images[0], scenes[0])
    assert one["shapes"][0]["predicted_colour"] == scenes[0].shapes[0].colour


def test_attribute_accuracy_near_chance_on_noise_and_wrong_scenes():
    images, scenes = _renders("val", 60)
    noise = torch.rand(60, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    on_noise = shapes_attribute_accuracy_batch(noise, scenes)
    assert on_noise["colour_accuracy"] < 0.35  # chance is 1/6
    assert on_noise["shape_accuracy"] < 0.6  # chance is 1/3
    wrong = shapes_attribute_accuracy_batch(images, scenes[1:] + scenes[:1])
    assert wrong["colour_accuracy"] < 0.35 and wrong["scene_accuracy"] < 0.2
    blank = shapes_attribute_accuracy(torch.full((3, 32, 32), 16 / 255), scenes[0])
    assert blank["colour_accuracy"] == 0.0 and blank["shape_accuracy"] is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shapes_attribute_accuracy(images[0] * 2 - 1, scenes[0])
    with pytest.raises(ValueError, match="scenes"):
        shapes_attribute_accuracy_batch(images, scenes[:3])
