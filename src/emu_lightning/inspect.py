"""Count an Emu model's parameters and plan its training memory per device, without reading any weight.

    python -m emu_lightning.inspect --config configs/emu-14b.yaml --devices 8
    python -m emu_lightning.inspect --config configs/emu-14b.yaml --devices 64 --seq-len 128 1024 --batch 1
    python -m emu_lightning.inspect --config configs/tiny.yaml --config configs/ablations/resampler-perceiver.yaml
    python -m emu_lightning.inspect --config configs/tiny.yaml --model.frozen '[vision]' --precision bf16-true

The config(s) are parsed by the very parser of the ``emu-lightning`` command (same ``class_path`` handling,
same stacking of several ``--config`` files, same dotted overrides), but only the model is instantiated, on
the ``meta`` device: no weight or tokenizer file is read and no memory is allocated, so the weight paths in
the config need not exist. Neither the trainer nor the data module is built.

Prints one JSON object on stdout:

- ``components``: per component (vision, resampler, llm, decoder when present) its class and its total and
  trainable parameter counts; ``total_params`` and ``trainable_params`` for the whole model;
- ``memory``: the training memory planned per device, under plain DDP (``ddp``) and under full sharding over
  ``devices`` devices (``fsdp``: FSDP, ``FULL_SHARD``, one unit per transformer block), at the precision of
  ``--precision`` or of the config's ``trainer.precision`` (Lightning's ``32-true`` when it has none):
  weights as held, master weights, gradients, DDP's gradient buckets, AdamW's state and its step's temporaries,
  autocast's weight copies (DDP) or the gathered units (FSDP), and the activations of each ``--seq-len`` (default:
  the model's ``max_length``) for ``--batch`` sequences per device (default: the data module's batch, else 1)
  and ``--images`` images (default: one per sequence), with and without activation checkpointing.
  ``memory.assumptions`` states every formula. ``devices`` comes from ``--devices``, else from the config's
  ``trainer.devices`` when it is a number, else 8.

The plan itself is :mod:`emu_lightning.memory` (:func:`~emu_lightning.memory.describe` reads the shapes off a built
model, :func:`~emu_lightning.memory.plan_memory` plans), which ``benchmarks/memory_plan.py`` checks against the peak
memory of a real DDP run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emu_lightning.memory import (
    DEFAULT_DEVICES,
    DEFAULT_PRECISION,
    PRECISION_ALIASES,
    PRECISIONS,
    describe,
    param_counts,
    plan_memory,
)


# ---------------------------------------------------------------------------------------------- counting
def count(model: nn.Module) -> dict[str, Any]:
    """Parameter counts of ``model``, per component (when it has ``components()``) and in total.

    Works on the meta device (shapes only). A parameter shared by two components counts in both components
    but once in the totals; parameters outside every component are listed under ``other``.
    """
    components: dict[str, Any] = {}
    named = model.components() if hasattr(model, "components") else {}
    inside: set[int] = set()
    for name, module in named.items():
        total, trainable = param_counts(module)
        cls = type(module)
        components[name] = {"class": f"{cls.__module__}.{cls.__qualname__}", "total": total, "trainable": trainable}
        inside.update(id(p) for p in module.parameters())
    total, trainable = param_counts(model)
    rest = [p for p in model.parameters() if id(p) not in inside]
    if named and rest:
        components["other"] = {
            "class": None,
            "total": sum(p.numel() for p in rest),
            "trainable": sum(p.numel() for p in rest if p.requires_grad),
        }
    return {"components": components, "total_params": total, "trainable_params": trainable}


# ---------------------------------------------------------------------------------------------- building
def _model_only_cli(base: type, device: str) -> type:
    """A subclass of the command's CLI class that instantiates only the model, under ``torch.device(device)``."""

    class ModelOnlyCLI(base):  # type: ignore[misc, valid-type]
        def instantiate_classes(self) -> None:
            # Only `model` is kept: absent keys (trainer callbacks, data) are skipped by the instantiation.
            config = type(self.config)(model=self.config["model"].clone())
            with torch.device(device):
                # jsonargparse >= 4.49 renamed instantiate_classes (LightningCLI's own call) to instantiate.
                instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
                self.config_init = instantiate(config)
            self.model = self.config_init["model"]
            self.datamodule = self.trainer = None

    return ModelOnlyCLI


