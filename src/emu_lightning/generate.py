"""Generate images from the command line with a trained EmuModel that has a decoder.

    python -m emu_lightning.generate --ckpt CKPT "a small red circle in the top left."         # text-to-image
    python -m emu_lightning.generate --ckpt CKPT @a.png "and the same in blue:"                # in-context
    python -m emu_lightning.generate --ckpt CKPT --blend a.png b.png                            # blending (as released)
    python -m emu_lightning.generate --ckpt CKPT --blend a.png b.png --blend-mode interpolate --weight 0.3

Prompt items are text, or ``@path`` for an image file (resized to the model's input size). ``--num`` samples
(different noise) are written side by side to ``--out`` (a PNG).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from emu_lightning.checkpoints import CheckpointError
from emu_lightning.images import ImageTransform
from emu_lightning.model import EmuModel


def _image(path: str, size: int) -> torch.Tensor:
    image = ImageTransform(size).load(path)
    if image is None:
        raise SystemExit(f"cannot read image {path!r}")
    return image


def parse_prompt(items: list[str], size: int) -> list[Any]:
    """``["@a.png", "text"]`` -> ``[image tensor, "text"]``."""
    return [_image(item[1:], size) if item.startswith("@") else item for item in items]


def main(argv: list[str] | None = None) -> torch.Tensor:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", help="prompt items: text, or @image.png")
    p.add_argument("--ckpt", required=True, help="an EmuModel checkpoint with a decoder")
    p.add_argument("--blend", nargs=2, metavar=("A", "B"), help="blend two image files instead of a prompt")
    p.add_argument(
        "--blend-mode",
        choices=("regress", "interpolate"),
        default="regress",
        help="regress: Emu regresses the image after A and B (as released); interpolate: decode a mix of their "
        "embeddings",
    )
    p.add_argument("--weight", type=float, default=0.5, help="blend weight of B (--blend-mode interpolate)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--steps", type=int, default=25, help="diffusion sampling steps")
    p.add_argument("--num", type=int, default=4, help="samples (different noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="generated.png")
    args = p.parse_args(argv)
    if not Path(args.ckpt).is_file():
        raise SystemExit(f"checkpoint {args.ckpt!r} does not exist")
    if bool(args.blend) == bool(args.items):
        raise SystemExit("give either prompt items or --blend A B")
    try:
        model = EmuModel.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if model.decoder is None:
        raise SystemExit(f"{args.ckpt} has no decoder: train one first (configs/stages/decoder.yaml)")
    size = model.vision.image_size
    generator = torch.Generator().manual_seed(args.seed)
    options = dict(guidance_scale=args.guidance, steps=args.steps, generator=generator)
    if args.blend:
        a, b = (_image(path, size)[None].expand(args.num, -1, -1, -1) for path in args.blend)
        images = model.blend_images(a, b, weight=args.weight, mode=args.blend_mode, **options)
    else:
        images = model.generate_image([parse_prompt(args.items, size)] * args.num, **options)
    from torchvision.utils import save_image

    save_image(images, args.out, nrow=args.num, padding=2, pad_value=1.0)
    print(f"wrote {args.num} image(s) to {args.out}")
    return images


if __name__ == "__main__":
    main()
