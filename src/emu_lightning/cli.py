"""The ``emu-lightning`` command: LightningCLI over EmuModel and any data module.

emu-lightning fit --config configs/tiny.yaml
emu-lightning fit --config configs/tiny.yaml --config configs/ablations/resampler-perceiver.yaml
emu-lightning validate --config configs/tiny.yaml --ckpt_path PATH
emu-lightning chat --ckpt PATH            (the assistant: see emu_lightning.chat)
emu-lightning consolidate FOLDER --out FILE   (a sharded FSDP checkpoint to one file; a file to a folder: back)
emu-lightning ablate --config BASE --variant FILE... --seeds N   (see emu_lightning.ablate)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from emu_lightning.callbacks import FinalCheckpoint, PreemptionCheckpoint
from emu_lightning.checkpoints import EMU, CheckpointError, SafeCheckpointIO, load_checkpoint
from emu_lightning.fsdp import SHARDED_METADATA, is_sharded_checkpoint
from emu_lightning.model import COMPONENTS, TOKENIZER_FROM_CHECKPOINT, EmuModel

ARCHITECTURE = (*COMPONENTS, "tokenizer")
"""The model arguments that make the network and its vocabulary: a checkpoint of other ones cannot be resumed."""
WEIGHT_FILES = (
    "tokenizer",
    "vision.init_args.checkpoint_path",
    "vision.init_args.checkpoint_prefix",
    "llm.init_args.pretrained_path",
    "decoder.init_args.pretrained",
)
"""The model arguments that only say where weights (and the vocabulary) are read from: with ``--ckpt_path`` they come
from the checkpoint, so these files are not read and may differ from the checkpoint's or be absent."""
SPECIAL_CKPT_PATHS = ("last", "hpc", "best", "registry")
"""``ckpt_path`` values that Lightning resolves to a file itself."""


class ConfigError(ValueError):
    """A config file or command line that cannot run: the message names the file or the option."""


