"""The one image transform: every reader, evaluation, chat and generation turns a picture into model input here.

As Emu's released inference does (``Resize((224, 224), BICUBIC)``), the whole picture is resized to the square input
size, bicubic, without cropping; the vision backbone then normalises it (CLIP's mean and std for EVA-CLIP). Training
readers use the same transform, so a non-square photo looks the same in training and at test time. Images leave
here as ``(3, S, S)`` uint8 tensors (a quarter of the bytes of floats to hand from a DataLoader worker); the model
scales them to ``[0, 1]`` on its device (:func:`emu_lightning.sequence.to_unit_range`).

The vision component owns it: ``model.vision.image_transform`` is the :class:`ImageTransform` at its input size.
When the model's parts take different sizes (the decoder stage), the data comes at the largest size and each part
:func:`resize` s the batch to its own on the model's device.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

RESAMPLE = Image.Resampling.BICUBIC


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels over white (img2dataset's alpha matting) rather than their hidden colour."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def resize(images: Tensor, size: int) -> Tensor:
    """Float images ``(N, 3, H, W)`` in ``[0, 1]`` resized to ``(N, 3, size, size)`` (bicubic, antialiased when
    shrinking, as PIL's resize is); returned as they are when already that size. For a model whose parts take
    different sizes (the decoder stage at the paper's sizes: 512 px for Stable Diffusion's VAE, 224 px for
    EVA-CLIP), the data comes at the largest and each part resizes from it."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    dtype = images.dtype
    out = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp_(0, 1).to(dtype)


@dataclass(frozen=True)
class ImageTransform:
    """A picture to a ``(3, size, size)`` uint8 tensor: RGB (alpha over white), the whole picture resized to the
    square (bicubic)."""

    size: int

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"image size {self.size} must be positive")

    def __call__(self, image: Image.Image) -> Tensor:
        image = to_rgb(image)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), RESAMPLE)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def decode(self, data: bytes) -> Tensor:
        """Encoded image bytes (JPEG, PNG, ...); raises whatever PIL raises on broken bytes."""
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # decode now, so truncated or corrupt bytes fail here
            return self(opened)

    def frame(self, rgb: np.ndarray) -> Tensor:
        """A decoded video frame, an ``(H, W, 3)`` uint8 array."""
        return self(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB"))

    def load(self, path: str | Path) -> Tensor | None:
        """An image file as floats in ``[0, 1]``, or ``None`` with a warning when it is missing or does not decode
        (an evaluation counts the skip and goes on)."""
        try:
            with Image.open(path) as opened:
                opened.load()
                image = self(opened)
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping image {str(path)!r}: {err}", stacklevel=2)
            return None
        return image.float() / 255.0
