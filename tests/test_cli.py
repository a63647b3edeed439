"""The `emu-lightning` command: every config parses, the tiny config fits end to end, ablations swap parts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emu_lightning.cli import EmuCLI, cli
from emu_lightning.model import EmuModel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
ABLATIONS = [p for p in CONFIGS if "ablations" in p.parts]
OVERLAYS = [p for p in CONFIGS if "eval" in p.parts]  # stacked on a model config
STAGES = [p for p in CONFIGS if "stages" in p.parts]  # stacked on the tiny config
BASES = [p for p in CONFIGS if "ablations" not in p.parts and p not in OVERLAYS and p not in STAGES]


class ParseOnly(EmuCLI):
    def instantiate_classes(self) -> None:  # parse and validate types, build nothing
        pass


def _parse(*configs: Path):
    args = [a for c in configs for a in ("--config", str(ROOT / c))]
    return cli(args, run=False, cli_class=ParseOnly).config


def test_configs_exist():
    names = {str(p) for p in CONFIGS}
    assert {"configs/tiny.yaml", "configs/emu-14b.yaml"} <= names
    assert {f"configs/ablations/resampler-{k}.yaml" for k in ("perceiver", "mlp", "pooled")} <= names


@pytest.mark.parametrize("config", BASES, ids=str)
def test_every_config_parses(config):
    cfg = _parse(config)
    assert cfg.model.resampler.class_path.startswith("emu_lightning.")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=str)
def test_eval_overlays_parse_on_the_tiny_config(overlay):
    cfg = _parse(Path("configs/tiny.yaml"), overlay)
    names = [c.class_path.rsplit(".", 1)[1] for c in cfg.trainer.callbacks]
    assert "CaptioningEval" in names and "VQAEval" in names


@pytest.mark.parametrize("stage", STAGES, ids=str)
def test_stage_overlays_build_on_the_tiny_config(stage):
    run = cli(["--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / stage), "--trainer.logger", "false"],
              run=False)  # fmt: skip
    assert run.model.stage == stage.stem and run.model.decoder is not None
    assert set(run.model.frozen) == {"vision", "resampler", "llm"}


@pytest.mark.parametrize("ablation", ABLATIONS, ids=str)
def test_ablations_hold_only_differences_and_swap_a_component(ablation):
    text = yaml.safe_load((ROOT / ablation).read_text())
    assert set(text) == {"model"} and len(text["model"]) == 1  # one component, nothing else
    cfg = _parse(Path("configs/tiny.yaml"), ablation)
    assert cfg.model.resampler.class_path == text["model"]["resampler"]["class_path"]
    run = cli(
        ["--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / ablation), "--trainer.logger", "false"],
        run=False,
    )
    assert type(run.model.resampler).__name__ == text["model"]["resampler"]["class_path"].rsplit(".", 1)[1]
    batch = run.model.sequencer([[run.datamodule.world.image("val", 0), "a red circle."]])
    assert run.model.losses(batch)["loss"].isfinite()


def test_unknown_component_class_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  resampler:\n    class_path: emu_lightning.components.resampler.NoSuchResampler\n")
    with pytest.raises(SystemExit):
        _parse(Path("configs/tiny.yaml"), bad)
    assert "NoSuchResampler" in capsys.readouterr().err


def test_tiny_fit_then_validate_from_the_command_line(tmp_path):
    """The real console entry point: a few training steps, a checkpoint, then `validate` from it."""
    root = tmp_path / "run"
    common = [
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.sources.shapes.init_args.val_size=32",
        "--data.init_args.sources.shapes.init_args.batch_size=8",
        # little ShapesWorld data on disk: this test writes it into its own folder
        "--data.init_args.sources.pairs.init_args.shapesworld={train: 40}",
        "--data.init_args.sources.mmc4.init_args.shapesworld={train: 8}",
        "--data.init_args.sources.webvid.init_args.shapesworld={train: 8}",
        "--data.init_args.sources.storyboard.init_args.shapesworld={train: 8}",
    ]
    exe = [sys.executable, "-m", "emu_lightning.cli"]
    fit = subprocess.run(
        [
            *exe,
            "fit",
            *common,
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpts = sorted(root.rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    assert not (tmp_path / "config.yaml").exists() or (root / "lightning_logs").exists()
    val = subprocess.run(
        [*exe, "validate", *common, f"--ckpt_path={ckpts[-1]}", "--trainer.limit_val_batches=2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert val.returncode == 0, val.stderr[-3000:]
    assert "val/ce" in val.stdout
    # the tiny config's evaluation callbacks ran in fit (steps 2 and 4) and again under validate
    for task in ("captioning", "vqa"):
        reports = sorted(p.parent.parent.name + "/" + p.name for p in root.rglob(f"eval/{task}-step*.json"))
        assert reports == [f"version_0/{task}-step0000002.json", f"version_0/{task}-step0000004.json",
                           f"version_1/{task}-step0000004.json"], reports  # fmt: skip
    assert "eval/vqa_4shot" in val.stdout

    # The checkpoint reloads on its own (tokenizer included) and generates.
    model = EmuModel.load_from_checkpoint(ckpts[-1], map_location="cpu")
    from emu_lightning.data.world import ShapesWorld

    image = ShapesWorld(image_size=32).image("val", 0)
    assert len(model.caption(image[None], max_new_tokens=3)) == 1
    import torch

    saved = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["hyper_parameters"]
    assert saved["resampler"]["class_path"].endswith("CausalTransformer")  # the config, not pickled modules
    assert "_instantiator" in saved
    assert json.dumps(saved)  # plain data
