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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from emu_lightning.data.pairs import decode_image, opened, tar_records
from emu_lightning.data.streaming import Skip, StreamingSource, expand_urls, shuffled

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TAR_SUFFIXES = (".tar",)

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
        image_size: side S of the square images, the whole picture resized to S x S (bicubic, the
            library's one transform); by default the model's (set by the DataModule).
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
        image_size: int | None = None,
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
        if image_size is not None and image_size < 1:
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
