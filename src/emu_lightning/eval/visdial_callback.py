"""The VisDial v1.0 evaluation as a callback: every ``every_n_steps`` training steps and/or after each validation
(and under ``emu-lightning validate``), rank each round's 100 answer options by their likelihood under the model
(:mod:`emu_lightning.eval.visdial`), log the official metrics and write every round's result.

Logged: ``eval/visdial_ndcg`` (over the densely annotated rounds evaluated; not logged without any),
``eval/visdial_mrr``, ``eval/visdial_r1``, ``eval/visdial_r5``, ``eval/visdial_r10``, ``eval/visdial_mean_rank``,
and a table of the first rounds (``eval/visdial_samples``). Written to ``<run dir>/eval/``, ``N`` the training step
of the weights (7 digits):

- ``visdial-step<N>.json``: the metrics, the chance levels of a random ranking of the same rounds (``chance``), the
  numbers of rounds evaluated, available and skipped, the template, the reduction, eight sample rounds and the names
  of the files below.
- ``visdial-step<N>-predictions.jsonl``: one line per round in the dialogs' order: ``image_id``, ``round_id``,
  ``question``, ``answer`` (the true one), ``gt_index``, ``gt_rank`` (its rank among the options, 1 = first),
  ``top_option`` and ``top_answer`` (the option ranked first), ``ndcg`` (``null`` without a dense annotation); a
  round whose image does not load has ``gt_rank`` ``null`` and a ``skipped`` reason. The mean over the lines of
  ``gt_rank <= k`` is R@k, of ``1 / gt_rank`` the MRR, of ``gt_rank`` the mean rank, of the non-null ``ndcg`` the
  NDCG: the logged metrics can be recomputed from the file alone.
- ``visdial-step<N>-ranks.json``: the official result format of the VisDial evaluation server,
  ``[{"image_id": int, "round_id": int, "ranks": [rank of option 0, ..., rank of option 99]}, ...]`` (ranks from 1),
  one entry per evaluated round (a skipped round has none, with a warning).

Under DDP each rank ranks a strided shard of the rounds (no padding duplicates), the records are gathered
(:func:`~emu_lightning.distributed.gather_dicts`), every rank computes the same metrics from their union and rank 0
writes the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from emu_lightning.data.visdial import VAL_IMAGE_TEMPLATE, VisDialRound, read_visdial
from emu_lightning.distributed import gather_dicts, rank_zero_first
from emu_lightning.eval.callbacks import (
    ScheduledEval,
    _json_lines,
    _log,
    _replace_text,
    _require,
    _weights_step,
    run_dir,
)
from emu_lightning.eval.visdial import (
    EMU_I_TEMPLATE,
    PRETRAINED_TEMPLATE,
    REDUCTIONS,
    DialogTemplate,
    chance_metrics,
    metrics_from_records,
    rank_rounds,
)
from emu_lightning.progress import progress_bar
from emu_lightning.reporting import log_text

TEMPLATES = {"emu-i": EMU_I_TEMPLATE, "pretrained": PRETRAINED_TEMPLATE}
"""The templates by name: ``emu-i`` the released Emu-I evaluation's prompt, ``pretrained`` the
``question: ... answer:`` prompt for a model that is not instruction-tuned."""
LOGGED = {"ndcg": "ndcg", "mrr": "mrr", "r1": "r@1", "r5": "r@5", "r10": "r@10", "mean_rank": "mean_rank"}
"""Logged name (after ``eval/visdial_``) -> metric."""


class VisDialEval(ScheduledEval):
    """VisDial v1.0 val: rank each round's answer options, log R@1/5/10, MRR, mean rank and NDCG, write every
    round's result and the official ranks file (the module docstring says what and where).

    Args:
        every_n_steps: also evaluate every this many training steps (``None``: only at validation).
        on_validation: evaluate at the end of each validation run (also under ``validate``).
        dialogs_json: ``visdial_1.0_val.json`` (required).
        image_root: the folder of the images, ``VisualDialog_val2018`` (required).
        dense_json: ``visdial_1.0_val_dense_annotations.json`` for NDCG (optional: without it no NDCG).
        image_template: an image's file name from its ``image_id``.
        num_rounds: evaluate the first N rounds, in the dialogs' order, only (``None``: all, 20,640 on val; the
            ranks file is complete for a submission only then). With ``dense_only``, the first N annotated rounds.
        dense_only: evaluate only the rounds with a dense annotation (2,064 on val, one per image): the NDCG of the
            whole split, and R@k / MRR / mean rank over those rounds, at a tenth of the cost.
        template: ``emu-i`` (the released Emu-I evaluation's prompt: system message, ``[USER]`` / ``[ASSISTANT]``
            turns, no caption), ``pretrained`` (the caption after the image, then ``question: ...? answer: ...``
            turns, for a model that is not instruction-tuned), or a
            :class:`~emu_lightning.eval.visdial.DialogTemplate`.
        reduction: what ranks the options: ``sequence_mean`` (the released evaluation's), ``sum`` or ``mean`` (see
            :meth:`~emu_lightning.eval.visdial.OptionScores.scores`).
        option_batch_size: options per forward after the prompt's shared KV cache; lower it for long prompts on a
            large model (each option holds a copy of the cache).
        strict: re-raise evaluation errors (by default they are logged and training goes on).
    """

    task_name = "visdial"

    def __init__(
        self,
        every_n_steps: int | None = None,
        on_validation: bool = True,
        dialogs_json: str | None = None,
        image_root: str | None = None,
        dense_json: str | None = None,
        image_template: str = VAL_IMAGE_TEMPLATE,
        num_rounds: int | None = None,
        dense_only: bool = False,
        template: str | DialogTemplate = "emu-i",
        reduction: str = "sequence_mean",
        option_batch_size: int = 100,
        strict: bool = False,
    ) -> None:
        super().__init__(every_n_steps, on_validation, strict)
        if not self.writes_own_data:
            _require(self, dialogs_json=dialogs_json, image_root=image_root)
        if isinstance(template, str) and template not in TEMPLATES:
            raise ValueError(f"template {template!r} must be one of {list(TEMPLATES)} or a DialogTemplate")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction {reduction!r} must be one of {list(REDUCTIONS)}")
        if option_batch_size < 1:
            raise ValueError(f"option_batch_size {option_batch_size} must be at least 1")
        if num_rounds is not None and num_rounds < 1:
            raise ValueError(f"num_rounds {num_rounds} must be at least 1 (null: all)")
        self.files = {"dialogs_json": dialogs_json, "image_root": image_root, "dense_json": dense_json,
                      "image_template": image_template}  # fmt: skip
        self.num_rounds, self.dense_only = num_rounds, dense_only
        self.template_name = template if isinstance(template, str) else "custom"
        self.template = TEMPLATES[template] if isinstance(template, str) else template
        self.reduction, self.option_batch_size = reduction, option_batch_size
        self.rounds: list[VisDialRound] | None = None
        self.num_available: int | None = None
        """Rounds the files have (with ``dense_only``, the annotated ones), before ``num_rounds``; once read."""

    # ------------------------------------------------------------------ data
    def read_rounds(self, trainer: L.Trainer, pl_module: Any, root: Path) -> list[VisDialRound]:
        """Every round of the data files; a subclass that writes its own set writes it under ``root`` first."""
        return read_visdial(**self.files, dense_only=self.dense_only)

    def build(self, trainer: L.Trainer, pl_module: Any, root: Path) -> list[VisDialRound]:
        """The rounds evaluated: :meth:`read_rounds` (sets written under ``root / "eval_data"``), the first
        ``num_rounds``."""
        rounds = self.read_rounds(trainer, pl_module, root / "eval_data")
        self.num_available = len(rounds)
        return rounds if self.num_rounds is None else rounds[: self.num_rounds]

    # ------------------------------------------------------------------ evaluation
    def _run(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        results = self.evaluate(trainer, pl_module)
        for name, key in LOGGED.items():
            if results["metrics"][key] is not None:
                _log(pl_module, f"eval/{self.task_name}_{name}", results["metrics"][key])
        columns = ["image_id", "round", "question", "answer", "top answer", "rank", "ndcg"]
        rows = [[s["image_id"], s["round_id"], s["question"], s["answer"], s.get("top_answer", ""),
                 "" if s["gt_rank"] is None else s["gt_rank"], "" if s.get("ndcg") is None else f"{s['ndcg']:.3f}"]
                for s in results["samples"]]  # fmt: skip
        log_text(trainer, f"eval/{self.task_name}_samples", columns, rows, results["step"])
        return results

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        """Evaluate now, outside the schedule (e.g. before training): the results are recorded in ``history`` and
        written to the run folder, but not logged. Returns them: ``metrics``
        (:func:`~emu_lightning.eval.visdial.metrics_from_records`), ``chance``
        (:func:`~emu_lightning.eval.visdial.chance_metrics` of the evaluated rounds), ``records`` (one per round,
        as the predictions file's lines), counts and file names."""
        root = run_dir(trainer)  # a collective under DDP: every rank asks, before any rank-only branch
        if self.rounds is None:  # rank 0 writes any evaluation files, then the other ranks read them
            self.rounds = rank_zero_first(lambda: self.build(trainer, pl_module, root), f"{self.task_name} set-up")
        rounds, step = self.rounds, _weights_step(trainer, pl_module)
        shard = rounds[trainer.global_rank :: trainer.world_size]

        def rank_shard() -> dict[tuple[int, int], dict[str, Any]]:
            if not shard:  # more ranks than rounds
                return {}
            with progress_bar(total=len(shard), desc=f"{self.task_name} step {step}", unit="round") as bar:
                records = rank_rounds(pl_module, shard, self.template, self.option_batch_size, self.reduction,
                                      keep_ranks=True, on_record=lambda _: bar.update(1))  # fmt: skip
            return {(r["image_id"], r["round_id"]): r for r in records}

        gathered = gather_dicts(rank_shard, f"{self.task_name} evaluation")
        records = [gathered[r.key] for r in rounds]
        ranked = [r for r in records if r["gt_rank"] is not None]
        if not ranked:
            raise ValueError(f"no VisDial round could be evaluated: the images of all {len(records)} rounds failed "
                             "to load")  # fmt: skip
        skipped = len(records) - len(ranked)
        stem = f"{self.task_name}-step{step:07d}"
        files = {"predictions": f"{stem}-predictions.jsonl", "ranks": f"{stem}-ranks.json"}
        without_ranks = [{k: v for k, v in r.items() if k != "ranks"} for r in records]
        results: dict[str, Any] = {
            "task": self.task_name,
            "step": step,
            "metrics": metrics_from_records(records),
            "chance": chance_metrics([r for r, rec in zip(rounds, records) if rec["gt_rank"] is not None]),
            "num_rounds": len(records),
            "num_available": self.num_available,
            "skipped_rounds": skipped,
            "skipped_images": len({r["image_id"] for r in records if r["gt_rank"] is None}),
            "dense_only": self.dense_only,
            "template": self.template_name,
            "reduction": self.reduction,
            "samples": without_ranks[:8],
            "files": files,
        }
        if trainer.is_global_zero:
            folder = root / "eval"
            with _json_lines(folder / files["predictions"]) as write:
                for record in without_ranks:
                    write({"task": self.task_name, "step": step, **record})
            self.write_ranks_file(folder / files["ranks"], ranked, skipped)
            _replace_text(folder / f"{stem}.json", json.dumps(results, indent=2))
        results["records"] = without_ranks  # the ranks are in the ranks file
        self.history.append(results)
        return results

    def write_ranks_file(self, path: Path, ranked: list[dict[str, Any]], skipped: int) -> None:
        """The VisDial server's result format, ``[{"image_id", "round_id", "ranks": [...]}]``, in the dialogs'
        order; the ``skipped`` rounds (an image that does not load) are left out, with a warning."""
        if skipped:
            rank_zero_warn(f"{path.name}: {skipped} round(s) whose image does not load have no ranks in the file")
        entries = [{"image_id": int(r["image_id"]), "round_id": int(r["round_id"]), "ranks": r["ranks"]}
                   for r in ranked]  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_text(path, json.dumps(entries))
