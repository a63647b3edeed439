"""``emu-lightning convert``: Emu's released weights to one EmuModel checkpoint, and an EmuModel back to them.

    emu-lightning convert --released checkpoints/Emu/Emu-pretrain.pt --tokenizer checkpoints/llama-13b \\
        --decoder checkpoints/Emu/pretrain --config configs/emu-14b.yaml --out checkpoints/emu-14b.ckpt
    emu-lightning convert --released checkpoints/Emu/Emu-instruct.pt --tokenizer checkpoints/llama-13b \\
        --config configs/emu-14b.yaml --out checkpoints/emu-i-14b.ckpt                 # Emu-I: LoRA found, kept
    emu-lightning convert --export runs/emu/final.ckpt --out exported/                  # the way back

Import reads the released multimodal encoder state dict (``visual.*``, ``ln_visual.*``, ``cformer.*``,
``decoder.lm.*``; possibly nested under ``module``; Emu-I's under ``decoder.lm.base_model.model.`` with peft's LoRA
adapters), the visual decoder folder (``unet/``, ``vae/``, ``scheduler/`` of the released generation pipeline) and
the LLaMA tokenizer folder, and writes one checkpoint that ``EmuModel.load_from_checkpoint``, ``model.init_checkpoint``,
``emu-lightning validate --ckpt_path`` and ``emu-lightning chat --ckpt`` accept. The network is the ``--config``'s
model, built on the meta device (no weight is allocated); the released tensors are written as they are (dtype
kept). Conversion is strict: every released key is consumed or on :data:`DROPPED` (unused by the released forward),
every model key is filled with its shape, and anything else is an error that names the keys.

Export writes the released layout: ``<out>/multimodal_encoder/pytorch_model.bin`` (a state dict that the released
``Emu`` loads with ``strict=True``: the unused keys of :data:`DROPPED` are written too, as the identity / zeros, and
the rotary ``inv_freq`` buffers as LLaMA computes them), ``unet/``, ``vae/``, ``scheduler/`` when the model has a
decoder (the released ``EmuGenerationPipeline`` folder), and ``tokenizer/``.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from emu_lightning.checkpoints import EMU, CheckpointError, load_checkpoint

RENAMES: tuple[tuple[str, str], ...] = (
    ("visual.", "vision.model."),
    ("ln_visual.", "vision.ln."),
    ("cformer.cformer.", "resampler.stack."),
    ("cformer.causal_tokens", "resampler.queries"),
    ("cformer.projection.", "resampler.projection."),
    ("decoder.lm.base_model.model.stu_regress_head.", "llm.regression_head."),  # Emu-I (peft-wrapped LLaMA)
    ("decoder.lm.base_model.model.", "llm.model."),
    ("decoder.lm.stu_regress_head.", "llm.regression_head."),
    ("decoder.lm.", "llm.model."),
)
"""Released key prefix -> EmuModel key prefix, first match wins."""

DROPPED = {
    r"^visual\.norm\.(weight|bias)$": "EVA-CLIP's final norm: Emu reads the last block's tokens before it",
    r"^visual\.head\.(weight|bias)$": "EVA-CLIP's contrastive projection, unused by Emu",
    r"^cformer\.cformer\.embed_tokens\.weight$": "T5's token embedding: the Causal Transformer reads its queries",
    r"\.rotary_emb\.inv_freq$": "LLaMA's rotary frequencies: a buffer computed from the config, not a weight",
}
"""Released keys that carry no weight of the network (regex -> why)."""

T5_VOCAB = 32128  # t5-base's token embedding rows, the unused table the released Causal Transformer keeps
CLIP_EMBED_DIM = 1024  # EVA-CLIP g/14's contrastive embedding width, the unused visual.head's rows
MODULE_KEYS = ("module", "state_dict", "model")
PEFT_LORA = re.compile(r"\.lora_([AB])(?:\.default)?\.weight$")
DECODER_PARTS = ("unet", "vae", "scheduler")


class ConversionError(ValueError):
    """Weights that do not convert: the message names the keys."""


# ---------------------------------------------------------------------------------------------- key mapping
def _rename(key: str) -> str | None:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _is_dropped(key: str) -> bool:
    return any(re.search(pattern, key) for pattern in DROPPED)


def _names(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def released_state_dict(obj: Any, source: str = "state dict") -> dict[str, Tensor]:
    """The tensors of a released file's dict, unwrapped from ``module`` (DeepSpeed) or ``state_dict``."""
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in MODULE_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{source} holds no state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if len(tensors) != len(obj):
        raise ConversionError(f"{source}: entries that are not tensors: {_names(set(obj) - set(tensors))}")
    return tensors


