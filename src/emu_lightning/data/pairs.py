"""Image-text pairs in img2dataset's webdataset layout: the LAION, CC3M, CC12M and COYO downloads.

A dataset is a set of tar shards ``{00000..00099}.tar``. Each sample is a run of consecutive members sharing
a key: ``<key>.jpg`` (or ``.jpeg`` / ``.png`` / ``.webp``), ``<key>.txt``, the caption, and ``<key>.json``,
img2dataset's metadata (not read: the caption is the ``.txt`` member only, as img2dataset writes it, so a
sample without one is skipped rather than guessed from the json). Shards are opened with ``webdataset``
(local paths, ``file:``, ``pipe:cmd`` and the other schemes of ``webdataset.gopen``) and streamed member
by member, so a shard is never held in memory whole.

Skip reasons (each counts one sample, except ``unreadable_shard``, which counts one shard):

- ``unreadable_shard``: the shard is missing, not a tar, or damaged (truncated); the samples read before
  the damage are still used, the one being read when it was found is lost with it.
- ``missing_image``: no image member for the key.
- ``missing_caption``: no ``.txt`` member for the key.
- ``empty_caption``: the ``.txt`` member is empty or whitespace only.
- ``corrupt_image``: the image bytes do not decode (PIL fails, truncated bytes included).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
from PIL import Image
from torch import Tensor
from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from emu_lightning.data.streaming import Skip, StreamingSource, expand_urls, shuffled
from emu_lightning.images import ImageTransform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image members img2dataset writes, in the order a sample's image is looked for."""
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- shared helpers
def decode_image(data: bytes, image_size: int) -> Tensor:
    """Decode image bytes into a ``(3, S, S)`` uint8 RGB tensor with the library's one image transform
    (:class:`emu_lightning.images.ImageTransform`: the whole picture resized to the square, bicubic). Raises whatever
    PIL raises on broken bytes."""
    return ImageTransform(image_size).decode(data)


@contextmanager
def opened(url: str) -> Iterator[IO[bytes]]:
    """``webdataset.gopen(url)``, closed on the way out. At the end of a normal read a failed ``pipe:`` command
    raises here; a read that stops early (damage, or a consumer that is done) closes the stream quietly, as
    its command may then exit with an error that means nothing."""
    stream = gopen(url)
    if isinstance(stream, Pipe):
        # webdataset polls the command at every read and raises as soon as it has failed, dropping the bytes that
        # read returned: a fast command (`cat x; exit 2`) then fails before any sample. Check once, on close.
        stream.check_status = lambda: None
    try:
        yield stream
    except BaseException:
        with suppress(Exception):
            stream.close()
        raise
    stream.close()


def tar_records(url: str, unreadable: str) -> Iterator[dict[str, Any] | Skip]:
    """The samples of one tar shard, in shard order: ``{"__key__": key, extension: bytes, ...}`` for each run
    of consecutive members with one key (a repeated extension starts a new sample, so no member is ever
    paired with another sample's). A shard that cannot be opened or read to its end ends with one
    ``Skip(unreadable)``; the samples completed before the damage are yielded first."""
    errors: list[Exception] = []

    def stop(error: Exception) -> bool:  # a bad member: remember why and stop reading the shard
        errors.append(error)
        return False

    group: dict[str, Any] | None = None
    try:
        with opened(url) as stream:
            for member in tar_file_iterator(stream, handler=stop):
                key, extension = base_plus_ext(member["fname"])
                if key is None:
                    continue  # a member without an extension belongs to no sample
                extension = extension.lower()
                if group is not None and (key != group["__key__"] or extension in group):
                    yield group
                    group = None
                group = group or {"__key__": key}
                group[extension] = member["data"]
    except Exception as error:  # missing file, not a tar, truncated header, failed pipe command, ...
        errors.append(error)
    if errors:
        yield Skip(unreadable, f"{url}: {errors[0]}")
    elif group is not None:
        yield group


