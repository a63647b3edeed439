"""Data reader throughput against the bare decode cost of the same files, with 0 and 2 DataLoader workers.

    .venv/bin/python benchmarks/data_throughput.py              # 256 px files read at 224 px, ~3-4 min on 2 cores
    .venv/bin/python benchmarks/data_throughput.py --quick      # tiny sizes, a smoke test (< 30 s)
    .venv/bin/python benchmarks/data_throughput.py --profile    # also a cProfile of one 0-worker pass per reader

Prints one JSON line per (format, workers). Target: ``ratio_vs_limit >= 0.8`` for every line.

Data: ShapesWorld writes each format into a temporary folder with the project's writers, images and video
frames ``--stored-size`` px square (256), read at ``--image-size`` (224), so every image is really resized:

- ``webdataset``: :func:`~emu_lightning.data.pairs.write_shapesworld_pairs`, 8 tar shards, JPEG by default
  (``--image-format``; LAION's shards are JPEG), read by :class:`~emu_lightning.data.pairs.ImageTextShards`.
- ``mmc4`` / ``mmc4_tar``: :func:`~emu_lightning.data.mmc4.write_shapesworld_mmc4` in its jsonl layout (PNG
  files beside 8 jsonl files) and its tar layout (8 shards of json with base64 PNGs), 2-4 images a document,
  read by :class:`~emu_lightning.data.mmc4.MMC4Documents` (default threshold 0.32, at most 5 images).
- ``webvid``: :func:`~emu_lightning.data.webvid.write_shapesworld_webvid`, 16-frame mp4 clips (8 fps), 8 frames
  sampled per clip at the segment centres (``train=False``), read by :class:`~emu_lightning.data.webvid.WebVidVideos`.
- ``storyboard``: :func:`~emu_lightning.data.storyboard.write_shapesworld_storyboard`, 8 PNG frames and a .vtt
  file a video, read by :class:`~emu_lightning.data.storyboard.StoryboardVideos`.

ShapesWorld images are flat shapes on a plain background: they decode faster than photographs, so the readers'
own per-sample work weighs *more* here than on real data; the ratios are a conservative bound.

Contenders (each counts samples: a pair, a document, a clip, a storyboard):

- ``reader``: the reader in one ordered pass (``shuffle=False, repeat=False``) through a ``DataLoader`` with
  ``batch_size=None`` (no collation, no tokenisation) and ``num_workers`` 0 or 2 (``--workers``). Workers are
  persistent and a warm-up pass is not timed, so worker start-up is excluded; the moving of each sample's
  tensors from a worker to the main process (shared memory) is included, as a training run pays it too.
- ``bare``: the decode work those samples need, and only that, in a tight loop over the same files: the
  same :func:`~emu_lightning.data.pairs.decode_image` (PIL decode, bicubic resize of the shorter side, centre
  crop, float tensor) of each image that the reader decodes, or the same
  :func:`~emu_lightning.data.webvid.read_clip` (PyAV decode up to the last sampled frame, area resize) of
  each clip with the same frame times. File lists are made before timing; reading the files' bytes (with
  ``tarfile`` for shards, plus ``json.loads`` and base64 for MMC4's tar layout, where the images live inside
  the json) is timed. Not timed in ``bare``, so counted as reader overhead: parsing jsonl, csv and WebVTT,
  ``webdataset``'s tar streaming, the skip bookkeeping, building the sample dicts.
  ``bare`` runs in 1 process and, for ``w`` workers, in ``w`` forked processes at once (a ``multiprocessing``
  pool with persistent processes, each decoding every ``w``-th file, as the reader's workers split units).

Ratios:

- ``ratio = samples_per_s / bare_samples_per_s``: against the 1-process bare loop.
- ``ratio_vs_limit = samples_per_s / limit_samples_per_s``, the one the 0.8 target applies to. The limit is the
  bare loop with as many processes as the reader has (1 for ``workers=0``; ``w`` for ``w`` workers), measured
  in the same rounds: on a shared machine two processes rarely get two whole cores, and the measured
  ``w``-process bare loop suffers the same load as the ``w`` workers do. ``ratio_vs_ideal`` compares with
  ``bare_samples_per_s * min(workers, cores)`` instead, the limit of an idle machine. With 2 workers on 2
  cores the main process (receiving the samples) competes with the workers for the cores; the bare loop's
  main process only waits.

Timing: one round runs every contender of a format once, in an order rotated every round (so drifting load
hits all alike); ``--rounds`` rounds, medians reported. Torch runs 1 thread (``--threads``) in the main
process as DataLoader workers do; the decode work is single-threaded PIL and FFmpeg (whose own threading is
the same in both contenders). ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` as in the other benchmarks.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch loads the OpenMP runtime)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/train_throughput.py: shared cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import base64
import contextlib
import cProfile
import csv
import functools
import io
import json
import math
import multiprocessing
import pstats
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import PIL
import torch
from torch.utils.data import DataLoader

from emu_lightning.data.mmc4 import MMC4Documents, write_shapesworld_mmc4
from emu_lightning.data.pairs import IMAGE_EXTENSIONS, ImageTextShards, decode_image, write_shapesworld_pairs
from emu_lightning.data.storyboard import StoryboardVideos, even_subset, write_shapesworld_storyboard
from emu_lightning.data.streaming import StreamingSource
from emu_lightning.data.webvid import WebVidVideos, read_clip, write_shapesworld_webvid
from emu_lightning.data.world import ShapesWorld

FORMATS = ("webdataset", "mmc4", "mmc4_tar", "webvid", "storyboard")
UNITS = 8
"""Shards / files / csv chunks / index chunks per format: enough for the workers to split evenly."""
SIM_THRESHOLD, MAX_IMAGES = 0.32, 5
"""MMC4Documents' defaults: the images the reader decodes (and so the bare loop decodes)."""
MAX_FRAMES = 8
"""StoryboardVideos' default ``max_frames``; ShapesWorld storyboards are written with this many frames."""
FULL = dict(image_size=224, stored_size=256, pairs=512, docs=192, videos=64, storyboards=64, rounds=5)
QUICK = dict(image_size=32, stored_size=40, pairs=64, docs=32, videos=16, storyboards=16, rounds=2)
"""Sizes of the default run and of ``--quick``; a flag given on the command line wins."""


