"""VizWiz-VQA: :class:`VizWizEval` on its released files, with the plain and Emu-I's released two-prompt protocols."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from emu_lightning.data.vqa import read_vizwiz
from emu_lightning.eval.callbacks import FewShotEval, VQAEval, _require
from emu_lightning.eval.tasks import EMU_I_SYSTEM, AnswerabilityPrompt, from_vizwiz

EMU_I_VIZWIZ_QUERY = (
    " [USER]: {image} based on the content of the image and common sense, please provide an accurate answer "
    "consisting of only one word or phrase. {question} [ASSISTANT]: the answer is:"
)
"""The answer prompt of Emu-I's released VizWiz evaluation (Emu1 ``mm_eval/datasets/vizwiz.py``), after
:data:`~emu_lightning.eval.tasks.EMU_I_SYSTEM`."""
EMU_I_VIZWIZ_ANSWERABILITY = (
    " [USER]: {image} based on the content of the image and common sense, please provide an accurate answer "
    "consisting of only one word or phrase. {question}, is the answer known? [ASSISTANT]:"
)
"""The released second prompt (its ``answerability_prompt``): the same with ", is the answer known?" after the
question; a reply of "no." makes the prediction "unanswerable"."""
EMU_I_VIZWIZ_DEMO = EMU_I_VIZWIZ_QUERY + " {answer}.{end}"
EMU_I_VIZWIZ_ANSWERABILITY_DEMO = EMU_I_VIZWIZ_ANSWERABILITY + " {known}.{end}"
"""Demonstrations in Emu-I's form, ours: the released protocol is zero-shot and shows none."""


class VizWizEval(FewShotEval):
    """Zero-/few-shot VizWiz-VQA from its released files, scored with the VQA accuracy (x100) as its official
    evaluation does.

    Each split is one json list (``val.json``; ``train.json`` for demonstrations; ``test.json`` has no answers) of
    ``{"image", "question", "answers": [10 x {"answer", "answer_confidence"}], "answerable", "answer_type"}``, read by
    :func:`~emu_lightning.data.vqa.read_vizwiz` (question ids are positions in the file). An unanswerable question is
    scored against its 10 answers like any other (mostly "unanswerable": predicting "unanswerable" scores there).
    Records show the ``image`` file name and the annotators' ``answerable`` beside the usual fields.

    Protocols (``protocol``):

    - ``plain``: one prompt per query, :class:`VQAEval`'s (``question: ... answer:``); the model says
      "unanswerable" itself or not at all.
    - ``two_prompt``: Emu-I's released protocol (Emu1 ``mm_eval/datasets/vizwiz.py``): the Emu-I system message, the
      answer prompt :data:`EMU_I_VIZWIZ_QUERY` and a second prompt asking whether the answer is known,
      :data:`EMU_I_VIZWIZ_ANSWERABILITY`; when the reply to the second is "no" the prediction is "unanswerable", else
      the answer to the first. Both replies are in each record (``answer``, ``answerability``, ``answer_known``,
      ``answerability_prompt``). Decoding defaults to the released beam 5, 1 to 20 new tokens, length penalty -1.
      Demonstrations, if asked for, are shown in both prompts (:data:`EMU_I_VIZWIZ_DEMO`,
      :data:`EMU_I_VIZWIZ_ANSWERABILITY_DEMO`; ``known`` is "no" for an unanswerable one).

    A split without answers (``test.json``) is predicted and not scored, and its answers are written in VizWiz's
    results format, ``[{"image": "VizWiz_test_00000000.jpg", "answer": str}, ...]``, to
    ``<run dir>/eval/vizwiz-step<N>-submission.json`` (one file per (shots, seed) with several).

    Args:
        annotations_json: the evaluated split's json (``val.json``, or ``test.json``).
        image_root: folder of its images.
        support_annotations_json: the split demonstrations come from (``train.json``).
        support_image_root: folder of its images.
        protocol: ``plain`` or ``two_prompt``.
        answerability_template: the second prompt's query (``two_prompt``; default: the released one).
        answerability_demo_template: a demonstration of the second prompt (``two_prompt``).
        prefix: text before each prompt (default: none; ``two_prompt``: the Emu-I system message).
        demo_template: one demonstration (default: :class:`VQAEval`'s; ``two_prompt``: :data:`EMU_I_VIZWIZ_DEMO`).
        query_template: the query (default: :class:`VQAEval`'s; ``two_prompt``: :data:`EMU_I_VIZWIZ_QUERY`).
        generation: ``generate`` options (default: :class:`VQAEval`'s; ``two_prompt``: the released ones).
        num_answers: answers each entry must have (10; ``None``: any number).
        write_submission: write the results file also for a split with answers.
        kwargs: the schedule and prompt options of :class:`FewShotEval`.
    """

    task_name = "vizwiz"
    metric = VQAEval.metric
    default_demo, default_query = VQAEval.default_demo, VQAEval.default_query
    default_generation = VQAEval.default_generation
    PROTOCOLS = ("plain", "two_prompt")
    EMU_I_GENERATION = {"num_beams": 5, "max_new_tokens": 20, "min_new_tokens": 1, "length_penalty": -1.0}

    def __init__(
        self,
        annotations_json: str | None = None,
        image_root: str | None = None,
        support_annotations_json: str | None = None,
        support_image_root: str | None = None,
        protocol: str = "plain",
        answerability_template: str | None = None,
        answerability_demo_template: str | None = None,
        prefix: str | None = None,
        demo_template: str | None = None,
        query_template: str | None = None,
        generation: dict[str, Any] | None = None,
        num_answers: int | None = 10,
        write_submission: bool = False,
        **kwargs: Any,
    ) -> None:
        if protocol not in self.PROTOCOLS:
            raise ValueError(f"VizWiz protocol {protocol!r} must be one of {list(self.PROTOCOLS)}")
        two = protocol == "two_prompt"
        if not two and (answerability_template is not None or answerability_demo_template is not None):
            raise ValueError("answerability_template and answerability_demo_template need protocol: two_prompt")
        super().__init__(
            prefix=(EMU_I_SYSTEM if two else "") if prefix is None else prefix,
            demo_template=demo_template or (EMU_I_VIZWIZ_DEMO if two else None),
            query_template=query_template or (EMU_I_VIZWIZ_QUERY if two else None),
            generation=(self.EMU_I_GENERATION if two else None) if generation is None else generation,
            **kwargs,
        )
        if not self.writes_own_data:
            _require(self, annotations_json=annotations_json, image_root=image_root,
                     support_annotations_json=support_annotations_json,
                     support_image_root=support_image_root)  # fmt: skip
        self.protocol, self.num_answers, self.write_submission = protocol, num_answers, write_submission
        self.answerability = None
        if two:
            self.answerability = AnswerabilityPrompt(
                query=answerability_template or EMU_I_VIZWIZ_ANSWERABILITY,
                demo=answerability_demo_template or EMU_I_VIZWIZ_ANSWERABILITY_DEMO,
            )
        self.query_files = (annotations_json, image_root)
        self.support_files = (support_annotations_json, support_image_root)

    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        read = lambda files: from_vizwiz(read_vizwiz(*files, num_answers=self.num_answers))  # noqa: E731
        return read(self.query_files), read(self.support_files)

    def task_options(self) -> dict[str, Any]:
        return {"answerability": self.answerability}

    def submission_entry(self, record: dict[str, Any]) -> dict[str, Any]:
        """VizWiz's results format: ``{"image": str, "answer": str}``."""
        return {"image": record["image"], "answer": record["prediction"]}
