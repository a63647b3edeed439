"""WUPS for NExT-QA open-ended against hand computations on a tiny generated WordNet 3.0 database.

Noun tree (nltk depth = edges from the root, ``entity`` has max_depth 0)::

    entity(0) > physical_entity(1) > object(2) > animal(3) > dog/pooch(4) > puppy(5)
                                               > animal(3) > cat(4)
                                    object(2) > artifact(3) > car(4)

plus a verb synset for ``dog`` ("chase") so that "noun synsets first" is exercised. nltk's Wu-Palmer is
``2*D / (d1 + d2)`` with ``D = max_depth(lcs) + 1`` and ``di = D + shortest_distance(synset_i, lcs)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from emu_lightning.eval.wups import (
    REQUIRED_WORDNET_FILES,
    WORDNET30_LEXNAMES,
    WORDNET_ENV_VAR,
    WordNetNotFoundError,
    load_wordnet,
    normalize_answer,
    wup,
    wups,
    wups_scores,
)
from emu_lightning.shapesworld.wordnet import write_wordnet_database

# key: (lemmas, hypernym keys, gloss)
_NOUNS: dict[str, tuple[list[str], list[str], str]] = {
    "entity": (["entity"], [], "that which is perceived to exist"),
    "physical_entity": (["physical_entity"], ["entity"], "an entity that has physical existence"),
    "object": (["object"], ["physical_entity"], "a tangible and visible entity"),
    "animal": (["animal"], ["object"], "a living organism"),
    "dog": (["dog", "pooch"], ["animal"], "a domesticated canid"),
    "puppy": (["puppy"], ["dog"], "a young dog"),
    "cat": (["cat"], ["animal"], "a small feline"),
    "artifact": (["artifact"], ["object"], "a man-made object"),
    "car": (["car"], ["artifact"], "a motor vehicle"),
}
_VERBS: dict[str, tuple[list[str], list[str], str]] = {
    "chase": (["dog"], [], "go after with the intent to catch"),
}


def write_tiny_wordnet(root: Path) -> Path:
    return write_wordnet_database(root, _NOUNS, _VERBS)


@pytest.fixture(scope="module")
def wn_dir(tmp_path_factory) -> Path:
    return write_tiny_wordnet(tmp_path_factory.mktemp("wordnet") / "dict")


@pytest.fixture(scope="module")
def wn(wn_dir):
    return load_wordnet(wn_dir)


def test_tiny_wordnet_loads_with_expected_depths(wn):
    dog = wn.synsets("dog")[0]
    assert dog.name() == "dog.n.01" and dog.pos() == "n"
    assert [s.pos() for s in wn.synsets("dog")] == ["n", "v"]  # nouns first
    assert wn.synsets("entity")[0].max_depth() == 0
    assert dog.max_depth() == 4
    assert wn.synsets("puppy")[0].max_depth() == 5
    assert wn.synsets("pooch")[0] == dog
    assert wn.synsets("dogs")[0] == dog  # morphy via the noun detachment rules


@pytest.mark.parametrize(
    ("w1", "w2", "expected"),
    [
        ("dog", "cat", 8 / 10),  # lcs animal: D=4, d1=d2=5 -> 2*4/(5+5)
        ("puppy", "dog", 10 / 11),  # lcs dog: D=5, d1=6, d2=5
        ("dog", "car", 6 / 10),  # lcs object: D=3, d=5,5
        ("dog", "animal", 8 / 9),  # lcs animal: D=4, d1=5, d2=4
        ("cat", "car", 6 / 10),
        ("pooch", "dog", 1.0),  # synonyms: same synset
        ("entity", "entity", 1.0),
        ("dog", "xyzzy", 0.0),  # unknown word
    ],
)
def test_wu_palmer_by_hand(wn, w1, w2, expected):
    assert wup(w1, w2, 0.0, wn) == pytest.approx(expected)
    assert wup(w2, w1, 0.0, wn) == pytest.approx(expected)
    s1, s2 = wn.synsets(w1), wn.synsets(w2)
    if s1 and s2:
        assert s1[0].wup_similarity(s2[0]) == pytest.approx(expected)


def test_threshold_downweights_below_09(wn):
    assert wup("dog", "cat", 0.9, wn) == pytest.approx(0.08)
    assert wup("dog", "animal", 0.9, wn) == pytest.approx(0.0889, abs=1e-4)
    assert wup("puppy", "dog", 0.9, wn) == pytest.approx(10 / 11)  # 0.909 >= 0.9 stays
    assert wup("pooch", "dog", 0.9, wn) == 1.0


def test_exact_match_and_synonyms(wn):
    for t in (0.0, 0.9):
        assert wups("dog", "dog", t, wn) == 1.0
        assert wups("xyzzy", "xyzzy", t, wn) == 1.0  # identical strings short-circuit before WordNet
        assert wups("pooch", "dog", t, wn) == 1.0


def test_related_and_unrelated(wn):
    assert wups("cat", "dog", 0.0, wn) == pytest.approx(0.8)
    assert wups("cat", "dog", 0.9, wn) == pytest.approx(0.08)
    assert wups("car", "dog", 0.0, wn) == pytest.approx(0.6)
    assert wups("car", "dog", 0.9, wn) == pytest.approx(0.06)
    assert wups("xyzzy", "dog", 0.0, wn) == 0.0
    assert wups("", "dog", 0.0, wn) == 0.0


def test_multi_word_answers(wn):
    # pred->ref: dog->cat 0.8, car->cat 0.6 => 0.48; ref->pred: cat->max(0.8, 0.6) = 0.8; min = 0.48
    assert wups("dog car", "cat", 0.0, wn) == pytest.approx(0.48)
    assert wups("dog car", "cat", 0.9, wn) == pytest.approx(0.08 * 0.06)
    assert wups("cat", "dog car", 0.0, wn) == pytest.approx(0.48)
    # NExT-OE skips words whose best match is 0 (unknown words are not penalised)
    assert wups("dog xyzzy", "dog", 0.0, wn) == 1.0
    # puppy->dog 10/11, cat->cat 1 ; dog->puppy 10/11, cat->cat 1
    assert wups("puppy cat", "dog cat", 0.9, wn) == pytest.approx(10 / 11)


def test_normalize_answer_lemmatizes_and_drops_stopwords(wn):
    assert normalize_answer("The Dogs", wn) == "dog"
    assert normalize_answer("on the car", wn) == "on car"  # spatial words are kept by the NExT-QA list
    assert normalize_answer("The Dogs") == "dogs"  # no WordNet -> no lemmatization


def test_wups_scores_means_and_per_sample(wn):
    res = wups_scores(
        predictions=["the dogs", "cat", "car", "two"],
        references=["dog", "dog", ["cat", "car"], "three"],
        wordnet=wn,
        question_types=["CW", "CW", "TN", "DC"],
    )
    assert res.per_sample_0 == pytest.approx([1.0, 0.8, 1.0, 0.0])
    assert res.per_sample_9 == pytest.approx([1.0, 0.08, 1.0, 0.0])
    assert res.wups_0 == pytest.approx(70.0)
    assert res.wups_9 == pytest.approx(52.0)
    assert res.as_dict() == {"wups@0.0": res.wups_0, "wups@0.9": res.wups_9}
    dc = wups_scores(["two"], ["two"], wn, question_types=["DC"])
    assert dc.wups_0 == dc.wups_9 == 100.0
    with pytest.raises(ValueError):
        wups_scores(["a"], [], wn)


def test_missing_folder_gives_install_instructions(tmp_path, monkeypatch):
    with pytest.raises(WordNetNotFoundError, match="apt-get install wordnet-base") as exc:
        load_wordnet(tmp_path / "nope")
    assert WORDNET_ENV_VAR in str(exc.value)
    monkeypatch.setenv(WORDNET_ENV_VAR, str(tmp_path / "also-nope"))
    with pytest.raises(WordNetNotFoundError, match="also-nope"):
        load_wordnet()


def test_missing_file_is_named(tmp_path, monkeypatch):
    root = write_tiny_wordnet(tmp_path / "dict")
    data_noun = (root / "data.noun").read_bytes()
    (root / "data.noun").unlink()
    with pytest.raises(WordNetNotFoundError, match="data.noun"):
        load_wordnet(root)
    (root / "data.noun").write_bytes(data_noun)
    monkeypatch.setenv(WORDNET_ENV_VAR, str(root))
    assert load_wordnet().synsets("dog")[0].name() == "dog.n.01"  # env var is honoured
    assert "data.noun" in REQUIRED_WORDNET_FILES


def test_a_folder_without_lexnames_loads_as_debians_wordnet_base(tmp_path):
    """Debian's wordnet-base installs every database file but lexnames (only its manual page): WordNet 3.0's fixed
    table stands in for it."""
    root = write_tiny_wordnet(tmp_path / "dict")
    (root / "lexnames").unlink()
    wn = load_wordnet(root)
    assert wn.synsets("dog")[0].lexname() == "noun.Tops"  # lexicographer file 03 of WordNet 3.0's table
    assert wup("dog", "cat", 0.0, wn) == pytest.approx(0.8)
    lines = WORDNET30_LEXNAMES.splitlines()
    assert len(lines) == 45 and lines[29] == "29\tverb.body\t2" and lines[44] == "44\tadj.ppl\t3"


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="system WordNet 3.0 not installed")
def test_real_wordnet():
    wn = load_wordnet("/usr/share/wordnet")
    assert wup("dog", "cat", 0.0, wn) == pytest.approx(0.8571, abs=1e-3)
    assert wups("dog", "dog", 0.9, wn) == 1.0
    res = wups_scores(["a dog"], ["the dog"], wn)
    assert res.wups_0 == res.wups_9 == 100.0
