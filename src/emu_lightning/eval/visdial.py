"""VisDial v1.0 evaluation: rank each round's 100 answer options by their likelihood under the model.

As in the released evaluation (Emu1 ``mm_eval``), a round's prompt is the image, the dialog so far and the question;
each option's tokens are scored by the language model after that prompt, and the options are ranked by that score.
The metrics are the official VisDial ones (``visdialch/metrics.py``): R@1, R@5, R@10, MRR and mean rank of the true
answer over every round, and NDCG over the densely annotated rounds.

Scoring shares the prompt: it runs once through the language model (the image embedded on the model's own path,
:meth:`~emu_lightning.model.EmuModel.embed`), and its KV cache, expanded along the batch dimension, serves every
chunk of options (:meth:`OptionScorer.score`). :meth:`OptionScorer.score_naive` runs one full forward per option,
prompt included (the released code's one option per segment), and is the reference the cached scores are tested
against.

:func:`evaluate_visdial` (a model, the rounds of :func:`~emu_lightning.data.visdial.read_visdial`, batch sizes)
returns the metrics and one record per round; the callback
(:class:`~emu_lightning.eval.visdial_callback.VisDialEval`) has each DDP rank rank its share with
:func:`rank_rounds` and scores the union of the records with :func:`metrics_from_records`, beside the chance levels
of a random ranking (:func:`chance_metrics`). :meth:`EmuModel.score_options
<emu_lightning.inference.EmuInference.score_options>` scores options after any prompt.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from emu_lightning.data.coco import load_image
from emu_lightning.data.visdial import VisDialRound
from emu_lightning.eval.tasks import EMU_I_SYSTEM, render

REDUCTIONS = ("sequence_mean", "sum", "mean")


@dataclass(frozen=True)
class DialogTemplate:
    """How a round is written. ``{image}`` marks the image, ``{end}`` the EOS; fields: ``caption`` (in ``image``),
    ``question`` and ``answer`` (in ``turn``), ``question`` (in ``query``), ``option`` (in ``option``).

    The default is the released Emu-I evaluation's prompt (Emu1 ``mm_eval/datasets/visdial.py``): the system
    message, the image as a user turn of its own ended by EOS, each earlier round as ``" [USER]: {question}?
    [ASSISTANT]: {answer}.</s>"``, then ``" [USER]: {question}? [ASSISTANT]:"``; the caption is not shown. Each
    option is scored as its own text with no EOS; the released code tokenizes it alone with LLaMA's SentencePiece,
    which starts it with a word boundary, written here as the leading space of ``" {option}"`` (as the assistant
    turns of :mod:`~emu_lightning.conversation` start). The released text has a space between ``[USER]:`` and the
    image, which its tokenizer strips around ``[IMG]``; the image here follows the tag directly, the same tokens.
    """

    prefix: str = EMU_I_SYSTEM
    """Text before everything (a system message); ``""``: none."""
    image: str = " [USER]:{image}{end}"
    turn: str = " [USER]: {question}? [ASSISTANT]: {answer}.{end}"
    query: str = " [USER]: {question}? [ASSISTANT]:"
    option: str = " {option}"


EMU_I_TEMPLATE = DialogTemplate()
PRETRAINED_TEMPLATE = DialogTemplate(
    prefix="",
    image="{image}{caption}.",
    turn=" question: {question}? answer: {answer}.",
    query=" question: {question}? answer:",
)
"""A prompt for the pretrained (not instruction-tuned) model, in the form of the VQA evaluation's
``question: ... answer:`` with the caption after the image. Ours: the released code evaluates VisDial with Emu-I's
template only."""


def dialog_prompt(
    dialog_round: VisDialRound, image: Tensor | None, template: DialogTemplate = EMU_I_TEMPLATE
) -> list[Any]:
    """A round's prompt as interleaved items (text, the image, ``END_OF_CHUNK``) for the sequence builder."""
    items: list[Any] = [template.prefix] if template.prefix else []
    items += render(template.image, image, caption=dialog_round.caption)
    for question, answer in dialog_round.history:
        items += render(template.turn, None, question=question, answer=answer)
    return items + render(template.query, None, question=dialog_round.question)


