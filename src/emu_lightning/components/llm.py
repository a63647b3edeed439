"""Language models: any Hugging Face causal LM, plus Emu's regression head.

The tiny default is a LLaMA-shaped model built from a config dict with random weights; real models
(LLaMA-13B as in the paper, or any causal LM) load from a local Hugging Face folder, strictly.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from emu_lightning.components.base import LanguageModel, LMOutput, on_meta_device


class HFCausalLM(LanguageModel):
    """A transformers causal LM with a bias-free ``Linear(D, D)`` regression head on its last hidden states.

    Args:
        config: model config fields (e.g. ``hidden_size``, ``num_hidden_layers``); with ``pretrained_path``
            it must describe the saved model (a mismatch is an error), without it the model starts random.
        model_type: a transformers model type (``llama``, ``mistral``, ``gpt2``, ``qwen2``, ...) for ``config``.
        pretrained_path: a local Hugging Face model folder to load weights (and, without ``config``, the
            config) from. Loading is strict: missing, unexpected or mismatched weights raise.
        attn_implementation: transformers attention kernel (``sdpa``, ``eager``, ``flash_attention_2``).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        freeze: freeze every weight (the regression head included).
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        model_type: str = "llama",
        pretrained_path: str | None = None,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        if config is None and pretrained_path is None:
            raise ValueError("HFCausalLM needs a `config` dict, a `pretrained_path`, or both")
        self.model = self._build(config, model_type, pretrained_path, attn_implementation)
        self.hidden_size = int(self.model.config.hidden_size)
        self.regression_head = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
        params = inspect.signature(self.model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.frozen = freeze
        if freeze:
            self.requires_grad_(False)

    @staticmethod
    def _build(config: dict[str, Any] | None, model_type: str, path: str | None, attn_implementation: str) -> nn.Module:
        cfg: PretrainedConfig
        if path is not None and not on_meta_device() and not Path(path).is_dir():
            raise FileNotFoundError(f"pretrained_path {path!r} is not a local model folder")
        if config is not None:
            try:
                cfg = AutoConfig.for_model(model_type, **config)
            except ValueError as err:
                raise ValueError(f"unknown transformers model_type {model_type!r}: {err}") from None
        else:
            cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        cfg._attn_implementation = attn_implementation
        if path is None or on_meta_device():
            # `inspect` counts parameters on the meta device: shapes only, no weights read.
            return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path,
                config=cfg,
                local_files_only=True,
                output_loading_info=True,
                attn_implementation=attn_implementation,
            )
        except RuntimeError as err:  # transformers refuses mismatched shapes, pointing at a log report
            raise RuntimeError(f"weights in {path!r} do not fit the model config (size mismatch): {err}") from err
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            details = "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in problems.items())
            raise RuntimeError(f"weights in {path!r} do not match the model config ({details})")
        return model

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def resize_token_embeddings(self, num_tokens: int) -> None:
        """Grow the vocabulary to ``num_tokens`` rows; new rows start at the mean of the old ones (as Emu)."""
        old = self.vocab_size
        if num_tokens <= old:
            return
        self.model.resize_token_embeddings(num_tokens, mean_resizing=False)
        if on_meta_device():
            return
        with torch.no_grad():
            tables = [self.model.get_input_embeddings().weight]
            out = self.model.get_output_embeddings()
            if out is not None and out.weight is not tables[0]:
                tables.append(out.weight)
            for w in tables:
                w[old:] = w[:old].mean(dim=0, keepdim=True)

    # ------------------------------------------------------------------ interface
    def embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        position_ids: Tensor | None = None,
    ) -> LMOutput:
        use_cache = use_cache or past_key_values is not None
        base = self.model.base_model
        kwargs = {self._cache_arg: past_key_values} if past_key_values is not None else {}
        if position_ids is not None:  # left-padded prompts: count positions from each row's first token
            kwargs["position_ids"] = position_ids
        out = base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        logits = self.model.get_output_embeddings()(hidden)
        cache = (out.get("cache") or out.get("past_key_values")) if use_cache else None
        return LMOutput(logits=logits, hidden=hidden, past_key_values=cache)

    def regress(self, hidden: Tensor) -> Tensor:
        return self.regression_head(hidden)

    @torch.no_grad()
    def generate(self, inputs_embeds: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        """transformers' ``generate`` over input embeddings (KV cache, greedy or beam); returns new token ids."""
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def train(self, mode: bool = True) -> HFCausalLM:
        return super().train(mode and not self.frozen)
