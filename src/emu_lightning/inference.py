"""Inference with an EmuModel: text generation (caption, answer, chat with the assistant) and image generation
(regressing visual embeddings, decoding them, blending), as :class:`EmuInference`, which EmuModel inherits.

Training (composition, losses, steps, optimisers) lives in :mod:`emu_lightning.model`; nothing here trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from transformers import TextStreamer

from emu_lightning.conversation import SYSTEM, ConversationError, conversation_items, normalise


class EmuInference:
    """Generation methods of :class:`~emu_lightning.model.EmuModel` (they use its components, tokenizer and
    sequence builder)."""

    # ------------------------------------------------------------------ generation
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def generate(
        self,
        prompts: Sequence[Sequence[Any]],
        max_new_tokens: int = 20,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        length_penalty: float = 1.0,
        **kwargs: Any,
    ) -> list[str]:
        """Continue interleaved prompts (lists of text and images) with text; greedy or beam search, KV cached.

        Args:
            prompts: one list of items per sample (``str``, ``(3, H, W)`` images, videos), see ``sequence.py``.
            max_new_tokens: most tokens generated per sample.
            num_beams: 1 for greedy decoding, more for beam search.
            min_new_tokens: EOS is suppressed until this many tokens were generated.
            length_penalty: beam score exponent on length (the paper's evaluation uses -1).
            kwargs: any other transformers generation option (``do_sample``, ``temperature``, ...).
        """
        if len(prompts) == 0:
            raise ValueError("generate needs at least one prompt")
        builder = self.sequencer.with_options(padding_side="left", add_eos=False)
        batch = builder([list(p) for p in prompts])
        if batch["truncated"].any():
            raise ValueError(f"prompt longer than max_length {self.max_length} tokens")
        with self._inference():
            ids = batch["input_ids"].to(self.device)
            embeds = self.embed(ids, batch["images"])
            out = self.llm.generate(
                embeds,
                batch["attention_mask"].to(self.device),
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                num_beams=num_beams,
                length_penalty=length_penalty,
                do_sample=kwargs.pop("do_sample", False),
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def caption(self, images: Tensor | Sequence[Tensor], prompt: str | None = None, **kwargs: Any) -> list[str]:
        """Captions for ``images`` (``(B, 3, H, W)`` or a list), optionally after a text ``prompt``."""
        return self.generate([[img] + ([prompt] if prompt else []) for img in _as_list(images)], **kwargs)

    def answer(
        self,
        images: Tensor | Sequence[Tensor],
        questions: Sequence[str],
        template: str = "question: {question} answer:",
        **kwargs: Any,
    ) -> list[str]:
        """Answers to one question per image; ``template`` formats the text after the image."""
        images = _as_list(images)
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        return self.generate([[img, template.format(question=q)] for img, q in zip(images, questions)], **kwargs)

    def score_options(
        self,
        prompt: Sequence[Any],
        options: Sequence[str],
        option_batch_size: int = 100,
        reduction: str = "sequence_mean",
    ) -> Tensor:
        """How likely each of ``options`` is as the continuation of ``prompt``: a ``(N,)`` float tensor (on the CPU),
        higher is better, as the VisDial evaluation ranks answer options
        (:class:`~emu_lightning.eval.visdial.OptionScorer`: the prompt runs once and its KV cache serves every chunk of
        ``option_batch_size`` options).

        Args:
            prompt: interleaved items (text, ``(3, H, W)`` images, ``END_OF_CHUNK``), as for :meth:`generate`.
            options: the texts to score; each is written after a space (``" red"``, a new word, as an answer follows
                ``answer:``, and as :data:`~emu_lightning.eval.visdial.EMU_I_TEMPLATE` writes an option), without EOS.
            option_batch_size: options per forward (each holds a copy of the prompt's KV cache).
            reduction: ``sequence_mean`` (the released evaluation's: the option's summed log-likelihood over the
                whole sequence's length less one), ``sum`` (the summed log-likelihood) or ``mean`` (per option
                token); see :meth:`~emu_lightning.eval.visdial.OptionScores.scores`.
        """
        from emu_lightning.eval.visdial import REDUCTIONS, OptionScorer

        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction {reduction!r} must be one of {list(REDUCTIONS)}")
        return OptionScorer(self, option_batch_size=option_batch_size).score(prompt, options).scores(reduction)

    # ------------------------------------------------------------------ assistant
    def chat(
        self,
        history: Sequence[dict[str, Any]],
        system: str | None = SYSTEM,
        max_new_tokens: int = 64,
        stream: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> str:
        """The assistant's next turn after a conversation, in Emu-I's template (``conversation.py``).

        Args:
            history: ``[{"role": "user", "content": ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}]``,
                user first, alternating, ending with the user's turn. ``content`` is text or a list of items
                (text, ``(3, H, W)`` images, ``(F, 3, H, W)`` videos).
            system: the system message (``None`` or ``""``: none); the default is the one instruction tuning uses.
            max_new_tokens: most tokens in the answer.
            stream: called with each piece of the answer's text as soon as it is decoded (greedy decoding only).
            kwargs: other :meth:`generate` options (``num_beams``, ``do_sample``, ``temperature``, ...).

        When the conversation plus ``max_new_tokens`` does not fit the context (``max_length`` tokens for the prompt,
        the language model's positions for both), the oldest exchanges (a user turn and its answer) are dropped
        until it fits; :attr:`last_chat` records how many (``dropped_turns``) and a warning says so. A last user
        turn that does not fit alone raises :class:`~emu_lightning.conversation.ConversationError`.
        """
        turns = normalise(history)
        budget = min(self.max_length, self.llm_max_positions() - max_new_tokens)
        counter = self.sequencer.with_options(padding_side="left", add_eos=False, max_length=10**9)
        dropped = 0
        while True:
            items = conversation_items(turns, system, generation_prompt=True)
            length = len(counter.encode(items).ids)
            if length <= budget:
                break
            if len(turns) == 1:
                raise ConversationError(
                    f"the last user turn is {length} tokens with the system message, more than the {budget} the "
                    f"context leaves with {max_new_tokens} new tokens (max_length {self.max_length})"
                )
            turns, dropped = turns[2:], dropped + 2
        if dropped:
            rank_zero_warn(f"chat: dropped the {dropped} oldest turns to fit the context of {budget} tokens")
        self.last_chat = {"dropped_turns": dropped, "prompt_tokens": length}
        if stream is not None:
            kwargs["streamer"] = _TextCallback(self.tokenizer, stream)
        return self.generate([items], max_new_tokens=max_new_tokens, **kwargs)[0]

    def merge_lora(self) -> EmuInference:
        """Merge the language model's LoRA adapters into its weights for inference (see ``HFCausalLM.merge_lora``)."""
        if not self.llm.has_lora:
            raise ValueError("this EmuModel's language model has no LoRA adapters to merge")
        self.llm.merge_lora()
        return self

    # ------------------------------------------------------------------ image generation
    def _left_pad(self, prompts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Token-id prompts to a left-padded ``(B, T)`` batch and its mask."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, length - len(p) :], mask[i, length - len(p) :] = p, 1
        return ids, mask

    def _regress(self, ids: Tensor, mask: Tensor, images: Tensor | None = None, use_cache: bool = True) -> Tensor:
        """Q visual embeddings ``(B, Q, D)`` regressed one after another after left-padded prompts and ``[IMG]``.

        Each prediction is fed back as the next input embedding, as the ``<image>`` slots are in training.
        With ``use_cache`` each step feeds one embedding to the KV cache; without it, every step runs the
        whole sequence again (the paper's released code); both give the same embeddings.
        """
        ids = torch.cat([ids, torch.full_like(ids[:, :1], self.img_start_id)], 1).to(self.device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1).to(self.device)
        embeds = self.embed(ids, images)
        if ids.shape[1] + self.num_queries > self.llm_max_positions():
            raise ValueError(
                f"prompt of {ids.shape[1]} tokens plus {self.num_queries} image embeddings exceeds the language "
                f"model's {self.llm_max_positions()} positions"
            )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(embeds, mask, use_cache=use_cache, position_ids=positions)
        preds = [self.llm.regress(out.hidden[:, -1:])]
        for _ in range(self.num_queries - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            if use_cache:
                out = self.llm(preds[-1], mask, past_key_values=out.past_key_values, position_ids=positions[:, -1:])
            else:
                embeds = torch.cat([embeds, preds[-1]], dim=1)
                out = self.llm(embeds, mask, position_ids=positions)
            preds.append(self.llm.regress(out.hidden[:, -1:]))
        return torch.cat(preds, dim=1)

    def llm_max_positions(self) -> int:
        return int(self.llm.max_positions or 10**9)

    def regress_image_embeddings(self, prompts: Sequence[Any], use_cache: bool = True) -> Tensor:
        """The Q visual embeddings Emu regresses after each interleaved prompt followed by ``[IMG]``: ``(B, Q, D)``.

        Args:
            prompts: one prompt per image to generate: a string, or a list of items (text, images) as in
                :meth:`generate`. An empty prompt (``[]`` or ``""``) is the unconditional one.
            use_cache: regress with a KV cache (one LLM step per embedding) or rerun the sequence each step.
        """
        if len(prompts) == 0:
            raise ValueError("regress_image_embeddings needs at least one prompt")
        items = [[p] if isinstance(p, str) and p else ([] if isinstance(p, str) else list(p)) for p in prompts]
        batch = self.sequencer.with_options(padding_side="left", add_eos=False)(items)
        if batch["truncated"].any():
            raise ValueError(f"prompt longer than max_length {self.max_length} tokens (too many images or words)")
        with self._inference():
            return self._regress(batch["input_ids"], batch["attention_mask"], batch["images"], use_cache=use_cache)

    def generate_image(
        self,
        prompts: Sequence[Any],
        guidance_scale: float = 7.5,
        steps: int = 50,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` for interleaved prompts: text-to-image (``["a red circle."]``),
        in-context generation (text and images in the prompt), any mix; batched.

        Emu regresses Q visual embeddings after each prompt and ``[IMG]`` (KV cached) and the decoder turns
        them into pixels, with classifier-free guidance whose unconditional branch is Emu's regression for an
        empty prompt (the paper: scale 7.5, 10 for in-context generation). ``guidance_scale=1`` is unguided.
        """
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale {guidance_scale} must be >= 1 (1: no guidance)")
        condition = self.regress_image_embeddings(prompts)
        return self.decode_embeddings(condition, guidance_scale, steps, generator)

    def blend_images(
        self,
        images_a: Tensor,
        images_b: Tensor,
        weight: float = 0.5,
        guidance_scale: float = 7.5,
        steps: int = 50,
        generator: torch.Generator | None = None,
        mode: str = "regress",
    ) -> Tensor:
        """Blend two batches of images.

        ``mode="regress"`` (the released image inference): both images are the prompt, and Emu regresses the
        embeddings of the image that follows them, decoded with guidance against the empty prompt; ``weight`` does
        not apply. ``mode="interpolate"``: decode ``(1 - weight) * emb(a) + weight * emb(b)`` of their visual
        embeddings (the resampler's, the space Emu's regression targets live in).
        """
        if images_a.shape != images_b.shape:
            raise ValueError(f"images to blend differ in shape: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
        if mode not in ("regress", "interpolate"):
            raise ValueError(f"blend mode {mode!r} must be 'regress' or 'interpolate'")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"blend weight {weight} must be in [0, 1]")
        if mode == "regress":
            if weight != 0.5:
                raise ValueError(f"blend weight {weight} applies to mode='interpolate'; 'regress' has none")
            prompts = [[a, b] for a, b in zip(images_a, images_b)]
            return self.generate_image(prompts, guidance_scale=guidance_scale, steps=steps, generator=generator)
        with self._inference():
            a, b = self.encode_images(images_a.to(self.device)), self.encode_images(images_b.to(self.device))
        return self.decode_embeddings(torch.lerp(a, b, weight), guidance_scale, steps, generator)

    def decode_embeddings(
        self, condition: Tensor, guidance_scale: float = 7.5, steps: int = 50, generator: torch.Generator | None = None
    ) -> Tensor:
        """Decode ``(B, Q, D)`` visual embeddings to images with the decoder, guided against the empty prompt."""
        if self.decoder is None:
            raise ValueError(
                "this EmuModel has no decoder: give `decoder:` (e.g. a DiffusionDecoder) to generate images"
            )
        uncondition = None
        if guidance_scale != 1:
            uncondition = self.regress_image_embeddings([[]]).expand_as(condition)
        with self._inference():
            return self.decoder.sample(condition, uncondition, steps=steps, guidance_scale=guidance_scale,
                                       generator=generator)  # fmt: skip


class _TextCallback(TextStreamer):
    """A transformers streamer that hands each decoded piece of text to a callback instead of printing it."""

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


def _as_list(images: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        return list(images.unbind(0))
    return list(images)