# --------------------------------------------------------------------------------------------------------- metrics


def scores_to_ranks(scores: Tensor) -> Tensor:
    """Scores ``(..., N)`` (higher is better) to each option's 1-based rank ``(..., N)``, as ``visdialch``'s
    ``scores_to_ranks``; equal scores rank in option order (its sort leaves ties to the sort's whim)."""
    if torch.isnan(scores).any():
        raise ValueError("scores hold NaN: the options cannot be ranked")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def retrieval_metrics(gt_ranks: Sequence[int] | Tensor) -> dict[str, float]:
    """R@1, R@5, R@10 (fractions of rounds whose true answer ranks within k), MRR (mean reciprocal rank) and the
    mean rank of the true answer, from each round's 1-based rank of it (``visdialch``'s ``SparseGTMetrics``)."""
    ranks = torch.as_tensor(gt_ranks, dtype=torch.float64)
    if ranks.numel() == 0:
        raise ValueError("no ranked rounds to score")
    if (ranks < 1).any():
        raise ValueError("ranks count from 1")
    return {
        "r@1": float((ranks <= 1).double().mean()),
        "r@5": float((ranks <= 5).double().mean()),
        "r@10": float((ranks <= 10).double().mean()),
        "mrr": float(ranks.reciprocal().mean()),
        "mean_rank": float(ranks.mean()),
    }


def ndcg(ranks: Sequence[int] | Tensor, relevance: Sequence[float] | Tensor) -> float:
    """NDCG of one round, as ``visdialch``'s ``NDCG``: with k the number of options of non-zero relevance, the DCG of
    the k options ranked first, ``sum_i rel(option at rank i) / log2(i + 1)``, over the DCG of the k most relevant
    options (the ideal order). ``ranks`` are each option's 1-based rank. NaN when no option is relevant (k = 0)."""
    ranks, rel = torch.as_tensor(ranks), torch.as_tensor(relevance, dtype=torch.float64)
    if ranks.shape != rel.shape or ranks.dim() != 1:
        raise ValueError(f"ranks {tuple(ranks.shape)} and relevance {tuple(rel.shape)} must be one vector each")
    k = int((rel != 0).sum())
    if k == 0:
        return math.nan
    discounts = torch.log2(torch.arange(k, dtype=torch.float64) + 2)
    predicted = rel[torch.argsort(ranks)[:k]]
    ideal = torch.sort(rel, descending=True).values[:k]
    return float((predicted / discounts).sum() / (ideal / discounts).sum())


