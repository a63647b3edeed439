"""Data reader throughput against the bare decode cost of the same files, with 0 and 2 DataLoader workers.

    .venv/bin/python benchmarks/data_throughput.py              # 256 px files read at 224 px, ~2.5 min on 2 cores
    .venv/bin/python benchmarks/data_throughput.py --quick      # tiny sizes, a smoke test (< 30 s)
    .venv/bin/python benchmarks/data_throughput.py --profile    # also a cProfile of one 0-worker pass per reader

Prints one JSON line per (format, workers), with the samples per second of the reader and of a bare decode
loop over the same files, and their ratio.

Data: ShapesWorld writes each format into a temporary folder with the project's writers, images and video
frames ``--stored-size`` px square (256), read at ``--image-size`` (224), so every image is really resized:

- ``webdataset``: :func:`~emu_lightning.shapesworld.writers.write_shapesworld_pairs`, 8 tar shards, JPEG by
  default (``--image-format``; LAION's shards are JPEG), read by :class:`~emu_lightning.data.pairs.ImageTextShards`.
- ``mmc4`` / ``mmc4_tar``: :func:`~emu_lightning.shapesworld.writers.write_shapesworld_mmc4` in its jsonl layout
  (PNG files beside 8 jsonl files) and its tar layout (8 shards of json with base64 PNGs), 2-4 images a document,
  read by :class:`~emu_lightning.data.mmc4.MMC4Documents` (default threshold 0.32, at most 5 images).
- ``webvid``: :func:`~emu_lightning.shapesworld.writers.write_shapesworld_webvid`, 16-frame mp4 clips (8 fps),
  8 frames sampled per clip at the segment centres (``train=False``), read by
  :class:`~emu_lightning.data.webvid.WebVidVideos`.
- ``storyboard``: :func:`~emu_lightning.shapesworld.writers.write_shapesworld_storyboard`, 8 PNG frames and a .vtt
  file a video, read by :class:`~emu_lightning.data.storyboard.StoryboardVideos`.

ShapesWorld images are flat shapes on a plain background: they decode faster than photographs, so the readers'
own per-sample work weighs *more* here than on real data; the ratios are a conservative bound.

Contenders (each counts samples: a pair, a document, a clip, a storyboard):

- ``reader_0``: the reader in one ordered pass (``shuffle=False, repeat=False``) through a ``DataLoader`` with
  ``num_workers=0`` and ``batch_size=None``: the reader's own samples, no collation, no tokenisation.
- ``reader_w``: the same with ``w`` persistent workers (``--workers``), in batches of ``--batch-size`` (32)
  that :func:`collate_images` stacks in the workers (every image of a batch in one tensor, as the
  SequenceBuilder stacks them; written straight into shared memory, as torch's ``default_collate`` does).
  So moving the samples from the workers to the main process is counted, as a training run pays it.
  Batching is needed: with ``batch_size=None`` every image tensor crosses on its own, at about 1 ms of
  file-descriptor passing per tensor (``--batch-size 0`` shows it). Worker start-up is not timed (a warm-up
  pass starts the workers; they persist).
- ``bare_1``: the decode work the samples need, and only that, in a tight loop over the same files in this
  process: the same :func:`~emu_lightning.data.pairs.decode_image` (PIL decode, bicubic resize of the shorter
  side, centre crop, float tensor) of each image the reader decodes, or the same
  :func:`~emu_lightning.data.webvid.read_clip` (PyAV decode up to the last sampled frame, area resize) of each
  clip with the same frame times. The file lists are made before timing; reading the bytes is timed (with
  ``tarfile`` for shards, plus ``json.loads`` and base64 for MMC4's tar layout, whose images live inside the
  json). Reader overhead, timed in ``reader`` only: parsing jsonl, csv and WebVTT, ``webdataset``'s tar
  streaming, skip bookkeeping, the sample dicts; with workers, also the collation and the transfer.
- ``bare_w``: ``bare_1`` in ``w`` forked processes at once (a persistent ``multiprocessing`` pool, each
  process decoding every ``w``-th file as the workers split the units; only counts come back).

Ratios (target: ``ratio_vs_limit >= 0.8`` on every line):

- ``ratio = samples_per_s / bare_samples_per_s``: against the 1-process bare loop (``bare_1``).
- ``ratio_vs_limit = samples_per_s / limit_samples_per_s``, the limit being the bare loop with as many
  processes as decode: ``bare_1`` for 0 workers, ``bare_w`` for ``w``. It is measured in the same rounds, so
  it gets the same share of a shared machine as the workers do (on the 2-core box below, busy with other jobs,
  ``bare_2`` ran no faster than ``bare_1``). ``ratio_vs_ideal`` divides by ``bare_1 * min(workers, cores)``
  instead: the limit of an idle machine, which a shared one never reaches.
- ``cpu_ratio = bare_cpu_ms_per_sample / cpu_ms_per_sample``: the same comparison in CPU time per sample (this
  process plus the workers or pool processes, from ``/proc``), against the limit's bare loop. It does not
  depend on how much of the machine other jobs leave, so it is the steadier figure on a shared machine; where
  wall-clock ratios and ``cpu_ratio`` disagree, load changed within a round.

Timing: one round runs every contender of a format once, in an order rotated every round, so drifting load
hits all alike; ``--rounds`` (5) rounds, medians reported. Torch runs 1 thread in the main process
(``--threads``), as in DataLoader workers and the pool; the decode work is single-threaded PIL, and FFmpeg's
own threads are the same in every contender. ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` as in the other
benchmarks. ``--profile`` prints a cProfile of one 0-worker pass of each reader (stderr).

What the numbers say (the defaults on a 2-core AMD EPYC, idle, load average 0.7-1.5; torch 2.14, Pillow 13,
PyAV 18; uint8 images). Wall-clock ratio against the limit in two runs of 7 rounds, then ``cpu_ratio``:

==============  =====================  =====================
format          0 workers              2 workers (batch 32)
==============  =====================  =====================
webdataset      0.93 / 0.96 (0.93)     0.80 / 0.81 (0.79)
mmc4            0.89 / 0.91 (0.89)     0.82 / 0.88 (0.83)
mmc4_tar        0.96 / 0.92 (0.96)     0.90 / 0.83 (0.91)
webvid          0.99 / 0.98 (0.98)     0.90 / 0.91 (0.88)
storyboard      0.95 / 0.95 (0.95)     0.86 / 0.95 (0.88)
==============  =====================  =====================

- Without workers the image readers use 4-11% more CPU than their bare decode (webdataset's streaming tar
  parse, about 0.1 ms a sample, is the largest part). Half of the decode work is PIL's bicubic resize (about
  0.9 ms for 256 to 224 px), a tenth to a fifth the JPEG or PNG decode.
- With workers, a batch costs a fixed 2-3 ms of CPU to hand from a worker to the main process (a shared-memory
  file, passing its descriptor, the queue message, the main process mapping it): a fifth of the pairs' decode
  time at batch 8 (``ratio_vs_limit`` 0.72-0.90 over several runs), about 5% at 32. The readers yield uint8
  images (a quarter of float32's bytes; the model scales them on its device), which halved the per-image part.
- Video decoding is the noisiest on a loaded machine (probably FFmpeg's own threads waiting on each other).
- At 32 px (the tiny model's size: ``--image-size 32 --stored-size 40``), a decode is about ten times
  cheaper and the readers' fixed Python work per sample weighs more: about 0.08 ms a pair (webdataset's
  pure-Python tar streaming), 0.15 ms a document (mmc4: json, per-image path and file calls) and 0.45 ms a
  storyboard (json, WebVTT parsing, a read per frame).
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
from torch.utils.data import DataLoader, get_worker_info

from emu_lightning.data.mmc4 import MMC4Documents
from emu_lightning.data.pairs import IMAGE_EXTENSIONS, ImageTextShards, decode_image
from emu_lightning.data.storyboard import StoryboardVideos, even_subset
from emu_lightning.data.streaming import StreamingSource
from emu_lightning.data.webvid import WebVidVideos, read_clip
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import (
    write_shapesworld_mmc4,
    write_shapesworld_pairs,
    write_shapesworld_storyboard,
    write_shapesworld_webvid,
)

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
    tokenisation. In a worker the stack is written straight into shared memory, as torch's
    ``default_collate`` does, which saves the copy into shared memory when the batch is sent."""
    images: list[torch.Tensor] = []
    texts: list[str] = []
    for sample in samples:
        for item in sample["items"]:
            if isinstance(item, torch.Tensor):
                images.extend(item if item.dim() == 4 else [item])
            else:
                texts.append(item)
    out = None
    if get_worker_info() is not None:
        first = images[0]
        storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(images), *first.shape)
    return {"images": torch.stack(images, out=out), "texts": texts, "samples": len(samples)}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds that process ``pid`` has used so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Contender:
    """One way through a format's samples: ``run()`` makes a pass and returns its sample count; ``pids`` are the
    helper processes (DataLoader workers, pool processes) whose CPU time counts with this process's."""

    run: Callable[[], int]
    pids: list[int]

    def timed(self, expected: int, what: str) -> tuple[float, float]:
        """One pass: ``(samples per second, CPU milliseconds per sample)``, the CPU time of this process and
        the helpers together. Raises when the pass did not yield ``expected`` samples."""
        cpu = time.process_time() + sum(process_cpu_s(p) for p in self.pids)
        start = time.perf_counter()
        n = self.run()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() + sum(process_cpu_s(p) for p in self.pids) - cpu
        if n != expected:
            raise RuntimeError(f"{what}: {n} samples, expected {expected}")
        return n / elapsed, 1000 * cpu / n


