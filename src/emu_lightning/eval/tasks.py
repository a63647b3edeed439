"""Zero- and few-shot captioning and VQA: prompts, in-context demonstrations, generation and scoring.

A task holds query examples (the evaluated split) and support examples (where demonstrations come from).
For each number of shots and each seed it builds one interleaved prompt per query, generates with the
model's ``generate`` and scores. Demonstrations are drawn per query from a generator seeded by
``(seed, query key)``, so they do not depend on how queries are split over processes; RICES picks the
most similar support images instead (most similar last, nearest the query). ``shots == 0`` with
``zero_shot_text_demos > 0`` is the paper's "zero-shot*": that many demonstrations with their images removed.

Every prediction is recorded with what produced it and what it scored (:meth:`FewShotTask.evaluate`): the query's
ids, the prompt as text, the demonstrations shown, the prediction, the references and the per-sample score, whose
mean is the reported score. A query split without references (VQAv2 test-dev) is predicted and not scored.

VQA tasks (``vqa``, ``okvqa``, ``vizwiz``) share the prompts and the VQA accuracy; a task may post-process answers its
own way (OK-VQA stems them) and may ask a second question per query (:class:`AnswerabilityPrompt`, the released Emu-I
VizWiz protocol: when the model says the answer is not known, the prediction is "unanswerable").

Video QA tasks (``msvdqa``, ``msrvttqa``, ``nextqa``) share the question prompts; their "image" is a clip, an
``(F, 3, S, S)`` tensor that the model sees as F image blocks, loaded by the task's ``loader``, and each has its own
per-sample score (``sample_score``: top-1 accuracy, or NExT-QA's WUPS).
"""

from __future__ import annotations

import functools
import re
import statistics
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from emu_lightning.data.coco import CaptionExample, load_image
from emu_lightning.data.vqa import UNANSWERABLE, VQAExample
from emu_lightning.eval.metrics import cider_score, postprocess_vqa_answer, vqa_accuracy
from emu_lightning.progress import progress_bar
from emu_lightning.sequence import END_OF_CHUNK

_IMAGE = "\x00"
_END = "\x01"
VQA_TASKS = ("vqa", "okvqa", "vizwiz")
"""Image question answering: scored with the VQA accuracy by default; prompts with ``question`` and ``answer``."""
VIDEO_QA_TASKS = ("msvdqa", "msrvttqa", "nextqa")
"""Video question answering: prompts as :data:`VQA_TASKS`', clips as their media, a ``sample_score`` of their own."""
EMU_I_SYSTEM = (
    "You will be presented with an image: [IMG]ImageContent[/IMG]. You will be able to see the image after I "
    "provide it to you. Please answer my questions based on the given image."
)
"""The system message of Emu-I's released evaluation (``image_system_msg`` of Emu1 ``mm_eval``)."""


@dataclass(frozen=True)
class EvalExample:
    """One evaluated item: an image, optional question text, and its references (captions or answers)."""

    key: int | str
    """Unique id of the item (COCO image id for captioning, question id for VQA, NExT-QA's ``<video>_<qid>``)."""
    image_id: int | str
    """The image (or video) the item is about; RICES shows each at most once."""
    image_path: Path
    """The image file, or a video file for a video task."""
    references: tuple[str, ...]
    question: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """Fields copied into each record of this query (VizWiz: its ``image`` file name and ``answerable``)."""


def from_captions(examples: Sequence[CaptionExample]) -> list[EvalExample]:
    return [EvalExample(e.image_id, e.image_id, e.image_path, e.references) for e in examples]


def from_vqa(examples: Sequence[VQAExample]) -> list[EvalExample]:
    return [EvalExample(e.question_id, e.image_id, e.image_path, e.answers, e.question) for e in examples]


def from_vizwiz(examples: Sequence[VQAExample]) -> list[EvalExample]:
    """VizWiz examples (:func:`~emu_lightning.data.vqa.read_vizwiz`); their records also show the ``image`` file
    name, ``answerable`` (the annotators' 0 or 1; ``None`` in the test split) and ``answer_type``."""
    return [EvalExample(e.question_id, e.image_id, e.image_path, e.answers, e.question,
                        {"image": e.image_name, "answerable": e.answerable, "answer_type": e.answer_type})
            for e in examples]  # fmt: skip


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