def build(args: Sequence[str], device: str = "meta") -> tuple[nn.Module, Any]:
    """The model that ``emu-lightning --config ... [overrides]`` would train, built on ``device``; also the config.

    ``args`` are command-line arguments of ``emu-lightning`` without a subcommand (``["--config", path, ...]``).
    Goes through :func:`emu_lightning.cli.cli` itself, so parsing is identical; only instantiation differs.
    """
    from emu_lightning.cli import EmuCLI, cli

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        # `args` given while sys.argv has arguments (as under `python -m emu_lightning.inspect`) is intended here.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        built = cli(list(args), run=False, cli_class=_model_only_cli(EmuCLI, device))
    return built.model, built.config


def _config_value(config: Any, key: str) -> Any:
    try:
        return config[key]
    except (KeyError, TypeError):
        return None


def _devices_from_config(config: Any) -> int | None:
    devices = _config_value(config, "trainer.devices")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    return None  # "auto", -1, a device list: the count is not known here


def _precision(value: Any) -> str | None:
    """Lightning's name for a ``trainer.precision`` value (``bf16`` is ``bf16-mixed``, ``32`` is ``32-true``...)."""
    if value is None:
        return None
    name = str(value).strip()
    return PRECISION_ALIASES.get(name, name)


def _batch_from_config(config: Any) -> int | None:
    """Sequences per device and step: the data module's ``batch_sizes`` summed (a mixture), else its ``batch_size``."""
    init = _config_value(config, "data.init_args")
    sizes = getattr(init, "batch_sizes", None)
    if isinstance(sizes, dict) and sizes:
        return int(sum(sizes.values()))
    size = getattr(init, "batch_size", None)
    return int(size) if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None


# ---------------------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emu_lightning.inspect",
        description="Count an Emu model's parameters and plan its training memory per device on the meta device "
        "(no weights read). Other arguments (e.g. --model.frozen '[vision]') go to the emu-lightning parser.",
    )
    parser.add_argument(
        "-c", "--config", action="append", required=True, help="YAML config; repeat to stack (later ones override)"
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help=f"N devices to shard over (default: trainer.devices, else {DEFAULT_DEVICES})",
    )
    parser.add_argument(
        "--precision",
        default=None,
        help=f"one of {', '.join(PRECISIONS)} (default: trainer.precision, else {DEFAULT_PRECISION})",
    )
    parser.add_argument(
        "--seq-len", type=int, nargs="+", default=None, help="tokens per sequence, one plan each (default: max_length)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="sequences per device and step (default: the data module's, else 1)"
    )
    parser.add_argument(
        "--images", type=int, default=None, help="images per device and step (default: one per sequence)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``), build the model on meta, print and return the JSON report.

    Exits with code 2 (``SystemExit``) on bad arguments, e.g. a config file that does not exist.
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    for path in args.config:
        if not Path(path).is_file():
            parser.error(f"config file not found: {path}")
    for name in ("devices", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.images is not None and args.images < 0:
        parser.error(f"--images must be >= 0, got {args.images}")
    if args.seq_len is not None and min(args.seq_len) < 1:
        parser.error(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.precision is not None and _precision(args.precision) not in PRECISIONS:
        parser.error(f"--precision {args.precision!r} is not planned; expected one of {list(PRECISIONS)}")
    cli_args = [a for path in args.config for a in ("--config", path)] + list(extra)
    model, config = build(cli_args, device="meta")
    precision = (
        _precision(args.precision) or _precision(_config_value(config, "trainer.precision")) or DEFAULT_PRECISION
    )
    if precision not in PRECISIONS:
        parser.error(f"trainer.precision {precision!r} is not planned; give --precision, one of {list(PRECISIONS)}")
    counts = count(model)
    # torch's AdamW runs foreach on CUDA parameters and its for-loop on CPU ones unless told otherwise
    on_cpu = str(_config_value(config, "trainer.accelerator")).lower() == "cpu"
    facts = describe(model, default_optimizer="for-loop" if on_cpu else "foreach")
    # EmuFSDPStrategy checkpoints the activations of its `blocks` (configs/scale/): those components count as configured
    blocks = {str(b).rsplit(".", 1)[-1] for b in _config_value(config, "trainer.strategy.init_args.blocks") or []}
    by_strategy = {s.component for s in facts.stacks if s.block_class in blocks or s.checkpointed}
    memory = plan_memory(
        facts,
        checkpointed=sorted(by_strategy) if blocks else None,
        precision=precision,
        devices=args.devices or _devices_from_config(config) or DEFAULT_DEVICES,
        seq_lens=args.seq_len,
        batch=args.batch or _batch_from_config(config) or 1,
        images=args.images,
    )
    report = {"configs": list(args.config), **counts, "memory": memory}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
