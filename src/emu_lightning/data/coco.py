"""COCO captions in Karpathy's split file (``dataset_coco.json``), optionally with the COCO annotation file.

The captioning evaluation scores ``split == "test"`` and draws demonstrations from ``split == "train"``
(``restval`` is excluded, as in OpenFlamingo's and Emu's evaluation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from emu_lightning.images import ImageTransform


@dataclass(frozen=True)
class CaptionExample:
    """One image of a captioning set with its reference captions."""

    image_id: int
    image_path: Path
    references: tuple[str, ...]
    split: str


def _read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    with path.open() as f:
        return json.load(f)


def read_karpathy(
    karpathy_json: str | Path,
    image_root: str | Path,
    split: str = "test",
    annotations_json: str | Path | None = None,
) -> list[CaptionExample]:
    """Read one split of Karpathy's ``dataset_coco.json``.

    Args:
        karpathy_json: path of ``dataset_coco.json`` (``images: [{filepath, filename, cocoid, split, sentences}]``).
        image_root: folder holding the ``filepath/filename`` images.
        split: ``train``, ``val``, ``test`` or ``restval``.
        annotations_json: a COCO captions annotation file (``captions_val2014.json``); when given, the
            references are its captions for each ``cocoid`` instead of the Karpathy sentences.
    """
    data = _read_json(karpathy_json, "Karpathy split file")
    if "images" not in data:
        raise ValueError(f"{karpathy_json} has no 'images' list: not a Karpathy dataset_coco.json")
    by_image: dict[int, list[str]] | None = None
    if annotations_json is not None:
        ann = _read_json(annotations_json, "COCO annotation file")
        by_image = {}
        for a in ann.get("annotations", []):
            by_image.setdefault(int(a["image_id"]), []).append(a["caption"].strip())
    examples = []
    for img in data["images"]:
        if img["split"] != split:
            continue
        image_id = int(img.get("cocoid", img.get("imgid")))
        if by_image is not None:
            if image_id not in by_image:
                raise ValueError(f"image {image_id} of {karpathy_json} has no caption in {annotations_json}")
            refs = by_image[image_id]
        else:
            refs = [s["raw"].strip() for s in img["sentences"]]
        path = Path(image_root) / img.get("filepath", "") / img["filename"]
        examples.append(CaptionExample(image_id, path, tuple(refs), split))
    if not examples:
        raise ValueError(f"{karpathy_json} has no images in split {split!r}")
    return examples


def load_image(path: str | Path, image_size: int) -> Tensor | None:
    """An image file as a ``(3, S, S)`` float tensor in ``[0, 1]`` through the library's one image transform
    (:class:`emu_lightning.images.ImageTransform`), or ``None`` with a warning when the file is missing or does not
    decode, so an evaluation can count the skip and go on."""
    return ImageTransform(image_size).load(path)