def register_helper(pids: Any, *_: Any) -> None:
    """A helper process's start (DataLoader ``worker_init_fn``, pool ``initializer``): one torch thread, as
    DataLoader workers have, and its pid sent to the benchmark through ``pids`` (a queue)."""
    torch.set_num_threads(1)
    pids.put(os.getpid())


def pool_pass(pool: Any, bare: Callable[[list[Any]], int], parts: list[list[Any]]) -> int:
    """The bare loop in the pool's processes at once, each on one part; the samples of all parts."""
    return sum(pool.map(bare, parts))


def loader(reader: StreamingSource, workers: int, batch_size: int, pids: Any) -> DataLoader:
    """The reader's DataLoader: with workers, batches of ``batch_size`` stacked by :func:`collate_images` in
    the workers (``batch_size`` 0: ``batch_size=None``); without, ``batch_size=None`` (nothing crosses a
    process, so nothing needs collating)."""
    init = functools.partial(register_helper, pids)
    common = dict(num_workers=workers, persistent_workers=workers > 0, worker_init_fn=init if workers else None)
    if workers and batch_size:
        return DataLoader(reader, batch_size, collate_fn=collate_images, **common)
    return DataLoader(reader, batch_size=None, **common)


def run_format(bench: Bench, args: argparse.Namespace, pools: dict[int, tuple[Any, list[int]]]) -> list[dict[str, Any]]:
    """Alternating rounds of the reader (each worker count) and the bare loop (1 process and each worker count)."""
    context = multiprocessing.get_context("fork")
    bare = functools.partial(bare_pass, bench.name, args.image_size, args.num_frames)
    contenders: dict[str, Contender] = {}
    loaders = {}
    for w in args.workers:
        queue = context.SimpleQueue()
        loaders[w] = loader(bench.reader(), w, args.batch_size, queue)
        contender = contenders[f"reader_{w}"] = Contender(functools.partial(count, loaders[w]), [])
        contender.timed(bench.samples, f"{bench.name} reader_{w}")  # warm-up: starts the workers, fills caches
        contender.pids = [queue.get() for _ in range(w)]
    contenders["bare_1"] = Contender(functools.partial(bare, bench.items), [])
    for p, (pool, pids) in pools.items():
        parts = [bench.items[k::p] for k in range(p)]  # every p-th file, as the workers split the units
        contenders[f"bare_{p}"] = Contender(functools.partial(pool_pass, pool, bare, parts), pids)
    for name in contenders:
        contenders[name].timed(bench.samples, f"{bench.name} {name}")  # warm-up (again for the readers: harmless)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    cpus: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rate, cpu = contenders[name].timed(bench.samples, f"{bench.name} {name}")
            rates[name].append(rate)
            cpus[name].append(cpu)
        log(
            f"{bench.name} round {r}: "
            + ", ".join(
                f"{k} {statistics.median(v):.1f}/s ({statistics.median(cpus[k]):.2f} ms cpu)" for k, v in rates.items()
            )
        )
    del loaders, contenders  # shuts the persistent workers down

    cores = len(os.sched_getaffinity(0))
    bare_1 = statistics.median(rates["bare_1"])
    records = []
    for w in args.workers:
        sps, cpu = statistics.median(rates[f"reader_{w}"]), statistics.median(cpus[f"reader_{w}"])
        limit_name = f"bare_{w}" if w > 1 else "bare_1"
        limit, limit_cpu = statistics.median(rates[limit_name]), statistics.median(cpus[limit_name])
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
                "cpu_ms_per_sample": round(cpu, 3),
                "bare_cpu_ms_per_sample": round(limit_cpu, 3),
                "cpu_ratio": round(limit_cpu / cpu, 3),
                "batch_size": args.batch_size if w and args.batch_size else None,
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
        default=32,
        help="with workers: samples per batch, stacked by collate_images in the workers (0: batch_size=None)",
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
    pools = {}
    for p in sorted({w for w in args.workers if w > 1}):
        queue = context.SimpleQueue()
        pool = context.Pool(p, initializer=register_helper, initargs=(queue,))
        pools[p] = (pool, [queue.get() for _ in range(p)])
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
        for pool, _ in pools.values():
            pool.terminate()
    log(f"done in {time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
