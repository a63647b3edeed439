"""MMC4 (Multimodal C4) interleaved documents, in their two on-disk layouts.

- **jsonl**, the released format: ``docs_shard_*_v2.jsonl`` (or ``.jsonl.gz``) files, one document per line:
  ``{"url", "text_list": [sentence, ...], "image_info": [{"image_name", "matched_text_index", "matched_sim",
  ...}, ...], "similarity_matrix", ...}``, with the images as files named ``image_name`` in a local folder.
- **webdataset**, OpenFlamingo's MMC4 shards: ``.tar`` files whose samples each hold one such document in a
  ``.json`` member, every image's file bytes base64-encoded in ``image_info[i]["image_base64"]``.

A document becomes one interleaved sample: its sentences in order, consecutive ones joined by single spaces,
and each kept image right before the sentence it is matched to (``matched_text_index``). An image is kept
when its ``matched_sim`` is at least ``sim_threshold``; of those, the first ``max_images`` usable ones in text
order (by ``matched_text_index``, then by their order in ``image_info``) are kept, as OpenFlamingo keeps the
first ones in document order; images after the limit are not read at all. A document without any kept image
is skipped, as in OpenFlamingo's and Emu's MMC4 pipelines.

Skip reasons. Document reasons count one document (or one line) that is not yielded:

- ``malformed_json``: a line (or ``.json`` member) that is not JSON, or not a document: ``text_list`` must be
  a list of strings and ``image_info`` a list of objects with an integer ``matched_text_index`` and a numeric
  ``matched_sim``; a tar sample without a ``.json`` member. Only that document is skipped; reading goes on.
- ``unreadable_file``: a missing, unreadable or damaged jsonl / gzip / tar file (the documents read before
  the damage are still used).
- ``empty_text``: no sentence with any text.
- ``no_images``: no image left after the threshold and the image drops below.

Image reasons count one image dropped from a document that may still be yielded (if it keeps another
image; if not, the document also counts one ``no_images``):

- ``missing_image``: the image file does not exist (jsonl) or the entry has no ``image_base64`` (tar).
- ``corrupt_image``: the bytes (or the base64) do not decode.
- ``bad_index``: ``matched_text_index`` is outside ``text_list``.

Images below the threshold are filtered by design and not counted.
"""

from __future__ import annotations

import base64
import binascii
import glob
import gzip
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from webdataset import TarWriter

from emu_lightning.data.modules import StreamingDataModule
from emu_lightning.data.pairs import decode_image, encode_image, opened, tar_records
from emu_lightning.data.streaming import Skip, StreamingSource, expand_urls, shuffled
from emu_lightning.data.world import ShapesWorld
from emu_lightning.sequence import SequenceBuilder

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TAR_SUFFIXES = (".tar",)
STORY_STREAM = 11
"""The :meth:`ShapesWorld.rng` stream of a story's layout (number of scenes, connectives, similarities)."""
OPENINGS = ("here is a story about shapes.", "a few boards of shapes.", "look at these shapes.")
CONNECTIVES = ("then the board changed.", "after that, a new board.", "the next one is different.")
LOW_SIM_PROB = 0.1
"""Share of the written images whose ``matched_sim`` falls below the default threshold 0.32."""

ImageLoader = Callable[[dict[str, Any]], bytes | Skip]
"""Reads one ``image_info`` entry's image bytes, or says why it cannot."""


def _is_document(doc: Any) -> bool:
    """True when ``doc`` has the fields a document needs, with the right types."""
    if not isinstance(doc, dict) or not isinstance(doc.get("text_list"), list):
        return False
    if not all(isinstance(s, str) for s in doc["text_list"]) or not isinstance(doc.get("image_info"), list):
        return False
    return all(
        isinstance(info, dict)
        and isinstance(info.get("matched_text_index"), int)
        and isinstance(info.get("matched_sim"), (int, float))
        for info in doc["image_info"]
    )


