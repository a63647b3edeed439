"""ShapesWorld's text-to-image metric: does a generated image show each shape of the scene where its caption puts it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from emu_lightning.shapesworld.world import BACKGROUND, COLOURS, Scene

_PALETTE_NAMES = ("background", *COLOURS)
_PALETTE = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float64) / 255.0
_FILL = {"triangle": (0.0, 0.66), "circle": (0.66, 0.92), "square": (0.92, 1.01)}
"""Fill ratio (shape pixels / bounding box) ranges: triangle ~0.5, circle ~pi/4, square 1."""
_SIZE_THRESHOLD = 0.65
"""Bounding-box extent over cell side separating small (~0.5, square ~0.43) from large (~0.9, square ~0.77)."""


def shapes_attribute_accuracy(image: Tensor, scene: Scene, min_fraction: float = 0.01) -> dict[str, Any]:
    """Check pixel by pixel whether an image shows each shape of a ShapesWorld scene in its grid cell.

    Every pixel of the shape's cell is labelled with its nearest palette colour (ShapesWorld's colours and the
    background). Colour: the majority label of the non-background pixels. Shape and size: from the largest
    8-connected blob of that colour: fill ratio of its bounding box (triangle ~0.5, circle ~0.785, square 1.0)
    and its extent relative to the cell; undecidable (None) when the blob has fewer than ``min_fraction`` of the
    cell's pixels (or 4). A cell with no coloured pixels gets a wrong colour and undecidable shape and size.

    Args:
        image: ``(3, H, W)`` float image in ``[0, 1]``.
        scene: the scene the image was generated for.
        min_fraction: smallest blob, as a fraction of the cell's pixels, whose shape and size are judged.

    Returns:
        ``{"shapes": [per-shape dict], "colour_accuracy", "shape_accuracy", "size_accuracy"}``; per shape:
        ``cell, colour, predicted_colour, colour_correct, shape, predicted_shape, shape_correct, size,
        predicted_size, size_correct, fill_ratio``. Accuracies average the decidable shapes (None if none).

    Raises:
        ValueError: the image is not ``(3, H, W)`` in ``[0, 1]``.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    x = image.detach().cpu().double()
    if x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise ValueError(f"image values must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    _, h, w = x.shape
    labels = torch.cdist(x.permute(1, 2, 0).reshape(-1, 3), _PALETTE).argmin(dim=1).reshape(h, w).numpy()
    rows = []
    for s in scene.shapes:
        r, c = divmod(s.cell, scene.grid)
        # floor/ceil: cells of non-integer size keep every pixel the shape can cover.
        y0, y1 = int(np.floor(r * h / scene.grid)), int(np.ceil((r + 1) * h / scene.grid))
        x0, x1 = int(np.floor(c * w / scene.grid)), int(np.ceil((c + 1) * w / scene.grid))
        cell = labels[y0:y1, x0:x1]
        counts = np.bincount(cell.ravel(), minlength=len(_PALETTE_NAMES))[1:]
        row = dict(cell=s.cell, colour=s.colour, shape=s.shape, size=s.size, predicted_colour=None)
        row.update(predicted_shape=None, predicted_size=None, fill_ratio=None)
        if counts.sum() > 0:
            k = int(counts.argmax()) + 1
            row["predicted_colour"] = _PALETTE_NAMES[k]
            blobs, _ = ndimage.label(cell == k, structure=np.ones((3, 3), dtype=int))
            sizes = np.bincount(blobs.ravel())[1:]
            if sizes.size and sizes.max() >= max(4, min_fraction * cell.size):
                ys, xs = np.nonzero(blobs == int(sizes.argmax()) + 1)
                bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
                fill = float(sizes.max() / (bh * bw))
                row["fill_ratio"] = fill
                row["predicted_shape"] = next(n for n, (lo, hi) in _FILL.items() if lo <= fill < hi)
                extent = max(bh, bw) / (min(h, w) / scene.grid)
                row["predicted_size"] = "large" if extent >= _SIZE_THRESHOLD else "small"
        row["colour_correct"] = row["predicted_colour"] == s.colour
        for key in ("shape", "size"):
            row[f"{key}_correct"] = None if row[f"predicted_{key}"] is None else row[f"predicted_{key}"] == row[key]
        rows.append(row)
    return {"shapes": rows, **_aggregate(rows)}


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("colour", "shape", "size"):
        judged = [r[f"{key}_correct"] for r in rows if r[f"{key}_correct"] is not None]
        out[f"{key}_accuracy"] = sum(judged) / len(judged) if judged else None
    return out


def shapes_attribute_accuracy_batch(
    images: Tensor | Sequence[Tensor], scenes: Sequence[Scene], min_fraction: float = 0.01
) -> dict[str, Any]:
    """:func:`shapes_attribute_accuracy` over a batch, aggregated over all shapes of all images.

    Args:
        images: ``(B, 3, H, W)`` or a list of ``(3, H, W)`` images in ``[0, 1]``.
        scenes: one scene per image.
        min_fraction: see :func:`shapes_attribute_accuracy`.

    Returns:
        ``{"colour_accuracy", "shape_accuracy", "size_accuracy", "num_shapes", "num_shape_undecided",
        "scene_accuracy", "per_image"}``; ``scene_accuracy`` is the fraction of images whose shapes all have the
        right colour and a shape judged right.
    """
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images but {len(scenes)} scenes")
    per_image = [shapes_attribute_accuracy(img, sc, min_fraction) for img, sc in zip(images, scenes)]
    rows = [r for p in per_image for r in p["shapes"]]
    scene_ok = [all(r["colour_correct"] and r["shape_correct"] for r in p["shapes"]) for p in per_image]
    return {
        **_aggregate(rows),
        "num_shapes": len(rows),
        "num_shape_undecided": sum(r["shape_correct"] is None for r in rows),
        "scene_accuracy": sum(scene_ok) / len(scene_ok) if scene_ok else None,
        "per_image": per_image,
    }
