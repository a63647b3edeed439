"""One image transform: a non-square photo becomes the same model input in training readers, evaluation, chat and
generation (the whole picture resized to the square, bicubic, as Emu's released inference does)."""

import io

import numpy as np
import torch
from conftest import make_model
from PIL import Image

from emu_lightning.chat import parse_turn
from emu_lightning.data.coco import load_image
from emu_lightning.data.pairs import decode_image
from emu_lightning.generate import parse_prompt
from emu_lightning.images import ImageTransform, resize


def test_every_path_gives_the_same_input_for_a_non_square_photo(tmp_path):
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # wider than tall
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    model = make_model()
    size = model.vision.image_size
    expected = torch.from_numpy(np.array(Image.fromarray(photo).resize((size, size), Image.Resampling.BICUBIC)))
    expected = expected.permute(2, 0, 1)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    reader = decode_image(buffer.getvalue(), size)  # pairs, MMC4, storyboards, instruction data
    video = ImageTransform(size).frame(photo)  # WebVid and instruction videos, frame by frame
    owned = model.vision.image_transform.load(path)  # what the vision component says
    evaluation = load_image(path, size)
    (chat,) = parse_turn(str(path), size)
    (generation,) = parse_prompt([f"@{path}"], size)
    assert torch.equal(reader, expected) and torch.equal(video, expected)
    for floats in (owned, evaluation, chat, generation):
        assert torch.equal(floats, expected.float() / 255)


def test_resize_matches_pil_when_shrinking_and_keeps_images_of_its_size():
    photo = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    )
    big = ImageTransform(128)(photo).float()[None] / 255
    assert resize(big, 128) is big
    small = resize(big, 32)
    direct = ImageTransform(32)(photo).float()[None] / 255
    assert small.shape == (1, 3, 32, 32) and 0 <= small.min() and small.max() <= 1
    assert (small - direct).abs().mean() < 0.03  # two bicubic steps, nearly PIL's one
    assert resize(big.half(), 32).dtype == torch.float16
