"""Callbacks that run zero-/few-shot evaluations during training and in ``emu-lightning validate``.

Each runs its task every ``every_n_steps`` training steps and/or at the end of validation, logs the mean
per number of shots (``eval/<task>_<k>shot``, with ``_std`` over seeds) and a table of sample predictions
(``eval/<task>_samples``, through :mod:`emu_lightning.reporting`), and writes to ``<run dir>/eval/`` per step: a
JSON and a Markdown report (scores, a few samples) and every prediction as JSON lines
(``<task>-step<N>-predictions.jsonl``: one line per query, shots and seed, with its prompt, demonstrations,
references and score). Under DDP each rank predicts a strided shard of the queries (no padding duplicates), the
predictions and their records are gathered, every rank scores the same union and rank 0 writes the files;
demonstrations depend only on (seed, query), never on the number of ranks.
Each reads its data files, which it requires; a subclass may write its own set first (the offline default's
ShapesWorld sets, :mod:`emu_lightning.shapesworld.eval`, written into the run folder).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from emu_lightning.data.coco import load_image, read_karpathy
from emu_lightning.data.vqa import read_vqa
from emu_lightning.distributed import gather_dicts, rank_zero_first
from emu_lightning.eval.metrics import (
    cached_feature_stats,
    coco30k_prompts,
    feature_stats,
    frechet_distance_from_stats,
    make_fid,
)
from emu_lightning.eval.tasks import (
    FewShotTask,
    PromptTemplate,
    from_captions,
    from_vqa,
)
from emu_lightning.progress import progress_bar
from emu_lightning.reporting import log_image, log_text


class ScheduledEval(Callback):
    """Runs ``_run`` every ``every_n_steps`` training steps and/or after each validation. In training an error is
    logged and training goes on unless ``strict``; outside training (``validate``) the evaluation is the run's
    purpose, so its error ends the run."""

    task_name = "task"
    writes_own_data = False
    """True for a subclass that writes its own evaluation set, so that no data files are required."""

    def __init__(self, every_n_steps: int | None, on_validation: bool, strict: bool) -> None:
        self.every_n_steps, self.on_validation, self.strict = every_n_steps, on_validation, strict
        self.history: list[dict[str, Any]] = []

    def _run(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any] | None:
        raise NotImplementedError

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any] | None:
        raise NotImplementedError

    def results_now(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any] | None:
        """The results for the weights as they are: the last evaluation if it was at this step (e.g. the validation
        that ends training), else a new :meth:`evaluate`."""
        if self.history and self.history[-1]["step"] == _weights_step(trainer, pl_module):
            return self.history[-1]
        return self.evaluate(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any] | None:
        try:
            return self._run(trainer, pl_module)
        except Exception as err:  # an evaluation must not kill a long training run
            if self.strict or trainer.state.fn != TrainerFn.FITTING:
                raise
            rank_zero_warn(f"{self.task_name} evaluation failed at step {_weights_step(trainer, pl_module)}: {err!r}")
            return None


class FewShotEval(ScheduledEval):
    """Shared schedule, sharding, logging and reports; subclasses say where the examples come from.

    Args:
        every_n_steps: also evaluate every this many training steps (``None``: only at validation).
        on_validation: evaluate at the end of each validation run (also under ``validate``).
        shots: numbers of demonstrations, e.g. ``[0, 4]``.
        seeds: one run per seed; the mean and standard deviation are logged.
        selection: ``random`` or ``rices`` demonstrations (RICES on the model's own vision backbone).
        zero_shot_text_demos: demonstrations without images for 0-shot (the paper's zero-shot*: 2).
        num_queries: evaluate the first N queries only (``None``: all). CIDEr's IDF depends on N.
        demo_template: one demonstration; ``{image}`` marks the image, ``{end}`` the EOS that ends it, as
            between chained training examples (default: the task's own).
        query_template: the query (default: the task's own).
        prefix: text before the prompt (a system message).
        generation: ``generate`` options (``num_beams``, ``max_new_tokens``, ``min_new_tokens``, ...); default:
            the paper's settings for the task.
        batch_size: prompts per ``generate`` call.
        strict: re-raise evaluation errors (by default they are logged and training goes on).
    """

    default_demo = "{image}{caption}{end}"
    default_query = "{image}"
    default_generation: dict[str, Any] = {}
    metric = "score"
    """What the logged score is (``CIDEr``, ``VQA accuracy``, ...), for tables."""

    def __init__(
        self,
        every_n_steps: int | None = None,
        on_validation: bool = True,
        shots: list[int] = [0, 4],  # noqa: B006 - jsonargparse shows list defaults in --help
        seeds: list[int] = [0],  # noqa: B006
        selection: str = "random",
        zero_shot_text_demos: int = 0,
        num_queries: int | None = 100,
        demo_template: str | None = None,
        query_template: str | None = None,
        prefix: str = "",
        generation: dict[str, Any] | None = None,
        batch_size: int = 16,
        strict: bool = False,
    ) -> None:
        super().__init__(every_n_steps, on_validation, strict)
        generation = dict(self.default_generation if generation is None else generation)
        self.task_args = dict(shots=tuple(shots), seeds=tuple(seeds), selection=selection, generation=generation,
                              zero_shot_text_demos=zero_shot_text_demos, batch_size=batch_size)  # fmt: skip
        self.template = PromptTemplate(demo_template or self.default_demo, query_template or self.default_query, prefix)
        self.num_queries = num_queries
        self.num_available: int | None = None
        """Queries the evaluated split has (before ``num_queries``), once built."""
        self.task: FewShotTask | None = None

    def override(self, **args: Any) -> None:
        """Set ``shots``, ``seeds``, ``selection``, ``zero_shot_text_demos`` or ``num_queries`` after construction
        (``emu-lightning --eval '{shots: [0, 1]}'``); before the first evaluation."""
        allowed = ("shots", "seeds", "selection", "zero_shot_text_demos", "num_queries")
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            raise ValueError(f"--eval: unknown keys {unknown}; allowed: {list(allowed)}")
        for key, value in args.items():
            if key == "num_queries":
                self.num_queries = value
            else:
                self.task_args[key] = tuple(value) if key in ("shots", "seeds") else value
        self.task = None

    # ------------------------------------------------------------------ data
    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        raise NotImplementedError

    def build(self, trainer: L.Trainer, pl_module: Any, root: Path) -> FewShotTask:
        """The task over this callback's examples; sets a subclass writes go under ``root`` (the run folder)."""
        queries, support = self.examples(trainer, pl_module, root / "eval_data")
        self.num_available = len(queries)
        if self.num_queries is not None:
            queries = queries[: self.num_queries]
        encoder = pl_module.vision if self.task_args["selection"] == "rices" else None
        return FewShotTask(self.task_name, queries, support, template=self.template, rices_encoder=encoder,
                           image_size=pl_module.vision.image_size, **self.task_args, **self.task_options())  # fmt: skip

    def task_options(self) -> dict[str, Any]:
        """More :class:`FewShotTask` arguments of a subclass (OK-VQA's ``answer_postprocess``, VizWiz's
        ``answerability``); none here."""
        return {}

    def _run(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        results = self.evaluate(trainer, pl_module)
        for shots, r in results["shots"].items():
            if r["mean"] is not None:  # a split without references (test-dev) is predicted, not scored
                _log(pl_module, f"eval/{self.task_name}_{shots}shot", r["mean"])
                _log(pl_module, f"eval/{self.task_name}_{shots}shot_std", r["std"])
        vqa = self.task_name != "captioning"
        columns = ["shots", "seed", "id", *(["question"] if vqa else []), "prediction", "references", "score"]
        rows = [[s["shots"], s["seed"], s["key"], *([s["question"]] if vqa else []), s["prediction"],
                 " / ".join(s["references"]), "" if s["score"] is None else f"{s['score']:.2f}"]
                for s in results["samples"]]  # fmt: skip
        log_text(trainer, f"eval/{self.task_name}_samples", columns, rows, results["step"])
        return results

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        """Evaluate now, outside the schedule (e.g. before training): results are recorded in ``history``
        and written to the run folder (the reports and every prediction), but not logged."""
        root = run_dir(trainer)  # a collective under DDP: every rank asks, before any rank-only branch
        if self.task is None:  # rank 0 writes any evaluation files, then the other ranks read them
            self.task = rank_zero_first(lambda: self.build(trainer, pl_module, root), f"{self.task_name} set-up")
        task, step = self.task, _weights_step(trainer, pl_module)
        shard = range(trainer.global_rank, len(task.queries), trainer.world_size)
        progress = lambda line: rank_zero_info(f"[{self.task_name}] step {step}: {line}")  # noqa: E731
        folder, stem = root / "eval", f"{self.task_name}-step{step:07d}"
        submissions = self.submission_files(task, stem)
        files = {"predictions": f"{stem}-predictions.jsonl", "submissions": sorted(submissions.values())}
        zero = trainer.is_global_zero
        with _json_lines(folder / files["predictions"]) if zero else contextlib.nullcontext() as write:

            def on_samples(shots: int, seed: int, records: list[dict[str, Any]]) -> None:
                if not zero:  # every rank holds the gathered records; rank 0 writes them
                    return
                for record in records:
                    write({"task": self.task_name, "step": step, **record})
                if (shots, seed) in submissions:
                    self.write_submission_file(folder / submissions[shots, seed], records)

            results = {"step": step, "num_queries": len(task.queries),
                       **task.evaluate(pl_module, shard, collect=gather_dicts, on_progress=progress,
                                       on_samples=on_samples)}  # fmt: skip
        results["files"] = files
        self.history.append(results)
        if zero:
            _write_report(folder, results)
        return results

    write_submission = False
    """Write the submission file also for a split with answers (a split without answers always gets one)."""

    def submission_entry(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """A predicted query's entry in the benchmark's results file, or ``None``: this benchmark writes none
        (:class:`VQAEval` writes the official VQA format)."""
        return None

    def submission_files(self, task: FewShotTask, stem: str) -> dict[tuple[int, int], str]:
        """File names of the submission files written per ``(shots, seed)``, under ``<run dir>/eval/``: none for a
        benchmark without a results format or a scored split without ``write_submission``; ``<stem>-submission.json``
        for one (shots, seed), else ``<stem>-<k>shot-seed<s>-submission.json``."""
        if type(self).submission_entry is FewShotEval.submission_entry or (task.scored and not self.write_submission):
            return {}
        if not task.scored and len(task.queries) < (self.num_available or 0):
            rank_zero_warn(f"{self.task_name} submission: {len(task.queries)} of the {self.num_available} questions "
                           f"are predicted (num_queries: {self.num_queries}); set num_queries: null for a complete "
                           "submission")  # fmt: skip
        runs = task.runs()
        if len(runs) == 1:
            return {runs[0]: f"{stem}-submission.json"}
        return {(shots, seed): f"{stem}-{shots}shot-seed{seed}-submission.json" for shots, seed in runs}

    def write_submission_file(self, path: Path, records: list[dict[str, Any]]) -> None:
        """The results file, one :meth:`submission_entry` per record in query order; questions skipped (an image
        that does not load) are left out, with a warning."""
        answers = [self.submission_entry(r) for r in records if r["prediction"] is not None]
        if len(answers) < len(records):
            rank_zero_warn(f"{path.name}: {len(records) - len(answers)} question(s) skipped (an image does not load) "
                           "have no answer in the submission")  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_text(path, json.dumps(answers))


class CaptioningEval(FewShotEval):
    """Zero-/few-shot captioning scored with CIDEr (x100), from COCO Karpathy files.

    Args:
        karpathy_json: Karpathy's ``dataset_coco.json``.
        image_root: folder the Karpathy ``filepath/filename`` entries are relative to.
        annotations_json: COCO captions annotation file for the evaluated split's references (optional; e.g.
            ``captions_val2014.json`` for Karpathy's test split). Demonstrations use the Karpathy file's sentences.
        split: evaluated split (``test``).
        support_split: where demonstrations come from (``train``).
        kwargs: the schedule and prompt options of :class:`FewShotEval`.
    """

    task_name = "captioning"
    metric = "CIDEr"
    # The paper's decoding for captions: beam 5, at most 20 new tokens, at least 8, length penalty -1.
    default_generation = {"num_beams": 5, "max_new_tokens": 20, "min_new_tokens": 8, "length_penalty": -1.0}

    def __init__(
        self,
        karpathy_json: str | None = None,
        image_root: str | None = None,
        annotations_json: str | None = None,
        split: str = "test",
        support_split: str = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not self.writes_own_data:
            _require(self, karpathy_json=karpathy_json, image_root=image_root)
        self.files = (karpathy_json, image_root, annotations_json)
        self.split, self.support_split = split, support_split

    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        return self.read(*self.files)

    def read(self, karpathy: str | Path, image_root: str | Path, annotations: str | Path | None) -> tuple[list, list]:
        """Queries of ``split`` and demonstrations of ``support_split`` from Karpathy's file."""
        queries = from_captions(read_karpathy(karpathy, image_root, self.split, annotations))
        # Demonstrations come from another split (train2014 images for Karpathy's train): their captions are the
        # Karpathy file's own sentences, not the evaluated split's annotation file.
        support = from_captions(read_karpathy(karpathy, image_root, self.support_split))
        return queries, support


class VQAEval(FewShotEval):
    """Zero-/few-shot VQA scored with the official VQA accuracy (x100), from VQAv2-format files.

    OK-VQA shares the format (:class:`~emu_lightning.eval.okvqa.OKVQAEval` stems its answers); VizWiz has its own
    (:class:`~emu_lightning.eval.vizwiz.VizWizEval`). A split without answers (VQAv2 test-dev: ``annotations_json``
    left out) is predicted and not scored, and its answers are written in the official results format,
    ``[{"question_id": int, "answer": str}, ...]``, to ``<run dir>/eval/vqa-step<N>-submission.json`` (with several
    shots or seeds, one file per pair: ``vqa-step<N>-<k>shot-seed<s>-submission.json``).

    Args:
        questions_json: evaluated questions.
        annotations_json: their annotations (answers); ``None`` for a split without them (VQAv2 test-dev): then
            nothing is scored and the submission file is written.
        image_root: folder of the evaluated images.
        image_template: image file name from ``image_id``.
        support_questions_json: questions that demonstrations come from (the train split).
        support_annotations_json: their annotations.
        support_image_root: folder of the support images.
        support_image_template: support image file name from ``image_id``.
        write_submission: write the submission file also when the split has answers (e.g. VQAv2 val, to check the
            scores with the official evaluation code); a split without answers always gets one.
        kwargs: the schedule and prompt options of :class:`FewShotEval`.
    """

    task_name = "vqa"
    metric = "VQA accuracy"
    default_demo = "{image}question: {question} answer: {answer}.{end}"
    default_query = "{image}question: {question} answer:"
    default_generation = {"num_beams": 5, "max_new_tokens": 10, "length_penalty": -1.0}

    def __init__(
        self,
        questions_json: str | None = None,
        annotations_json: str | None = None,
        image_root: str | None = None,
        image_template: str = "COCO_val2014_{image_id:012d}.jpg",
        support_questions_json: str | None = None,
        support_annotations_json: str | None = None,
        support_image_root: str | None = None,
        support_image_template: str = "COCO_train2014_{image_id:012d}.jpg",
        write_submission: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not self.writes_own_data:  # the evaluated split may lack answers (test-dev); the demonstrations need them
            _require(self, questions_json=questions_json, image_root=image_root,
                     support_questions_json=support_questions_json, support_annotations_json=support_annotations_json,
                     support_image_root=support_image_root)  # fmt: skip
        self.write_submission = write_submission
        self.query_files = (questions_json, annotations_json, image_root, image_template)
        self.support_files = (support_questions_json, support_annotations_json, support_image_root,
                              support_image_template)  # fmt: skip

    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        return from_vqa(read_vqa(*self.query_files)), from_vqa(read_vqa(*self.support_files))

    def submission_entry(self, record: dict[str, Any]) -> dict[str, Any]:
        """The official VQA results format: ``{"question_id": int, "answer": str}``."""
        return {"question_id": int(record["key"]), "answer": record["prediction"]}


class TextToImageEval(ScheduledEval):
    """Text-to-image: one image per caption with the model's ``generate_image``, scored by FID (a subclass may add
    scores: ShapesWorld's attribute accuracy, :class:`emu_lightning.shapesworld.ShapesWorldTextToImageEval`).

    FID uses the offline ``shapes-colour-hist-v1`` features unless ``inception_path`` names local Inception-v3
    FID weights; results are labelled with the extractor (``FID[<name>]``). Real statistics are computed once
    and cached in ``stats_cache_dir``. A model without ``generate_image`` is skipped with one warning.

    Each evaluation writes to ``<run dir>/eval/``: a grid of the first 64 images (``text_to_image-step<N>.png``, 8
    per row), the results (``.json``) and a line per prompt (``text_to_image-step<N>-predictions.jsonl``: ``key``,
    ``prompt``, ``index`` in generation order, ``grid_index`` (its cell in the grid: row ``grid_index // 8``,
    column ``grid_index % 8``; ``None`` past 64), ``image`` (the image's own PNG with ``save_images``) and the
    per-image scores a subclass has, e.g. ShapesWorld's ``attributes``). The grid and the prompts are also logged
    (``eval/text_to_image``, ``eval/text_to_image_prompts``).

    Args:
        every_n_steps: also evaluate every this many training steps (``None``: only at validation).
        on_validation: evaluate at the end of each validation run.
        num_prompts: captions to draw (the COCO-30k protocol uses 30,000), one per image, with ``seed``.
        seed: seed of the draw.
        captions_json: COCO captions annotation file (``captions_val2014.json``).
        image_root: folder of the real images for ``captions_json``.
        image_template: real image file name from ``image_id``.
        real_size: side the real images are resized to (the COCO protocol: 256).
        guidance_scale: classifier-free guidance scale passed to ``generate_image``.
        steps: diffusion sampling steps passed to ``generate_image``.
        batch_size: prompts per ``generate_image`` call.
        extractor: FID feature extractor: ``default`` or ``shapes-colour-hist-v1``.
        inception_path: local Inception-v3 FID weights for a real Inception FID.
        stats_cache_dir: where real statistics are cached (default: ``<run dir>/eval/fid_stats``).
        save_images: also save every generated image as a PNG, ``<run dir>/eval/text_to_image-step<N>/<index>.png``.
        strict: re-raise evaluation errors (by default they are logged and training goes on).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        on_validation: bool = True,
        num_prompts: int = 64,
        seed: int = 0,
        captions_json: str | None = None,
        image_root: str | None = None,
        image_template: str = "COCO_val2014_{image_id:012d}.jpg",
        real_size: int = 256,
        guidance_scale: float = 7.5,
        steps: int = 50,
        batch_size: int = 16,
        extractor: str = "default",
        inception_path: str | None = None,
        stats_cache_dir: str | None = None,
        save_images: bool = False,
        strict: bool = False,
    ) -> None:
        super().__init__(every_n_steps, on_validation, strict)
        if not self.writes_own_data:
            _require(self, captions_json=captions_json, image_root=image_root)
        self.save_images = save_images
        self.num_prompts, self.seed, self.batch_size = num_prompts, seed, batch_size
        self.captions_json, self.image_root, self.image_template = captions_json, image_root, image_template
        self.real_size, self.guidance_scale, self.steps = real_size, guidance_scale, steps
        self.extractor, self.inception_path, self.stats_cache_dir = extractor, inception_path, stats_cache_dir
        self._warned = False
        self._prompts: list[tuple[Any, str]] | None = None
        self._fid: Any = None
        self.last_images: torch.Tensor | None = None
        self.last_keys: list[Any] = []

    task_name = "text_to_image"

    def prompts(self, trainer: L.Trainer, pl_module: Any) -> tuple[list[tuple[Any, str]], Any, str]:
        """``(prompts, real, source)``: ``(key, caption)`` pairs, a function loading the real images (a ``(N, 3, H, W)``
        tensor in [0, 1]) and a name of that set for the statistics cache."""
        by_image: dict[int, list[str]] = {}
        for a in json.loads(Path(self.captions_json).read_text())["annotations"]:
            by_image.setdefault(int(a["image_id"]), []).append(a["caption"].strip())
        prompts = coco30k_prompts(by_image, self.num_prompts, self.seed)

        def real() -> torch.Tensor:
            paths = [Path(self.image_root) / self.image_template.format(image_id=i) for i, _ in prompts]
            images = [load_image(p, self.real_size) for p in paths]
            return torch.stack([im for im in images if im is not None])

        return prompts, real, f"{Path(self.captions_json).stem}-{self.num_prompts}-seed{self.seed}-{self.real_size}px"

    def extra_scores(self, images: torch.Tensor, keys: list[Any]) -> dict[str, Any]:
        """Scores beside FID for the generated ``images`` of prompts ``keys`` (none here; subclasses add theirs),
        merged into the results; a ``"per_sample"`` entry, ``{key: {name: value}}``, goes to each prompt's line of
        the predictions file instead."""
        return {}

    def _setup(self, trainer: L.Trainer, pl_module: Any, root: Path) -> None:
        self._fid = make_fid(self.extractor, self.inception_path)
        self._prompts, real, source = self.prompts(trainer, pl_module)
        cache = Path(self.stats_cache_dir) if self.stats_cache_dir else root / "eval" / "fid_stats"
        name = f"{source}-{self._fid.extractor_name}".replace("/", "_")
        self._real_stats = cached_feature_stats(cache, name, lambda: self._features(real()),
                                                {"source": source, "extractor": self._fid.extractor_name})  # fmt: skip

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        # torchmetrics' own Inception takes uint8 images; custom extractors take floats in [0, 1].
        custom = getattr(self._fid, "used_custom_model", True)
        batches = [b if custom else (b * 255).round().to(torch.uint8) for b in images.split(64)]
        return torch.cat([self._fid.inception(b).double() for b in batches])

    def _run(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any] | None:
        results = self.evaluate(trainer, pl_module)
        if results is None:
            return None
        _log(pl_module, "eval/t2i_fid", results["fid"]["value"])
        for k, v in results.get("attributes", {}).items():
            if k in ("colour_accuracy", "shape_accuracy", "scene_accuracy") and v is not None:
                _log(pl_module, f"eval/t2i_{k}", v)
        if trainer.is_global_zero:  # the grid beside the scalars, and which prompt is in which cell
            from torchvision.utils import make_grid

            log_image(trainer, "eval/text_to_image", make_grid(self.last_images[:64], nrow=8), results["step"])
            prompts = dict(self._prompts)
            rows = [[i, k, prompts[k]] for i, k in enumerate(self.last_keys[:64])]
            log_text(trainer, "eval/text_to_image_prompts", ["grid_index", "key", "prompt"], rows, results["step"])
        return results

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any] | None:
        """Generate and score now, outside the schedule: results go to ``history`` and the run folder (a PNG grid
        and a JSON file), and the images to ``last_images``; nothing is logged. ``None`` for a model without
        ``generate_image`` or without a decoder."""
        if not hasattr(pl_module, "generate_image") or getattr(pl_module, "decoder", True) is None:
            if not self._warned:
                rank_zero_warn(f"{type(pl_module).__name__} has no generate_image or no decoder: text-to-image "
                               "evaluation skipped")  # fmt: skip
                self._warned = True
            return None
        root = run_dir(trainer)  # a collective under DDP: every rank asks, before any rank-only branch
        if self._prompts is None:  # rank 0 caches the real statistics, then the other ranks read them
            rank_zero_first(lambda: self._setup(trainer, pl_module, root), f"{self.task_name} set-up")
        step = _weights_step(trainer, pl_module)
        shard = self._prompts[trainer.global_rank :: trainer.world_size]

        def generate() -> dict[Any, torch.Tensor]:
            generated: dict[Any, torch.Tensor] = {}
            with progress_bar(total=len(shard), desc=f"text-to-image step {step}", unit="image") as bar:
                for start in range(0, len(shard), self.batch_size):
                    chunk = shard[start : start + self.batch_size]
                    images = pl_module.generate_image([[caption] for _, caption in chunk],
                                                      guidance_scale=self.guidance_scale, steps=self.steps)  # fmt: skip
                    generated.update({key: img.detach().float().cpu().clamp(0, 1)
                                      for (key, _), img in zip(chunk, images)})  # fmt: skip
                    bar.update(len(chunk))
            return generated

        generated = gather_dicts(generate, f"{self.task_name} generation")
        keys = [k for k, _ in self._prompts if k in generated]
        fake = torch.stack([generated[k] for k in keys])
        mu, sigma = feature_stats(self._features(fake))
        value = frechet_distance_from_stats(mu, sigma, *self._real_stats)
        results: dict[str, Any] = {"task": self.task_name, "step": step, "num_prompts": len(keys),
                                   "fid": {"metric": f"FID[{self._fid.extractor_name}]", "value": value}}  # fmt: skip
        extra = self.extra_scores(fake, keys)
        per_sample = extra.pop("per_sample", {})
        results.update(extra)
        self.last_images, self.last_keys = fake, keys
        prompts = dict(self._prompts)
        results["samples"] = [{"key": k, "prompt": prompts[k]} for k in keys[:8]]
        stem = f"{self.task_name}-step{step:07d}"
        results["files"] = {"grid": f"{stem}.png", "predictions": f"{stem}-predictions.jsonl",
                            "images": f"{stem}/" if self.save_images else None}  # fmt: skip
        self.history.append(results)
        if trainer.is_global_zero:
            from torchvision.utils import save_image

            folder = root / "eval"
            folder.mkdir(parents=True, exist_ok=True)
            save_image(fake[:64], folder / f"{stem}.png", nrow=8)
            with _json_lines(folder / results["files"]["predictions"]) as write:
                for i, k in enumerate(keys):
                    image = None
                    if self.save_images:
                        image = f"{stem}/{i:05d}.png"
                        (folder / stem).mkdir(exist_ok=True)
                        save_image(fake[i], folder / image)
                    write({"task": self.task_name, "step": step, "key": k, "prompt": prompts[k], "index": i,
                           "grid_index": i if i < 64 else None, "image": image, **per_sample.get(k, {})})  # fmt: skip
            (folder / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
        return results


def _require(callback: Any, **given: Any) -> None:
    """The data files a callback reads must all be given (the library never substitutes a toy set for them)."""
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(
            f"{type(callback).__name__} needs {', '.join(missing)} (your data files); for the built-in toy set use "
            f"emu_lightning.shapesworld.ShapesWorld{type(callback).__name__}"
        )


def _log(pl_module: Any, name: str, value: float) -> None:
    # Every rank holds the same scores (they are computed from everyone's predictions), and every rank logs them:
    # the all-reduce of identical values changes nothing, and no rank waits for another that did not log.
    pl_module.log(name, float(value), sync_dist=True)


def _weights_step(trainer: L.Trainer, pl_module: Any) -> int:
    """The training step of the weights being evaluated: the trainer's while fitting; under ``validate``, that of
    the checkpoint the model was loaded from (the trainer counts from 0 there)."""
    if trainer.state.fn == TrainerFn.FITTING:
        return trainer.global_step
    loaded = getattr(pl_module, "checkpoint_step", None)
    return trainer.global_step if loaded is None else int(loaded)


def run_dir(trainer: L.Trainer) -> Path:
    """Where a run's reports go: the logger's version folder, or the trainer's root without a logger.

    Under DDP this is a collective (``trainer.log_dir`` broadcasts rank 0's folder): every rank must call it at the
    same point, never inside a rank-only branch."""
    return Path(trainer.log_dir or trainer.default_root_dir)


@contextlib.contextmanager
def _json_lines(path: Path) -> Iterator[Any]:
    """A function writing one JSON object per line to ``path``; the file appears there complete (written beside it,
    renamed at the end), and not at all when the writing fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w") as f:
            yield lambda record: f.write(json.dumps(record, default=str) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _replace_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _write_report(folder: Path, results: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{results['task']}-step{results['step']:07d}"
    (folder / f"{stem}.json").write_text(json.dumps(results, indent=2))
    title = (f"# {results['task']} at step {results['step']} ({results['num_queries']} queries, "
             f"{results['selection']} demonstrations)")  # fmt: skip
    lines = [title, ""]
    if not results["scored"]:
        lines += ["Not scored: the evaluated split has no references.", ""]
    lines += ["| shots | mean | std | seeds | evaluated |", "|---|---|---|---|---|"]
    for shots, r in results["shots"].items():
        mean, std = ("-", "-") if r["mean"] is None else (f"{r['mean']:.2f}", f"{r['std']:.2f}")
        lines.append(f"| {shots} | {mean} | {std} | {len(r['seeds'])} | {r['num_evaluated']} |")
    lines += ["", "| shots | seed | id | question | prediction | references | score |", "|---|---|---|---|---|---|---|"]
    for s in results["samples"]:
        refs = " / ".join(s["references"]).replace("|", "\\|")
        score = "-" if s["score"] is None else f"{s['score']:.2f}"
        lines.append(f"| {s['shots']} | {s['seed']} | {s['key']} | {s['question']} | "
                     f"{s['prediction'].replace('|', '/')} | {refs} | {score} |")  # fmt: skip
    files = results.get("files", {})
    lines += ["", f"Every prediction, with its prompt, demonstrations and score: `{files.get('predictions')}`"]
    lines += [f"Submission file: `{name}`" for name in files.get("submissions", [])]
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