# ---------------------------------------------------------------------------------------------- reader
class ImageTextShards(StreamingSource):
    """Image-text pairs from img2dataset webdataset shards; one unit per shard.

    A sample is ``{"items": [image, caption]}`` (or caption first), ``"id"`` (the key) and ``"url"`` (the
    shard); the image is a ``(3, S, S)`` float tensor in ``[0, 1]``. Bad samples become skips (see the module
    docstring for the reasons), never exceptions.

    Args:
        urls: the shards: a brace pattern (``/data/{00000..00099}.tar``) or a list of them; local paths,
            ``file:`` and ``pipe:cmd`` URLs (the command writes the tar to stdout).
        image_size: side S of the square images, the whole picture resized to S x S (bicubic, the
            library's one transform); by default the model's (set by the DataModule).
        image_first_prob: probability that the image precedes its caption (else the caption comes first).
        shuffle_buffer: with ``shuffle``, a shard's samples pass through a shuffle buffer this long.
        name: the source's name in sample metadata and skip counts.
        shuffle: shuffle the shards (a new order each pass) and the samples within each.
        repeat: start a new pass when one ends (training); False: one pass.
        seed: seeds the shard order, the in-shard shuffle and the image/caption order.
        split_by_node: split the shards across distributed ranks.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        image_size: int | None = None,
        image_first_prob: float = 0.5,
        shuffle_buffer: int = 1000,
        name: str = "pairs",
        shuffle: bool = True,
        repeat: bool = True,
        seed: int = 0,
        split_by_node: bool = True,
    ) -> None:
        super().__init__(name, shuffle=shuffle, repeat=repeat, seed=seed, split_by_node=split_by_node)
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"urls {urls!r} name no shard")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size {image_size} must be positive")
        if not 0.0 <= image_first_prob <= 1.0:
            raise ValueError(f"image_first_prob {image_first_prob} is not a probability")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer {shuffle_buffer} must be at least 1")
        self.image_size, self.image_first_prob, self.shuffle_buffer = image_size, image_first_prob, shuffle_buffer

    def units(self) -> list[str]:
        return self.urls

    def read(self, unit: str, rng: np.random.Generator) -> Iterator[dict[str, Any] | Skip]:
        records = tar_records(unit, "unreadable_shard")
        if self.shuffle:
            records = shuffled(records, self.shuffle_buffer, rng)
        for record in records:
            yield record if isinstance(record, Skip) else self.pair(record, unit, rng)

    def pair(self, record: dict[str, Any], url: str, rng: np.random.Generator) -> dict[str, Any] | Skip:
        """One grouped tar sample as an interleaved sample, or the reason it cannot be one."""
        key = record["__key__"]
        where = f"{url}:{key}"
        extension = next((e for e in IMAGE_EXTENSIONS if e in record), None)
        if extension is None:
            return Skip("missing_image", where)
        if "txt" not in record:
            return Skip("missing_caption", where)
        caption = record["txt"].decode("utf-8", errors="replace").strip()
        if not caption:
            return Skip("empty_caption", where)
        try:
            image = decode_image(record[extension], self.image_size)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on broken bytes
            return Skip("corrupt_image", f"{where}: {error}")
        items = [image, caption] if rng.random() < self.image_first_prob else [caption, image]
        return {"items": items, "id": key, "url": url}


# ---------------------------------------------------------------------------------------------- writer
def shard_pattern(root: str | Path, num_shards: int) -> str:
    """The brace pattern naming shards ``00000.tar`` .. ``{num_shards - 1:05d}.tar`` under ``root``."""
    return f"{root}/{{00000..{num_shards - 1:05d}}}.tar"


def encode_image(image: Tensor, image_format: str) -> bytes:
    """A ``(3, H, W)`` tensor in ``[0, 1]`` as ``png``, ``jpg`` or ``webp`` file bytes."""
    if image_format not in PIL_FORMATS:
        raise ValueError(f"image_format {image_format!r} is not one of {sorted(PIL_FORMATS)}")
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    options = {} if image_format == "png" else {"quality": 95}
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=PIL_FORMATS[image_format], **options)
    return out.getvalue()
