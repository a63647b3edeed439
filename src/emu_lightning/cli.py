"""The ``emu-lightning`` command: LightningCLI over EmuModel and any data module.

emu-lightning fit --config configs/tiny.yaml
emu-lightning fit --config configs/tiny.yaml --config configs/ablations/resampler-perceiver.yaml
emu-lightning validate --config configs/tiny.yaml --ckpt_path PATH
emu-lightning chat --ckpt PATH            (the assistant: see emu_lightning.chat)
"""

from __future__ import annotations

import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from emu_lightning.model import EmuModel


class EmuCLI(LightningCLI):
    """LightningCLI with the model's optimizer and scheduler taken from its own init arguments.

    With ``--ckpt_path`` (resuming ``fit``, or ``validate`` / ``test`` / ``predict`` of a checkpoint) every weight
    comes from that checkpoint, so the stage's ``model.init_checkpoint`` (an earlier stage's file, which may be
    gone) is not read.
    """

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None and config.get("ckpt_path") and config.get("model") is not None:
            config.model.init_checkpoint = None


def cli(args: list[str] | None = None, run: bool = True, cli_class: type[EmuCLI] = EmuCLI) -> EmuCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line.

    ``cli_class`` lets tools reuse the exact parser with other instantiation (``inspect`` builds only the
    model, on the meta device).
    """
    # Nothing is downloaded at run time: without this every hub look-up waits ~45 s before failing.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cli_class(
        EmuModel,
        L.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    if sys.argv[1:2] == ["chat"]:  # not a Trainer subcommand: the assistant has its own small parser
        from emu_lightning.chat import main as chat_main

        sys.exit(chat_main(sys.argv[2:]))
    cli()


if __name__ == "__main__":
    main()