def prompt_text(items: Sequence[Any]) -> str:
    """A prompt's items as one text: images as ``<image>``, a clip of F frames as ``<video:F frames>`` (F image
    blocks), the end of an example (EOS) as ``<end>``."""

    def text(x: Any) -> str:
        if isinstance(x, Tensor):
            return f"<video:{x.shape[0]} frames>" if x.dim() == 4 else "<image>"
        return "<end>" if x == END_OF_CHUNK else str(x)

    return "".join(text(x) for x in items)


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


@dataclass(frozen=True)
class AnswerabilityPrompt:
    """A second question per query, whether the answer is known: when the model says no, the prediction is
    ``unanswerable`` instead of its answer to the first prompt (Emu-I's released VizWiz protocol).

    The prompt shares the task's prefix and demonstrations (the same support examples, in the same order); fields:
    ``question``, ``answer`` and ``known`` (``"no"`` for a demonstration whose majority answer is ``unanswerable``,
    else ``"yes"``).
    """

    query: str
    """The second prompt's query; ``{image}`` and ``{question}`` as in the task's query template."""
    demo: str
    """One demonstration of the second prompt (``{known}`` is its answer)."""
    unanswerable: str = UNANSWERABLE
    """The prediction when the model says the answer is not known."""

    def says_unknown(self, text: str) -> bool:
        """Whether the model's reply to the second prompt is "no": its first line, lower-cased and stripped of
        whitespace and of one final period, is ``no``. (The released code compares the decoded text with ``"no."``
        exactly; case, surrounding spaces and the period are forgiven here, since tokenizers differ in them.)"""
        first = text.strip().split("\n")[0].strip().lower()
        return first.removesuffix(".").strip() == "no"


class ImageCache:
    """Loads each unique media file once (an image with :func:`~emu_lightning.data.coco.load_image`, or what
    ``loader`` returns: a video task's clip); files that fail to load are counted (``skipped``) and return ``None``.

    With ``max_items``, only that many recently used files stay loaded (clips are large: 8 frames at 224 px are
    4.8 MB; a real video benchmark has thousands); a file that failed is never loaded again."""

    def __init__(
        self, image_size: int, loader: Callable[..., Tensor | None] | None = None, max_items: int | None = None
    ) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items {max_items} must be at least 1 (None: keep every file loaded)")
        self.image_size, self.max_items = image_size, max_items
        self.loader = functools.partial(loader or load_image, image_size=image_size)
        self.images: OrderedDict[Path, Tensor] = OrderedDict()
        self.skipped: set[Path] = set()

    def __call__(self, path: Path) -> Tensor | None:
        if path in self.skipped:
            return None
        if path in self.images:
            self.images.move_to_end(path)
            return self.images[path]
        media = self.loader(path)
        if media is None:
            self.skipped.add(path)
            return None
        self.images[path] = media
        if self.max_items is not None and len(self.images) > self.max_items:
            self.images.popitem(last=False)
        return media


