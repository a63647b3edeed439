"""Zero- and few-shot captioning and VQA: prompts, in-context demonstrations, generation and scoring.

A task holds query examples (the evaluated split) and support examples (where demonstrations come from).
For each number of shots and each seed it builds one interleaved prompt per query, generates with the
model's ``generate`` and scores. Demonstrations are drawn per query from a generator seeded by
``(seed, query key)``, so they do not depend on how queries are split over processes; RICES picks the
most similar support images instead (most similar last, nearest the query). ``shots == 0`` with
``zero_shot_text_demos > 0`` is the paper's "zero-shot*": that many demonstrations with their images removed.
"""

from __future__ import annotations

import functools
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from emu_lightning.data.coco import CaptionExample, load_image
from emu_lightning.data.vqa import VQAExample
from emu_lightning.eval.metrics import cider, postprocess_vqa_answer, vqa_accuracy
from emu_lightning.sequence import END_OF_CHUNK

_IMAGE = "\x00"
_END = "\x01"


@dataclass(frozen=True)
class EvalExample:
    """One evaluated item: an image, optional question text, and its references (captions or answers)."""

    key: int
    """Unique id of the item (COCO image id for captioning, question id for VQA)."""
    image_id: int
    image_path: Path
    references: tuple[str, ...]
    question: str = ""


def from_captions(examples: Sequence[CaptionExample]) -> list[EvalExample]:
    return [EvalExample(e.image_id, e.image_id, e.image_path, e.references) for e in examples]


def from_vqa(examples: Sequence[VQAExample]) -> list[EvalExample]:
    return [EvalExample(e.question_id, e.image_id, e.image_path, e.answers, e.question) for e in examples]


def render(template: str, image: Tensor | None, **fields: str) -> list[Any]:
    """Interleaved items from a template: ``"{image}Output:{caption}{end}"`` -> ``[image, "Output:caption", END]``.

    ``{end}`` is :data:`~emu_lightning.sequence.END_OF_CHUNK` (the EOS that ends an example). With
    ``image=None`` (a text-only demonstration) the image is left out.
    """
    items: list[Any] = []
    for part in re.split(f"({_IMAGE}|{_END})", template.format(image=_IMAGE, end=_END, **fields)):
        if part == _IMAGE:
            items += [image] if image is not None else []
        elif part == _END:
            items.append(END_OF_CHUNK)
        elif part:
            items.append(part)
    return items


@dataclass
class PromptTemplate:
    """How demonstrations and the query are written. ``{image}`` marks the image, ``{end}`` the end of an
    example (EOS); fields: ``caption``, ``question``, ``answer``."""

    demo: str = "{image}{caption}{end}"
    query: str = "{image}"
    prefix: str = ""
    """Text before everything (a system message)."""


def caption_postprocess(text: str) -> str:
    """The paper's caption post-processing: the first sentence, lower case."""
    first = text.strip().split("\n")[0].split(". ")[0].strip()
    return first.lower()