class EmuCLI(LightningCLI):
    """LightningCLI with the model's optimizer and scheduler taken from its own init arguments.

    With ``--ckpt_path`` (resuming ``fit``, or ``validate`` / ``test`` / ``predict`` of a checkpoint) every weight
    and the tokenizer come from that checkpoint, so the files the config names for them (:data:`WEIGHT_FILES`, and
    the stage's ``model.init_checkpoint``, an earlier stage's file) are not read and need not exist.
    """

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None or config.get("model") is None:
            return
        if config.get("ckpt_path"):
            config.model.init_checkpoint = None
        elif config.model.get("init_checkpoint") and Path(config.model.init_checkpoint).is_file():
            # its components' weights are copied in: do not read them from their files first
            try:
                checkpoint = load_checkpoint(config.model.init_checkpoint, require=EMU, mmap=True)
            except CheckpointError:
                return  # EmuModel reports it
            holds = {key.split(".", 1)[0] for key in checkpoint["state_dict"]}
            _weights_from_checkpoint(config.model, checkpoint.get("hyper_parameters") or {}, False, holds)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` against the command's model, instead of Lightning's default of silently taking the
        checkpoint's model arguments over the command's (which trained another architecture than the config said and
        dropped changed loss weights). Another architecture is an error naming the differences; other changed
        arguments (loss weights, optimizer, schedule) take the command's values, with a warning that lists them."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        path = config.get("ckpt_path") if config is not None else None
        if not path or str(path) in SPECIAL_CKPT_PATHS or config.get("model") is None:
            return
        if is_sharded_checkpoint(path):  # FSDP's folder: its metadata (hyper-parameters, tokenizer) is in meta.pt
            checkpoint = load_checkpoint(Path(path) / SHARDED_METADATA, what="--ckpt_path's metadata", require=())
        else:
            checkpoint = load_checkpoint(path, what="--ckpt_path", mmap=True)  # the metadata only
        hparams = checkpoint.get("hyper_parameters") or {}
        # the config as `fit` saves it in hparams: plain YAML values (a TrainedBPE's corpus is its import path)
        dumped = self.parser.dump(self.config, skip_link_targets=False, skip_none=False)
        model = yaml.safe_load(dumped)[subcommand]["model"]
        saved = dict(_flatten(hparams))
        given = dict(_flatten(model))
        ignored = ("init_checkpoint", *WEIGHT_FILES)
        changed = [k for k in sorted(saved.keys() & given.keys()) if k not in ignored and saved[k] != given[k]]
        for key, (theirs, ours) in _one_sided(hparams, model, saved, given).items():  # e.g. a decoder, LoRA
            saved[key], given[key] = theirs, ours
            changed.append(key)
        network = [k for k in changed if k.split(".")[0] in ARCHITECTURE]
        if network:
            lines = "\n".join(f"  model.{k}: {saved[k]!r} in the checkpoint, {given[k]!r} here" for k in network[:12])
            more = f"\n  ... and {len(network) - 12} more" if len(network) > 12 else ""
            drop = [k for k in network if k in COMPONENTS and given[k]]
            hint = "".join(f"\n--model.{k} null drops the config's {k}" for k in drop)
            raise ConfigError(
                f"--ckpt_path {path} holds another model than this command builds:\n{lines}{more}\n"
                "Give the config the checkpoint was trained with (its run folder's config.yaml), or start a new run "
                f"from its weights with --model.init_checkpoint{hint}"
            )
        if changed:
            lines = "\n".join(f"  model.{k}: {saved[k]!r} -> {given[k]!r}" for k in changed)
            rank_zero_warn(f"{subcommand} --ckpt_path {path}: these model arguments differ from the checkpoint's and "
                           f"take this command's values:\n{lines}")  # fmt: skip
        _weights_from_checkpoint(config.model, hparams, has_tokenizer="emu_tokenizer" in checkpoint)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--eval",
            type=dict[str, Any] | None,
            default=None,
            help="Arguments set on every few-shot evaluation callback (CaptioningEval, VQAEval) over their configs': "
            "shots, seeds, selection, zero_shot_text_demos, num_queries; e.g. '{shots: [0, 1], "
            "zero_shot_text_demos: 1}' on a small support set",
        )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Lightning's trainer, plus what every run of this library has (a config lists its own to change them): a
        resumable checkpoint on SIGTERM (:class:`~emu_lightning.callbacks.PreemptionCheckpoint`), the final weights at
        ``<root>/final.ckpt`` (:class:`~emu_lightning.callbacks.FinalCheckpoint`), ``last.ckpt`` beside Lightning's
        checkpoints, and checkpoints read with ``weights_only=True``
        (:class:`~emu_lightning.checkpoints.SafeCheckpointIO`)."""
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, FinalCheckpoint) for c in trainer.callbacks):
            trainer.callbacks.append(FinalCheckpoint())
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.save_last is None:
            trainer.checkpoint_callback.save_last = True
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        overrides = config.get("eval") if config is not None else None
        if overrides:
            from emu_lightning.eval.callbacks import FewShotEval

            for callback in trainer.callbacks:
                if isinstance(callback, FewShotEval):
                    callback.override(**overrides)
        if not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):
            trainer.callbacks.append(PreemptionCheckpoint())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer


def _weights_from_checkpoint(
    model: Any, saved: dict[str, Any], has_tokenizer: bool, holds: set[str] | None = None
) -> None:
    """Stop the model config from reading weight files that a checkpoint replaces (``--ckpt_path``; or the components
    ``holds`` names, those of ``model.init_checkpoint``): the tokenizer is the checkpoint's, the vision tower's weights
    are not read, and the language model and decoder are built from the checkpoint's own description of them when it
    has one that agrees with the config (``llm.config``; a decoder without ``pretrained``, as converted ones are)."""
    if has_tokenizer:
        model.tokenizer = TOKENIZER_FROM_CHECKPOINT
    parts = {name: (model.get(name), saved.get(name)) for name in ("vision", "llm", "decoder")}
    args = {n: (g.init_args, s.get("init_args") or {}) for n, (g, s) in parts.items()
            if g is not None and isinstance(s, dict) and g.get("class_path") == s.get("class_path")
            and (holds is None or n in holds)}  # fmt: skip
    if "vision" in args and "checkpoint_path" in args["vision"][0]:
        args["vision"][0].checkpoint_path = None
    if "llm" in args and args["llm"][1].get("config") is not None:
        given, ckpt = args["llm"]
        mine = given.config.as_dict() if hasattr(given.config, "as_dict") else dict(given.config or {})
        if all(ckpt["config"].get(k, v) == v for k, v in mine.items()):
            given.pretrained_path, given.config = None, ckpt["config"]
    if "decoder" in args and "pretrained" in args["decoder"][1] and args["decoder"][1]["pretrained"] is None:
        given, ckpt = args["decoder"]
        for key in ("pretrained", "unet", "vae", "scheduler_config"):
            if key in ckpt:
                setattr(given, key, ckpt[key])


DESCRIBED_BY_FILES = ("llm.init_args.config", "decoder.init_args.unet", "decoder.init_args.vae",
                      "decoder.init_args.scheduler_config")  # fmt: skip
"""Model arguments that a self-contained checkpoint fills in where a config reads them from the weight folders."""


def _one_sided(
    saved_tree: dict[str, Any], given_tree: dict[str, Any], saved: dict[str, Any], given: dict[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """Parts set on one side only (``None`` on the other): ``{key: (checkpoint's, command's)}``, e.g. a checkpoint
    without the config's decoder, or with LoRA adapters the config lacks."""
    out: dict[str, tuple[Any, Any]] = {}
    for flat, other_tree, other_flat, checkpoint_side in ((given, saved_tree, saved, True), (saved, given_tree, given,
                                                                                            False)):  # fmt: skip
        for key, value in flat.items():
            if value is not None or key in other_flat or key in DESCRIBED_BY_FILES:
                continue
            other = _nested(other_tree, key)
            if isinstance(other, dict) and other:
                out[key] = (_summary(other), None) if checkpoint_side else (None, _summary(other))
    return out


def _nested(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def _summary(value: dict[str, Any]) -> Any:
    """A class_path dict as its class name, any other dict as it is."""
    return str(value["class_path"]).rpartition(".")[2] if "class_path" in value else value


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", 1)``; tuples read as lists (a YAML round trip turns one into the other)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}{key}.")
    else:
        yield prefix[:-1], list(value) if isinstance(value, tuple) else value


def check_config_files(args: list[str]) -> None:
    """Read every ``--config`` file of ``args`` as YAML first, so that a missing or malformed file is an error that
    names it (jsonargparse reports ``in "<unicode string>", line 3`` without the file)."""
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"config file {path}{where}: {problem} (not valid YAML)") from None


def cli(args: list[str] | None = None, run: bool = True, cli_class: type[EmuCLI] = EmuCLI) -> EmuCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line.

    ``cli_class`` lets tools reuse the exact parser with other instantiation (``inspect`` builds only the
    model, on the meta device).
    """
    # Nothing is downloaded at run time: without this every hub look-up waits ~45 s before failing.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_config_files(sys.argv[1:] if args is None else args)
    return cli_class(
        EmuModel,
        L.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


MORE_SUBCOMMANDS = {
    "chat": "Talk to a trained EmuModel (emu-lightning chat --help).",
    "convert": "Emu's released weights to an EmuModel checkpoint, and back (emu-lightning convert --help).",
    "consolidate": "A sharded (FSDP) checkpoint folder to one file, and back (emu-lightning consolidate --help).",
    "ablate": "Train a base config and its variants over seeds; one report (emu-lightning ablate --help).",
}
"""Subcommands that are not Trainer methods: each has its own parser."""


def main() -> None:
    command = sys.argv[1:2]
    if command == ["chat"]:  # not a Trainer subcommand: the assistant has its own small parser
        from emu_lightning.chat import main as chat_main

        sys.exit(chat_main(sys.argv[2:]))
    if command == ["convert"]:
        from emu_lightning.convert import main as convert_main

        sys.exit(convert_main(sys.argv[2:]))
    if command == ["consolidate"]:
        from emu_lightning.fsdp import consolidate_main

        sys.exit(consolidate_main(sys.argv[2:]))
    if command == ["ablate"]:
        from emu_lightning.ablate import main as ablate_main

        sys.exit(ablate_main(sys.argv[2:]))
    if command in (["-h"], ["--help"]):
        try:
            cli()
        except SystemExit:  # LightningCLI printed its help; list the other subcommands after it
            sys.stdout.write("\nmore subcommands:\n")
            sys.stdout.write("".join(f"    {name:<20}{text}\n" for name, text in MORE_SUBCOMMANDS.items()))
            raise
    try:
        cli()
    except (ConfigError, CheckpointError) as err:  # the message says it all: no traceback
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