def interleave(sentences: Sequence[str], images: dict[int, list[Tensor]]) -> list[Any]:
    """Items with ``images[j]`` right before sentence ``j``; the sentences between images are joined by single
    spaces, and empty ones are left out."""
    items: list[Any] = []
    text: list[str] = []
    for j, sentence in enumerate(sentences):
        if j in images:
            if text:
                items.append(" ".join(text))
                text = []
            items.extend(images[j])
        if sentence:
            text.append(sentence)
    if text:
        items.append(" ".join(text))
    return items


def jsonl_records(path: str) -> Iterator[tuple[str, Any] | Skip]:
    """``(where, parsed line)`` for each non-blank line of a jsonl (or gzipped jsonl) file, where is
    ``path:line``; a line that is not JSON becomes a ``malformed_json`` skip, a damaged file ends with an
    ``unreadable_file`` one."""
    try:
        with opened(path) as raw:
            lines = gzip.open(raw) if path.endswith(".gz") else raw
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield where, json.loads(line)
                except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
                    yield Skip("malformed_json", f"{where}: {error}")
    except Exception as error:  # missing file, bad gzip, truncated stream, ...
        yield Skip("unreadable_file", f"{path}: {error}")


def tar_documents(url: str) -> Iterator[tuple[str, Any] | Skip]:
    """``(where, parsed .json member)`` for each sample of an OpenFlamingo MMC4 tar shard; where is
    ``url:key``."""
    for record in tar_records(url, "unreadable_file"):
        if isinstance(record, Skip):
            yield record
            continue
        where = f"{url}:{record['__key__']}"
        if "json" not in record:
            yield Skip("malformed_json", f"{where}: no .json member")
            continue
        try:
            yield where, json.loads(record["json"])
        except ValueError as error:
            yield Skip("malformed_json", f"{where}: {error}")


def file_loader(image_dir: Path) -> ImageLoader:
    """Image bytes from ``image_dir / image_name`` (the jsonl layout)."""

    def load(info: dict[str, Any]) -> bytes | Skip:
        name = info.get("image_name")
        if not isinstance(name, str) or not name:
            return Skip("missing_image", "no image_name")
        try:
            return (image_dir / name).read_bytes()
        except OSError as error:
            return Skip("missing_image", str(error))

    return load


def base64_load(info: dict[str, Any]) -> bytes | Skip:
    """Image bytes from ``image_base64`` (the webdataset layout)."""
    encoded = info.get("image_base64")
    if not encoded:
        return Skip("missing_image", f"{info.get('image_name')}: no image_base64")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError, TypeError) as error:
        return Skip("corrupt_image", f"{info.get('image_name')}: bad base64: {error}")


