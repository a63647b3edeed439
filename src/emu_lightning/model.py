"""EmuModel: vision backbone + resampler + language model (+ visual decoder), one unified objective.

The objective over an interleaved sequence (ARCHITECTURE.md): cross-entropy on the next text token, plus
L2 regression of the next visual embedding. Regression predictions are read at ``[IMG]`` and at every
``<image>`` position; their targets are the next position's input embedding, detached: the Q visual
embeddings of the image, then the ``[/IMG]`` embedding (Q + 1 targets per image).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from transformers import TextStreamer

from emu_lightning.checkpoints import EMU, LIGHTNING, load_checkpoint
from emu_lightning.components.base import LanguageModel, Resampler, VisionBackbone, VisualDecoder, on_meta_device
from emu_lightning.conversation import SYSTEM, ConversationError, conversation_items, normalise
from emu_lightning.data.streaming import batch_skips, format_skips
from emu_lightning.sequence import IGNORE_INDEX, SequenceBuilder, to_unit_range
from emu_lightning.tokenizer import (
    EMU_TOKENS,
    IMAGE,
    IMG_END,
    IMG_START,
    PRETRAIN_TOKENS,
    add_emu_tokens,
    load_tokenizer,
    tokenizer_from_state,
    tokenizer_to_state,
)

COMPONENTS = ("vision", "resampler", "llm", "decoder")
TOKENIZER_FROM_CHECKPOINT = "<checkpoint>"
"""``tokenizer:`` value meaning "the tokenizer stored in the checkpoint being loaded" (``load_from_checkpoint``,
``--ckpt_path`` and converted checkpoints use it): no tokenizer is built until the checkpoint is read."""
STAGES = ("pretrain", "decoder", "instruct")

try:  # set by LightningCLI so that hparams hold the config (class_path dicts), not the built modules
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older Lightning
    _given_hyperparameters = None


class EmuModel(L.LightningModule):
    """Emu: one autoregressive model over interleaved text and images, trained with CE + L2 regression.

    Args:
        vision: the vision backbone (``class_path`` in YAML swaps it).
        resampler: maps visual tokens to Q embeddings in the LLM's width.
        llm: the language model with its regression head.
        decoder: the visual decoder (diffusion UNet) that turns regressed embeddings into pixels; optional.
        tokenizer: a local tokenizer folder; ``None`` trains the built-in ShapesWorld byte-level BPE. The
            tokenizer is stored inside every checkpoint, so inference does not need the folder;
            ``"<checkpoint>"`` (:data:`TOKENIZER_FROM_CHECKPOINT`) is the one of the checkpoint being loaded.
        max_length: longest training sequence in tokens (longer samples are truncated between blocks).
        ce_weight: weight of the next-token cross-entropy.
        regression_weight: weight of the next-visual-embedding L2 loss.
        regression_warmup_steps: ramp the regression weight linearly from 0 over these many steps, so
            captioning grounds before regression pulls on the visual embeddings (0: full weight at once).
        lr_multipliers: per-component learning-rate multipliers, e.g. ``{vision: 0.1}``.
        frozen: components to freeze, e.g. ``[vision]``; frozen components also stay in eval mode.
        optimizer: optimizer factory taking parameter groups (``class_path: torch.optim.AdamW`` ...).
        scheduler: learning-rate scheduler factory taking the optimizer, stepped every optimizer step.
        weight_decay_norms: also apply weight decay to biases, norms and embeddings (off by default).
        init_checkpoint: an EmuModel checkpoint to start from: its tokenizer and the weights of every component
            it holds (strictly, component by component); components it lacks (a new decoder) keep their
            initialisation. Unlike ``fit --ckpt_path`` nothing else (optimizer, step) is resumed.
        stage: ``pretrain`` (the unified objective, everything trains), ``decoder`` (the paper's second stage:
            vision, resampler and LLM frozen, only the decoder trains, on the images of text-then-image samples)
            or ``instruct`` (instruction tuning, Emu-I: vision, resampler and decoder frozen; the language model
            trains its LoRA adapters when it has them (``llm.init_args.lora``), all its weights otherwise; the
            loss is the cross-entropy alone, whatever ``regression_weight`` says).
        decoder_condition: what the decoder stage conditions on: ``regressed`` (the paper: Emu's Q embeddings
            regressed after the text before the image and ``[IMG]``) or ``autoencoder`` (Emu2: the resampler's
            embeddings of the target image itself).
        decoder_sketch_fit: decoder stage: before the first step, solve the decoder's spatial sketch in closed
            form (:meth:`DiffusionDecoder.fit_sketch`) on the conditions and images of this many training
            batches; 0: it is learned by gradient descent alone.
    """

    def __init__(
        self,
        vision: VisionBackbone,
        resampler: Resampler,
        llm: LanguageModel,
        decoder: VisualDecoder | None = None,
        tokenizer: str | None = None,
        max_length: int = 256,
        ce_weight: float = 1.0,
        regression_weight: float = 1.0,
        regression_warmup_steps: int = 0,
        lr_multipliers: dict[str, float] | None = None,
        frozen: list[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        weight_decay_norms: bool = False,
        init_checkpoint: str | None = None,
        stage: str = "pretrain",
        decoder_condition: str = "regressed",
        decoder_sketch_fit: int = 0,
    ) -> None:
        super().__init__()
        given = _given_hyperparameters.get() if _given_hyperparameters is not None else None
        self.save_hyperparameters(ignore=None if given is not None else [*COMPONENTS, "optimizer", "scheduler"])
        self.vision, self.resampler, self.llm, self.decoder = vision, resampler, llm, decoder
        self._check_widths()
        self.lr_multipliers = _check_names(lr_multipliers or {}, "lr_multipliers")
        self.checkpoint_step: int | None = None  # set when weights come from a checkpoint
        self.data_skips: dict[str, Counter] = {}
        """Samples the streaming readers skipped in this process's training batches, per source and reason."""
        self.data_truncated = 0
        """Training samples cut at ``max_length`` in this process (their end, e.g. late turns, is not trained)."""
        self.last_chat: dict[str, int] = {}
        """What the last :meth:`chat` call did to fit the context: ``dropped_turns``, ``prompt_tokens``."""
        self._uncondition: Tensor | None = None  # the decoder stage's unconditional branch, computed once per fit
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} must be one of {list(STAGES)}")
        if decoder_condition not in ("regressed", "autoencoder"):
            raise ValueError(f"decoder_condition {decoder_condition!r} must be 'regressed' or 'autoencoder'")
        if stage == "decoder":
            if decoder is None:
                raise ValueError("stage 'decoder' needs a decoder")
            frozen = sorted({*(frozen or []), "vision", "resampler", "llm"})  # only the decoder trains
        if stage == "instruct":  # only the language model trains (its adapters, when it has LoRA)
            frozen = sorted({*(frozen or []), "vision", "resampler", *(["decoder"] if decoder is not None else [])})
        if decoder_sketch_fit < 0 or (decoder_sketch_fit and not hasattr(decoder, "fit_sketch")):
            raise ValueError("decoder_sketch_fit must be >= 0 and needs a decoder with fit_sketch (DiffusionDecoder)")
        self.stage, self.decoder_condition, self.decoder_sketch_fit = stage, decoder_condition, decoder_sketch_fit
        self.frozen = list(_check_names({n: 0 for n in frozen or []}, "frozen"))
        for name in self.frozen:
            if getattr(self, name) is None:
                raise ValueError(f"frozen names {name!r}, but this model has no {name}")
            getattr(self, name).requires_grad_(False)
        if ce_weight < 0 or regression_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got ce {ce_weight}, regression {regression_weight}")
        self.ce_weight, self.regression_weight = ce_weight, regression_weight
        self.regression_warmup_steps = regression_warmup_steps
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay_norms = weight_decay_norms
        self.max_length = max_length
        if init_checkpoint is None:
            if tokenizer is None and llm.pretrained_path is not None:
                raise ValueError(
                    f"the language model loads pretrained weights from {llm.pretrained_path!r} but `tokenizer` is not "
                    "set: give the tokenizer folder it was trained with (model.tokenizer); the built-in ShapesWorld "
                    "tokenizer is only for language models trained from scratch"
                )
            self._set_tokenizer(self._load_tokenizer(tokenizer))
        else:
            self._init_from(init_checkpoint)
        if stage == "instruct" and self.tokenizer is not None:
            # Emu-I's [USER] and [ASSISTANT], after the weights they start from (their rows: the mean of the others)
            add_emu_tokens(self.tokenizer, instruct=True)
            self._set_tokenizer(self.tokenizer)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> EmuModel:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``, except that the ``init_checkpoint`` the run started from is not read
        again (unless given here): every weight is in this checkpoint, and the earlier stage's file need not exist;
        nor is the tokenizer folder: the checkpoint's own tokenizer is used."""
        kwargs.setdefault("init_checkpoint", None)
        if isinstance(checkpoint_path, (str, Path)):  # a clear error for a bad file, before Lightning reads it
            load_checkpoint(checkpoint_path, what="checkpoint", require=(*LIGHTNING, *EMU), mmap=True)
            kwargs.setdefault("tokenizer", TOKENIZER_FROM_CHECKPOINT)  # the checkpoint's own, not the folder again
        kwargs["weights_only"] = True  # tensors and plain data only: a crafted file cannot run code
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def _init_from(self, path: str) -> None:
        # mapped: the weights are copied into the components at once
        checkpoint = load_checkpoint(path, what="model.init_checkpoint", require=EMU, mmap=True)
        self._set_tokenizer(tokenizer_from_state(checkpoint["emu_tokenizer"]))
        state = checkpoint["state_dict"]
        for name, module in self.components().items():
            own = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
            if own:
                module.load_state_dict(own, strict=True)

    # ------------------------------------------------------------------ construction
    def _check_widths(self) -> None:
        v, r, lm = self.vision, self.resampler, self.llm
        if r.in_dim != v.out_dim:
            raise ValueError(f"resampler in_dim {r.in_dim} does not match the vision backbone's out_dim {v.out_dim}")
        if r.out_dim != lm.hidden_size:
            raise ValueError(
                f"resampler out_dim {r.out_dim} does not match the language model's hidden size {lm.hidden_size}"
            )
        # One dummy pass catches token-count mismatches (MLP, pooled) before training starts.
        param = next(r.parameters())
        try:
            with torch.no_grad():
                out = r(torch.zeros(1, v.num_tokens, v.out_dim, device=param.device, dtype=param.dtype))
        except ValueError as err:
            raise ValueError(
                f"resampler {type(r).__name__} does not fit the vision backbone's {v.num_tokens} tokens "
                f"of width {v.out_dim}: {err}"
            ) from None
        if tuple(out.shape[1:]) != (r.num_queries, r.out_dim):
            raise ValueError(f"resampler returned {tuple(out.shape[1:])}, expected ({r.num_queries}, {r.out_dim})")
        dec = self.decoder
        if dec is not None and getattr(dec, "cond_dim", r.out_dim) != r.out_dim:
            raise ValueError(f"decoder cond_dim {dec.cond_dim} does not match the visual embeddings' width {r.out_dim}")
        if dec is not None and getattr(dec, "num_queries", None) not in (None, r.num_queries):
            raise ValueError(
                f"decoder num_queries {dec.num_queries} does not match the resampler's {r.num_queries} embeddings"
            )

    def _load_tokenizer(self, path: str | None) -> Any:
        if path == TOKENIZER_FROM_CHECKPOINT:  # set by on_load_checkpoint, before the weights load
            return None
        if on_meta_device() and path is not None and not Path(path).is_dir():
            # `inspect` builds on meta without any files: count the rows Emu's tokens would add, plus a pad
            # token, which LLaMA's tokenizer lacks (32,004 on LLaMA; 32,006 for instruction tuning).
            added = len(EMU_TOKENS) if self.stage == "instruct" else len(PRETRAIN_TOKENS)
            self.llm.resize_token_embeddings(self.llm.vocab_size + added + 1)
            return None
        return load_tokenizer(path)

    def _set_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if tokenizer is None:
            self.sequencer = None
            return
        self.llm.resize_token_embeddings(len(tokenizer))
        self.sequencer = SequenceBuilder(tokenizer, self.resampler.num_queries, self.max_length)
        vocab = tokenizer.get_vocab()
        self.img_start_id, self.img_end_id, self.image_id = vocab[IMG_START], vocab[IMG_END], vocab[IMAGE]

    @property
    def num_queries(self) -> int:
        return self.resampler.num_queries

    def components(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in COMPONENTS if getattr(self, n) is not None}

    def train(self, mode: bool = True) -> EmuModel:
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    # ------------------------------------------------------------------ forward
    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``(N, 3, H, W)`` in ``[0, 1]`` (or uint8, scaled here) to visual embeddings ``(N, Q, D)``."""
        return self.resampler(self.vision(to_unit_range(images)))

    def embed(self, input_ids: Tensor, images: Tensor | None) -> Tensor:
        """Token embeddings with every ``<image>`` placeholder overwritten by the visual embeddings, in order."""
        embeds = self.llm.embed(input_ids)
        slots = input_ids == self.image_id
        n_slots = int(slots.sum())
        n_images = 0 if images is None else images.shape[0]
        if n_slots != n_images * self.num_queries:
            raise ValueError(f"batch has {n_slots} <image> slots but {n_images} images x {self.num_queries} queries")
        if n_images:
            visual = self.encode_images(images.to(self.device)).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), visual)
        return embeds

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Cross-entropy, regression MSE and their weighted sum for one batch."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        embeds = self.embed(ids, batch.get("images"))
        out = self.llm(embeds, mask)
        logits, targets = out.logits[:, :-1], labels[:, 1:]
        if (targets != IGNORE_INDEX).any():
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        else:
            ce = logits.sum() * 0.0
        # Predict at [IMG] and at each <image>: the next input embedding (Q visual ones, then [/IMG]).
        source = ((ids == self.img_start_id) | (ids == self.image_id))[:, :-1]
        if source.any():
            pred = self.llm.regress(out.hidden[:, :-1][source])
            mse = F.mse_loss(pred.float(), embeds[:, 1:][source].detach().float())
        else:
            mse = out.hidden.sum() * 0.0
        weight = self.current_regression_weight()
        return {"ce": ce, "mse": mse, "loss": self.ce_weight * ce + weight * mse}

    def current_regression_weight(self) -> float:
        if self.regression_warmup_steps <= 0 or self._trainer is None:
            return self.regression_weight
        return self.regression_weight * min(1.0, self.global_step / self.regression_warmup_steps)

    def decoder_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The decoder stage's diffusion loss on each sample's first image, conditioned on Emu's regression for
        the text before it (or, ``autoencoder``, on that image's own embeddings); samples whose first image
        has no text before it are skipped. The unconditional branch is the regression for an empty prompt."""
        images, condition = self.decoder_inputs(batch)
        if self._uncondition is None:  # Emu is frozen in this stage: the empty prompt's regression is fixed
            self._uncondition = self.regress_image_embeddings([[]])
        return {"decoder": self.decoder.loss(images, condition, self._uncondition)}

    @torch.no_grad()
    def decoder_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The decoder stage's ``(images, condition)`` of a batch: each text-then-image sample's first image
        and Emu's regression for the text before it (or the image's own embeddings, ``autoencoder``)."""
        ids, counts = batch["input_ids"], batch["image_counts"].tolist()
        first = torch.tensor([sum(counts[:i]) for i in range(len(counts))])
        starts = [(row == self.img_start_id).nonzero() for row in ids]
        text_from = int(self.sequencer.bos_id is not None)  # the first token after BOS
        keep = [i for i, s in enumerate(starts) if counts[i] > 0 and len(s) and int(s[0]) > text_from]
        if not keep:
            raise ValueError("no sample has text before an image: the decoder stage needs text-then-image samples")
        images = to_unit_range(batch["images"][first[keep]].to(self.device))
        if self.decoder_condition == "autoencoder":
            return images, self.encode_images(images)
        prompts = [ids[i, : int(starts[i][0])] for i in keep]
        return images, self._regress(*self._left_pad(prompts))

    def on_train_start(self) -> None:
        self._uncondition = None  # weights may have been loaded since the last fit
        if self.stage == "decoder" and self.decoder_sketch_fit and self.global_step == 0:
            self._fit_decoder_sketch()

    def _fit_decoder_sketch(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError("decoder_sketch_fit reads its batches from the datamodule; fit was given none")
        images, conditions = [], []
        for i, batch in enumerate(datamodule.train_dataloader()):
            if i >= self.decoder_sketch_fit:
                break
            batch = self.trainer.strategy.batch_to_device(batch)
            x, c = self.decoder_inputs(batch)
            images.append(x)
            conditions.append(c)
        mse = self.decoder.fit_sketch(torch.cat(conditions), torch.cat(images))
        fitted = [m for m in (self.decoder.spatial, self.decoder.condition_norm) if m is not None]
        with torch.no_grad():  # every rank fitted on its own batches: all start from rank 0's solution
            for tensor in (t for m in fitted for t in m.state_dict().values()):
                tensor.copy_(self.trainer.strategy.broadcast(tensor, src=0))
        rank_zero_info(f"decoder sketch fitted in closed form on {sum(len(x) for x in images)} pairs (MSE {mse:.4f})")

    def stage_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.stage == "decoder":
            losses = self.decoder_losses(batch)
            return {**losses, "loss": losses["decoder"]}
        losses = self.losses(batch)
        if self.stage == "instruct":  # the loss is on the assistant's text only; the MSE is still reported
            losses["loss"] = self.ce_weight * losses["ce"]
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.stage_losses(batch)
        n = batch["input_ids"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=n)
        self._count_skips(batch)
        if "truncated" in batch and bool(batch["truncated"].any()):
            self.data_truncated += int(batch["truncated"].sum())
            self.log("data/truncated", float(self.data_truncated), reduce_fx="max", batch_size=1)
        return losses["loss"]

    def _count_skips(self, batch: dict[str, Any]) -> None:
        """Add the batch's skipped-sample counts (streaming sources) to :attr:`data_skips` and log the totals
        as ``data/skipped/<source>/<reason>``."""
        for source, reasons in batch_skips(batch).items():
            total = self.data_skips.setdefault(source, Counter())
            total.update(reasons)
            for reason in reasons:
                self.log(f"data/skipped/{source}/{reason}", float(total[reason]), reduce_fx="max", batch_size=1)

    def on_fit_end(self) -> None:
        if self.data_skips and self.trainer.is_global_zero:
            print(f"samples skipped by the data readers on rank 0:\n{format_skips(self.data_skips)}", flush=True)
        if self.data_truncated and self.trainer.is_global_zero:
            print(f"training samples truncated at max_length {self.max_length} on rank 0: {self.data_truncated}")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.stage_losses(batch)
        # averaged over every rank's batches (under DDP each rank validates its own part of the held-out set)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=batch["input_ids"].shape[0],
                      sync_dist=True)  # fmt: skip

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        groups = []
        for name, module in self.components().items():
            mult = float(self.lr_multipliers.get(name, 1.0))
            params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            if not params or mult == 0.0:
                continue
            decays = {True: [], False: []}
            for n, p in params:  # biases, norms and embeddings are not decayed unless asked
                decays[self.weight_decay_norms or (p.dim() >= 2 and "embed" not in n)].append(p)
            if decays[True]:
                groups.append({"params": decays[True], "name": name, "lr_mult": mult})
            if decays[False]:
                groups.append(
                    {"params": decays[False], "name": f"{name}_no_decay", "lr_mult": mult, "weight_decay": 0.0}
                )
        if not groups:
            raise ValueError("nothing to train: every component is frozen or has lr multiplier 0")
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group["lr_mult"]
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["emu_tokenizer"] = tokenizer_to_state(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The training step of the loaded weights: evaluations outside fit (validate) report under it.
        self.checkpoint_step = checkpoint.get("global_step")
        if "emu_tokenizer" in checkpoint:
            self._set_tokenizer(tokenizer_from_state(checkpoint["emu_tokenizer"]))

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

    def merge_lora(self) -> EmuModel:
        """Merge the language model's LoRA adapters into its weights for inference (see ``HFCausalLM.merge_lora``)."""
        if not getattr(self.llm, "has_lora", False):
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
        config = getattr(getattr(self.llm, "model", None), "config", None)
        return int(getattr(config, "max_position_embeddings", None) or 10**9)

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


def _check_names(mapping: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(mapping) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"{what} names unknown component(s) {unknown}; expected some of {list(COMPONENTS)}")
    return dict(mapping)
