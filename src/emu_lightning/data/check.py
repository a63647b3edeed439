"""Check a data source before training: read it as training would and count what is usable and what is not.

    python -m emu_lightning.data.check --format webdataset 'shards/{00000..00099}.tar'
    python -m emu_lightning.data.check --format mmc4 docs/*.jsonl --image-dir images/
    python -m emu_lightning.data.check --format webvid results_2M_train.csv --video-dir videos/
    python -m emu_lightning.data.check --format storyboard storyboards/index.jsonl --root storyboards/
    python -m emu_lightning.data.check --format llava llava_instruct_150k.json --image-dir coco/train2017/
    python -m emu_lightning.data.check --format videochat videochat_instruct_11k.json --video-dir videos/

Prints one JSON object: ``ok`` (samples that would be used), ``skipped`` (samples, or for storyboards also
single frames and subtitle lines and for chat formats also leading assistant turns, that would be dropped) and
``reasons`` (count per reason), ``examples`` (the first case of each reason, naming its file and record: a
shard and sample key, a csv data row, a json entry), plus the format and paths. Exits 0 when at least one
sample is usable, 1 otherwise (including a source that cannot be opened, with ``error`` in the JSON).
A progress bar over the source's parts (shards, files, chunks of rows or lines) goes to stderr; ``EMU_PROGRESS=0``
turns it off.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from emu_lightning.data.instruct import FORMATS as INSTRUCTION_FORMATS
from emu_lightning.data.instruct import InstructionConversations
from emu_lightning.data.mmc4 import MMC4Documents
from emu_lightning.data.pairs import ImageTextShards
from emu_lightning.data.storyboard import StoryboardVideos
from emu_lightning.data.streaming import StreamingSource
from emu_lightning.data.webvid import WebVidVideos
from emu_lightning.progress import progress_bar

FORMATS = ("webdataset", "mmc4", "webvid", "storyboard", *INSTRUCTION_FORMATS)


def open_source(fmt: str, paths: Sequence[str], args: argparse.Namespace) -> StreamingSource:
    """The reader training would use for ``fmt``, in one ordered pass (no shuffling, no repeat)."""
    common: dict[str, Any] = dict(image_size=args.image_size, shuffle=False, repeat=False, split_by_node=False)
    if fmt == "webdataset":
        return ImageTextShards(list(paths), **common)
    if fmt == "mmc4":
        return MMC4Documents(list(paths), image_dir=args.image_dir, sim_threshold=args.sim_threshold, **common)
    if fmt == "webvid":
        return WebVidVideos(list(paths), video_dir=args.video_dir, num_frames=args.num_frames, train=False, **common)
    if fmt == "storyboard":
        return StoryboardVideos(list(paths), root=args.root, **common)
    if fmt in INSTRUCTION_FORMATS:
        dirs = dict(image_dir=args.image_dir, video_dir=args.video_dir, num_frames=args.num_frames)
        return InstructionConversations(list(paths), fmt, train=False, **dirs, **common)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def check(fmt: str, paths: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """``{"format", "paths", "ok", "skipped", "reasons"}`` (and ``error`` when the source cannot be opened)."""
    report: dict[str, Any] = {"format": fmt, "paths": list(paths)}
    try:
        source = open_source(fmt, paths, args)
        _show_progress(source, f"checking {fmt}")
        report.update(source.check(limit=args.limit), examples=source.skip_examples)
    except (OSError, ValueError) as err:
        report.update(ok=0, skipped=0, reasons={}, examples={}, error=f"{type(err).__name__}: {err}")
    return report


def _show_progress(source: StreamingSource, desc: str) -> None:
    """Make ``source.check`` show a bar with an ETA: it reads the parts ``units()`` lists in order, so this source's
    ``units`` hands them out through the bar (which advances as each part is done)."""
    units = source.units

    def units_with_progress() -> Any:
        parts = list(units())
        return progress_bar(parts, total=len(parts), desc=desc, unit="part")

    source.units = units_with_progress  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS, help="the source's on-disk format")
    p.add_argument("paths", nargs="+", help="shards (brace patterns, pipe: URLs), json, jsonl, csv or index files")
    p.add_argument(
        "--image-dir", help="MMC4, llava: folder the images are named relative to (default: each jsonl/json's folder)"
    )
    p.add_argument(
        "--video-dir",
        help="WebVid: folder holding {page_dir}/{videoid}.mp4 (default: the csv's); videochat, video_chatgpt: "
        "folder the videos are named relative to (default: the json's)",
    )
    p.add_argument("--root", help="storyboard: folder frame and subtitle paths are relative to (default: the index's)")
    p.add_argument("--image-size", type=int, default=224, help="side images and frames are resized to")
    p.add_argument(
        "--num-frames", type=int, default=8, help="WebVid, videochat, video_chatgpt: frames sampled per video"
    )
    p.add_argument("--sim-threshold", type=float, default=0.32, help="MMC4: least image-sentence similarity")
    p.add_argument("--limit", type=int, default=None, help="stop after this many samples (usable or not)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be at least 1, got {args.limit}")
    report = check(args.format, args.paths, args)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
