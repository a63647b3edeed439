"""Zero-/few-shot video question answering: MSVD-QA, MSRVTT-QA (top-1 accuracy) and NExT-QA open-ended (WUPS).

Each callback reads its benchmark's released files (:mod:`emu_lightning.data.videoqa`), samples ``num_frames`` frames
of every clip at segment centres (:func:`~emu_lightning.data.videoqa.load_clip`; 8, as in training) and shows them as
that many image blocks where a VQA prompt shows its image (``{image}`` in the templates). A missing or corrupt video is
skipped and counted, as a missing image is. Answers are post-processed as VQA answers are
(:func:`~emu_lightning.eval.metrics.postprocess_vqa_answer`); MSVD-QA and MSRVTT-QA then score top-1 accuracy: 1 when
the answer equals the reference after the VQA answer normalisation
(:func:`~emu_lightning.eval.metrics.normalize_vqa_answer`), else 0. NExT-QA scores WUPS as Flamingo reports it
(:mod:`emu_lightning.eval.wups`), from WordNet 3.0 files on disk.

Demonstrations (few-shot) come from the benchmark's train split, at random or by RICES on each clip's middle frame;
the support files are needed only when demonstrations are shown. Clips are large (8 frames at 224 px: 4.8 MB), so at
most ``cache_size`` stay loaded (questions come grouped by video, so each is decoded about once).

Logged and written as every :class:`~emu_lightning.eval.callbacks.FewShotEval`: ``eval/<task>_<k>shot``, and under
``<run dir>/eval/`` the reports and every prediction (``<task>-step<N>-predictions.jsonl``, with the question's
``video_id``, ``video`` file and NExT-QA's ``question_type``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L

from emu_lightning.data.videoqa import VideoQAExample, load_clip, read_msrvtt_qa, read_msvd_qa, read_nextqa_oe
from emu_lightning.eval.callbacks import FewShotEval, VQAEval, _require
from emu_lightning.eval.metrics import normalize_vqa_answer
from emu_lightning.eval.tasks import EvalExample
from emu_lightning.eval.wups import load_wordnet, wups_scores


def from_videoqa(examples: list[VideoQAExample]) -> list[EvalExample]:
    """Video questions as evaluation examples: the key is the benchmark's question id (an int for MSVD-QA and
    MSRVTT-QA, ``"<video>_<qid>"`` for NExT-QA), the "image" the video; records also show ``video_id``, the ``video``
    file name and ``question_type`` (NExT-QA's; ``""`` elsewhere)."""
    return [
        EvalExample(
            int(e.key) if e.key.isdigit() else e.key,
            e.video_id,
            e.video_path,
            e.answers,
            e.question,
            {"video_id": e.video_id, "video": e.video_path.name, "question_type": e.question_type},
        )
        for e in examples
    ]


def top1_accuracy(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """1.0 when the prediction equals one of the references after the VQA answer normalisation (lower case,
    punctuation, number words as digits, articles dropped), else 0.0: MSVD-QA's and MSRVTT-QA's top-1 accuracy."""
    answer = normalize_vqa_answer(prediction)
    return float(any(answer == normalize_vqa_answer(r) for r in references))


class VideoQAEval(FewShotEval):
    """What the video QA callbacks share: clips as media, the VQA prompts, their scoring; subclasses read the files.

    Args:
        num_frames: frames per clip, at segment centres (8, as in training); each is one image block.
        cache_size: clips kept decoded at once.
        kwargs: the schedule and prompt options of :class:`~emu_lightning.eval.callbacks.FewShotEval` (default
            prompts and decoding: :class:`~emu_lightning.eval.callbacks.VQAEval`'s).
    """

    default_demo, default_query = VQAEval.default_demo, VQAEval.default_query
    default_generation = VQAEval.default_generation
    metric = "top-1 accuracy"

    def __init__(self, num_frames: int = 8, cache_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_frames < 1:
            raise ValueError(f"num_frames {num_frames} must be at least 1")
        self.num_frames, self.cache_size = num_frames, cache_size
        self.query_files: tuple[Any, ...] = ()
        self.support_files: tuple[Any, ...] = ()

    def read(self, *files: Any) -> list[VideoQAExample]:
        """The questions of one split's files (:attr:`query_files` or :attr:`support_files`)."""
        raise NotImplementedError

    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        queries = from_videoqa(self.read(*self.query_files))
        shown = max([*self.task_args["shots"], self.task_args["zero_shot_text_demos"]])
        if self.support_files[0] is None:
            if shown > 0:
                raise ValueError(f"{type(self).__name__}: {shown} demonstrations asked for, but no support split "
                                 "(the train split's files) is given")  # fmt: skip
            return queries, []
        return queries, from_videoqa(self.read(*self.support_files))

    def task_options(self) -> dict[str, Any]:
        return {"loader": functools.partial(load_clip, n=self.num_frames), "cache_size": self.cache_size,
                "sample_score": self.sample_score}  # fmt: skip

    def sample_score(self, prediction: str, query: EvalExample) -> float:
        """One answer's score in [0, 1]: top-1 accuracy (:func:`top1_accuracy`)."""
        return top1_accuracy(prediction, query.references)


class MSVDQAEval(VideoQAEval):
    """Zero-/few-shot MSVD-QA, top-1 accuracy x100 (``eval/msvdqa_<k>shot``).

    Args:
        qa_json: the evaluated split (``test_qa.json``: ``[{answer, id, question, video_id}]``).
        video_root: MSVD's ``YouTubeClips`` folder.
        mapping: the release's ``youtube_mapping.txt`` (``<clip name> vid<N>``); without it, videos are
            ``vid<N>.avi`` / ``.mp4``.
        support_qa_json: the split demonstrations come from (``train_qa.json``); needed only with demonstrations.
        support_video_root: its videos (default: ``video_root``).
        support_mapping: its mapping (default: ``mapping``).
        kwargs: :class:`VideoQAEval`'s.
    """

    task_name = "msvdqa"

    def __init__(
        self,
        qa_json: str | None = None,
        video_root: str | None = None,
        mapping: str | None = None,
        support_qa_json: str | None = None,
        support_video_root: str | None = None,
        support_mapping: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not self.writes_own_data:
            _require(self, qa_json=qa_json, video_root=video_root)
        self.query_files = (qa_json, video_root, mapping)
        self.support_files = (support_qa_json, support_video_root or video_root, support_mapping or mapping)

    def read(self, qa_json: str, video_root: str, mapping: str | None) -> list[VideoQAExample]:
        return read_msvd_qa(qa_json, video_root, mapping)


class MSRVTTQAEval(VideoQAEval):
    """Zero-/few-shot MSRVTT-QA, top-1 accuracy x100 (``eval/msrvttqa_<k>shot``).

    Args:
        qa_json: the evaluated split (``test_qa.json``: ``[{answer, category_id, id, question, video_id}]``).
        video_root: the folder of ``video<N>.mp4``.
        support_qa_json: the split demonstrations come from (``train_qa.json``); needed only with demonstrations.
        support_video_root: its videos (default: ``video_root``).
        kwargs: :class:`VideoQAEval`'s.
    """

    task_name = "msrvttqa"

    def __init__(
        self,
        qa_json: str | None = None,
        video_root: str | None = None,
        support_qa_json: str | None = None,
        support_video_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not self.writes_own_data:
            _require(self, qa_json=qa_json, video_root=video_root)
        self.query_files = (qa_json, video_root)
        self.support_files = (support_qa_json, support_video_root or video_root)

    def read(self, qa_json: str, video_root: str) -> list[VideoQAExample]:
        return read_msrvtt_qa(qa_json, video_root)


class NExTQAEval(VideoQAEval):
    """Zero-/few-shot NExT-QA open-ended, WUPS x100 (``eval/nextqa_<k>shot``), as Flamingo reports it.

    Each answer is scored as NExT-OE's evaluation does (:func:`~emu_lightning.eval.wups.wups_scores`): both answers
    lemmatized and stripped of stopwords, the Wu-Palmer set score against each reference (the max over NExT-OE's extra
    reference answers), counting (``DC``) and yes/no (``DB``) questions by exact match. WordNet 3.0 is read from a
    folder (:func:`~emu_lightning.eval.wups.load_wordnet`: ``wordnet``, else ``$EMU_WORDNET_DIR``, else Debian's
    ``/usr/share/wordnet`` from the ``wordnet-base`` package); without it the evaluation stops before generating
    anything, saying how to install it.

    Args:
        csv: the evaluated split (NExT-OE ``val.csv`` / ``test.csv``).
        video_root: NExT-QA's ``NExTVideo`` folder.
        map_json: ``map_vid_vidorID.json`` (videos under their folders); without it, ``<video>.mp4``.
        extra_answers_json: ``add_reference_answer_<split>.json`` (second reference answers).
        support_csv: the split demonstrations come from (``train.csv``); needed only with demonstrations.
        support_video_root: its videos (default: ``video_root``).
        support_map_json: its video map (default: ``map_json``).
        wordnet: the WordNet 3.0 database folder.
        threshold: WUPS@0.0 (``0.0``, default) or WUPS@0.9 (``0.9``).
        kwargs: :class:`VideoQAEval`'s.
    """

    task_name = "nextqa"
    THRESHOLDS = (0.0, 0.9)

    def __init__(
        self,
        csv: str | None = None,
        video_root: str | None = None,
        map_json: str | None = None,
        extra_answers_json: str | None = None,
        support_csv: str | None = None,
        support_video_root: str | None = None,
        support_map_json: str | None = None,
        wordnet: str | None = None,
        threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not self.writes_own_data:
            _require(self, csv=csv, video_root=video_root)
        if threshold not in self.THRESHOLDS:
            raise ValueError(f"threshold {threshold} must be one of {list(self.THRESHOLDS)} (WUPS@0.0 or WUPS@0.9)")
        self.query_files = (csv, video_root, map_json, extra_answers_json)
        self.support_files = (support_csv, support_video_root or video_root, support_map_json or map_json, None)
        self.wordnet_dir, self.threshold = wordnet, threshold
        self.metric = f"WUPS@{threshold}"
        self.wordnet: Any = None

    def read(self, csv: str, video_root: str, map_json: str | None, extra: str | None) -> list[VideoQAExample]:
        return read_nextqa_oe(csv, video_root, map_json, extra)

    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        self.wordnet = load_wordnet(self.wordnet_path(root))  # before any generation: a missing WordNet stops it now
        return super().examples(trainer, pl_module, root)

    def wordnet_path(self, root: Path) -> str | None:
        """The WordNet folder to read (``None``: :func:`~emu_lightning.eval.wups.load_wordnet`'s default places)."""
        return self.wordnet_dir

    def sample_score(self, prediction: str, query: EvalExample) -> float:
        """One answer's WUPS at :attr:`threshold` in [0, 1] (exact match for ``DB`` / ``DC`` questions)."""
        qtype = query.extra.get("question_type", "")
        result = wups_scores([prediction], [list(query.references)], self.wordnet, [qtype])
        return result.per_sample_0[0] if self.threshold == 0.0 else result.per_sample_9[0]
