"""VisDial option scoring: one full forward per option (naive) vs the prompt's KV cache shared by batched options.

    .venv/bin/python benchmarks/visdial_scoring.py            # 4 rounds x 100 options, 3 repeats (about a minute)
    .venv/bin/python benchmarks/visdial_scoring.py --quick    # 2 rounds x 20 options, one repeat: a smoke test

Prints one JSON line per method (``naive``, ``cached``) and a ``speedup`` line.

Method (one process, fp32, ``torch.set_num_threads`` = the usable cores):

- Model: an untrained tiny EmuModel built as ``tests/conftest.py::make_model`` builds it (ViT of width 32 on 16 px
  images, 4 visual queries, a LLaMA-shaped LM of width 32, 2 layers, the ShapesWorld BPE), except that the language
  model has ``--positions`` positions (512) so that the released Emu-I prompt with its system message and three
  earlier rounds fits. The scores are those of random weights; only the time and the agreement matter.
- Rounds: the first ``--rounds`` rounds of one synthetic dialog (round r shows the r - 1 before it), each with
  ``--options`` options of 1 to 8 words drawn with a fixed seed, written in Emu-I's template
  (:data:`~emu_lightning.eval.visdial.EMU_I_TEMPLATE`).
- ``naive``: :meth:`~emu_lightning.eval.visdial.OptionScorer.score_naive`, one forward over prompt + option per
  option (the prompt's embeddings, image included, computed once per round: the released code's loop with one
  option per segment). ``cached``: :meth:`~emu_lightning.eval.visdial.OptionScorer.score`, the prompt once, then
  the options in chunks of ``--option-batch-size`` on its KV cache. Each repeat times both on every round, the
  methods alternating, so load on a shared machine falls on both; the medians over ``--repeats`` are reported,
  ``ms_per_round`` = median / rounds. ``llm_tokens`` counts the token positions the language model runs over in a
  repeat (padding included; the prompt's image embedding is the same for both). ``max_abs_diff`` is the largest
  difference between the two methods' summed log-likelihoods.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch loads the OpenMP runtime)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/train_throughput.py: shared cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from emu_lightning import shapesworld
from emu_lightning.components.llm import HFCausalLM
from emu_lightning.components.resampler import PreNormCausalTransformer
from emu_lightning.components.vision import TimmVisionBackbone
from emu_lightning.data.visdial import VisDialRound
from emu_lightning.eval.visdial import EMU_I_TEMPLATE, OptionScorer, dialog_prompt
from emu_lightning.model import EmuModel
from emu_lightning.tokenizer import TrainedBPE

WORDS = ("yes", "no", "red", "circle", "square", "on the left", "two", "small", "big", "i think so", "maybe", "blue",
         "it is", "not sure", "one", "green", "in the middle", "triangle", "i can't tell", "there are")  # fmt: skip
QUESTIONS = ("is the photo in color", "how many shapes are there", "is the circle red", "where is the square",
             "are they big", "is there a triangle", "what color is the background", "can you see any text")  # fmt: skip


def make_model(positions: int) -> EmuModel:
    """``tests/conftest.py::make_model()``, with ``positions`` language-model positions."""
    torch.manual_seed(0)
    vision = TimmVisionBackbone(
        "vit_base_patch16_224", image_size=16, model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    )
    resampler = PreNormCausalTransformer(in_dim=32, out_dim=32, num_queries=4, width=32, depth=1, num_heads=2)
    config = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=positions)  # fmt: skip
    llm = HFCausalLM(config=config)
    return EmuModel(vision, resampler, llm, tokenizer=TrainedBPE(shapesworld.corpus), max_length=64)


def make_rounds(num_rounds: int, num_options: int, seed: int = 0) -> list[VisDialRound]:
    rng = random.Random(seed)
    phrase = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))  # noqa: E731
    rounds, history = [], []
    for r in range(1, num_rounds + 1):
        options = tuple(phrase() for _ in range(num_options))
        gt = rng.randrange(num_options)
        question = QUESTIONS[(r - 1) % len(QUESTIONS)]
        rounds.append(VisDialRound(1, Path("unused.jpg"), "a red circle and a blue square", r, tuple(history),
                                   question, options, gt))  # fmt: skip
        history.append((question, options[gt]))
    return rounds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds scored per repeat")
    p.add_argument("--options", type=int, default=100, help="options per round (VisDial: 100)")
    p.add_argument("--option-batch-size", type=int, default=100, help="options per forward of the cached scoring")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--positions", type=int, default=512, help="the language model's positions")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    p.add_argument("--quick", action="store_true", help="2 rounds x 20 options, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.options, args.repeats = 2, 20, 1
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model = make_model(args.positions).eval()
    scorer = OptionScorer(model, EMU_I_TEMPLATE.option, args.option_batch_size)
    torch.manual_seed(1)
    image = torch.rand(3, 16, 16)
    rounds = make_rounds(args.rounds, args.options)
    prompts = [dialog_prompt(r, image, EMU_I_TEMPLATE) for r in rounds]
    lengths = [scorer.encode(prompt)[0].shape[1] for prompt in prompts]
    methods = {"naive": scorer.score_naive, "cached": scorer.score}
    tokens = {"naive": 0, "cached": 0}  # token positions the language model runs over, per repeat
    for length, r in zip(lengths, rounds):
        sizes = sorted(len(o) for o in scorer.option_ids(r.options))
        tokens["naive"] += sum(length + n for n in sizes)
        chunks = [sizes[i : i + args.option_batch_size] for i in range(0, len(sizes), args.option_batch_size)]
        tokens["cached"] += length + sum(len(c) * (c[-1] - 1) for c in chunks)
    for prompt, r in zip(prompts[:1], rounds):  # warm-up (allocator, kernels), untimed
        for score in methods.values():
            score(prompt, r.options)
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.repeats):
        for name, score in methods.items():
            start = time.perf_counter()
            results[name] = [score(prompt, r.options).log_likelihood for prompt, r in zip(prompts, rounds)]
            times[name].append(time.perf_counter() - start)
    diff = max(float((a - b).abs().max()) for a, b in zip(results["naive"], results["cached"]))
    common = {"rounds": args.rounds, "options": args.options, "prompt_tokens": lengths, "threads": threads,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}  # fmt: skip
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name in methods:
        batch = args.option_batch_size if name == "cached" else 1
        print(json.dumps({"bench": "visdial_scoring", "method": name, "option_batch_size": batch,
                          "s": round(medians[name], 3), "ms_per_round": round(medians[name] / args.rounds * 1000, 1),
                          "llm_tokens": tokens[name],
                          "repeats_s": [round(t, 3) for t in times[name]], **common}), flush=True)  # fmt: skip
    print(json.dumps({"bench": "visdial_scoring", "speedup": round(medians["naive"] / medians["cached"], 1),
                      "max_abs_diff": diff, **common}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