class MMC4Documents(StreamingSource):
    """MMC4 documents as interleaved samples, from jsonl files or OpenFlamingo's tar shards (see the module
    docstring for the rules and the skip reasons); one unit per file.

    A sample is ``{"items": [...], "id": "file:line" or "shard:key", "url": file}``, the images ``(3, S, S)``
    float tensors in ``[0, 1]``.

    Args:
        paths: jsonl files (``.jsonl`` / ``.jsonl.gz``) or tar shards (``.tar``): a path, a brace or glob
            pattern (``/data/mmc4/docs_shard_{0..99}_v2.jsonl``, ``/data/mmc4/*.tar``), or a list of them.
        image_dir: folder of the jsonl layout's image files; by default each jsonl file's own folder.
        image_size: side S of the square images: the shorter side is resized to S, then centre-cropped.
        sim_threshold: images whose ``matched_sim`` is below this are dropped (MMC4's CLIP similarity).
        max_images: most images kept per document: the first usable ones in text order.
        shuffle_buffer: with ``shuffle``, a file's documents pass through a shuffle buffer this long.
        name: the source's name in sample metadata and skip counts.
        shuffle: shuffle the files (a new order each pass) and the documents within each.
        repeat: start a new pass when one ends (training); False: one pass.
        seed: seeds the file order and the in-file shuffle.
        split_by_node: split the files across distributed ranks.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        image_size: int,
        image_dir: str | None = None,
        sim_threshold: float = 0.32,
        max_images: int = 5,
        shuffle_buffer: int = 100,
        name: str = "mmc4",
        shuffle: bool = True,
        repeat: bool = True,
        seed: int = 0,
        split_by_node: bool = True,
    ) -> None:
        super().__init__(name, shuffle=shuffle, repeat=repeat, seed=seed, split_by_node=split_by_node)
        if image_size < 1:
            raise ValueError(f"image_size {image_size} must be positive")
        if max_images < 1:
            raise ValueError(f"max_images {max_images} must be at least 1")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer {shuffle_buffer} must be at least 1")
        self.paths, self.image_dir, self.image_size = paths, image_dir, image_size
        self.sim_threshold, self.max_images, self.shuffle_buffer = sim_threshold, max_images, shuffle_buffer

    def units(self) -> list[str]:
        """The files ``paths`` names: braces expanded, globs matched (sorted); each must be jsonl or tar."""
        files: list[str] = []
        for pattern in expand_urls(self.paths):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                raise ValueError(f"paths pattern {pattern!r} matches no file")
            files += matches
        for path in files:
            if not path.endswith(JSONL_SUFFIXES + TAR_SUFFIXES):
                raise ValueError(f"{path!r} is not an MMC4 file (expected {', '.join(JSONL_SUFFIXES + TAR_SUFFIXES)})")
        return files

    def read(self, unit: str, rng: np.random.Generator) -> Iterator[dict[str, Any] | Skip]:
        if unit.endswith(TAR_SUFFIXES):
            records, load = tar_documents(unit), base64_load
        else:
            records = jsonl_records(unit)
            load = file_loader(Path(self.image_dir) if self.image_dir is not None else Path(unit).parent)
        if self.shuffle:
            records = shuffled(records, self.shuffle_buffer, rng)
        for record in records:
            if isinstance(record, Skip):
                yield record
            else:
                yield from self.document(*record, unit, load)

    def document(self, where: str, doc: Any, url: str, load: ImageLoader) -> Iterator[dict[str, Any] | Skip]:
        """One parsed document as a sample, after a :class:`Skip` for each dropped image; or only skips."""
        if not _is_document(doc):
            yield Skip("malformed_json", f"{where}: not an MMC4 document")
            return
        sentences = [s.strip() for s in doc["text_list"]]
        if not any(sentences):
            yield Skip("empty_text", where)
            return
        candidates = []
        for k, info in enumerate(doc["image_info"]):
            index = info["matched_text_index"]
            if not 0 <= index < len(sentences):
                yield Skip("bad_index", f"{where}: image {k} matches sentence {index} of {len(sentences)}")
            elif info["matched_sim"] >= self.sim_threshold:
                candidates.append((index, k))
        images: dict[int, list[Tensor]] = {}
        kept = 0
        for index, k in sorted(candidates):
            if kept == self.max_images:
                break
            image = self.image(doc["image_info"][k], load, f"{where}: image {k}")
            if isinstance(image, Skip):
                yield image
                continue
            images.setdefault(index, []).append(image)
            kept += 1
        if not kept:
            yield Skip("no_images", where)
            return
        yield {"items": interleave(sentences, images), "id": where, "url": url}

    def image(self, info: dict[str, Any], load: ImageLoader, where: str) -> Tensor | Skip:
        """One image of a document, or why it is dropped."""
        data = load(info)
        if isinstance(data, Skip):
            return Skip(data.reason, f"{where}: {data.detail}")
        try:
            return decode_image(data, self.image_size)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on broken bytes
            return Skip("corrupt_image", f"{where}: {error}")


# ---------------------------------------------------------------------------------------------- writer
def shapesworld_story(
    world: ShapesWorld, split: str, doc: int, first_scene: int, images_per_doc: tuple[int, int]
) -> dict[str, Any]:
    """Document ``doc`` of ``split`` in MMC4's jsonl format: an opening sentence, then scenes ``first_scene``,
    ``first_scene + 1``, ... (between ``images_per_doc[0]`` and ``images_per_doc[1]`` of them), each a caption
    sentence, sometimes after a connective one. The image of a scene is named ``f"{split}_{scene:09d}.png"``
    and matched to its caption; about :data:`LOW_SIM_PROB` of the ``matched_sim`` values fall below 0.32."""
    rng = world.rng(split, doc, stream=STORY_STREAM)
    text_list = [OPENINGS[int(rng.integers(len(OPENINGS)))]]
    image_info = []
    for scene in range(first_scene, first_scene + int(rng.integers(images_per_doc[0], images_per_doc[1] + 1))):
        if rng.random() < 0.5:
            text_list.append(CONNECTIVES[int(rng.integers(len(CONNECTIVES)))])
        references = world.captions(world.scene(split, scene))
        text_list.append(references[int(rng.integers(len(references)))])
        sim = rng.uniform(0.20, 0.30) if rng.random() < LOW_SIM_PROB else rng.uniform(0.33, 0.45)
        name = f"{split}_{scene:09d}.png"
        image_info.append(
            {
                "image_name": name,
                "raw_url": f"https://shapesworld.invalid/images/{name}",
                "matched_text_index": len(text_list) - 1,
                "matched_sim": round(float(sim), 4),
            }
        )
    similarity = rng.uniform(0.05, 0.2, size=(len(image_info), len(text_list))).round(4)
    for i, info in enumerate(image_info):
        similarity[i, info["matched_text_index"]] = info["matched_sim"]
    return {
        "url": f"https://shapesworld.invalid/{split}/story/{doc}",
        "text_list": text_list,
        "image_info": image_info,
        "similarity_matrix": similarity.tolist(),
        "could_have_url_duplicate": 0,
    }


def write_shapesworld_mmc4(
    world: ShapesWorld,
    root: str | Path,
    split: str = "train",
    num_docs: int = 100,
    images_per_doc: tuple[int, int] = (2, 4),
    layout: str = "jsonl",
    docs_per_file: int = 50,
) -> list[str]:
    """Write ``num_docs`` ShapesWorld stories (:func:`shapesworld_story`) in an MMC4 layout and return the index
    files' paths.

    Each scene appears in one document only; scenes are numbered from 0 in document order. ``layout="jsonl"``
    writes ``{root}/docs_shard_{k:05d}_v2.jsonl`` files and the PNG images to ``{root}/images/`` (the reader's
    ``image_dir``); ``layout="wds"`` writes tar shards ``{root}/{k:05d}.tar`` whose samples (key
    ``f"{d:09d}"``) hold the document in a ``.json`` member, each image's PNG bytes in its ``image_base64``.
    """
    if not 1 <= images_per_doc[0] <= images_per_doc[1]:
        raise ValueError(f"images_per_doc {images_per_doc} must be (low, high) with 1 <= low <= high")
    if layout not in ("jsonl", "wds"):
        raise ValueError(f"layout {layout!r} must be 'jsonl' or 'wds'")
    if num_docs < 1 or docs_per_file < 1:
        raise ValueError(f"num_docs {num_docs} and docs_per_file {docs_per_file} must be positive")
    root = Path(root)
    (root / "images" if layout == "jsonl" else root).mkdir(parents=True, exist_ok=True)
    paths, scene = [], 0
    for k, first in enumerate(range(0, num_docs, docs_per_file)):
        docs = []
        for d in range(first, min(num_docs, first + docs_per_file)):
            doc = shapesworld_story(world, split, d, scene, images_per_doc)
            for info in doc["image_info"]:
                data = encode_image(world.image(split, scene), "png")
                if layout == "jsonl":
                    (root / "images" / info["image_name"]).write_bytes(data)
                else:
                    info["image_base64"] = base64.b64encode(data).decode("ascii")
                scene += 1
            docs.append(doc)
        if layout == "jsonl":
            path = root / f"docs_shard_{k:05d}_v2.jsonl"
            path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        else:
            path = root / f"{k:05d}.tar"
            with TarWriter(str(path), encoder=False, mtime=0) as sink:
                for d, doc in enumerate(docs, first):
                    sink.write({"__key__": f"{d:09d}", "json": json.dumps(doc).encode()})
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------------------------- data module
class MMC4DataModule(StreamingDataModule):
    """MMC4 interleaved documents, from jsonl files with image folders or OpenFlamingo's tar shards
    (ShapesWorld writes both with :func:`write_shapesworld_mmc4`). Training reads the files shuffled and
    repeating; validation reads its files once, in order.

    Args:
        paths: training files: jsonl (``.jsonl`` / ``.jsonl.gz``) or tar shards, as a path, a brace or glob
            pattern, or a list of them.
        val_paths: held-out files, read once in order; none by default.
        image_dir: folder of the jsonl layout's image files; by default each jsonl file's own folder.
        image_size: side of the square images (must match the vision backbone's input size).
        sim_threshold: images whose ``matched_sim`` is below this are dropped.
        max_images: most images kept per document (the first usable ones in text order).
        shuffle_buffer: training documents of a file pass through a shuffle buffer this long.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes; each reads its own files.
        seed: seeds the file order and the in-file shuffle.
        shapesworld: write ShapesWorld stories to ``paths`` / ``val_paths`` first, where not yet written (tar
            shards in OpenFlamingo's layout, or jsonl with images in ``image_dir``): ``{train: n, val: n}``
            documents and ShapesWorld arguments (see :class:`StreamingDataModule`).
        sequencer: a SequenceBuilder; by default the trained model's.
    """

    def __init__(
        self,
        paths: str | list[str],
        val_paths: str | list[str] | None = None,
        image_dir: str | None = None,
        image_size: int = 32,
        sim_threshold: float = 0.32,
        max_images: int = 5,
        shuffle_buffer: int = 100,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        shapesworld: dict[str, Any] | None = None,
        sequencer: SequenceBuilder | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, sequencer, seed=seed, shapesworld=shapesworld)
        self.train_paths, self.val_paths, self.image_dir, self.image_size = paths, val_paths, image_dir, image_size
        self.sim_threshold, self.max_images, self.shuffle_buffer = sim_threshold, max_images, shuffle_buffer

    def setup(self, stage: str | None = None) -> None:
        self.check_image_size(self.image_size)

    def source(self, paths: str | list[str], train: bool) -> MMC4Documents:
        return MMC4Documents(
            paths,
            self.image_size,
            image_dir=self.image_dir,
            sim_threshold=self.sim_threshold,
            max_images=self.max_images,
            shuffle_buffer=self.shuffle_buffer,
            shuffle=train,
            repeat=train,
            seed=self.seed,
        )

    def paths(self, split: str) -> str | list[str] | None:
        return self.train_paths if split == "train" else self.val_paths

    def write_shapesworld(self, root: Path, split: str, num_samples: int, num_files: int) -> list[str]:
        layout = "wds" if expand_urls(self.paths(split))[0].endswith(".tar") else "jsonl"
        if layout == "jsonl" and (self.image_dir is None or Path(self.image_dir) != root / "images"):
            raise ValueError(f"ShapesWorld's jsonl layout puts the images in {root / 'images'}: set image_dir to it")
        docs_per_file = math.ceil(num_samples / num_files)
        return write_shapesworld_mmc4(self.world, root, split, num_samples, layout=layout, docs_per_file=docs_per_file)

    def train_source(self) -> MMC4Documents:
        return self.source(self.train_paths, train=True)

    def val_source(self) -> MMC4Documents | None:
        return None if self.val_paths is None else self.source(self.val_paths, train=False)
