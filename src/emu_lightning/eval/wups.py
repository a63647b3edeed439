"""WUPS (Wu-Palmer similarity set score) for NExT-QA open-ended, reading WordNet 3.0 from a local folder.

Flamingo reports NExT-QA open-ended as WUPS@0.0 / WUPS@0.9 (Malinowski & Fritz, 2014). This module follows the
NExT-QA authors' evaluation code, ``doc-doc/NExT-OE`` (``metrics.py`` at commit 2744b57a908f,
``eval_oe.py`` at commit 14567165db64):

* ``metrics.py`` lines 11-37 ``wup(word1, word2, alpha)``: identical strings score 1.0 (before any WordNet lookup,
  so unknown-but-identical tokens also score 1.0); a word without synsets scores 0.0; otherwise only the FIRST synset
  of each word is compared (``wordnet.synsets(word)[0]``; nltk orders synsets noun, verb, adjective, adverb, so noun
  senses come first), with nltk's ``Synset.wup_similarity`` (defaults: ``simulate_root=True``); ``None`` -> 0.0; a
  similarity below the threshold ``alpha`` is multiplied by 0.1 (an exact 1.0 never is).
* ``metrics.py`` lines 40-61 ``wups(words1, words2, alpha)``: product over ``words1`` of the max similarity against
  ``words2``; words whose max is 0 are SKIPPED (not multiplied in); if every word scored 0 the result is 0.0.
* ``metrics.py`` lines 64-76 ``get_wups(pred, truth, alpha)``: tokenize both, ``min`` of the two directions.
* ``eval_oe.py`` lines 6-12 and 53-69: both answers go through ``remove_stop`` (pywsd ``lemmatize_sentence`` then
  drop stopwords from NExT-QA's tailored ``stopwords.txt``); question types ``DB``/``DC`` (descriptive binary /
  counting) are scored by exact match of the normalized strings instead of WUPS; with an additional reference answer
  the score is the max over references. Reported numbers are means x100.

Differences (all because nothing may be downloaded and pywsd is not a dependency):

* Tokenization uses ``nltk.tokenize.NLTKWordTokenizer`` (the word tokenizer inside ``nltk.word_tokenize``) without
  the punkt sentence splitter, which needs downloaded data; for short answers this is the same.
* Lemmatization: pywsd POS-tags the sentence (needs the downloaded perceptron tagger) and lemmatizes with that POS,
  falling back to the Porter stem. Here each lower-cased token is replaced by ``wordnet.morphy(token)`` (first base
  form found, nouns first) when WordNet knows it, else kept as is. Rare answers may lemmatize differently.
* ``stopwords.txt`` is not in the NExT-OE repository snapshot we could read; :data:`NEXTQA_STOPWORDS` is the list a
  copy of NExT-OE's ``eval_oe.py`` inlines (nltk's English list minus spatial/temporal/negation words such as
  ``before``, ``after``, ``in``, ``on``, ``up``, ``down``, ``no``, ``not``). Membership is exact-word (that copy kept
  it as one string, making ``in`` a substring test; we do not reproduce that bug).

WordNet is read with ``nltk.corpus.reader.wordnet.WordNetCorpusReader(root, None)`` (a subclass that skips nltk
3.10's OMW sense-key mapping, which would need nltk_data's own wordnet package; see :class:`_LocalWordNetReader`)
from a folder of WordNet 3.0 database files; nltk's reader opens ``lexnames``, ``index.{noun,verb,adj,adv}``,
``data.{noun,verb,adj,adv}`` (``data.adj`` at construction, the others lazily) and ``{noun,verb,adj,adv}.exc``;
``index.sense`` and ``cntlist.rev`` are only needed for sense keys / lemma counts, which WUPS does not use.
Debian/Ubuntu's ``wordnet-base`` package installs this layout in ``/usr/share/wordnet``, all but ``lexnames`` (shipped
only as its manual page, lexnames(5WN)): that file is the same in every WordNet 3.0, and :data:`WORDNET30_LEXNAMES`
stands in for it when a folder lacks it. The folder is appended to
``nltk.data.path`` (nltk >= 3.9.3 refuses corpus reads outside those roots).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nltk.data
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.tokenize import NLTKWordTokenizer

__all__ = [
    "DEFAULT_WORDNET_DIR",
    "NEXTQA_STOPWORDS",
    "REQUIRED_WORDNET_FILES",
    "WORDNET30_LEXNAMES",
    "WORDNET_ENV_VAR",
    "WordNetNotFoundError",
    "WupsResult",
    "load_wordnet",
    "normalize_answer",
    "wup",
    "wups",
    "wups_scores",
]

WORDNET_ENV_VAR = "EMU_WORDNET_DIR"
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
_POS_SUFFIXES = ("noun", "verb", "adj", "adv")
#: Files nltk's ``WordNetCorpusReader`` opens for synset lookups and similarities (and ``lexnames``, which WordNet 3.0
#: fixes: :data:`WORDNET30_LEXNAMES` stands in for it when a folder lacks it, as Debian's ``wordnet-base`` does).
REQUIRED_WORDNET_FILES: tuple[str, ...] = (
    *(f"index.{s}" for s in _POS_SUFFIXES),
    *(f"data.{s}" for s in _POS_SUFFIXES),
    *(f"{s}.exc" for s in _POS_SUFFIXES),
)
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
_LEXNAME_POS = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
#: WordNet 3.0's ``lexnames`` file (lexnames(5WN): the 45 lexicographer files, ``<number>\t<name>\t<pos>``), the same
#: in every copy of WordNet 3.0; Debian's ``wordnet-base`` ships it only as that manual page.
WORDNET30_LEXNAMES = "".join(
    f"{i:02d}\t{name}\t{_LEXNAME_POS[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES)
)

_INSTALL_HINT = (
    "Install WordNet 3.0 database files: `apt-get install wordnet-base` (Debian/Ubuntu; installs /usr/share/wordnet), "
    f"or set {WORDNET_ENV_VAR} to a WordNet 3.0 `dict` folder (e.g. WordNet-3.0/dict from the Princeton tarball) "
    f"containing {', '.join(REQUIRED_WORDNET_FILES)}. Nothing is downloaded automatically."
)

#: Stopwords removed before scoring (see module docstring for provenance).
NEXTQA_STOPWORDS: frozenset[str] = frozenset(
    w.strip()
    for w in (
        "i, me, my, myself, we, our, ours, ourselves, you, you're, you've, you'll, you'd, your, yours, yourself, "
        "yourselves, he, him, his, himself, she, she's, her, hers, herself, it, it's, its, itself, they, them, "
        "their, theirs, themselves, what, which, who, whom, this, that, that'll, these, those, am, is, are, was, "
        "were, be, been, being, have, has, had, having, do, does, did, doing, a, an, the, and, but, if, or, "
        "because, as, until, while, to, from, of, at, for, with, about, into, through, during, again, further, "
        "then, here, there, when, where, why, how, all, any, each, most, other, some, such, only, own, so, than, "
        "too, very, s, t, can, will, just, don, don't, should, should've, now, d, ll, m, o, re, ve, y, ain, "
        "aren, aren't, couldn, couldn't, didn, didn't, doesn, doesn't, hadn, hadn't, hasn, hasn't, haven, "
        "haven't, isn, isn't, ma, mightn, mightn't, mustn, mustn't, needn, needn't, shan, shan't, shouldn, "
        "shouldn't, wasn, wasn't, weren, weren't, won, won't, wouldn, wouldn't"
    ).split(",")
)

#: NExT-QA question types scored by exact match instead of WUPS (eval_oe.py: descriptive binary / counting).
EXACT_MATCH_QTYPES = frozenset({"DB", "DC"})

_TOKENIZER = NLTKWordTokenizer()


class _LocalWordNetReader(WordNetCorpusReader):
    """``WordNetCorpusReader`` for a standalone folder, without the Open Multilingual WordNet sense-key mapping.

    nltk 3.10's ``WordNetCorpusReader.__init__`` ends with ``self.map30 = self.map_wn()``, which (unless the version
    string equals ``"wordnet"``) reads ``index.sense`` of nltk_data's own ``corpora/wordnet`` package to map sense
    keys for OMW; without nltk_data that raises ``LookupError``. The mapping is only used by multilingual lookups
    (``omw_reader`` is None here anyway), so it is skipped: ``map30 = None``, as nltk sets when no mapping is needed.
    """

    def map_wn(self, version: str = "wordnet"):
        return None

    def open(self, file: str):
        """The folder's file; WordNet 3.0's fixed ``lexnames`` (:data:`WORDNET30_LEXNAMES`) when the folder lacks it
        (Debian's ``wordnet-base`` installs every other file, not that one)."""
        if file == "lexnames" and not (Path(self.root.path) / file).is_file():
            return io.StringIO(WORDNET30_LEXNAMES)
        return super().open(file)


class WordNetNotFoundError(FileNotFoundError):
    """No usable WordNet 3.0 database folder was found."""


def _missing_files(root: Path) -> list[str]:
    return [name for name in REQUIRED_WORDNET_FILES if not (root / name).is_file()]


def load_wordnet(path: str | Path | None = None) -> WordNetCorpusReader:
    """Open WordNet 3.0 from a local folder (never downloads).

    Search order: ``path``; else ``$EMU_WORDNET_DIR``; else ``/usr/share/wordnet``. The first candidate given is
    the only one tried when ``path`` or the env var is set, so a wrong setting fails loudly instead of silently
    falling back. The folder is appended to ``nltk.data.path`` because nltk >= 3.9.3 refuses corpus reads outside
    those roots. Raises :class:`WordNetNotFoundError` naming the missing files and how to install them.
    """
    if path is not None:
        root, origin = Path(path), "the `path` argument"
    elif os.environ.get(WORDNET_ENV_VAR):
        root, origin = Path(os.environ[WORDNET_ENV_VAR]), f"${WORDNET_ENV_VAR}"
    else:
        root, origin = DEFAULT_WORDNET_DIR, "the default location"
    root = root.expanduser()
    if not root.is_dir():
        raise WordNetNotFoundError(f"WordNet folder {str(root)!r} (from {origin}) does not exist. {_INSTALL_HINT}")
    missing = _missing_files(root)
    if missing:
        raise WordNetNotFoundError(
            f"WordNet folder {str(root)!r} (from {origin}) lacks {', '.join(missing)}. {_INSTALL_HINT}"
        )
    root = root.resolve()
    # nltk >= 3.9.3 sandboxes corpus reads to roots on ``nltk.data.path`` (nltk/pathsec.py, ENFORCE mode) and
    # raises PermissionError otherwise; authorizing the folder this way is the documented opt-in.
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():
        # omw_reader=None: "The multilingual functions are not available" -- expected, English only.
        warnings.simplefilter("ignore", UserWarning)
        return _LocalWordNetReader(str(root), None)


@dataclass
class _SynsetCache:
    """Per-reader cache of ``wordnet.synsets(word)[0]`` and pairwise Wu-Palmer similarities."""

    first_synset: dict[str, object] = field(default_factory=dict)
    similarity: dict[tuple[str, str], float] = field(default_factory=dict)
    morphy: dict[str, str] = field(default_factory=dict)


_CACHES: dict[int, tuple[WordNetCorpusReader, _SynsetCache]] = {}


def _cache_for(wordnet: WordNetCorpusReader) -> _SynsetCache:
    entry = _CACHES.get(id(wordnet))
    if entry is None or entry[0] is not wordnet:
        entry = (wordnet, _SynsetCache())
        _CACHES[id(wordnet)] = entry
    return entry[1]


def _first_synset(word: str, wordnet: WordNetCorpusReader, cache: _SynsetCache):
    if word not in cache.first_synset:
        synsets = wordnet.synsets(word)
        cache.first_synset[word] = synsets[0] if synsets else None
    return cache.first_synset[word]


def _raw_wup(word1: str, word2: str, wordnet: WordNetCorpusReader) -> float:
    """NExT-OE ``wup`` before thresholding: 1.0 for identical strings, else first-synset Wu-Palmer (0.0 if none)."""
    if word1 == word2:
        return 1.0
    cache = _cache_for(wordnet)
    key = (word1, word2)
    if key not in cache.similarity:
        s1 = _first_synset(word1, wordnet, cache)
        s2 = _first_synset(word2, wordnet, cache) if s1 is not None else None
        sim = s1.wup_similarity(s2) if s1 is not None and s2 is not None else None
        cache.similarity[key] = 0.0 if sim is None else float(sim)
    return cache.similarity[key]


def wup(word1: str, word2: str, threshold: float, wordnet: WordNetCorpusReader) -> float:
    """Thresholded Wu-Palmer similarity of two words (NExT-OE ``metrics.wup``): below ``threshold`` -> x0.1."""
    sim = _raw_wup(word1, word2, wordnet)
    return 0.1 * sim if sim < threshold else sim


def _set_score(words1: Sequence[str], words2: Sequence[str], threshold: float, wordnet: WordNetCorpusReader) -> float:
    """NExT-OE ``metrics.wups``: product over words1 of the best match in words2, skipping words that match nothing."""
    score, any_match = 1.0, False
    for w1 in words1:
        best = max((wup(w1, w2, threshold, wordnet) for w2 in words2), default=0.0)
        if best == 0:
            continue
        score *= best
        any_match = True
    return score if any_match else 0.0


def _tokenize(text: str) -> list[str]:
    return _TOKENIZER.tokenize(text)


def wups(prediction: str, reference: str, threshold: float, wordnet: WordNetCorpusReader) -> float:
    """WUPS of one prediction against one reference, in [0, 1] (NExT-OE ``metrics.get_wups``; no normalization).

    Both strings are tokenized; the score is the min over the two directions of :func:`_set_score`.
    Use :func:`normalize_answer` first (as :func:`wups_scores` does) to match NExT-OE's ``eval_oe.py``.
    """
    pred, ref = _tokenize(prediction), _tokenize(reference)
    return min(_set_score(pred, ref, threshold, wordnet), _set_score(ref, pred, threshold, wordnet))


def normalize_answer(
    text: str, wordnet: WordNetCorpusReader | None = None, stopwords: frozenset[str] = NEXTQA_STOPWORDS
) -> str:
    """Approximation of NExT-OE ``eval_oe.remove_stop``: lower-case, tokenize, lemmatize, drop stopwords.

    Lemmatization uses ``wordnet.morphy`` (skipped when ``wordnet`` is None); see the module docstring.
    """
    cache = _cache_for(wordnet) if wordnet is not None else None
    out = []
    for token in _tokenize(text.lower()):
        if cache is not None:
            if token not in cache.morphy:
                cache.morphy[token] = wordnet.morphy(token) or token
            token = cache.morphy[token]
        if token not in stopwords:
            out.append(token)
    return " ".join(out)


@dataclass
class WupsResult:
    """Mean WUPS@0.0 / WUPS@0.9 (x100) and per-sample values (in [0, 1])."""

    wups_0: float
    wups_9: float
    per_sample_0: list[float]
    per_sample_9: list[float]

    def as_dict(self) -> dict[str, float]:
        return {"wups@0.0": self.wups_0, "wups@0.9": self.wups_9}


def wups_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    wordnet: WordNetCorpusReader,
    question_types: Sequence[str] | None = None,
    normalize: bool = True,
) -> WupsResult:
    """NExT-QA open-ended WUPS@0.0 and WUPS@0.9 (x100 means), following NExT-OE ``eval_oe.evaluate``.

    ``references[i]`` is one answer or several (NExT-OE's extra reference answers): the max over them is taken.
    With ``question_types``, types ``DB``/``DC`` are scored by exact match of the normalized strings (both
    thresholds). ``normalize=False`` skips :func:`normalize_answer` (raw tokens, as ``metrics.get_wups``).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    if question_types is not None and len(question_types) != len(predictions):
        raise ValueError(f"{len(question_types)} question types vs {len(predictions)} predictions")

    def prep(text: str) -> str:
        return normalize_answer(text, wordnet) if normalize else text

    per_0: list[float] = []
    per_9: list[float] = []
    for i, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        ref_list = [refs] if isinstance(refs, str) else list(refs)
        p = prep(pred)
        r = [prep(x) for x in ref_list]
        if question_types is not None and question_types[i] in EXACT_MATCH_QTYPES:
            s0 = s9 = float(any(p == x for x in r))
        else:
            s0 = max((wups(p, x, 0.0, wordnet) for x in r), default=0.0)
            s9 = max((wups(p, x, 0.9, wordnet) for x in r), default=0.0)
        per_0.append(s0)
        per_9.append(s9)
    n = max(len(per_0), 1)
    return WupsResult(100.0 * sum(per_0) / n, 100.0 * sum(per_9) / n, per_0, per_9)