def metrics_from_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The VisDial metrics of :func:`evaluate_visdial`'s records (skipped rounds left out): :func:`retrieval_metrics`
    over every ranked round, ``ndcg`` (the mean over the rounds with a dense annotation; ``None`` without any),
    ``num_ranked`` and ``num_ndcg`` (rounds whose relevances are all zero have no NDCG and are not counted)."""
    ranked = [r for r in records if r.get("gt_rank") is not None]
    metrics: dict[str, Any] = retrieval_metrics([r["gt_rank"] for r in ranked])
    dense = [r["ndcg"] for r in ranked if r.get("ndcg") is not None and not math.isnan(r["ndcg"])]
    metrics.update(ndcg=sum(dense) / len(dense) if dense else None, num_ranked=len(ranked), num_ndcg=len(dense))
    return metrics


def chance_metrics(rounds: Sequence[VisDialRound]) -> dict[str, Any]:
    """The expected metrics of a uniformly random ranking of each round's options (exact, not sampled), to read a
    score against: with N options, R@k = k / N, MRR = (1 + 1/2 + ... + 1/N) / N, mean rank = (N + 1) / 2 (for
    N = 100: 0.01, 0.05, 0.10, 0.0519 and 50.5), averaged over ``rounds``; ``ndcg`` over the rounds with a dense
    annotation that has a relevant option: each option of a random ranking is any option with the same chance, so a
    round's expected NDCG is its mean relevance times the discounts of its top k over the ideal DCG (k / N when k
    options have relevance 1 and the others 0); ``None`` without such rounds."""
    if not rounds:
        raise ValueError("no VisDial rounds")
    sizes = torch.tensor([len(r.options) for r in rounds], dtype=torch.float64)
    harmonic_of = {n: sum(1.0 / i for i in range(1, n + 1)) for n in {len(r.options) for r in rounds}}
    harmonic = torch.tensor([harmonic_of[len(r.options)] for r in rounds], dtype=torch.float64)
    out: dict[str, Any] = {f"r@{k}": float((sizes.clamp(max=k) / sizes).mean()) for k in (1, 5, 10)}
    out.update(mrr=float((harmonic / sizes).mean()), mean_rank=float(((sizes + 1) / 2).mean()))
    expected = []
    for r in rounds:
        rel = torch.as_tensor(r.relevance if r.relevance is not None else (), dtype=torch.float64)
        k = int((rel != 0).sum())
        if k:
            discounts = 1 / torch.log2(torch.arange(k, dtype=torch.float64) + 2)
            ideal = (torch.sort(rel, descending=True).values[:k] * discounts).sum()
            expected.append(float(rel.mean() * discounts.sum() / ideal))
    out["ndcg"] = sum(expected) / len(expected) if expected else None
    return out


# --------------------------------------------------------------------------------------------------------- scoring


@dataclass
class OptionScores:
    """The log-likelihood of each option's tokens after one prompt."""

    log_likelihood: Tensor
    """``(N,)`` float32: the sum of the log-probabilities of each option's tokens."""
    num_tokens: Tensor
    """``(N,)``: each option's number of tokens."""
    prompt_length: int
    """The prompt's tokens (BOS and image placeholders included)."""

    def scores(self, reduction: str = "sequence_mean") -> Tensor:
        """Each option's score, higher is better, by ``reduction``:

        - ``sequence_mean`` (the released evaluation's): the summed log-likelihood over the length of the whole
          sequence less one, ``prompt_length + num_tokens - 1``. The released code ranks by the language model's
          ``llm_loss`` with ``reduction='none'`` for one option per forward (``n_segments=100``); its
          ``PredictClassMixin`` is LAVIS's ``_predict_class``, whose LLaMA loss with ``reduction="none"`` is the
          token cross-entropy averaged over every shifted position, the prompt's (ignored, zero) included.
        - ``sum``: the summed log-likelihood.
        - ``mean``: the mean log-likelihood per option token.
        """
        if reduction == "sum":
            return self.log_likelihood
        if reduction == "mean":
            return self.log_likelihood / self.num_tokens
        if reduction == "sequence_mean":
            return self.log_likelihood / (self.prompt_length + self.num_tokens - 1)
        raise ValueError(f"reduction {reduction!r} must be one of {list(REDUCTIONS)}")