@dataclass
class FewShotTask:
    """A zero-/few-shot evaluation over ``queries`` with demonstrations from ``support``.

    Args:
        name: ``captioning``, or ``vqa``, ``okvqa``, ``vizwiz`` (:data:`VQA_TASKS`: the VQA accuracy and the fields
            ``question`` and ``answer``).
        queries: the evaluated examples.
        support: the examples demonstrations are drawn from (the train split).
        template: demonstration and query templates.
        shots: numbers of demonstrations to evaluate, e.g. ``(0, 4)``.
        seeds: one evaluation per seed; results report the mean and standard deviation.
        selection: ``random`` or ``rices`` (similar support images by the given ``rices`` selector; a clip is compared
            by its middle frame, :func:`key_frame`).
        zero_shot_text_demos: for ``shots == 0``, demonstrations shown without their images (paper: 2).
        image_size: side the images are resized to.
        batch_size: prompts per ``generate`` call.
        generation: ``generate`` options (beams, lengths, length penalty).
        answer_postprocess: a VQA task's answer post-processing (default :func:`postprocess_vqa_answer`; OK-VQA:
            :func:`~emu_lightning.eval.okvqa.postprocess_okvqa_answer`).
        answerability: a second prompt per query (:class:`AnswerabilityPrompt`), for a VQA task.
        loader: ``loader(path, image_size=S)`` loads an example's media (default:
            :func:`~emu_lightning.data.coco.load_image`; a video task's: its clip,
            :func:`~emu_lightning.data.videoqa.load_clip`); ``None`` for a file that does not load.
        cache_size: media files kept loaded (``None``: all).
        sample_score: a question task's per-sample score in [0, 1] from the post-processed prediction and the query
            (default: the VQA accuracy against its references); the task's score is their mean x100.
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
    answer_postprocess: Callable[[str], str] | None = None
    answerability: AnswerabilityPrompt | None = None
    loader: Callable[..., Tensor | None] | None = None
    cache_size: int | None = None
    sample_score: Callable[[str, EvalExample], float] | None = None

    @property
    def kind(self) -> str:
        """``captioning``, or ``vqa`` for every question task (:data:`VQA_TASKS`, :data:`VIDEO_QA_TASKS`)."""
        return "captioning" if self.name == "captioning" else "vqa"

    def __post_init__(self) -> None:
        if self.name != "captioning" and self.name not in VQA_TASKS + VIDEO_QA_TASKS:
            raise ValueError(
                f"task name {self.name!r} must be 'captioning' or one of {list(VQA_TASKS + VIDEO_QA_TASKS)}"
            )
        asks = (self.answer_postprocess, self.answerability, self.sample_score)
        if self.kind == "captioning" and any(x is not None for x in asks):
            raise ValueError(
                "answer_postprocess, answerability and sample_score are for question tasks, not captioning"
            )
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
        if not keys:
            raise ValueError(f"no {self.name} queries to evaluate")
        if len(set(keys)) != len(keys):
            raise ValueError("query keys must be unique")
        answered = [q for q in self.queries if q.references]
        if answered and len(answered) < len(self.queries):
            missing = next(q.key for q in self.queries if not q.references)
            raise ValueError(
                f"{len(self.queries) - len(answered)} of {len(self.queries)} queries have no references (e.g. "
                f"{missing}): give references for every query, or for none (a test split, predicted and not scored)"
            )
        self.scored = bool(answered)
        """Whether the queries have references (scores); a test split without them is only predicted."""
        if most > 0:
            bare = next((e.key for e in self.support if not e.references), None)
            if bare is not None:
                raise ValueError(f"support example {bare} has no references to show as a demonstration's "
                                 f"{'caption' if self.kind == 'captioning' else 'answer'}")  # fmt: skip
        self.images = ImageCache(self.image_size, self.loader, self.cache_size)
        self._baseline: dict[str, Any] | None = None
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
            return [] if image is None else self.rices.find_for_images(key_frame(image)[None], k)[0].tolist()
        rng = np.random.default_rng([seed, _seed_of(self.queries[query_index].key)])
        return rng.choice(len(self.support), size=k, replace=False).tolist()

    def _fields(self, example: EvalExample, answer: bool) -> dict[str, str]:
        if self.kind == "captioning":
            return {"caption": example.references[0] if answer else ""}
        majority = _majority(example.references) if answer else ""
        unknown = self.answerability.unanswerable if self.answerability else UNANSWERABLE
        return {"question": example.question, "answer": majority, "known": "no" if majority == unknown else "yes"}

    def prompt(self, query_index: int, shots: int, seed: int) -> list[Any] | None:
        """The interleaved prompt for one query, or ``None`` when an image does not load (a counted skip)."""
        return self._build(query_index, shots, seed)[1]

    def _build(
        self, query_index: int, shots: int, seed: int, demos: list[int] | None = None, second: bool = False
    ) -> tuple[list[int], list[Any] | None, Path | None]:
        """``(demonstrations, prompt, image that did not load)``: the support indices shown (in order), the
        interleaved prompt (``None`` when an image does not load) and that image's path. ``demos`` (default: drawn)
        gives the demonstrations; ``second`` builds the :attr:`answerability` prompt instead of the first."""
        text_only = shots == 0 and self.zero_shot_text_demos > 0
        if demos is None:
            demos = self.demonstrations(query_index, self.zero_shot_text_demos if text_only else shots, seed)
        demo_template, query_template = self.template.demo, self.template.query
        if second:
            demo_template, query_template = self.answerability.demo, self.answerability.query
        items: list[Any] = [self.template.prefix] if self.template.prefix else []
        for d in demos:
            example = self.support[d]
            image = None if text_only else self.images(example.image_path)
            if image is None and not text_only:
                return demos, None, example.image_path
            items += render(demo_template, image, **self._fields(example, answer=True))
        query = self.queries[query_index]
        image = self.images(query.image_path)
        if image is None:
            return demos, None, query.image_path
        return demos, items + render(query_template, image, **self._fields(query, answer=False)), None

    # ------------------------------------------------------------------ running
    def runs(self) -> list[tuple[int, int]]:
        """The ``(shots, seed)`` pairs :meth:`evaluate` runs, in order; without demonstrations (0 shots and no
        text-only ones) seeds change nothing, so that number of shots runs once, with the first seed."""
        return [(shots, seed) for shots in self.shots
                for seed in (self.seeds if shots > 0 or self.zero_shot_text_demos > 0 else self.seeds[:1])]  # fmt: skip

    def predict_samples(
        self, model: Any, shots: int, seed: int, indices: Sequence[int] | None = None
    ) -> dict[int, dict[str, Any]]:
        """Per query key (for the queries at ``indices``, default: all): ``prompt`` (the text of the prompt,
        :func:`prompt_text`), ``demonstrations`` (the support indices shown, in order) and ``prediction`` (the
        post-processed generated text; ``None`` for a query skipped because an image does not load, with
        ``skipped`` saying which).

        With :attr:`answerability`, each query has a second prompt with the same demonstrations, generated in the
        same batches: the sample also holds ``answerability_prompt``, ``answer`` (the post-processed reply to the
        first prompt), ``answerability`` (the reply to the second, stripped) and ``answer_known`` (false when that
        reply is "no", which makes the ``prediction`` ``unanswerable``; else the prediction is ``answer``)."""
        indices = range(len(self.queries)) if indices is None else indices
        out: dict[int, dict[str, Any]] = {}
        pending: list[tuple[int, str, list[Any]]] = []  # (query key, which reply, prompt)
        desc = f"{self.name} {shots}-shot seed {seed}"  # a line with the score follows (on_progress): not kept
        with progress_bar(total=len(indices), desc=desc, unit="query", leave=False) as bar:
            done = 0

            def generate() -> None:
                texts = model.generate([p for _, _, p in pending], **self.generation)
                if len(texts) != len(pending):
                    raise ValueError(f"generate returned {len(texts)} texts for {len(pending)} prompts")
                for (key, slot, _), text in zip(pending, texts):
                    out[key][slot] = self.postprocess(text) if slot != "answerability" else text.strip()
                pending.clear()

            for n, i in enumerate(indices, 1):
                demos, prompt, failed = self._build(i, shots, seed)
                key = self.queries[i].key
                out[key] = {"prompt": None if prompt is None else prompt_text(prompt), "demonstrations": demos,
                            "prediction": None}  # fmt: skip
                second = None
                if prompt is not None and self.answerability is not None:
                    second = self._build(i, shots, seed, demos=demos, second=True)[1]
                    out[key]["answerability_prompt"] = prompt_text(second)
                if prompt is None:
                    out[key]["skipped"] = f"image {str(failed)!r} does not load"
                    continue
                slots = [("prediction", prompt)] if second is None else [("answer", prompt), ("answerability", second)]
                for slot, items in slots:
                    pending.append((key, slot, items))
                    if len(pending) == self.batch_size:  # the same batches as generating every prompt at the end
                        generate()
                        bar.update(n - done)
                        done = n
            if pending:
                generate()
            bar.update(len(indices) - done)
        check = self.answerability
        for sample in out.values() if check is not None else ():
            if "answer" in sample:
                sample["answer_known"] = known = not check.says_unknown(sample["answerability"])
                sample["prediction"] = sample["answer"] if known else check.unanswerable
        return out

    def predict(self, model: Any, shots: int, seed: int, indices: Sequence[int] | None = None) -> dict[int, str]:
        """Generated (post-processed) text per query key, for the queries at ``indices`` (default: all); skipped
        queries are left out."""
        samples = self.predict_samples(model, shots, seed, indices)
        return {k: s["prediction"] for k, s in samples.items() if s["prediction"] is not None}

    def postprocess(self, text: str) -> str:
        if self.kind == "captioning":
            return caption_postprocess(text)
        return (self.answer_postprocess or postprocess_vqa_answer)(text)

    def score_samples(self, predictions: dict[int, str]) -> tuple[float, dict[int, float]]:
        """The score and each prediction's: CIDEr-D x100 and each image's CIDEr-D x100 (captioning; the corpus score
        is the mean of the per-image ones), or the mean x100 of each answer's :attr:`sample_score` (default: VQA
        accuracy) and each answer's x100."""
        if not self.scored:
            raise ValueError(f"the {self.name} queries have no references: nothing to score")
        refs = {q.key: list(q.references) for q in self.queries if q.key in predictions}
        unknown = sorted(set(predictions) - set(refs))
        if unknown:
            raise ValueError(f"predictions for unknown ids {unknown[:5]}")
        if not predictions:
            raise ValueError("nothing to score: every query was skipped")
        if self.kind == "captioning":
            result = cider_score(predictions, refs)
            return result.score, result.per_image
        if self.sample_score is None:
            per_sample = {k: 100.0 * vqa_accuracy(predictions[k], refs[k]) for k in predictions}
        else:
            query = {q.key: q for q in self.queries}
            per_sample = {k: 100.0 * float(self.sample_score(predictions[k], query[k])) for k in predictions}
        return statistics.fmean(per_sample.values()), per_sample

    def constant_baseline(self, candidates: int = 10) -> dict[str, Any] | None:
        """The chance level to read a score against: the best score of one prediction given to every query, among
        the ``candidates`` most common references of the queries (captioning: three captions) -- what a model that
        ignores the image and the question reaches at best (VQAv2's "prior" baseline, picked with the answers).
        ``{"prediction", "score"}``; ``None`` for a split without references. Computed once."""
        if not self.scored:
            return None
        if self._baseline is None:
            counts = Counter(r for q in self.queries for r in dict.fromkeys(q.references))
            common = [text for text, _ in counts.most_common(3 if self.kind == "captioning" else candidates)]
            scored = [(self.score({q.key: text for q in self.queries}), text) for text in common]
            score, text = max(scored, key=lambda pair: pair[0])
            self._baseline = {"prediction": text, "score": score}
        return self._baseline

    def score(self, predictions: dict[int, str]) -> float:
        """CIDEr x100 (captioning) or mean VQA accuracy x100 over the predicted queries."""
        return self.score_samples(predictions)[0]

    def evaluate(
        self,
        model: Any,
        indices: Sequence[int] | None = None,
        collect: Callable[[Callable[[], dict[int, Any]], str], dict[int, Any]] | None = None,
        on_progress: Callable[[str], None] | None = None,
        on_samples: Callable[[int, int, list[dict[str, Any]]], None] | None = None,
    ) -> dict[str, Any]:
        """Run every (shots, seed) pair of :meth:`runs`; returns per number of shots the ``mean`` and ``std`` over
        seeds, ``per_seed`` (the score of each seed, in the order of ``seeds``), ``seeds`` and ``num_evaluated``, and
        ``chance``, the best constant prediction's score (:meth:`constant_baseline`).

        Each pair records one sample per query, in query order: ``shots``, ``seed``, ``key`` (the query id),
        ``image_id``, the query's ``extra`` fields (VizWiz: ``image``, ``answerable``, ``answer_type``), ``question``
        (VQA only), ``prompt`` (:func:`prompt_text`; ``None`` for a skipped query),
        ``demonstrations`` (``[{"key", "image_id"}, ...]`` of the support examples, in the order shown),
        ``prediction`` (``None`` when skipped, with ``skipped`` saying why), ``references`` and ``score`` (the
        prediction's CIDEr-D x100 or VQA accuracy x100; ``None`` when skipped or not scored). The mean of the
        scores of a pair is that pair's score. With :attr:`answerability`, the fields of the second prompt
        (:meth:`predict_samples`) follow ``prompt``.

        Queries without references (every one of them: a test split such as VQAv2 test-dev) are predicted and
        not scored: ``scored`` is false and each number of shots has ``num_evaluated`` without a mean.

        Args:
            model: anything with ``generate`` (an :class:`~emu_lightning.model.EmuModel`).
            indices: the queries this process predicts (default: all); under DDP, a rank's shard.
            collect: under DDP, runs a rank's prediction (a function of no arguments) on every rank and returns the
                union of their predictions, failing on every rank when one fails (``distributed.gather_dicts``);
                default: the predictions of this process alone.
            on_progress: called with a line per (shots, seed).
            on_samples: called with ``(shots, seed, samples)`` after each pair (e.g. to write them to a file); by
                default the samples of every pair are returned in ``results["records"]`` instead.
        """
        results: dict[str, Any] = {"task": self.name, "selection": self.selection, "scored": self.scored,
                                   "shots": {}}  # fmt: skip
        kept: list[dict[str, Any]] = []
        scores: dict[int, list[float]] = {}
        counts: dict[int, int] = {}
        records: list[dict[str, Any]] = []
        for shots, seed in self.runs():
            predict = functools.partial(self.predict_samples, model, shots, seed, indices)
            what = f"{self.name} {shots}-shot seed {seed}"
            samples = predict() if collect is None else collect(predict, what)
            predictions = {k: s["prediction"] for k, s in samples.items() if s["prediction"] is not None}
            counts[shots] = len(predictions)
            line = f"{what}: {len(predictions)} predicted, not scored (no references)"
            per_sample: dict[int, float] = {}
            if self.scored:
                score, per_sample = self.score_samples(predictions)
                scores.setdefault(shots, []).append(score)
                line = f"{what}: {score:.2f}"
            records = [self._record(q, shots, seed, samples[q.key], per_sample.get(q.key))
                       for q in self.queries if q.key in samples]  # fmt: skip
            if on_samples is not None:
                on_samples(shots, seed, records)
            else:
                kept += records
            if on_progress is not None:
                on_progress(line)
        for shots in self.shots:
            per_seed = scores.get(shots, [])
            results["shots"][shots] = {
                "mean": statistics.fmean(per_seed) if per_seed else None,
                "std": statistics.pstdev(per_seed) if per_seed else None,
                "per_seed": per_seed,
                "seeds": [seed for k, seed in self.runs() if k == shots],
                "num_evaluated": counts[shots],
            }
        shown = [r for r in records if r["prediction"] is not None][:8]  # a few of the last pair, for the reports
        results["samples"] = [{"shots": r["shots"], "seed": r["seed"], "key": r["key"],
                               "question": r.get("question", ""), "prediction": r["prediction"],
                               "references": r["references"][:3], "score": r["score"]} for r in shown]  # fmt: skip
        results["skipped_images"] = len(self.images.skipped)
        results["chance"] = self.constant_baseline()
        if on_samples is None:
            results["records"] = kept
        return results

    def _record(
        self, query: EvalExample, shots: int, seed: int, sample: dict[str, Any], score: float | None
    ) -> dict[str, Any]:
        record: dict[str, Any] = {"shots": shots, "seed": seed, "key": query.key, "image_id": query.image_id,
                                  **query.extra}  # fmt: skip
        if self.kind == "vqa":
            record["question"] = query.question
        demos = [{"key": self.support[d].key, "image_id": self.support[d].image_id} for d in sample["demonstrations"]]
        record.update(prompt=sample["prompt"], demonstrations=demos)
        for name in ("answerability_prompt", "answer", "answerability", "answer_known"):
            if name in sample:
                record[name] = sample[name]
        record.update(prediction=sample["prediction"], references=list(query.references), score=score)
        if "skipped" in sample:
            record["skipped"] = sample["skipped"]
        return record


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
        return {"image_id": example.image_id, "image": key_frame(image)}


def key_frame(media: Tensor) -> Tensor:
    """What RICES compares of an example's media: an image itself, a clip's middle frame (frame ``F // 2``)."""
    return media[media.shape[0] // 2] if media.dim() == 4 else media


def _seed_of(key: int | str) -> int:
    """A query key as a seed for its demonstrations: an int itself, a text key its CRC-32 (stable across runs and
    processes, unlike ``hash``)."""
    return key if isinstance(key, int) else zlib.crc32(str(key).encode())


def _majority(answers: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: (counts[a], -answers.index(a))) if answers else ""