class ImageCache:
    """Loads each unique image file once; failed decodes are counted (``skipped``) and return ``None``."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.images: dict[Path, Tensor | None] = {}
        self.skipped: set[Path] = set()

    def __call__(self, path: Path) -> Tensor | None:
        if path not in self.images:
            self.images[path] = load_image(path, self.image_size)
            if self.images[path] is None:
                self.skipped.add(path)
        return self.images[path]


@dataclass
class FewShotTask:
    """A zero-/few-shot evaluation over ``queries`` with demonstrations from ``support``.

    Args:
        name: ``captioning`` or ``vqa`` (chooses the metric and the template fields).
        queries: the evaluated examples.
        support: the examples demonstrations are drawn from (the train split).
        template: demonstration and query templates.
        shots: numbers of demonstrations to evaluate, e.g. ``(0, 4)``.
        seeds: one evaluation per seed; results report the mean and standard deviation.
        selection: ``random`` or ``rices`` (similar support images by the given ``rices`` selector).
        zero_shot_text_demos: for ``shots == 0``, demonstrations shown without their images (paper: 2).
        image_size: side the images are resized to.
        batch_size: prompts per ``generate`` call.
        generation: ``generate`` options (beams, lengths, length penalty).
    """

    name: str
    queries: Sequence[EvalExample]
    support: Sequence[EvalExample]
    template: PromptTemplate = field(default_factory=PromptTemplate)
    shots: Sequence[int] = (0, 4)
    seeds: Sequence[int] = (0,)
    selection: str = "random"
    zero_shot_text_demos: int = 0
    image_size: int = 32
    batch_size: int = 16
    generation: dict[str, Any] = field(default_factory=dict)
    rices: Any = None
    """A fitted :class:`~emu_lightning.eval.rices.RICES` over ``support``; built from ``rices_encoder`` if unset."""
    rices_encoder: Any = None
    """Image encoder for RICES (e.g. ``model.vision``), used when ``selection="rices"`` and no ``rices`` is given."""

    def __post_init__(self) -> None:
        if self.name not in ("captioning", "vqa"):
            raise ValueError(f"task name {self.name!r} must be 'captioning' or 'vqa'")
        if self.selection not in ("random", "rices"):
            raise ValueError(f"selection {self.selection!r} must be 'random' or 'rices'")
        if self.selection == "rices" and self.rices is None and self.rices_encoder is None:
            raise ValueError("selection='rices' needs a RICES selector or a rices_encoder")
        most = max([*self.shots, self.zero_shot_text_demos])
        if most > len(self.support):
            raise ValueError(f"{most} demonstrations asked for, but the support set has {len(self.support)}")
        images = len({e.image_id for e in self.support})
        if self.selection == "rices" and max(self.shots) > images:
            raise ValueError(
                f"{max(self.shots)} demonstrations asked for with RICES, which shows each support image "
                f"once, but the support set has {images} different images ({len(self.support)} items)"
            )
        keys = [q.key for q in self.queries]
        if len(set(keys)) != len(keys):
            raise ValueError("query keys must be unique")
        self.images = ImageCache(self.image_size)
        if self.selection == "rices" and self.rices is None:
            from emu_lightning.eval.rices import RICES

            self.rices = RICES(self.support_images(), self.rices_encoder)

    def support_images(self) -> _SupportImages:
        """The support set in RICES' dataset protocol (``image_id`` and ``image`` per item)."""
        return _SupportImages(self)

    # ------------------------------------------------------------------ prompts
    def demonstrations(self, query_index: int, k: int, seed: int) -> list[int]:
        """Support indices for one query, least similar first (RICES) or in random order."""
        if k == 0:
            return []
        if self.selection == "rices":
            image = self.images(self.queries[query_index].image_path)
            return [] if image is None else self.rices.find_for_images(image[None], k)[0].tolist()
        rng = np.random.default_rng([seed, self.queries[query_index].key])
        return rng.choice(len(self.support), size=k, replace=False).tolist()

    def _fields(self, example: EvalExample, answer: bool) -> dict[str, str]:
        if self.name == "captioning":
            return {"caption": example.references[0] if answer else ""}
        return {"question": example.question, "answer": _majority(example.references) if answer else ""}

    def prompt(self, query_index: int, shots: int, seed: int) -> list[Any] | None:
        """The interleaved prompt for one query, or ``None`` when an image does not load (a counted skip)."""
        text_only = shots == 0 and self.zero_shot_text_demos > 0
        demos = self.demonstrations(query_index, self.zero_shot_text_demos if text_only else shots, seed)
        items: list[Any] = [self.template.prefix] if self.template.prefix else []
        for d in demos:
            example = self.support[d]
            image = None if text_only else self.images(example.image_path)
            if image is None and not text_only:
                return None
            items += render(self.template.demo, image, **self._fields(example, answer=True))
        query = self.queries[query_index]
        image = self.images(query.image_path)
        if image is None:
            return None
        return items + render(self.template.query, image, **self._fields(query, answer=False))

    # ------------------------------------------------------------------ running
    def predict(self, model: Any, shots: int, seed: int, indices: Sequence[int] | None = None) -> dict[int, str]:
        """Generated (post-processed) text per query key, for the queries at ``indices`` (default: all)."""
        indices = range(len(self.queries)) if indices is None else indices
        prompts = [(self.queries[i].key, self.prompt(i, shots, seed)) for i in indices]
        prompts = [(k, p) for k, p in prompts if p is not None]
        out: dict[int, str] = {}
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            texts = model.generate([p for _, p in chunk], **self.generation)
            for (key, _), text in zip(chunk, texts):
                out[key] = self.postprocess(text)
        return out

    def postprocess(self, text: str) -> str:
        if self.name == "captioning":
            return caption_postprocess(text)
        return postprocess_vqa_answer(text)

    def score(self, predictions: dict[int, str]) -> float:
        """CIDEr x100 (captioning) or mean VQA accuracy x100 over the predicted queries."""
        refs = {q.key: list(q.references) for q in self.queries if q.key in predictions}
        unknown = sorted(set(predictions) - set(refs))
        if unknown:
            raise ValueError(f"predictions for unknown ids {unknown[:5]}")
        if not predictions:
            raise ValueError("nothing to score: every query was skipped")
        if self.name == "captioning":
            return cider(predictions, refs)
        return 100.0 * sum(vqa_accuracy(predictions[k], refs[k]) for k in predictions) / len(predictions)

    def evaluate(
        self,
        model: Any,
        indices: Sequence[int] | None = None,
        collect: Callable[[Callable[[], dict[int, str]], str], dict[int, str]] | None = None,
        on_progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Run every (shots, seed) pair; returns the mean and std per number of shots.

        Args:
            model: anything with ``generate`` (an :class:`~emu_lightning.model.EmuModel`).
            indices: the queries this process predicts (default: all); under DDP, a rank's shard.
            collect: under DDP, runs a rank's prediction (a function of no arguments) on every rank and returns the
                union of their predictions, failing on every rank when one fails (``distributed.gather_dicts``);
                default: the predictions of this process alone.
            on_progress: called with a line per (shots, seed).
        """
        results: dict[str, Any] = {"task": self.name, "selection": self.selection, "shots": {}}
        predictions: dict[int, str] = {}
        for shots in self.shots:
            scores = []
            drawn = shots > 0 or self.zero_shot_text_demos > 0
            for seed in self.seeds if drawn else self.seeds[:1]:  # without demonstrations seeds change nothing
                predict = functools.partial(self.predict, model, shots, seed, indices)
                what = f"{self.name} {shots}-shot seed {seed}"
                predictions = predict() if collect is None else collect(predict, what)
                scores.append(self.score(predictions))
                if on_progress is not None:
                    on_progress(f"{self.name} {shots}-shot seed {seed}: {scores[-1]:.2f}")
            results["shots"][shots] = {
                "mean": statistics.fmean(scores),
                "std": statistics.pstdev(scores),
                "per_seed": scores,
                "num_evaluated": len(predictions),
            }
        by_key = {q.key: q for q in self.queries}
        results["samples"] = [
            {"key": k, "question": by_key[k].question, "prediction": p, "references": list(by_key[k].references[:3])}
            for k, p in list(predictions.items())[:8]
        ]
        results["skipped_images"] = len(self.images.skipped)
        return results


class _SupportImages:
    def __init__(self, task: FewShotTask) -> None:
        self.task = task
        self.image_ids = [e.image_id for e in task.support]

    def __len__(self) -> int:
        return len(self.task.support)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.task.support[i]
        image = self.task.images(example.image_path)
        if image is None:
            raise ValueError(f"support image {str(example.image_path)!r} does not load")
        return {"image_id": example.image_id, "image": image}


def _majority(answers: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: (counts[a], -answers.index(a))) if answers else ""
