"""Language models: any Hugging Face causal LM, plus Emu's regression head.

The tiny default is a LLaMA-shaped model built from a config dict with random weights; real models
(LLaMA-13B as in the paper, or any causal LM) load from a local Hugging Face folder, strictly.
Instruction tuning trains LoRA adapters (through ``peft``) on a frozen model, as in the paper.
"""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from emu_lightning.components.base import LanguageModel, LMOutput, on_meta_device

ADAPTER_NAME = "default"  # peft's name for the one adapter; saved files and `lora_state_dict()` keys omit it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what `PeftModel.save_pretrained` puts before the transformers model's keys


@dataclass
class LoRA:
    """Low-rank adapters on the language model's linear layers; the defaults are Emu's instruction tuning.

    Args:
        r: rank of each adapter.
        alpha: scale numerator: an adapter adds ``alpha / r * B @ A`` to its layer's weight.
        dropout: dropout on each adapter's input while training.
        target_modules: names (or dotted name suffixes) of the linear layers to adapt, e.g. the attention
            projections.
    """

    # The `Args:` above, not attribute docstrings, is what jsonargparse shows in --help by default.
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"LoRA target_modules must be a non-empty list of names, got {self.target_modules!r}")
        self.target_modules = list(self.target_modules)

    @classmethod
    def from_any(cls, value: LoRA | dict[str, Any]) -> LoRA:
        """A :class:`LoRA` from itself or a plain dict of its fields (unknown keys are an error)."""
        if isinstance(value, LoRA):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"lora must be a LoRA or a dict of its fields, got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown LoRA keys {unknown}; expected some of {[f.name for f in fields(cls)]}")
        return cls(**value)

    @classmethod
    def from_peft(cls, config: Any, where: str) -> LoRA:
        """The :class:`LoRA` a ``peft.LoraConfig`` describes; features this class cannot express are an error."""
        unsupported = {
            "use_dora": bool(config.use_dora),
            "use_rslora": bool(config.use_rslora),
            "rank_pattern": bool(config.rank_pattern),
            "alpha_pattern": bool(config.alpha_pattern),
            "bias": config.bias != "none",
            "modules_to_save": bool(config.modules_to_save),
            "layers_to_transform": config.layers_to_transform is not None,
            "target_modules": isinstance(config.target_modules, str),  # a regex
        }
        bad = {k: getattr(config, k) for k, v in unsupported.items() if v}
        if bad:
            raise ValueError(f"adapter config in {where} uses LoRA settings HFCausalLM does not support: {bad}")
        return cls(
            r=config.r,
            alpha=float(config.lora_alpha),
            dropout=float(config.lora_dropout),
            target_modules=sorted(config.target_modules),
        )

    def to_peft(self, base_model_name_or_path: str | None = None) -> Any:
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path,
        )


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
        lora: train LoRA adapters (a :class:`LoRA`, or a dict of its fields) instead of the model: they are
            injected with ``peft`` after the weights load, and every other weight (embeddings, LM head,
            regression head) is frozen. ``self.model`` stays the plain transformers model. A state dict without
            adapter keys (a stage trained without LoRA) loads strictly into the base weights and keeps the
            current adapters; one with adapter keys (a LoRA checkpoint) loads as is. Exclusive with ``freeze``.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        model_type: str = "llama",
        pretrained_path: str | None = None,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        freeze: bool = False,
        lora: LoRA | None = None,
    ) -> None:
        super().__init__()
        if config is None and pretrained_path is None:
            raise ValueError("HFCausalLM needs a `config` dict, a `pretrained_path`, or both")
        lora = None if lora is None else LoRA.from_any(lora)
        if lora is not None and freeze:
            raise ValueError("HFCausalLM got freeze=True and lora: LoRA trains adapters, so the model cannot be frozen")
        self.pretrained_path = pretrained_path
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
        self.lora: LoRA | None = None
        if lora is not None:
            self._inject_lora(lora)
        # Registered always, so adapters added later by `load_lora` are covered too.
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_base_state_into_lora)
        else:  # torch < 2.5
            self._register_load_state_dict_pre_hook(_base_state_into_lora, with_module=True)

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
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

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
        # LoRA dropout is active in training mode like any dropout, as long as the model is not frozen.
        return super().train(mode and not self.frozen)

    # ------------------------------------------------------------------ LoRA
    @property
    def has_lora(self) -> bool:
        """True while LoRA adapters are injected (not yet merged)."""
        return bool(self._lora_layers())

    def lora_parameters(self) -> list[nn.Parameter]:
        """The adapter parameters (the only trainable ones of a LoRA model)."""
        return [p for n, p in self.model.named_parameters() if _is_lora_key(n)]

    @property
    def num_lora_parameters(self) -> int:
        return sum(p.numel() for p in self.lora_parameters())

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The adapters' tensors, keyed as in ``self.model`` without the adapter name (as peft saves them)."""
        self._require_lora("lora_state_dict")
        from peft import get_peft_model_state_dict

        # Not the embeddings: peft adds them when the vocabulary was resized (Emu's tokens always resize it), but
        # they are not trained here and belong to the base model.
        return get_peft_model_state_dict(self.model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)

    def save_lora(self, path: str | Path) -> None:
        """Write the adapters to folder ``path`` as ``PeftModel.save_pretrained`` does.

        The folder holds ``adapter_config.json`` and ``adapter_model.safetensors``, so
        ``peft.PeftModel.from_pretrained(model, path)`` applies it to a plain transformers model with these
        base weights, and :meth:`load_lora` loads it back.
        """
        self._require_lora("save_lora")
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.lora.to_peft(self.pretrained_path)
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        config.save_pretrained(str(path))
        state = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.lora_state_dict().items()}
        save_file(state, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    def load_lora(self, path: str | Path) -> None:
        """Load adapters saved by :meth:`save_lora` (or ``PeftModel.save_pretrained``) from folder ``path``.

        A model without adapters first gets them injected from the folder's config (frozen as well if the
        model was built with ``freeze=True``); a model with adapters must have the folder's ``r``, ``alpha``
        and target modules. Loading is strict: every adapter tensor must be there, with its shape.
        """
        from peft import LoraConfig
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"LoRA folder {str(path)!r} does not exist or lacks {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
            )
        try:
            saved = LoRA.from_peft(LoraConfig.from_pretrained(str(path)), repr(str(path)))
        except (TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path / ADAPTER_CONFIG} is not a peft LoraConfig: {err}") from err
        if self.lora is None:
            self._inject_lora(saved)
        else:
            ours = (self.lora.r, self.lora.alpha, sorted(self.lora.target_modules))
            theirs = (saved.r, saved.alpha, sorted(saved.target_modules))
            if ours != theirs:
                raise ValueError(
                    f"LoRA in {str(path)!r} has (r, alpha, target_modules) = {theirs}, this model has {ours}"
                )
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items()}
        extra = sorted(k for k in state if not _is_lora_key(k))
        if extra:  # e.g. the embeddings peft saves beside adapters of a model with a resized vocabulary
            warnings.warn(f"LoRA folder {str(path)!r}: ignoring {len(extra)} non-adapter tensor(s) {extra[:4]}",
                          stacklevel=2)  # fmt: skip
            state = {k: v for k, v in state.items() if k not in extra}
        params = {_without_adapter_name(n): p for n, p in self.model.named_parameters() if _is_lora_key(n)}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"LoRA weights in {str(path)!r} do not fit: missing {missing}, unexpected {unexpected}")
        wrong = {k: (tuple(state[k].shape), tuple(p.shape)) for k, p in params.items() if state[k].shape != p.shape}
        if wrong:
            raise ValueError(f"LoRA weights in {str(path)!r} have wrong shapes (saved, expected): {wrong}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k])

    def merge_lora(self) -> HFCausalLM:
        """Fold the adapters into the base weights and remove them: ``self.model`` is a plain model again.

        Meant for inference and export: the merged weights stay frozen, as the base weights were.
        """
        self._require_lora("merge_lora")
        for name, layer in self._lora_layers():
            layer.merge(adapter_names=[ADAPTER_NAME])
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, layer.get_base_layer())
        del self.model.peft_config  # peft would otherwise see a second adapter on the next injection
        self.lora = None
        return self

    def _inject_lora(self, lora: LoRA) -> None:
        from peft import inject_adapter_in_model

        linear = [n for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
        missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in linear)]
        if missing:
            leaves = sorted({n.rpartition(".")[2] for n in linear})
            raise ValueError(
                f"LoRA target_modules {missing} match no linear layer; the model's linear layers: {leaves}"
            )
        inject_adapter_in_model(lora.to_peft(self.pretrained_path), self.model, adapter_name=ADAPTER_NAME)
        self.lora = lora
        self.train(self.training)  # new modules start in training mode: an eval-mode model would get live dropout
        # Only the adapters train: embeddings, LM head and regression head stay as loaded.
        for name, p in self.named_parameters():
            p.requires_grad_(_is_lora_key(name) and not self.frozen)

    def _lora_layers(self) -> list[tuple[str, nn.Module]]:
        """``(name in self.model, layer)`` of every peft LoRA layer."""
        if not hasattr(self.model, "peft_config"):  # never injected: no need to import peft
            return []
        from peft.tuners.lora import LoraLayer

        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def _require_lora(self, what: str) -> None:
        if not self.has_lora:
            raise RuntimeError(f"{what}() needs LoRA adapters, but this HFCausalLM has none (build it with `lora`)")


def _is_lora_key(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def _without_adapter_name(name: str) -> str:
    return name.replace(f".{ADAPTER_NAME}.", ".")


def _base_state_into_lora(
    module: HFCausalLM, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """Load-state-dict pre-hook: let a state without adapters (an earlier stage) load into a LoRA model.

    Each adapted layer's ``weight``/``bias`` moves to ``base_layer.weight``/``base_layer.bias``, where peft keeps
    them, and the current adapters fill in their own keys, so strict loading still checks every base weight.
    """
    layers = module._lora_layers()
    if not layers or any(k.startswith(prefix) and _is_lora_key(k[len(prefix) :]) for k in state_dict):
        return
    for name, layer in layers:
        key = f"{prefix}model.{name}."
        for suffix in ("weight", "bias"):
            if key + suffix in state_dict:
                state_dict[key + "base_layer." + suffix] = state_dict.pop(key + suffix)
        for sub, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            if not sub.startswith("base_layer."):
                state_dict[key + sub] = tensor.detach()
