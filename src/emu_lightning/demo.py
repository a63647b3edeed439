"""``make demo``: train the tiny Emu on ShapesWorld on CPU and show what it learned.

    python -m emu_lightning.demo [--config configs/tiny.yaml] [--num-eval 200] [extra CLI overrides ...]
    python -m emu_lightning.demo --config configs/tiny.yaml --config configs/stages/decoder.yaml    # the decoder stage
    python -m emu_lightning.demo --config configs/tiny.yaml --config configs/stages/decoder.yaml \
        --config configs/stages/instruct.yaml                                                      # instruction tuning

Prints held-out images' generated captions beside their references, the held-out cross-entropy before
and after training, the share of held-out captions that name exactly the right coloured shapes, and the
zero- and few-shot scores of the config's evaluation callbacks (CIDEr and VQA accuracy on held-out
ShapesWorld; with ``configs/eval/shapesworld-benchmarks.yaml`` all eight benchmarks of the paper's table) before and
after training, each beside its chance level. Writes the same figures to ``<run dir>/demo.json``; the
callbacks write their own reports to ``<run dir>/eval/``. The decoder stage shows text-to-image scores and a
grid of generated images; the instruct stage shows the assistant's held-out VQA score before and after
instruction tuning (the same prompt), a few held-out conversations, and saves the LoRA adapters alone.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from emu_lightning.callbacks import FinalCheckpoint
from emu_lightning.cli import cli
from emu_lightning.data.modules import EmuDataModule
from emu_lightning.eval.callbacks import FewShotEval, TextToImageEval, run_dir
from emu_lightning.eval.visdial_callback import VisDialEval
from emu_lightning.model import EmuModel
from emu_lightning.shapesworld import ShapesWorld, find_world


@torch.no_grad()
def heldout_losses(model: EmuModel, dm: EmuDataModule, max_batches: int = 8) -> dict[str, float]:
    """Mean cross-entropy and regression MSE over the first ``max_batches`` held-out batches."""
    dm.sequencer = model.sequencer
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {"ce": 0.0, "mse": 0.0}
    n = 0
    for i, batch in enumerate(dm.val_dataloader()):
        if i >= max_batches:
            break
        losses = model.losses(batch)
        for k in totals:
            totals[k] += float(losses[k])
        n += 1
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in totals.items()}


def caption_accuracy(
    model: EmuModel,
    dm: EmuDataModule,
    num: int,
    batch_size: int = 64,
    max_new_tokens: int = 40,
    **generate: Any,
) -> tuple[float, list[dict[str, Any]]]:
    """Share of held-out images whose greedy caption names exactly their coloured shapes, and the rows."""
    world, rows = find_world(dm, model.vision.image_size), []
    for start in range(0, num, batch_size):
        idx = list(range(start, min(num, start + batch_size)))
        scenes = [world.scene("val", i) for i in idx]
        images = torch.stack([world.render(s, world.rng("val", i, stream=1)) for i, s in zip(idx, scenes)])
        for i, scene, text in zip(idx, scenes, model.caption(images, max_new_tokens=max_new_tokens, **generate)):
            refs = world.captions(scene)
            rows.append(
                {
                    "id": f"val-{i}",
                    "caption": text,
                    # The reference with positions, the most informative of the five.
                    "reference": refs[1],
                    "correct": world.caption_correct(text, scene),
                    "exact": text in refs,
                }
            )
    return sum(r["correct"] for r in rows) / max(len(rows), 1), rows


def few_shot_scores(trainer: Any, model: EmuModel) -> dict[str, float]:
    """``{"<task> <k>-shot": mean score}`` for every few-shot callback of the trainer, at the current step.

    A callback that already evaluated at this step (the validation at the end of training) is not rerun.
    """
    return {name: row["score"] for name, row in benchmark_scores(trainer, model).items() if row["shots"] is not None}


VISDIAL_SHOWN = {"ndcg": "NDCG", "mrr": "MRR", "r@1": "R@1"}
"""The VisDial metrics the demo shows (x100), with their names."""


def benchmark_scores(trainer: Any, model: EmuModel) -> dict[str, dict[str, Any]]:
    """Every evaluation callback's headline scores at the current step, each with what it is and its chance level:
    ``{"<task> <k>-shot": {"task", "shots", "metric", "score", "chance"}}`` for the few-shot tasks (chance: the best
    constant answer, :meth:`~emu_lightning.eval.tasks.FewShotTask.constant_baseline`) and ``{"visdial <metric>":
    ...}`` for VisDial (chance: a random ranking of the options; x100 like the paper's NDCG). A callback that already
    evaluated at this step (the validation at the end of training) is not rerun."""
    rows: dict[str, dict[str, Any]] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, FewShotEval):
            results = callback.results_now(trainer, model)
            chance = (results.get("chance") or {}).get("score")
            for shots, r in results["shots"].items():
                rows[f"{callback.task_name} {shots}-shot"] = {"task": callback.task_name, "shots": shots,
                                                              "metric": callback.metric, "score": r["mean"],
                                                              "chance": chance}  # fmt: skip
        elif isinstance(callback, VisDialEval):
            results = callback.results_now(trainer, model)
            for key, label in VISDIAL_SHOWN.items():
                if results["metrics"][key] is not None:
                    rows[f"visdial {key}"] = {"task": "visdial", "shots": None, "metric": label,
                                              "score": 100 * results["metrics"][key],
                                              "chance": 100 * results["chance"][key]}  # fmt: skip
    return rows


def print_benchmarks(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> None:
    """The table of :func:`benchmark_scores` before and after training, with the chance level beside each."""
    print(f"{'task':<10} {'shots':>5} {'metric':<16} {'before':>8} {'after':>8} {'chance':>8}")
    for name, row in after.items():
        shots = "" if row["shots"] is None else str(row["shots"])
        was = before.get(name, {}).get("score")
        cells = [f"{v:>8.1f}" if v is not None else f"{'-':>8}" for v in (was, row["score"], row["chance"])]
        print(f"{row['task']:<10} {shots:>5} {row['metric']:<16} {' '.join(cells)}")


def training_extent(trainer: Any, train_seconds: float) -> dict[str, Any]:
    """How far training got against its plan: steps reached and planned, and whether the time cap stopped it. A run cut
    short by ``max_time`` (a busy machine: other processes on the same cores) says so plainly, since every figure
    after it is that of a model trained for less than the config plans."""
    planned, reached = trainer.max_steps, trainer.global_step
    extent = {"steps": reached, "steps_planned": planned, "train_seconds": round(train_seconds, 1),
              "steps_per_second": round(reached / max(train_seconds, 1e-9), 2),
              "stopped_by_time_cap": 0 < planned and reached < planned}  # fmt: skip
    if extent["stopped_by_time_cap"]:
        print(
            f"\nNOTE: the time cap stopped training after {reached} of {planned} planned steps "
            f"({extent['steps_per_second']} steps/s, {train_seconds:.0f} s): the figures below are those of a model "
            f"trained {reached / planned:.0%} as long as planned. Other processes on the same cores slow training "
            "(see docs/demo.md); rerun on an idle machine, or raise --trainer.max_time.",
            flush=True,
        )
    return extent


def save_run(trainer: Any, results: dict[str, Any], details: dict[str, Any]) -> None:
    """Save the trained weights as evaluated here, whichever way training stopped (max_steps or max_time), as
    ``<run>/checkpoints/final.ckpt`` unless the config's :class:`FinalCheckpoint` already wrote them at the end of
    ``fit``; write ``results`` and ``details`` to ``<run>/demo.json``; print ``results``."""
    out_dir = run_dir(trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = next((c.target(trainer) for c in trainer.callbacks if isinstance(c, FinalCheckpoint)), None)
    if final is None:
        final = out_dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(final)
    print(f"checkpoint: {final}")
    (out_dir / "demo.json").write_text(json.dumps({**results, **details}, indent=2))
    print(json.dumps(results))


def text_to_image_demo(trainer: Any, model: EmuModel, dm: EmuDataModule, show: int) -> dict[str, Any]:
    """The decoder stage: text-to-image scores before and after training the decoder, and a grid of held-out
    prompts' real images (odd columns) beside the generated ones (even columns)."""
    from torchvision.utils import save_image

    evals = [c for c in trainer.callbacks if isinstance(c, TextToImageEval)]
    if not evals:
        raise SystemExit("the decoder demo needs a TextToImageEval callback (configs/stages/decoder.yaml has one)")
    t2i = evals[0]
    trainer.datamodule = dm  # the held-out prompts come from the datamodule's ShapesWorld

    def scores() -> dict[str, float]:
        done = t2i.results_now(trainer, model)
        return {"fid": done["fid"]["value"], **{k: v for k, v in done.get("attributes", {}).items()
                                               if k.endswith("accuracy") and v is not None}}  # fmt: skip

    print("text-to-image with the untrained decoder ...", flush=True)
    before = scores()
    start = time.perf_counter()
    trainer.fit(model, dm)
    train_seconds = time.perf_counter() - start
    after = scores()
    metric = t2i.history[-1]["fid"]["metric"]
    extent = training_extent(trainer, train_seconds)

    out_dir = run_dir(trainer)
    world, keys = find_world(dm, model.vision.image_size), t2i.last_keys[:show]
    real = [world.image("val", k) for k in keys]
    pairs = [img for r, g in zip(real, t2i.last_images[:show]) for img in (r, g)]
    save_image(torch.stack(pairs), out_dir / "text_to_image_grid.png", nrow=2, padding=2, pad_value=1.0)
    prompts = dict(t2i._prompts)
    print(f"\nheld-out prompts after {trainer.global_step} decoder steps ({train_seconds:.0f} s); "
          f"grid (real | generated, one row each): {out_dir / 'text_to_image_grid.png'}")  # fmt: skip
    for row, k in enumerate(keys):
        print(f"  row {row}: {prompts[k]}")
    print(f"\n{'text-to-image (' + str(len(t2i.last_keys)) + ' held-out prompts)':<44} {'before':>8} {'after':>8}")
    for name in after:
        label = metric if name == "fid" else name.replace("_", " ")
        print(f"{label:<44} {before.get(name, float('nan')):>8.3f} {after[name]:>8.3f}")
    results = {"stage": "decoder", **extent,
               "fid_metric": metric, "before": before, "after": after,
               "prompts": [prompts[k] for k in keys]}  # fmt: skip
    save_run(trainer, {k: v for k, v in results.items() if k != "prompts"}, {"prompts": results["prompts"]})
    return results


def instruct_demo(trainer: Any, model: EmuModel, dm: Any, show: int) -> dict[str, Any]:
    """The instruct stage: the assistant-prompt VQA score of the model before (the previous stage's weights; fresh
    LoRA adapters change nothing) and after instruction tuning, held-out conversations, the adapters saved alone."""
    world = find_world(dm, model.vision.image_size)
    trainer.datamodule = dm
    print("held-out VQA with the assistant's prompt, before instruction tuning ...", flush=True)
    before = few_shot_scores(trainer, model)
    start = time.perf_counter()
    trainer.fit(model, dm)
    train_seconds = time.perf_counter() - start
    after = few_shot_scores(trainer, model)

    rows = []
    for i in range(show):
        image, qa = world.image("val", i), world.questions("val", i)[i % 3]
        answer = model.chat([{"role": "user", "content": [image, qa.question]}], max_new_tokens=10)
        rows.append({"id": f"val-{i}", "question": qa.question, "answer": answer, "truth": qa.answer})
    image = world.image("val", show)
    first = [{"role": "user", "content": [image, "describe the image."]}]
    reply = model.chat(first, max_new_tokens=40)
    follow = first + [{"role": "assistant", "content": reply or "."},
                      {"role": "user", "content": "how many shapes are there?"}]  # fmt: skip
    turns = [["describe the image.", reply], ["how many shapes are there?", model.chat(follow, max_new_tokens=10)]]
    dialogue = {"scene": world.captions(world.scene("val", show))[1], "turns": turns}

    extent = training_extent(trainer, train_seconds)
    print(f"\nheld-out questions after {trainer.global_step} instruction-tuning steps ({train_seconds:.0f} s):")
    for r in rows:
        print(f"  {r['id']:<7} [USER]: <image> {r['question']:<40} [ASSISTANT]: {r['answer']:<12} "
              f"(truth: {r['truth']})")  # fmt: skip
    print(f"\na two-turn conversation about val-{show} ({dialogue['scene']}):")
    for question, answer in dialogue["turns"]:
        print(f"  [USER]: {question}\n  [ASSISTANT]: {answer}")
    if after:
        print(f"\n{'held-out VQA, assistant prompt':<36} {'before':>8} {'after':>8}")
        for name, value in after.items():
            print(f"{name:<36} {before.get(name, float('nan')):>8.1f} {value:>8.1f}")
    out_dir = run_dir(trainer)
    if getattr(model.llm, "has_lora", False):
        model.llm.save_lora(out_dir / "lora")
        print(f"LoRA adapters alone (peft format): {out_dir / 'lora'}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results = {"stage": "instruct", **extent,
               "trainable_parameters": trainable, "parameters": sum(p.numel() for p in model.parameters()),
               "vqa_before": {k: round(v, 2) for k, v in before.items()},
               "vqa_after": {k: round(v, 2) for k, v in after.items()}}  # fmt: skip
    save_run(trainer, results, {"samples": rows, "dialogue": dialogue})
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="config file(s), stacked (default: configs/tiny.yaml)")
    parser.add_argument("--num-eval", type=int, default=200, help="held-out images to caption after training")
    parser.add_argument("--show", type=int, default=10, help="captions to print")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the final weights an earlier run left at the same path"
    )
    args, overrides = parser.parse_known_args(argv)

    torch.manual_seed(0)
    configs = args.config or ["configs/tiny.yaml"]
    run = cli([a for c in configs for a in ("--config", c)] + overrides, run=False)
    model, dm, trainer = run.model, run.datamodule, run.trainer
    for final in (c for c in trainer.callbacks if isinstance(c, FinalCheckpoint)):
        final.overwrite = final.overwrite or args.overwrite
        try:  # now, not after minutes of evaluation and training
            final.check_target(trainer)
        except FileExistsError as err:
            hint = "(the demo replaces it with --overwrite: make demo DEMO_ARGS=--overwrite)"
            raise SystemExit(f"error: {err}\n{hint}") from None
    if not isinstance(find_world(dm, model.vision.image_size), ShapesWorld):
        raise SystemExit(f"the demo needs ShapesWorld data, the config gives {type(dm).__name__} without it")
    if model.stage == "decoder":
        return text_to_image_demo(trainer, model, dm, args.show)
    if model.stage == "instruct":
        return instruct_demo(trainer, model, dm, args.show)

    before = heldout_losses(model, dm)
    untrained_acc, _ = caption_accuracy(model, dm, min(args.num_eval, 64))
    print(
        f"untrained: held-out cross-entropy {before['ce']:.3f} (uniform over the vocabulary would be "
        f"{math.log(len(model.tokenizer)):.3f}), captions right {untrained_acc:.0%}",
        flush=True,
    )

    if any(isinstance(c, (FewShotEval, VisDialEval)) for c in trainer.callbacks):
        print("evaluation of the untrained model ...", flush=True)
    # fit attaches the datamodule too; the callbacks write their held-out sets from its ShapesWorld
    trainer.datamodule = dm
    start = time.perf_counter()
    scores_before = benchmark_scores(trainer, model)
    eval_seconds = time.perf_counter() - start

    start = time.perf_counter()
    trainer.fit(model, dm)
    train_seconds = time.perf_counter() - start

    after = heldout_losses(model, dm)
    scores_after = benchmark_scores(trainer, model)
    accuracy, rows = caption_accuracy(model, dm, args.num_eval)
    extent = training_extent(trainer, train_seconds)
    print(f"\nheld-out captions after {trainer.global_step} steps ({train_seconds:.0f} s of training):")
    width = max(len(r["caption"]) for r in rows[: args.show])
    print(f"{'id':<8} {'shapes':<6} {'exact':<5} {'generated':<{width}}  reference")
    for r in rows[: args.show]:
        ok, exact = ("yes" if r["correct"] else "no"), ("yes" if r["exact"] else "no")
        print(f"{r['id']:<8} {ok:<6} {exact:<5} {r['caption']:<{width}}  {r['reference']}")
    results = {
        **extent,
        "heldout_ce_before": round(before["ce"], 4),
        "heldout_ce_after": round(after["ce"], 4),
        "heldout_mse_after": round(after["mse"], 4),
        "caption_accuracy_before": round(untrained_acc, 4),
        "caption_accuracy": round(accuracy, 4),
        "caption_exact_match": round(sum(r["exact"] for r in rows) / max(len(rows), 1), 4),
        "num_eval": len(rows),
        "few_shot_before": {k: round(r["score"], 2) for k, r in scores_before.items()},
        "few_shot_after": {k: round(r["score"], 2) for k, r in scores_after.items()},
        "chance": {k: None if r["chance"] is None else round(r["chance"], 2) for k, r in scores_after.items()},
        "few_shot_eval_seconds": round(eval_seconds, 1),
    }
    print(f"\nheld-out cross-entropy: {before['ce']:.3f} before -> {after['ce']:.3f} after training")
    print(f"captions naming exactly the right coloured shapes: {accuracy:.1%} of {len(rows)} held-out images")
    print(
        f"captions equal to one of the five references (sizes and positions too): {results['caption_exact_match']:.1%}"
    )
    if scores_after:
        print(f"\nheld-out evaluation on ShapesWorld (reports and every prediction in {run_dir(trainer) / 'eval'}); "
              "chance: the best constant answer (VisDial: a random ranking)")  # fmt: skip
        print_benchmarks(scores_before, scores_after)
    save_run(trainer, results, {"samples": rows[: args.show]})
    return results


if __name__ == "__main__":
    main()
