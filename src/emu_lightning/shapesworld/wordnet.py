"""Small hand-made databases in WordNet 3.0's file format, readable by :func:`emu_lightning.eval.wups.load_wordnet`.

:func:`write_wordnet_database` writes any noun / verb hierarchy as the files nltk's ``WordNetCorpusReader`` opens
(``lexnames``, ``data.*``, ``index.*``, ``*.exc``); :func:`write_shapesworld_wordnet` writes one that covers
ShapesWorld's video answers (directions, colours, shapes, numbers), so that WUPS on ShapesWorld video QA means
something offline: a wrong answer of the right kind (``left`` for ``right``) scores higher than one of another kind
(``red`` for ``right``). Neither is the Princeton WordNet; real evaluations read that (``apt-get install
wordnet-base``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from emu_lightning.shapesworld.world import COLOURS, NUMBER_WORDS, SHAPES

Synsets = Mapping[str, tuple[Sequence[str], Sequence[str], str]]
"""Synsets by key: ``key: (lemmas, hypernym keys, gloss)``."""

DEFAULT_HEADER = "  1 This is a tiny hand-made WordNet 3.0-format database for tests.\n  2 Not the Princeton WordNet.\n"
"""The license-header lines every data/index file starts with (WordNet's files begin with numbered lines)."""
LEXNAMES = "00\tadj.all\t3\n01\tadj.pert\t3\n02\tadv.all\t4\n03\tnoun.Tops\t1\n04\tverb.motion\t2\n"
NOUN_LEXNUM, VERB_LEXNUM = 3, 4
"""Lexicographer file numbers (into :data:`LEXNAMES`) the nouns and verbs are written with."""


def _data_file(synsets: Synsets, pos: str, lexnum: int, header: str) -> tuple[str, dict[str, int]]:
    """Render ``data.<pos>`` and each synset's offset: the byte offset of its line, written as its first field
    (8-digit fields keep the line lengths independent of the offsets, so one layout pass finds them)."""
    hyponyms: dict[str, list[str]] = {key: [] for key in synsets}
    for key, (_, hypers, _) in synsets.items():
        for h in hypers:
            if h not in synsets:
                raise ValueError(f"synset {key!r} has hypernym {h!r}, which is not a synset of the same database")
            hyponyms[h].append(key)

    def render(key: str, offsets: dict[str, int]) -> str:
        lemmas, hypers, gloss = synsets[key]
        if not lemmas or any(not lemma or " " in lemma for lemma in lemmas):
            raise ValueError(f"synset {key!r} has lemmas {list(lemmas)}: expected words without spaces (use _)")
        ptrs = [("@", h) for h in hypers] + [("~", h) for h in hyponyms[key]]
        fields = [f"{offsets[key]:08d}", f"{lexnum:02d}", pos, f"{len(lemmas):02x}"]
        for lemma in lemmas:
            fields += [lemma, "0"]
        fields.append(f"{len(ptrs):03d}")
        for symbol, target in ptrs:
            fields += [symbol, f"{offsets[target]:08d}", pos, "0000"]
        if pos == "v":  # verb frames: one generic frame
            fields += ["01", "+", "02", "00"]
        return " ".join(fields) + f" | {gloss}\n"

    zero = dict.fromkeys(synsets, 0)
    offsets, position = {}, len(header.encode())
    for key in synsets:
        offsets[key] = position
        position += len(render(key, zero).encode())
    text = header + "".join(render(key, offsets) for key in synsets)
    encoded = text.encode()
    for key, off in offsets.items():  # every offset must point at its own line, or nltk reads the wrong synset
        if encoded[off : off + 8].decode() != f"{off:08d}":
            raise RuntimeError(f"data.{pos}: synset {key!r} is not at its offset {off} (a gloss with a newline?)")
    return text, offsets


def _index_file(synsets: Synsets, pos: str, offsets: dict[str, int], header: str) -> str:
    """Render ``index.<pos>``: one sorted line per lemma with the offsets of its synsets, in the given order."""
    by_lemma: dict[str, list[int]] = {}
    for key, (lemmas, _, _) in synsets.items():
        for lemma in lemmas:
            by_lemma.setdefault(lemma.lower(), []).append(offsets[key])
    lines = []
    for lemma in sorted(by_lemma):
        offs = by_lemma[lemma]
        ptr_symbols = ["@", "~"]
        fields = [lemma, pos, str(len(offs)), str(len(ptr_symbols)), *ptr_symbols, str(len(offs)), "0"]
        lines.append(" ".join(fields + [f"{o:08d}" for o in offs]) + "  \n")
    return header + "".join(lines)


def write_wordnet_database(
    root: str | Path, nouns: Synsets, verbs: Synsets | None = None, header: str = DEFAULT_HEADER
) -> Path:
    """Write a WordNet 3.0-format database (the files :func:`~emu_lightning.eval.wups.load_wordnet` needs) to ``root``.

    Args:
        root: the folder to write (created); it plays WordNet's ``dict`` folder.
        nouns: the noun synsets, ``key: (lemmas, hypernym keys, gloss)``; a synset without hypernyms is a root
            (nltk's depth 0). Keys only name synsets here (nltk names them ``<first lemma>.n.NN``); a lemma in several
            synsets lists them in this order, which is the order nltk returns them in.
        verbs: the verb synsets, in the same form (none by default).
        header: the numbered lines every data/index file starts with (nltk skips lines that begin with a space).

    Returns:
        ``root``.

    Raises:
        ValueError: a hypernym key is not a synset of the same part of speech, or a lemma is empty or has a space.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {"lexnames": LEXNAMES}
    for pos, suffix, lexnum, synsets in (("n", "noun", NOUN_LEXNUM, nouns), ("v", "verb", VERB_LEXNUM, verbs or {})):
        data, offsets = _data_file(synsets, pos, lexnum, header)
        files[f"data.{suffix}"], files[f"index.{suffix}"] = data, _index_file(synsets, pos, offsets, header)
    for suffix in ("adj", "adv"):
        files[f"data.{suffix}"] = files[f"index.{suffix}"] = header
    for suffix in ("noun", "verb", "adj", "adv"):
        files[f"{suffix}.exc"] = ""
    for name, text in files.items():
        (root / name).write_bytes(text.encode())
    return root


DIGITS = tuple(str(n) for n in range(len(NUMBER_WORDS)))


def shapesworld_nouns() -> dict[str, tuple[list[str], list[str], str]]:
    """The noun hierarchy of :func:`write_shapesworld_wordnet`, with nltk depths: ``entity`` (0) > ``abstraction`` (1)
    > ``direction`` (2) > ``right``, ``left``, ``up``, ``down`` (3); ``abstraction`` > ``attribute`` (2) >
    ``visual_property`` (3) > ``colour`` (4) > the colours (5); ``attribute`` > ``shape`` (3) > ``plane_figure`` (4) >
    ``circle``, ``square``, ``triangle`` (5); ``abstraction`` > ``measure`` (2) > ``number`` (3) > ``zero``/``0`` ...
    ``nine``/``9`` (4)."""
    nouns: dict[str, tuple[list[str], list[str], str]] = {
        "entity": (["entity"], [], "that which is perceived to exist"),
        "abstraction": (["abstraction"], ["entity"], "a general concept"),
        "direction": (["direction", "way"], ["abstraction"], "the line along which something moves"),
        "attribute": (["attribute"], ["abstraction"], "a quality of something"),
        "visual_property": (["visual_property"], ["attribute"], "a property perceived by sight"),
        "colour": (["colour", "color"], ["visual_property"], "the hue of something"),
        "shape": (["shape", "form"], ["attribute"], "the spatial arrangement of something"),
        "plane_figure": (["plane_figure", "figure"], ["shape"], "a two-dimensional shape"),
        "measure": (["measure", "quantity"], ["abstraction"], "how much there is of something"),
        "number": (["number"], ["measure"], "a count"),
    }
    glosses = {"right": "towards the east of the image", "left": "towards the west of the image",
               "up": "towards the top of the image", "down": "towards the bottom of the image"}  # fmt: skip
    for word, gloss in glosses.items():
        nouns[word] = ([word], ["direction"], gloss)
    for colour in COLOURS:
        nouns[colour] = ([colour], ["colour"], f"the colour {colour}")
    for shape in SHAPES:
        nouns[shape] = ([shape], ["plane_figure"], f"a {shape} figure")
    for word, digit in zip(NUMBER_WORDS, DIGITS):
        nouns[word] = ([word, digit], ["number"], f"the number {digit}")
    return nouns


def write_shapesworld_wordnet(root: str | Path) -> Path:
    """Write the ShapesWorld WordNet (:func:`shapesworld_nouns`) to ``root`` and return it: load it with
    ``load_wordnet(root)`` to score ShapesWorld video answers with WUPS offline. With it ``wup(right, left)`` = 0.75,
    ``wup(red, blue)`` = ``wup(circle, square)`` = 5/6 and ``wup(right, red)`` = 0.4."""
    return write_wordnet_database(
        root,
        shapesworld_nouns(),
        header="  1 ShapesWorld's hand-made WordNet 3.0-format database.\n  2 Not the Princeton WordNet.\n",
    )
