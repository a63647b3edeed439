"""Checkpoints are read with weights_only=True everywhere (a crafted file runs no code), bad files and bad configs are
errors that name the file, and `--ckpt_path` never swaps the command's model or settings for the checkpoint's."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from emu_lightning import chat, generate
from emu_lightning.checkpoints import CheckpointError, load_checkpoint
from emu_lightning.cli import ConfigError, EmuCLI, cli
from emu_lightning.model import EmuModel

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
PERCEIVER = str(ROOT / "configs/ablations/resampler-perceiver.yaml")


class ParseOnly(EmuCLI):
    """Parses (and checks ``--ckpt_path``), builds and runs nothing."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


class Crafted:
    """Unpickling this runs a command: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.ckpt"
    torch.save(
        {"state_dict": {}, "pytorch-lightning_version": "2.6.6", "emu_tokenizer": {}, "x": Crafted(marker)}, path
    )
    return path, marker


def test_a_crafted_checkpoint_runs_no_code_anywhere(crafted, capsys):
    path, marker = crafted
    attempts = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "EmuModel.load_from_checkpoint": lambda: EmuModel.load_from_checkpoint(path),
        "fit --model.init_checkpoint": lambda: cli(["--config", TINY, f"--model.init_checkpoint={path}"], run=False),
        "fit --ckpt_path": lambda: cli(["fit", "--config", TINY, f"--ckpt_path={path}"], cli_class=ParseOnly),
        "chat --ckpt": lambda: chat.load_model(str(path)),
        "generate --ckpt": lambda: generate.main(["--ckpt", str(path), "a red circle."]),
    }
    for name, attempt in attempts.items():
        with pytest.raises((CheckpointError, SystemExit)) as err:
            attempt()
        message = str(err.value)
        assert str(path) in message and "posix.system" in message and "could run code" in message, (name, message)
        assert not marker.exists(), f"{name} ran the file's code"


def test_bad_checkpoint_files_are_errors_that_name_the_file(tmp_path):
    files = {
        "empty": (b"", "is empty (0 bytes)"),
        "random": (os.urandom(4096), "is not a PyTorch checkpoint"),
    }
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "pytorch-lightning_version": "2.6.6"}, good)
    files["truncated"] = (good.read_bytes()[: good.stat().st_size // 2], "cannot be read")
    for name, (data, expected) in files.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(expected)) as err:
            cli(["fit", "--config", TINY, f"--ckpt_path={path}"], cli_class=ParseOnly)
        assert str(path) in str(err.value) and "weights_only=False" not in str(err.value)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match=r"is not a Lightning checkpoint: it lacks \['state_dict', "):
        cli(["validate", "--config", TINY, f"--ckpt_path={foreign}"], cli_class=ParseOnly)
    with pytest.raises(CheckpointError, match="init_checkpoint .* is not an EmuModel checkpoint"):
        cli(["--config", TINY, f"--model.init_checkpoint={foreign}"], run=False)
    # the console command prints the message alone, no traceback, and exits 2
    random = tmp_path / "random.ckpt"
    out = subprocess.run([sys.executable, "-m", "emu_lightning.cli", "fit", "--config", TINY, f"--ckpt_path={random}"],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith(f"error: --ckpt_path '{random}' is not a PyTorch checkpoint")
    assert "Traceback" not in out.stderr


def test_malformed_and_missing_config_files_are_errors_that_name_them(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  max_length: 64\n   regression_weight: [1\n")
    with pytest.raises(ConfigError, match=rf"config file {bad}, line 3, column \d+: .*not valid YAML"):
        cli(["--config", TINY, "--config", str(bad)], run=False)
    with pytest.raises(ConfigError, match="config file 'nowhere.yaml' does not exist"):
        cli(["--config=nowhere.yaml"], run=False)


def _checkpoint_of(tmp_path: Path, *configs: str, **changes) -> Path:
    """A Lightning checkpoint whose hyperparameters are those `fit` saves for ``configs`` (weights are not needed)."""
    run = cli([a for c in configs for a in ("--config", c)], run=False, cli_class=ParseOnly)
    # as Lightning's CLI saves them: the config dumped to plain data (an import path stays a string)
    model = yaml.safe_load(run.parser.dump(run.config, skip_link_targets=False, skip_none=False))["model"]
    model.update(changes)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6", "hyper_parameters": model}, path)
    return path


def test_resuming_another_architecture_is_an_error(tmp_path):
    perceiver = _checkpoint_of(tmp_path, TINY, PERCEIVER)
    for subcommand in ("fit", "validate"):
        with pytest.raises(ConfigError, match="holds another model than this command builds") as err:
            cli([subcommand, "--config", TINY, f"--ckpt_path={perceiver}"], cli_class=ParseOnly)
        assert re.search(
            r"model\.resampler\.class_path: 'emu_lightning\.[\w.]*PerceiverResampler' in the", str(err.value)
        )
    # the same architecture resumes
    config = cli(["fit", "--config", TINY, "--config", PERCEIVER, f"--ckpt_path={perceiver}"], cli_class=ParseOnly)
    assert config.config.fit.model.resampler.class_path.endswith("PerceiverResampler")


def test_changed_settings_when_resuming_take_the_commands_values_and_are_logged(tmp_path):
    ckpt = _checkpoint_of(tmp_path, TINY, regression_weight=1.0, ce_weight=1.0)
    with pytest.warns(UserWarning, match=r"model.regression_weight: 1.0 -> 0.5"):
        run = cli(["fit", "--config", TINY, f"--ckpt_path={ckpt}", "--model.regression_weight=0.5"],
                  cli_class=ParseOnly)  # fmt: skip
    assert run.config.fit.model.regression_weight == 0.5  # Lightning's own CLI put the checkpoint's 1.0 back
    dumped = yaml.safe_load(run.parser.dump(run.config, skip_none=False))
    assert dumped["fit"]["model"]["regression_weight"] == 0.5  # what config.yaml records


def test_a_sharded_checkpoint_folder_is_checked_through_its_metadata(tmp_path):
    """FSDP's `state_dict_type: sharded` saves a folder; --ckpt_path reads its meta.pt for the model's arguments."""
    folder = tmp_path / "sharded.ckpt"
    folder.mkdir()
    _checkpoint_of(tmp_path, TINY, PERCEIVER).rename(folder / "meta.pt")
    with pytest.raises(ConfigError, match="holds another model than this command builds"):
        cli(["fit", "--config", TINY, f"--ckpt_path={folder}"], cli_class=ParseOnly)
    config = cli(["fit", "--config", TINY, "--config", PERCEIVER, f"--ckpt_path={folder}"], cli_class=ParseOnly)
    assert config.config.fit.model.resampler.class_path.endswith("PerceiverResampler")