def lora_of(state: dict[str, Tensor]) -> dict[str, Any] | None:
    """The LoRA that a released state dict's peft adapters describe (rank and target modules; alpha is not stored)."""
    adapted = {}
    for key, value in state.items():
        match = PEFT_LORA.search(key)
        if match and match.group(1) == "A":
            adapted[key[: match.start()].rsplit(".", 1)[-1]] = int(value.shape[0])
    if not adapted:
        return None
    ranks = set(adapted.values())
    if len(ranks) != 1:
        raise ConversionError(f"LoRA adapters of different ranks {sorted(ranks)} are not supported")
    return {"r": ranks.pop(), "target_modules": sorted(adapted)}


def from_released(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Released keys -> EmuModel keys (tensors untouched); returns the mapped state and the dropped keys.

    Raises :class:`ConversionError` naming every key that is neither mapped nor dropped.
    """
    out: dict[str, Tensor] = {}
    dropped, unknown = [], []
    adapted = {key[: PEFT_LORA.search(key).start()] for key in state if PEFT_LORA.search(key)}
    for key, value in state.items():
        if _is_dropped(key):
            dropped.append(key)
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
            continue
        match = PEFT_LORA.search(new)
        if match:  # old peft: `lora_A.weight` or `lora_A.default.weight`; ours: `lora_A.default.weight`
            new = f"{new[: match.start()]}.lora_{match.group(1)}.default.weight"
        else:
            for suffix in ("weight", "bias"):  # old peft kept the adapted layer's own weight; newer: base_layer
                stem = key[: -len(suffix) - 1]
                if key.endswith("." + suffix) and stem in adapted:
                    new = f"{_rename(stem)}.base_layer.{suffix}"
        if new in out:
            raise ConversionError(f"released keys collide on {new!r}")
        out[new] = value
    if unknown:
        raise ConversionError(f"{len(unknown)} released key(s) that Emu does not have: {_names(unknown)}")
    return out, dropped


def to_released(state: dict[str, Tensor], lora: bool) -> dict[str, Tensor]:
    """EmuModel keys -> released keys (the inverse of :func:`from_released`, without the dropped keys)."""
    llm = "decoder.lm.base_model.model." if lora else "decoder.lm."
    inverse = (
        ("vision.model.", "visual."),
        ("vision.ln.", "ln_visual."),
        ("resampler.stack.", "cformer.cformer."),
        ("resampler.queries", "cformer.causal_tokens"),
        ("resampler.projection.", "cformer.projection."),
        ("llm.regression_head.", llm + "stu_regress_head."),
        ("llm.model.", llm),
    )
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("decoder."):
            continue  # the visual decoder is written as diffusers folders
        new = next((n + key[len(o) :] for o, n in inverse if key.startswith(o)), None)
        if new is None:
            unknown.append(key)
            continue
        new = new.replace(".base_layer.", ".")  # the released peft layout keeps the adapted layer's own weight
        out[new] = value
    if unknown:
        raise ConversionError(f"{len(unknown)} model key(s) have no place in the released layout: {_names(unknown)}")
    return out


def dropped_fillers(state: dict[str, Tensor], llm_config: dict[str, Any], clip_embed_dim: int) -> dict[str, Tensor]:
    """The released keys of :data:`DROPPED` for an exported state: identity norm, zero head and table, and LLaMA's
    rotary ``inv_freq`` per layer, so that the released code loads the file with ``strict=True``."""
    width = state["visual.cls_token"].shape[-1]
    t5_width = state["cformer.causal_tokens"].shape[-1]
    dtype = state["visual.cls_token"].dtype
    llm = "decoder.lm.base_model.model." if any(".lora_" in k for k in state) else "decoder.lm."
    heads = int(llm_config["num_attention_heads"])
    head_dim = int(llm_config.get("head_dim") or int(llm_config["hidden_size"]) // heads)
    base = float(llm_config.get("rope_theta") or 10000.0)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    out = {
        "visual.norm.weight": torch.ones(width, dtype=dtype),
        "visual.norm.bias": torch.zeros(width, dtype=dtype),
        "visual.head.weight": torch.zeros(clip_embed_dim, width, dtype=dtype),
        "visual.head.bias": torch.zeros(clip_embed_dim, dtype=dtype),
        "cformer.cformer.embed_tokens.weight": torch.zeros(T5_VOCAB, t5_width, dtype=dtype),
    }
    for i in range(int(llm_config["num_hidden_layers"])):
        out[f"{llm}model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return out


# ---------------------------------------------------------------------------------------------- import
def _released_name(key: str, lora: bool) -> str:
    if key.startswith("decoder."):
        return key[len("decoder.") :] + " in the decoder folder"
    try:
        return next(iter(to_released({key: torch.empty(0)}, lora)))
    except ConversionError:
        return key


def _check_against(model: torch.nn.Module, state: dict[str, Tensor], what: str, lora: bool = False) -> None:
    """Every model key filled with its shape; errors name the released keys (the model's in brackets)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [f"{_released_name(k, lora)} ({k})" for k in sorted(set(expected) - set(state))]
    extra = [f"{_released_name(k, lora)} ({k})" for k in sorted(set(state) - set(expected))]
    wrong = {k: (tuple(state[k].shape), expected[k]) for k in set(state) & set(expected)
             if tuple(state[k].shape) != expected[k]}  # fmt: skip
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) missing from {what}: {_names(missing)}")
    if extra:
        problems.append(f"{len(extra)} key(s) of {what} that the model does not have: {_names(extra)}")
    if wrong:
        shown = "; ".join(f"{_released_name(k, lora)}: {a} in {what}, {b} in the model ({k})"
                          for k, (a, b) in sorted(wrong.items())[:8])  # fmt: skip
        problems.append(f"{len(wrong)} shape mismatch(es): {shown}")
    if problems:
        raise ConversionError("\n".join(problems))


def _self_contained(model_config: dict[str, Any], decoder: Any, lora: dict[str, Any] | None) -> dict[str, Any]:
    """The model's init arguments with every weight file replaced by what the checkpoint holds."""
    from emu_lightning.model import TOKENIZER_FROM_CHECKPOINT

    config = dict(model_config)
    config["tokenizer"] = TOKENIZER_FROM_CHECKPOINT
    config["init_checkpoint"] = None
    config["vision"]["init_args"]["checkpoint_path"] = None
    llm = config["llm"]["init_args"]
    if llm.get("config") is None:
        raise ConversionError("the config's llm needs `config:` (the language model's sizes) to convert into it")
    llm["pretrained_path"] = None
    if lora is not None:
        llm["lora"] = lora
    if decoder is not None:
        args = config["decoder"]["init_args"]
        if args.get("pretrained") is not None:
            args.update(decoder.self_contained_config())
    return config


def convert_released(
    released: str | Path,
    config: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    decoder: str | Path | None = None,
    lora_alpha: float = 16.0,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Convert the released weights into an EmuModel checkpoint at ``out``; returns a summary.

    Args:
        released: the released multimodal encoder file (``Emu-pretrain.pt``, ``Emu-instruct.pt``, or the pipeline's
            ``multimodal_encoder/pytorch_model.bin``).
        config: the model config to convert into (``configs/emu-14b.yaml``).
        out: the checkpoint to write.
        tokenizer: the LLaMA tokenizer folder (default: the config's ``model.tokenizer``).
        decoder: the released generation pipeline folder (``unet/``, ``vae/``, ``scheduler/``); without it the
            checkpoint has no visual decoder.
        lora_alpha: Emu-I's LoRA alpha (16, as released), which a state dict does not store.
        overrides: more ``emu-lightning`` arguments for the model, e.g. ``["--model.max_length", "2048"]``.
    """
    import lightning

    from emu_lightning.inspect import build
    from emu_lightning.tokenizer import tokenizer_to_state

    released = Path(released)
    if not released.is_file():
        raise CheckpointError(f"released weights {str(released)!r} do not exist")
    raw = torch.load(released, map_location="cpu", weights_only=True, mmap=True)
    state, dropped = from_released(released_state_dict(raw, repr(str(released))))
    lora = lora_of(state)
    args = ["--config", str(config), *(overrides or [])]
    if tokenizer is not None:
        args += ["--model.tokenizer", str(tokenizer)]
    if lora is not None:  # Emu-I: the instruct stage's vocabulary ([USER], [ASSISTANT]) and its adapters
        lora = {"r": lora["r"], "alpha": float(lora_alpha), "dropout": 0.05, "target_modules": lora["target_modules"]}
        args += ["--model.stage", "instruct", "--model.llm.init_args.lora", repr(lora).replace("'", '"')]
    if decoder is None:
        args += ["--model.decoder", "null"]
    else:
        args += ["--model.decoder.init_args.pretrained", str(decoder)]
    model, parsed = build(args, device="meta")
    if model.tokenizer is None:
        raise ConversionError("give --tokenizer: the LLaMA tokenizer folder the released model was trained with")
    built_decoder = None
    if decoder is not None:  # small enough to load for real; its weights come from the folder
        from jsonargparse import Namespace

        spec = parsed["model"]["decoder"]
        spec = spec.as_dict() if isinstance(spec, Namespace) else dict(spec)
        built_decoder = _build_decoder(spec, model.resampler.out_dim, model.resampler.num_queries)
        state.update({f"decoder.{k}": v for k, v in built_decoder.state_dict().items()})
    _check_against(model, state, f"released {released.name}" + (f" + {decoder}" if decoder else ""), lora is not None)
    model_config = parsed["model"].as_dict()
    hparams = _self_contained(model_config, built_decoder, lora)
    hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": state,
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "emu_tokenizer": tokenizer_to_state(model.tokenizer),
        "emu_converted_from": {
            "released": str(released),
            "decoder": str(decoder) if decoder else None,
            "dropped": sorted(dropped),
        },  # fmt: skip
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return {"out": str(out), "keys": len(state), "dropped": len(dropped), "lora": lora,
            "vocab": len(model.tokenizer), "decoder": decoder is not None}  # fmt: skip


def _build_decoder(spec: dict[str, Any], cond_dim: int, num_queries: int) -> Any:
    """The decoder a config's ``class_path`` dict describes, for real; ``cond_dim`` and ``num_queries`` (the visual
    embeddings' width and number) where the config leaves them to EmuModel."""
    module, _, name = spec["class_path"].rpartition(".")
    given = {"cond_dim": cond_dim, "num_queries": num_queries, **spec.get("init_args", {})}
    return getattr(importlib.import_module(module), name)(**given)


# ---------------------------------------------------------------------------------------------- export
def export_released(checkpoint: str | Path, out: str | Path, clip_embed_dim: int = CLIP_EMBED_DIM) -> dict[str, Any]:
    """Write an EmuModel checkpoint in the released layout under folder ``out``; returns a summary."""
    from emu_lightning.tokenizer import tokenizer_from_state

    ckpt = load_checkpoint(checkpoint, what="--export", require=EMU, mmap=True)
    hparams = ckpt.get("hyper_parameters") or {}
    state = ckpt["state_dict"]
    lora = any(".lora_" in k for k in state)
    released = to_released(state, lora)
    llm = hparams.get("llm", {}).get("init_args", {})
    llm_config = dict(llm.get("config") or {})
    if not llm_config and llm.get("pretrained_path"):
        import json

        llm_config = json.loads((Path(llm["pretrained_path"]) / "config.json").read_text())
    if "num_hidden_layers" not in llm_config:
        raise ConversionError(f"{checkpoint}: the language model's config is not in the checkpoint's hyper-parameters")
    released.update(dropped_fillers(released, llm_config, clip_embed_dim))
    out = Path(out)
    (out / "multimodal_encoder").mkdir(parents=True, exist_ok=True)
    torch.save(released, out / "multimodal_encoder" / "pytorch_model.bin")
    tokenizer_from_state(ckpt["emu_tokenizer"]).save_pretrained(out / "tokenizer")
    wrote = ["multimodal_encoder/pytorch_model.bin", "tokenizer/"]
    decoder_state = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    if decoder_state:
        spec = hparams["decoder"]
        queries = hparams["resampler"].get("init_args", {}).get("num_queries")
        if queries is None:
            raise ConversionError(f"{checkpoint}: no resampler num_queries in the checkpoint's hyper-parameters")
        decoder = _build_decoder(spec, int(state["llm.regression_head.weight"].shape[0]), int(queries))
        decoder.load_state_dict(decoder_state, strict=True)
        wrote += decoder.save_pretrained_parts(out)
    return {"out": str(out), "keys": len(released), "lora": lora, "wrote": wrote}


# ---------------------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emu-lightning convert",
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--released", help="the released multimodal encoder weights (Emu-pretrain.pt, Emu-instruct.pt)")
    what.add_argument("--export", metavar="CKPT", help="an EmuModel checkpoint to write in the released layout")
    parser.add_argument("--out", required=True, help="the checkpoint to write (import) or the folder (export)")
    parser.add_argument("--config", default="configs/emu-14b.yaml", help="the model to convert into (import)")
    parser.add_argument("--tokenizer", help="the LLaMA tokenizer folder (default: the config's model.tokenizer)")
    parser.add_argument("--decoder", help="the released generation pipeline folder (unet/, vae/, scheduler/)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="Emu-I's LoRA alpha (not in the weights)")
    parser.add_argument("--clip-embed-dim", type=int, default=CLIP_EMBED_DIM,
                        help="rows of the unused visual.head written on export (EVA-CLIP g/14: 1024)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    try:
        if args.export:
            if overrides:
                raise ConversionError(f"unknown arguments for --export: {overrides}")
            summary = export_released(args.export, args.out, clip_embed_dim=args.clip_embed_dim)
            print(f"wrote the released layout of {args.export} to {summary['out']}: {', '.join(summary['wrote'])} "
                  f"({summary['keys']} keys" + (", LoRA" if summary["lora"] else "") + ")")  # fmt: skip
        else:
            if not Path(args.config).is_file():
                raise ConversionError(f"config file {args.config!r} does not exist")
            options = dict(tokenizer=args.tokenizer, decoder=args.decoder, lora_alpha=args.lora_alpha)
            summary = convert_released(args.released, args.config, args.out, overrides=overrides, **options)
            lora = f", LoRA r={summary['lora']['r']} on {summary['lora']['target_modules']}" if summary["lora"] else ""
            print(f"wrote {summary['out']}: {summary['keys']} tensors ({summary['dropped']} unused released keys "
                  f"dropped), vocabulary {summary['vocab']}" + (", with the visual decoder" if summary["decoder"]
                  else "") + lora)  # fmt: skip
    except (ConversionError, CheckpointError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