class OptionScorer:
    """Scores answer options after interleaved prompts with an :class:`~emu_lightning.model.EmuModel` (eval mode, no
    gradients).

    Args:
        model: the model (its tokenizer, sequence builder, ``embed`` and language model are used).
        option_format: how an option is written before it is tokenized (``"{option}"`` in it).
        option_batch_size: options per forward of :meth:`score`. Each chunk holds the prompt's KV cache once per
            option (``option_batch_size`` x layers x 2 x prompt length x width values): lower it for long prompts on
            a large model.
    """

    def __init__(self, model: Any, option_format: str = " {option}", option_batch_size: int = 100) -> None:
        if option_batch_size < 1:
            raise ValueError(f"option_batch_size {option_batch_size} must be at least 1")
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer (a checkpoint's tokenizer is set when it loads)")
        self.model, self.option_format, self.option_batch_size = model, option_format, option_batch_size
        self.positions = model.llm_max_positions()
        self.builder = model.sequencer.with_options(add_eos=False, padding_side="right", max_length=self.positions)

    # ------------------------------------------------------------------ inputs
    def encode(self, prompt: Sequence[Any]) -> tuple[Tensor, Tensor | None]:
        """A prompt's token ids ``(1, P)`` (BOS first, ``<image>`` placeholders) and its images."""
        batch = self.builder([list(prompt)])
        if batch["truncated"].any():
            raise ValueError(f"prompt longer than the language model's {self.positions} positions")
        return batch["input_ids"], batch["images"]

    def option_ids(self, options: Sequence[str]) -> list[list[int]]:
        """Each option's token ids, as scored (no BOS, no EOS)."""
        if not options:
            raise ValueError("no options to score")
        texts = [self.option_format.format(option=o) for o in options]
        ids = self.model.tokenizer(texts, add_special_tokens=False)["input_ids"]
        empty = [o for o, i in zip(options, ids) if not i]
        if empty:
            raise ValueError(f"option {empty[0]!r} has no tokens to score")
        return [list(i) for i in ids]

    def _check_length(self, prompt_length: int, options: list[list[int]]) -> None:
        longest = prompt_length + max(len(o) for o in options)
        if longest > self.positions:
            raise ValueError(
                f"prompt of {prompt_length} tokens plus the longest option exceeds the language model's "
                f"{self.positions} positions"
            )

    # ------------------------------------------------------------------ scoring
    def score(self, prompt: Sequence[Any], options: Sequence[str]) -> OptionScores:
        """Options scored with the prompt's KV cache shared: the prompt runs once; each chunk of options (shortest
        first, so that a chunk pads little) runs on the cache expanded along the batch dimension, right-padded, with an
        attention mask over prompt and option."""
        model, llm = self.model, self.model.llm
        ids, images = self.encode(prompt)
        opts = self.option_ids(options)
        length = ids.shape[1]
        self._check_length(length, opts)
        with model._inference():
            device = model.device
            embeds = model.embed(ids.to(device), images)
            ones = torch.ones(1, length, dtype=torch.long, device=device)
            out = llm(embeds, ones, use_cache=True, position_ids=torch.arange(length, device=device)[None])
            first = out.logits[:, -1:].float().log_softmax(-1)  # predicts each option's first token
            cache = out.past_key_values
            order = sorted(range(len(opts)), key=lambda i: len(opts[i]))  # chunks of similar lengths pad less
            sums, counts = [], []
            for start in range(0, len(opts), self.option_batch_size):
                tokens, mask = self._pad([opts[i] for i in order[start : start + self.option_batch_size]], device)
                n, width = tokens.shape
                logprobs = first.expand(n, 1, -1)
                if width > 1:  # the last token's logits predict nothing scored: it is not fed
                    fed = width - 1
                    attention = torch.cat([ones.expand(n, -1), mask[:, :fed]], dim=1)
                    positions = (length + torch.arange(fed, device=device)).expand(n, fed)
                    step = llm(llm.embed(tokens[:, :fed]), attention, past_key_values=expand_cache(cache, n),
                               position_ids=positions)  # fmt: skip
                    logprobs = torch.cat([logprobs, step.logits.float().log_softmax(-1)], dim=1)
                picked = logprobs.gather(-1, tokens[..., None]).squeeze(-1) * mask
                sums.append(picked.sum(1))
                counts.append(mask.sum(1))
        back = torch.argsort(torch.tensor(order))  # to the options' own order
        return OptionScores(torch.cat(sums).cpu()[back], torch.cat(counts).cpu()[back], length)

    def score_naive(self, prompt: Sequence[Any], options: Sequence[str]) -> OptionScores:
        """The reference: one full forward per option over the prompt and the option (the prompt's embeddings, the
        image's included, computed once), as the released code scores one option per segment."""
        model, llm = self.model, self.model.llm
        ids, images = self.encode(prompt)
        opts = self.option_ids(options)
        length = ids.shape[1]
        self._check_length(length, opts)
        sums, counts = [], []
        with model._inference():
            device = model.device
            prompt_embeds = model.embed(ids.to(device), images)
            for option in opts:
                tokens = torch.tensor([option], device=device)
                embeds = torch.cat([prompt_embeds, llm.embed(tokens)], dim=1)
                total = embeds.shape[1]
                out = llm(embeds, torch.ones(1, total, dtype=torch.long, device=device),
                          position_ids=torch.arange(total, device=device)[None])  # fmt: skip
                logprobs = out.logits[0, length - 1 : total - 1].float().log_softmax(-1)
                sums.append(logprobs.gather(-1, tokens[0, :, None]).sum())
                counts.append(len(option))
        return OptionScores(torch.stack(sums).cpu(), torch.tensor(counts), length)

    def _pad(self, options: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
        width = max(len(o) for o in options)
        tokens = torch.full((len(options), width), self.model.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(options), width, dtype=torch.long)
        for i, o in enumerate(options):
            tokens[i, : len(o)], mask[i, : len(o)] = torch.tensor(o), 1
        return tokens.to(device), mask.to(device)


def expand_cache(cache: Any, n: int) -> Any:
    """A transformers KV cache of one sequence as ``n`` copies along the batch dimension, leaving ``cache`` as it was.

    The layers of a ``DynamicCache`` get expanded views of the prompt's keys and values (no copy: the next forward
    concatenates the new ones onto them into fresh tensors); any other cache is deep-copied and repeated with its
    ``batch_repeat_interleave``.
    """
    layers = getattr(cache, "layers", None)
    if layers is not None and all(_plain_layer(layer) for layer in layers):
        expanded = copy.copy(cache)
        expanded.layers = []
        for layer in layers:
            twin = copy.copy(layer)
            twin.keys = layer.keys.expand(n, *layer.keys.shape[1:])
            twin.values = layer.values.expand(n, *layer.values.shape[1:])
            expanded.layers.append(twin)
        return expanded
    if hasattr(cache, "batch_repeat_interleave"):
        expanded = copy.deepcopy(cache)
        expanded.batch_repeat_interleave(n)
        return expanded
    raise TypeError(
        f"cannot expand a {type(cache).__name__} along the batch dimension to share a prompt; score the options "
        "with OptionScorer.score_naive"
    )


def _plain_layer(layer: Any) -> bool:
    # transformers' DynamicLayer: full keys and values (B, heads, T, d) that each update concatenates onto
    return (
        type(layer).__name__ == "DynamicLayer"
        and isinstance(getattr(layer, "keys", None), Tensor)
        and (layer.keys.dim() == 4 and layer.keys.shape[0] == 1)
    )


# ------------------------------------------------------------------------------------------------------------ task


def evaluate_visdial(
    model: Any,
    rounds: Sequence[VisDialRound],
    template: DialogTemplate = EMU_I_TEMPLATE,
    option_batch_size: int = 100,
    reduction: str = "sequence_mean",
    image_size: int | None = None,
    naive: bool = False,
    keep_scores: bool = False,
    keep_ranks: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Rank the options of every round and score the rankings.

    Args:
        model: an :class:`~emu_lightning.model.EmuModel`.
        rounds: the rounds to evaluate (:func:`~emu_lightning.data.visdial.read_visdial`; under DDP a rank's share).
        template: how a round is written (:data:`EMU_I_TEMPLATE`, the released prompt, by default).
        option_batch_size: options per forward (see :class:`OptionScorer`).
        reduction: what ranks the options (:meth:`OptionScores.scores`); the released evaluation's by default.
        image_size: side the images are resized to; default: the vision tower's.
        naive: score with one full forward per option instead of the shared prompt cache (same scores, slower).
        keep_scores: put each round's option scores in its record (``scores``, by ``reduction``).
        keep_ranks: put each option's 1-based rank in its record (``ranks``: what the official server's result
            file holds per round, with ``image_id`` and ``round_id``).
        on_record: called with each round's record as soon as it is ranked (a progress bar, a file).

    Returns:
        ``metrics`` (:func:`metrics_from_records`), ``records`` (:func:`rank_rounds`), ``num_rounds``,
        ``skipped_rounds``, ``skipped_images`` (distinct files) and ``reduction``.

    Raises:
        ValueError: no round to evaluate, an unknown ``reduction``, a prompt too long for the language model, or
            no image that loads.
    """
    records = rank_rounds(model, rounds, template, option_batch_size, reduction, image_size, naive, keep_scores,
                          keep_ranks, on_record)  # fmt: skip
    skipped = [r for r in records if r["gt_rank"] is None]
    if len(skipped) == len(records):
        files = len({r["image_id"] for r in skipped})
        raise ValueError(f"no VisDial round could be evaluated: the images of all {len(records)} rounds failed to "
                         f"load ({files} file(s))")  # fmt: skip
    return {
        "metrics": metrics_from_records(records),
        "records": records,
        "num_rounds": len(records),
        "skipped_rounds": len(skipped),
        "skipped_images": len({r["image_id"] for r in skipped}),  # one dialog, so one file, per image
        "reduction": reduction,
    }


def rank_rounds(
    model: Any,
    rounds: Sequence[VisDialRound],
    template: DialogTemplate = EMU_I_TEMPLATE,
    option_batch_size: int = 100,
    reduction: str = "sequence_mean",
    image_size: int | None = None,
    naive: bool = False,
    keep_scores: bool = False,
    keep_ranks: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One record per round, in order (the arguments are :func:`evaluate_visdial`'s): ``image_id``, ``round_id``,
    ``question``, ``answer`` (the true one), ``gt_index``, ``gt_rank``, ``top_option`` (the index ranked first),
    ``top_answer``, ``ndcg`` (``None`` without a dense annotation), optionally ``scores`` and ``ranks``. A round
    whose image does not load has ``gt_rank`` ``None`` and ``skipped`` saying why (a warning names the file); that
    every round of a call is skipped is not an error here (under DDP a rank's share may be), as it is for
    :func:`evaluate_visdial`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} must be one of {list(REDUCTIONS)}")
    if not rounds:
        raise ValueError("no VisDial rounds to evaluate")
    scorer = OptionScorer(model, template.option, option_batch_size)
    size = image_size or model.vision.image_size
    loaded: tuple[Any, Tensor | None] = (None, None)  # the last image: a dialog's rounds come one after another
    failed: set[Any] = set()
    records: list[dict[str, Any]] = []
    for r in rounds:
        record: dict[str, Any] = {"image_id": r.image_id, "round_id": r.round_id, "question": r.question,
                                  "answer": r.answer, "gt_index": r.gt_index}  # fmt: skip
        if loaded[0] != r.image_path:
            loaded = (r.image_path, None if r.image_path in failed else load_image(r.image_path, size))
            if loaded[1] is None:
                failed.add(r.image_path)
        image = loaded[1]
        if image is None:
            record.update(gt_rank=None, skipped=f"image {str(r.image_path)!r} does not load")
        else:
            prompt = dialog_prompt(r, image, template)
            try:
                result = scorer.score_naive(prompt, r.options) if naive else scorer.score(prompt, r.options)
            except ValueError as err:
                raise ValueError(f"VisDial image {r.image_id} round {r.round_id}: {err}") from None
            scores = result.scores(reduction)
            ranks = scores_to_ranks(scores)
            top = int(torch.argmin(ranks))
            record.update(gt_rank=int(ranks[r.gt_index]), top_option=top, top_answer=r.options[top],
                          ndcg=None if r.relevance is None else ndcg(ranks, r.relevance))  # fmt: skip
            if keep_scores:
                record["scores"] = scores.tolist()
            if keep_ranks:
                record["ranks"] = ranks.tolist()
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records