def log(msg: str) -> None:
    print(f"[data_throughput] {msg}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    """One format's files: ``reader()`` makes its reader, ``items`` are the bare loop's work (one per sample,
    or one per tar shard for the tar formats), ``samples`` the samples a pass yields."""

    name: str
    reader: Callable[[], StreamingSource]
    items: list[Any]
    samples: int
    config: dict[str, Any]


# ---------------------------------------------------------------------- bare decode loops (module level: picklable)
def bare_pass(fmt: str, image_size: int, num_frames: int, items: list[Any]) -> int:
    """Decode what ``items`` hold in a tight loop; returns the number of samples they make."""
    samples = 0
    if fmt == "webdataset":
        for shard in items:
            with tarfile.open(shard) as tar:
                for member in tar:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                        decode_image(data, image_size)
                        samples += 1
    elif fmt == "mmc4_tar":
        for shard in items:
            with tarfile.open(shard) as tar:
                for member in tar:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    infos = kept_images(json.loads(data))
                    for info in infos:
                        decode_image(base64.b64decode(info["image_base64"]), image_size)
                    samples += bool(infos)
    elif fmt in ("mmc4", "storyboard"):
        for paths in items:
            for path in paths:
                decode_image(path.read_bytes(), image_size)
            samples += 1
    elif fmt == "webvid":
        for path in items:
            read_clip(path, num_frames, image_size)
            samples += 1
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return samples


def kept_images(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``image_info`` entries MMC4Documents decodes: ``matched_sim >= 0.32``, the first 5 in text order."""
    candidates = sorted(
        (info["matched_text_index"], k)
        for k, info in enumerate(doc["image_info"])
        if info["matched_sim"] >= SIM_THRESHOLD
    )
    return [doc["image_info"][k] for _, k in candidates[:MAX_IMAGES]]


# ---------------------------------------------------------------------- data
def make_benches(root: Path, args: argparse.Namespace) -> list[Bench]:
    """Write every format of ``args.formats`` under ``root`` and describe how to read it."""
    world = ShapesWorld(image_size=args.stored_size)
    size, common = args.image_size, dict(shuffle=False, repeat=False, split_by_node=False)
    benches = []
    for fmt in args.formats:
        start = time.perf_counter()
        folder = root / fmt
        if fmt == "webdataset":
            n = args.pairs
            shards = write_shapesworld_pairs(
                world, folder, num_samples=n, shard_size=math.ceil(n / UNITS), image_format=args.image_format
            )
            bench = Bench(
                fmt,
                functools.partial(ImageTextShards, shards, size, **common),
                shards,
                n,
                {"samples": n, "shards": len(shards), "image_format": args.image_format},
            )
        elif fmt in ("mmc4", "mmc4_tar"):
            layout = "jsonl" if fmt == "mmc4" else "wds"
            n = args.docs
            files = write_shapesworld_mmc4(world, folder, num_docs=n, layout=layout, docs_per_file=math.ceil(n / UNITS))
            image_dir = str(folder / "images") if layout == "jsonl" else None
            if layout == "jsonl":
                docs = [json.loads(line) for path in files for line in Path(path).read_text().splitlines()]
                items: list[Any] = [[folder / "images" / i["image_name"] for i in kept_images(d)] for d in docs]
                items = [paths for paths in items if paths]
                samples, images = len(items), sum(len(paths) for paths in items)
            else:
                items = files
                with contextlib.ExitStack() as stack:
                    tars = [stack.enter_context(tarfile.open(path)) for path in files]
                    counts = [len(kept_images(json.load(t.extractfile(m)))) for t in tars for m in t]  # type: ignore
                samples, images = sum(c > 0 for c in counts), sum(counts)
            bench = Bench(
                fmt,
                functools.partial(
                    MMC4Documents, files, size, image_dir=image_dir, sim_threshold=SIM_THRESHOLD, **common
                ),
                items,
                samples,
                {"documents": n, "usable_documents": samples, "images_decoded": images, "files": len(files)},
            )
        elif fmt == "webvid":
            n = args.videos
            csv_path = write_shapesworld_webvid(world, folder, num_videos=n, num_frames=args.clip_frames, fps=8)
            with csv_path.open() as f:
                rows = list(csv.DictReader(f))
            items = [folder / row["page_dir"] / f"{row['videoid']}.mp4" for row in rows]
            reader = functools.partial(
                WebVidVideos,
                csv_path,
                num_frames=args.num_frames,
                image_size=size,
                train=False,
                rows_per_unit=math.ceil(n / UNITS),
                **common,
            )
            config = {"clips": n, "clip_frames": args.clip_frames, "num_frames": args.num_frames}
            bench = Bench(fmt, reader, items, n, config)
        elif fmt == "storyboard":
            n = args.storyboards
            index = write_shapesworld_storyboard(world, folder, num_videos=n, frames_per_video=MAX_FRAMES)
            docs = [json.loads(line) for line in index.read_text().splitlines()]
            items = []
            for doc in docs:
                frames = sorted((f["time"], f["image"]) for f in doc["frames"])
                items.append([folder / frames[k][1] for k in even_subset(len(frames), MAX_FRAMES)])
            reader = functools.partial(
                StoryboardVideos,
                index,
                image_size=size,
                max_frames=MAX_FRAMES,
                lines_per_unit=math.ceil(n / UNITS),
                **common,
            )
            bench = Bench(fmt, reader, items, n, {"storyboards": n, "frames_per_storyboard": MAX_FRAMES})
        else:
            raise ValueError(f"unknown format {fmt!r}")
        log(f"wrote {fmt} ({bench.samples} samples) in {time.perf_counter() - start:.1f}s")
        benches.append(bench)
    return benches


# ---------------------------------------------------------------------- contenders
def count(samples: Iterable[Any]) -> int:
    """Samples in a pass: one per element, or ``batch["samples"]`` per batch of :func:`collate_images`."""
    return sum(x["samples"] if "images" in x else 1 for x in samples)


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A trivial collate: every image and video frame of the batch stacked into one tensor, as the
    SequenceBuilder stacks them (so a batch leaves a worker as one tensor), the texts in a list; no
    tokenisation."""
    images: list[torch.Tensor] = []
    texts: list[str] = []
    for sample in samples:
        for item in sample["items"]:
            if isinstance(item, torch.Tensor):
                images.extend(item if item.dim() == 4 else [item])
            else:
                texts.append(item)
    return {"images": torch.stack(images), "texts": texts, "samples": len(samples)}


def timed(fn: Callable[[], int], expected: int, what: str) -> float:
    """Run one pass; its samples per second. Raises when the pass did not yield ``expected`` samples."""
    start = time.perf_counter()
    n = fn()
    elapsed = time.perf_counter() - start
    if n != expected:
        raise RuntimeError(f"{what}: {n} samples, expected {expected}")
    return n / elapsed


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_format(bench: Bench, args: argparse.Namespace, pools: dict[int, Any]) -> list[dict[str, Any]]:
    """Alternating rounds of the reader (each worker count) and the bare loop (1 and each worker count)."""
    batch = dict(batch_size=args.batch_size, collate_fn=collate_images) if args.batch_size else dict(batch_size=None)
    loaders = {w: DataLoader(bench.reader(), num_workers=w, persistent_workers=w > 0, **batch) for w in args.workers}
    bare = functools.partial(bare_pass, bench.name, args.image_size, args.num_frames)

    def bare_parallel(processes: int) -> int:
        parts = [bench.items[k::processes] for k in range(processes)]
        return sum(pools[processes].map(bare, parts))

    contenders: dict[str, Callable[[], int]] = {f"reader_{w}": functools.partial(count, loaders[w]) for w in loaders}
    contenders["bare_1"] = functools.partial(bare, bench.items)
    for p in sorted({w for w in args.workers if w > 1}):
        contenders[f"bare_{p}"] = functools.partial(bare_parallel, p)
    for name, fn in contenders.items():  # warm-up: starts the workers, fills the page cache, checks the counts
        timed(fn, bench.samples, f"{bench.name} {name}")
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(timed(contenders[name], bench.samples, f"{bench.name} {name}"))
        log(f"{bench.name} round {r}: " + ", ".join(f"{k} {statistics.median(v):.1f}/s" for k, v in rates.items()))
    del loaders  # shuts the persistent workers down

    cores = len(os.sched_getaffinity(0))
    bare_1 = statistics.median(rates["bare_1"])
    records = []
    for w in args.workers:
        sps = statistics.median(rates[f"reader_{w}"])
        limit = statistics.median(rates[f"bare_{w}"]) if w > 1 else bare_1
        ideal = bare_1 * max(1, min(w, cores))
        records.append(
            {
                "format": bench.name,
                "workers": w,
                "samples_per_s": round(sps, 2),
                "bare_samples_per_s": round(bare_1, 2),
                "ratio": round(sps / bare_1, 3),
                "limit_samples_per_s": round(limit, 2),
                "ratio_vs_limit": round(sps / limit, 3),
                "ideal_limit_samples_per_s": round(ideal, 2),
                "ratio_vs_ideal": round(sps / ideal, 3),
                "target": 0.8,
                "meets_target": sps / limit >= 0.8,
                "samples_per_pass": bench.samples,
                **bench.config,
            }
        )
    return records


def profile_reader(bench: Bench, top: int) -> None:
    """cProfile of one 0-worker pass of the reader, the top functions by own time and cumulative time to stderr."""
    profiler = cProfile.Profile()
    reader = bench.reader()
    profiler.enable()
    count(reader)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    log(f"profile of one {bench.name} pass (0 workers):\n{out.getvalue()}")


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: a smoke test of under 30 s")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader worker counts")
    p.add_argument("--image-size", type=int, help="side the readers resize images and frames to (224; quick: 32)")
    p.add_argument("--stored-size", type=int, help="side of the images and frames written (256; quick: 40)")
    p.add_argument("--image-format", choices=("jpg", "png", "webp"), default="jpg", help="webdataset images")
    p.add_argument("--pairs", type=int, help="webdataset: image-text pairs (512; quick: 64)")
    p.add_argument("--docs", type=int, help="mmc4, mmc4_tar: documents of 2-4 images (192; quick: 32)")
    p.add_argument("--videos", type=int, help="webvid: clips (64; quick: 16)")
    p.add_argument("--clip-frames", type=int, default=16, help="webvid: frames per written clip (8 fps)")
    p.add_argument("--num-frames", type=int, default=8, help="webvid: frames sampled per clip")
    p.add_argument("--storyboards", type=int, help="storyboard: videos of 8 frames (64; quick: 16)")
    p.add_argument("--rounds", type=int, help="alternating rounds; medians are reported (5; quick: 2)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="samples per batch, collated by stacking the images (0: batch_size=None, each sample apart)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process (workers use 1)")
    p.add_argument("--profile", action="store_true", help="cProfile one 0-worker pass of each reader (stderr)")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds < 1 or any(w < 0 for w in args.workers) or args.image_size < 1:
        p.error("need --rounds >= 1, --workers >= 0 and --image-size >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    context = multiprocessing.get_context("fork")  # as the DataLoader's workers on Linux
    pools = {p: context.Pool(p, initializer=_one_thread) for p in sorted({w for w in args.workers if w > 1})}
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="data_throughput_") as tmp:
            for bench in make_benches(Path(tmp), args):
                records = run_format(bench, args, pools)
                if args.profile:
                    profile_reader(bench, top=15)
                for record in records:
                    record.update(
                        {
                            "image_size": args.image_size,
                            "stored_size": args.stored_size,
                            "batch_size": args.batch_size or None,
                            "rounds": args.rounds,
                            "threads": torch.get_num_threads(),
                            "cores": len(os.sched_getaffinity(0)),
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                            "torch": torch.__version__,
                            "pillow": PIL.__version__,
                            "av": av.__version__,
                        }
                    )
                    print(json.dumps(record), flush=True)
                    results.append(record)
    finally:
        for pool in pools.values():
            pool.terminate()
    log(f"done in {time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
