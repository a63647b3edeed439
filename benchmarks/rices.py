"""RICES retrieval speed against a plain torch top-k, and the encoder calls saved by caching per unique image.

    .venv/bin/python benchmarks/rices.py            # 100k x 768 support, 5k queries, 1,000 VQA images: ~1-2 min
    .venv/bin/python benchmarks/rices.py --quick    # small sizes, a smoke test
    .venv/bin/python benchmarks/rices.py --questions vqav2_train_questions.json   # (b) on a real questions file

Prints one JSON line per measurement.

Method (one process, fp32, ``torch.set_num_threads`` = faiss's OpenMP threads = the usable cores):

(a) ``search``: support features ``(M, D)`` and query features ``(N, D)`` are Gaussian, L2-normalised, from a
    fixed seed. Each contender answers all N queries (top ``k``, least similar first), in rounds with the
    order rotated every round; the median of ``--repeats`` rounds is reported.

    - ``baseline``: ``(queries @ support.T).topk(k)``, one matmul over all queries (an N x M float32 block).
    - ``baseline_chunked``: the same in blocks of 1,024 queries (bounded memory).
    - ``rices``: ``RICES.from_features(support).find(queries, k)`` with its default backend; also each backend
      forced (``faiss_s``: ``IndexFlatIP``; ``torch_s``: chunked matmul). Both take 2k + 8 float32
      candidates; rows where two of the best k + 1 are within float32 rounding (``D * 2^-23``) are
      re-ranked in float64 with ties by the lower index, so the backends agree exactly.
      Index construction (normalising and copying the features, ``IndexFlatIP.add``) is timed apart
      (``build_s``): it is paid once per support set, not per query.

    ``speedup = baseline_s / rices_s``. ``rows_differing`` counts queries whose indices differ from the
    baseline: a float32 similarity has rounding error ~1e-7, so two support items closer than that may
    swap or trade the k-th place; for those rows ``max_similarity_gap`` is the largest float64 difference
    between the swapped items, and ``rices_exact`` says whether RICES's rows equal a float64 top-k.

(b) ``encoder_calls``: a VQA-like support set, several questions per image (ShapesWorld train scenes
    with their VQA questions, 32 px, a tiny ViT as the encoder; or the ``image_id`` of every question in
    ``--questions``, with placeholder pixels, since only counts matter). RICES encodes each unique image
    once (``encoder_calls_cached``); OpenFlamingo's loader encoded the image of every question
    (``encoder_calls_per_question``, run here as RICES over items that each count as their own image).
    ``saved_ratio = 1 - cached / per_question``. A second construction with the same cache key reads the
    features from disk (``encoder_calls_reload``, expected 0).
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch loads the OpenMP runtime)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/train_throughput.py: shared cores

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import torch
import torch.nn.functional as F

from emu_lightning.components.vision import TimmVisionBackbone
from emu_lightning.eval.rices import RICES, features_from_vision_backbone
from emu_lightning.shapesworld.world import ShapesWorld


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def baseline(support: torch.Tensor, queries: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    chunk = chunk or queries.shape[0]
    return torch.cat([(q @ support.T).topk(k, dim=1).indices.flip(1) for q in queries.split(chunk)])


def bench_search(args: argparse.Namespace, threads: int) -> None:
    g = torch.Generator().manual_seed(args.seed)
    support = F.normalize(torch.randn(args.support, args.dim, generator=g), dim=1)
    queries = F.normalize(torch.randn(args.queries, args.dim, generator=g), dim=1)
    k = args.k

    build_s, default = timed(lambda: RICES.from_features(support))
    forced = {
        "torch": RICES.from_features(support, use_faiss=False),
        "faiss": RICES.from_features(support, use_faiss=True),
    }
    contenders = {
        "baseline": lambda: baseline(support, queries, k),
        "baseline_chunked": lambda: baseline(support, queries, k, chunk=1024),
        "rices": lambda: default.find(queries, k),
        "torch": lambda: forced["torch"].find(queries, k),
        "faiss": lambda: forced["faiss"].find(queries, k),
    }
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds, results[name] = timed(contenders[name])
            times[name].append(seconds)
    med = {n: statistics.median(t) for n, t in times.items()}

    base, ours = results["baseline"], results["rices"]
    differing = (base != ours).any(dim=1).nonzero().flatten()
    gap, exact = 0.0, True
    if len(differing):
        q64 = queries[differing].double()
        sims = torch.cat([q64 @ s.double().T for s in support.split(20_000)], dim=1)  # exact, rows x M
        gap = (sims.gather(1, ours[differing]) - sims.gather(1, base[differing])).abs().max().item()
        exact = bool((sims.gather(1, ours[differing]) == sims.topk(k, dim=1).values.flip(1)).all())
    emit(
        {
            "bench": "search",
            "support": args.support,
            "queries": args.queries,
            "dim": args.dim,
            "k": k,
            "threads": threads,
            "repeats": args.repeats,
            "backend": default.backend,
            "baseline_s": round(med["baseline"], 3),
            "baseline_chunked_s": round(med["baseline_chunked"], 3),
            "rices_s": round(med["rices"], 3),
            "torch_s": round(med["torch"], 3),
            "faiss_s": round(med["faiss"], 3),
            "build_s": round(build_s, 3),
            "speedup": round(med["baseline"] / med["rices"], 3),
            "speedup_vs_chunked": round(med["baseline_chunked"] / med["rices"], 3),
            "indices_identical": len(differing) == 0,
            "rows_differing": len(differing),
            "max_similarity_gap": gap,
            "rices_exact": exact,
            "backends_identical": torch.equal(results["torch"], results["faiss"]),
            "times_s": {n: [round(t, 3) for t in ts] for n, ts in times.items()},
        }
    )


class LazyVQA:
    """Items ``{"image_id", "image", "question"}``; pixels come from ``load(image_id)``, memoised."""

    def __init__(self, questions: list[dict[str, Any]], load: Callable[[Any], torch.Tensor], id_key: str) -> None:
        self.questions, self.load, self._pixels = questions, load, {}
        self.image_ids = [q[id_key] for q in questions]

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.image_ids[i]
        if image_id not in self._pixels:
            self._pixels[image_id] = self.load(self.questions[i]["image_id"])
        return {"image_id": image_id, "image": self._pixels[image_id], "question": self.questions[i]["question"]}


def bench_encoder_calls(args: argparse.Namespace) -> None:
    world = ShapesWorld(image_size=32)
    if args.questions:
        questions = json.loads(Path(args.questions).read_text())["questions"]
        blank = torch.zeros(3, 32, 32)
        load, source = (lambda _id: blank), f"{args.questions} (placeholder pixels)"
    else:
        questions = [
            {"image_id": i, "question": qa.question, "question_id": qa.question_id}
            for i in range(args.images)
            for qa in world.questions("train", i)
        ]
        load, source = (lambda i: world.image("train", i)), f"ShapesWorld train, {args.images} scenes"
    torch.manual_seed(0)
    vision = TimmVisionBackbone(
        "vit_base_patch16_224", image_size=32, model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    )
    encoder = features_from_vision_backbone(vision)
    with tempfile.TemporaryDirectory() as cache:
        cached_s, cached = timed(
            lambda: RICES(LazyVQA(questions, load, "image_id"), encoder, cache_dir=cache, cache_key="tiny-vit-vqa")
        )
        reload_s, reloaded = timed(
            lambda: RICES(LazyVQA(questions, load, "image_id"), encoder, cache_dir=cache, cache_key="tiny-vit-vqa")
        )
    per_question_s, per_question = timed(lambda: RICES(LazyVQA(questions, load, "question_id"), encoder))
    emit(
        {
            "bench": "encoder_calls",
            "source": source,
            "questions": len(questions),
            "unique_images": cached.num_images,
            "encoder_calls_cached": cached.encoder_calls,
            "encoder_calls_reload": reloaded.encoder_calls,
            "encoder_calls_per_question": per_question.encoder_calls,
            "saved_ratio": round(1 - cached.encoder_calls / per_question.encoder_calls, 4),
            "reload_features_identical": torch.equal(cached.features, reloaded.features),
            "cached_s": round(cached_s, 3),
            "reload_s": round(reload_s, 3),
            "per_question_s": round(per_question_s, 3),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--support", type=int, default=100_000, help="support features M")
    parser.add_argument("--queries", type=int, default=5_000, help="query features N")
    parser.add_argument("--dim", type=int, default=768, help="feature width D")
    parser.add_argument("--k", type=int, default=8, help="demonstrations per query")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per contender (median)")
    parser.add_argument("--images", type=int, default=1_000, help="ShapesWorld scenes for the encoder-call count")
    parser.add_argument("--questions", help="a VQA questions json; counts its image ids instead of ShapesWorld")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch and faiss threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.support, args.queries, args.images, args.repeats = 5_000, 500, 100, 2

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    emit(
        {
            "bench": "env",
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "load_avg_1m": os.getloadavg()[0],
        }
    )
    bench_search(args, args.threads)
    bench_encoder_calls(args)


if __name__ == "__main__":
    main()
