"""Count an Emu model's parameters and its training memory without reading any weight.

    python -m emu_lightning.inspect --config configs/emu-14b.yaml --devices 8
    python -m emu_lightning.inspect --config configs/tiny.yaml --config configs/ablations/resampler-perceiver.yaml
    python -m emu_lightning.inspect --config configs/tiny.yaml --model.frozen '[vision]'

The config(s) are parsed by the very parser of the ``emu-lightning`` command (same ``class_path`` handling,
same stacking of several ``--config`` files, same dotted overrides), but only the model is instantiated, on
the ``meta`` device: no weight or tokenizer file is read and no memory is allocated, so the weight paths in
the config need not exist. Neither the trainer nor the data module is built.

Prints one JSON object on stdout:

- ``components``: per component (vision, resampler, llm, decoder when present) its class and its total and
  trainable parameter counts; ``total_params`` and ``trainable_params`` for the whole model;
- ``memory``: bytes (and GiB) per device for training, under plain DDP and under full sharding (FSDP /
  ZeRO-3) over ``devices`` devices; ``memory.assumptions`` spells out the formula. ``devices`` comes from
  ``--devices``, else from the config's ``trainer.devices`` when it is a number, else 8.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_DEVICES = 8
WEIGHT_BYTES = 2  # bf16 weights, every parameter
GRAD_BYTES = 2  # bf16 gradients, trainable parameters
OPTIMIZER_BYTES = 8  # fp32 Adam m and v, trainable parameters
ASSUMPTIONS = (
    f"per device, no activations: DDP = {WEIGHT_BYTES} B x total_params (bf16 weights) + {GRAD_BYTES} B x "
    f"trainable_params (bf16 grads) + {OPTIMIZER_BYTES} B x trainable_params (fp32 Adam m and v); "
    "full sharding (FSDP / ZeRO-3) = DDP / devices, rounded up to whole bytes; GiB = bytes / 2**30"
)


# ---------------------------------------------------------------------------------------------- counting
def _params(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())  # shared (tied) parameters are listed once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def count(model: nn.Module) -> dict[str, Any]:
    """Parameter counts of ``model``, per component (when it has ``components()``) and in total.

    Works on the meta device (shapes only). A parameter shared by two components counts in both components
    but once in the totals; parameters outside every component are listed under ``other``.
    """
    components: dict[str, Any] = {}
    named = model.components() if hasattr(model, "components") else {}
    inside: set[int] = set()
    for name, module in named.items():
        total, trainable = _params(module)
        cls = type(module)
        components[name] = {"class": f"{cls.__module__}.{cls.__qualname__}", "total": total, "trainable": trainable}
        inside.update(id(p) for p in module.parameters())
    total, trainable = _params(model)
    rest = [p for p in model.parameters() if id(p) not in inside]
    if named and rest:
        components["other"] = {
            "class": None,
            "total": sum(p.numel() for p in rest),
            "trainable": sum(p.numel() for p in rest if p.requires_grad),
        }
    return {"components": components, "total_params": total, "trainable_params": trainable}


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def training_memory(total: int, trainable: int, devices: int) -> dict[str, Any]:
    """Per-device training memory (weights, gradients, Adam states; no activations) under DDP and full sharding.

    DDP: every device holds ``2 * total + 2 * trainable + 8 * trainable`` bytes; full sharding divides that by
    ``devices`` (rounded up to whole bytes).
    """
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if not 0 <= trainable <= total:
        raise ValueError(f"need 0 <= trainable <= total, got trainable {trainable}, total {total}")
    parts = {
        "weights_bytes": WEIGHT_BYTES * total,
        "grads_bytes": GRAD_BYTES * trainable,
        "optimizer_bytes": OPTIMIZER_BYTES * trainable,
    }
    ddp = sum(parts.values())
    sharded = {k: math.ceil(v / devices) for k, v in parts.items()}
    sharded_total = math.ceil(ddp / devices)
    return {
        "devices": devices,
        "assumptions": ASSUMPTIONS,
        "ddp": {**parts, "bytes": ddp, "gib": _gib(ddp)},
        "sharded": {**sharded, "bytes": sharded_total, "gib": _gib(sharded_total)},
    }


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


def _devices_from_config(config: Any) -> int | None:
    try:
        devices = config["trainer.devices"]
    except KeyError:
        return None
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    return None  # "auto", -1, a device list: the count is not known here


# ---------------------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emu_lightning.inspect",
        description="Count an Emu model's parameters and training memory on the meta device (no weights read). "
        "Other arguments (e.g. --model.frozen '[vision]') go to the emu-lightning parser.",
    )
    parser.add_argument(
        "-c", "--config", action="append", required=True, help="YAML config; repeat to stack (later ones override)"
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help=f"N for the memory estimate (default: trainer.devices, else {DEFAULT_DEVICES})",
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
    if args.devices is not None and args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    cli_args = [a for path in args.config for a in ("--config", path)] + list(extra)
    model, config = build(cli_args, device="meta")
    counts = count(model)
    devices = args.devices or _devices_from_config(config) or DEFAULT_DEVICES
    report = {
        "configs": list(args.config),
        **counts,
        "memory": training_memory(counts["total_params"], counts["trainable_params"], devices),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
