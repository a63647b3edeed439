"""EmuModel: vision backbone + resampler + language model (+ visual decoder), one unified objective.

The objective over an interleaved sequence (ARCHITECTURE.md): cross-entropy on the next text token, plus
L2 regression of the next visual embedding. Regression predictions are read at ``[IMG]`` and at every
``<image>`` position; their targets are the next position's input embedding, detached: the Q visual
embeddings of the image, then the ``[/IMG]`` embedding (Q + 1 targets per image).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from emu_lightning.checkpoints import EMU, LIGHTNING, load_checkpoint
from emu_lightning.components.base import LanguageModel, Resampler, VisionBackbone, VisualDecoder, on_meta_device
from emu_lightning.images import resize
from emu_lightning.inference import EmuInference
from emu_lightning.schedules import WarmupCosine
from emu_lightning.sequence import IGNORE_INDEX, SequenceBuilder, to_unit_range
from emu_lightning.tokenizer import (
    EMU_TOKENS,
    IMAGE,
    IMG_END,
    IMG_START,
    PRETRAIN_TOKENS,
    TrainedBPE,
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


class EmuModel(EmuInference, L.LightningModule):
    """Emu: one autoregressive model over interleaved text and images, trained with CE + L2 regression.

    Args:
        vision: the vision backbone (``class_path`` in YAML swaps it).
        resampler: maps visual tokens to Q embeddings in the LLM's width; in YAML its ``in_dim`` and ``out_dim`` may be
            left out: they are the vision backbone's ``out_dim`` and the language model's ``hidden_size``.
        llm: the language model with its regression head.
        decoder: the visual decoder (diffusion UNet) that turns regressed embeddings into pixels; optional. Its
            ``cond_dim`` and ``num_queries`` may be left out: they are the resampler's ``out_dim`` and
            ``num_queries``. Likewise an ``MLPProjector``'s ``num_tokens`` is the vision backbone's.
        tokenizer: a local tokenizer folder (the one a pretrained language model was trained with), or a
            :class:`~emu_lightning.tokenizer.TrainedBPE` for a language model trained from scratch. It is stored
            inside every checkpoint, so inference does not need the folder; ``"<checkpoint>"``
            (:data:`TOKENIZER_FROM_CHECKPOINT`) is the one of the checkpoint being loaded. Required unless
            ``init_checkpoint`` gives it.
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
        resampler: Resampler | Callable[[int, int], Resampler],
        llm: LanguageModel,
        decoder: VisualDecoder | Callable[[int, int], VisualDecoder] | None = None,
        tokenizer: str | TrainedBPE | None = None,
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
        # Built objects are not hyperparameters a checkpoint can hold (it stores the tokenizer itself)
        built = [*COMPONENTS, "optimizer", "scheduler", *(["tokenizer"] if isinstance(tokenizer, TrainedBPE) else [])]
        self.save_hyperparameters(ignore=None if given is not None else built)
        if not isinstance(resampler, Resampler):  # widths said once: those of the components it connects
            resampler = resampler(vision.out_dim, llm.hidden_size)
        resampler.set_num_tokens(vision.num_tokens)
        if decoder is not None and not isinstance(decoder, VisualDecoder):
            decoder = decoder(resampler.out_dim, resampler.num_queries)
        self.vision, self.resampler, self.llm, self.decoder = vision, resampler, llm, decoder
        self._check_widths()
        self.lr_multipliers = _check_names(lr_multipliers or {}, "lr_multipliers")
        self.checkpoint_step: int | None = None  # set when weights come from a checkpoint
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
        fits = decoder is not None and decoder.fits_before_training
        if decoder_sketch_fit < 0 or (decoder_sketch_fit and not fits):
            raise ValueError(
                "decoder_sketch_fit must be >= 0 and needs a decoder that fits before training (a DiffusionDecoder "
                "with a linear spatial map and sketch_weight > 0)"
            )
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
            if not isinstance(tokenizer, str) and llm.pretrained_path is not None:
                raise ValueError(
                    f"the language model loads pretrained weights from {llm.pretrained_path!r}: give the tokenizer "
                    f"folder it was trained with (model.tokenizer), not {tokenizer!r}"
                )
            if tokenizer is None:
                raise ValueError(
                    "EmuModel needs a tokenizer (model.tokenizer): a local tokenizer folder, or for a language model "
                    "trained from scratch a TrainedBPE over your corpus, e.g. "
                    "TrainedBPE(emu_lightning.shapesworld.corpus) as configs/tiny.yaml does"
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
        if dec is not None and dec.cond_dim != r.out_dim:
            raise ValueError(f"decoder cond_dim {dec.cond_dim} does not match the visual embeddings' width {r.out_dim}")
        if dec is not None and dec.num_queries not in (None, r.num_queries):
            raise ValueError(
                f"decoder num_queries {dec.num_queries} does not match the resampler's {r.num_queries} embeddings"
            )

    def _load_tokenizer(self, path: str | TrainedBPE) -> Any:
        if path == TOKENIZER_FROM_CHECKPOINT:  # set by on_load_checkpoint, before the weights load
            return None
        if isinstance(path, TrainedBPE):
            return path()
        if on_meta_device() and not Path(path).is_dir():
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

    @property
    def data_image_size(self) -> int:
        """The side of the images the training data should give: the vision tower's, or in the decoder stage the
        larger of it and the decoder's (each part resizes the batch to its own size: Stable Diffusion's 512 px
        and EVA-CLIP's 224 px at the paper's sizes)."""
        sizes = [self.vision.image_size]
        if self.stage == "decoder" and self.decoder is not None and self.decoder.image_size:
            sizes.append(self.decoder.image_size)
        return max(sizes)

    def components(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in COMPONENTS if getattr(self, n) is not None}

    def train(self, mode: bool = True) -> EmuModel:
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    # ------------------------------------------------------------------ forward
    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``(N, 3, H, W)`` in ``[0, 1]`` (or uint8, scaled here) to visual embeddings ``(N, Q, D)``; images
        of another side than the vision tower's are resized to it (:attr:`data_image_size`)."""
        return self.resampler(self.vision(resize(to_unit_range(images), self.vision.image_size)))

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
            condition = self.encode_images(images)
        else:
            prompts = [ids[i, : int(starts[i][0])] for i in keep]
            condition = self._regress(*self._left_pad(prompts))
        return resize(images, self.decoder.image_size or images.shape[-1]), condition

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
        mse, fitted = self.decoder.fit_before_training(torch.cat(conditions), torch.cat(images))
        with torch.no_grad():  # every rank fitted on its own batches: all start from rank 0's solution
            for tensor in fitted:
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
        return losses["loss"]

    def configure_callbacks(self) -> list[L.Callback]:
        """Every fit counts skipped and truncated samples (:class:`~emu_lightning.callbacks.DataAccounting`) and
        logs its step time (:class:`~emu_lightning.callbacks.StepTime`)."""
        from emu_lightning.callbacks import DataAccounting, StepTime

        return [DataAccounting(), StepTime()]

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
        if isinstance(scheduler, WarmupCosine) and scheduler.max_steps is None:  # the run's length, said once
            scheduler.max_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["emu_tokenizer"] = tokenizer_to_state(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The training step of the loaded weights: evaluations outside fit (validate) report under it.
        self.checkpoint_step = checkpoint.get("global_step")
        if "emu_tokenizer" in checkpoint:
            self._set_tokenizer(tokenizer_from_state(checkpoint["emu_tokenizer"]))


def _check_names(mapping: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(mapping) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"{what} names unknown component(s) {unknown}; expected some of {list(COMPONENTS)}")
    return dict(mapping)
