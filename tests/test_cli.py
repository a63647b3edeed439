"""The `emu-lightning` command: every config parses, the tiny config fits end to end, ablations swap parts."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emu_lightning.cli import EmuCLI, cli
from emu_lightning.components.llm import LoRA
from emu_lightning.model import EmuModel
from emu_lightning.shapesworld import find_world

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
ABLATIONS = [p for p in CONFIGS if "ablations" in p.parts]
OVERLAYS = [p for p in CONFIGS if "eval" in p.parts]  # stacked on a model config
STAGES = [p for p in CONFIGS if "stages" in p.parts]  # stacked on the tiny config
ON_14B = [Path("configs/emu-i.yaml")]  # stacked on the 14B config
BASES = [p for p in CONFIGS if not {"ablations", "scale"} & set(p.parts) and p not in OVERLAYS + STAGES + ON_14B]


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


@pytest.mark.parametrize("overlay", ON_14B, ids=str)
def test_14b_overlays_parse_on_the_14b_config(overlay):
    cfg = _parse(Path("configs/emu-14b.yaml"), overlay)
    assert cfg.model.stage == "instruct" and cfg.model.decoder is None and cfg.model.llm.init_args.lora["r"] == 16


@pytest.mark.parametrize("overlay", OVERLAYS, ids=str)
def test_eval_overlays_parse_on_the_tiny_config(overlay):
    cfg = _parse(Path("configs/tiny.yaml"), overlay)
    names = [c.class_path.rsplit(".", 1)[1] for c in cfg.trainer.callbacks]
    assert any(n.endswith("CaptioningEval") for n in names) and any(n.endswith("VQAEval") for n in names)


def test_the_paper_table_config_builds_all_eight_benchmarks():
    run = cli(["--config", "configs/tiny.yaml", "--config", "configs/eval/paper-table.yaml"], run=False)
    evals = [c for c in run.trainer.callbacks if hasattr(c, "task_name")]
    assert [c.task_name for c in evals] == ["captioning", "vqa", "okvqa", "vizwiz", "visdial", "msvdqa", "msrvttqa",
                                            "nextqa"]  # fmt: skip
    # the paper's protocol: zero-shot everywhere, beam 5, every question; few-shot RICES where the paper reports it
    for c in evals:
        if c.task_name == "visdial":
            assert c.num_rounds is None and c.template_name == "pretrained"
            continue
        assert c.num_queries is None and c.task_args["shots"][0] == 0 and c.task_args["generation"]["num_beams"] == 5
        few = c.task_name in ("vqa", "vizwiz")
        assert c.task_args["shots"] == ((0, 4, 8) if few else (0,))
        assert c.task_args["selection"] == ("rices" if few else "random")


STAGE_FROZEN = {
    "pretrain": set(),
    "decoder": {"vision", "resampler", "llm"},
    "instruct": {"vision", "resampler", "decoder"},
}
"""Each stage's frozen components (the paper's); the instruct stage's language model trains LoRA adapters only."""


def stage_configs(stage: str) -> list[Path]:
    """The stack a stage runs with (README): the instruct stage keeps the decoder stage's decoder."""
    stack = {"pretrain": ["pretrain"], "decoder": ["decoder"], "instruct": ["decoder", "instruct"]}[stage]
    return [Path("configs/tiny.yaml")] + [Path(f"configs/stages/{s}.yaml") for s in stack]


def test_the_three_stages_have_configs():
    assert {p.stem for p in STAGES} == set(STAGE_FROZEN)


@pytest.mark.parametrize("stage", sorted(STAGE_FROZEN))
def test_stage_overlays_build_with_the_papers_frozen_sets(stage):
    args = [a for c in stage_configs(stage) for a in ("--config", str(ROOT / c))]
    # each stage names the previous one's final checkpoint; none exists here
    run = cli([*args, "--trainer.logger", "false", "--model.init_checkpoint", "null"], run=False)
    assert run.model.stage == stage and set(run.model.frozen) == STAGE_FROZEN[stage]
    assert (run.model.decoder is not None) == (stage != "pretrain")
    trainable = {n.split(".")[0] for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == {"pretrain": {"vision", "resampler", "llm"}, "decoder": {"decoder"}, "instruct": {"llm"}}[stage]
    if stage == "instruct":
        assert run.model.llm.lora == LoRA(r=16, alpha=16, dropout=0.05)
        assert all("lora_" in n for n, p in run.model.named_parameters() if p.requires_grad)
    chained = yaml.safe_load((ROOT / f"configs/stages/{stage}.yaml").read_text())["model"]["init_checkpoint"]
    previous = {"pretrain": None, "decoder": "runs/tiny/final.ckpt", "instruct": "runs/tiny-decoder/final.ckpt"}
    assert chained == previous[stage]


@pytest.mark.parametrize("ablation", ABLATIONS, ids=str)
def test_ablations_hold_only_differences_and_swap_a_component(ablation):
    text = yaml.safe_load((ROOT / ablation).read_text())
    assert set(text) == {"model"} and len(text["model"]) == 1  # one component, nothing else
    cfg = _parse(Path("configs/tiny.yaml"), ablation)
    name = text["model"]["resampler"]["class_path"].rsplit(".", 1)[1]  # jsonargparse may shorten the import path
    assert cfg.model.resampler.class_path.rsplit(".", 1)[1] == name
    run = cli(
        ["--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / ablation), "--trainer.logger", "false"],
        run=False,
    )
    assert type(run.model.resampler).__name__ == text["model"]["resampler"]["class_path"].rsplit(".", 1)[1]
    world = find_world(run.datamodule, run.model.vision.image_size)
    batch = run.model.sequencer([[world.image("val", 0), "a red circle."]])
    assert run.model.losses(batch)["loss"].isfinite()


def test_unknown_component_class_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  resampler:\n    class_path: emu_lightning.components.resampler.NoSuchResampler\n")
    with pytest.raises(SystemExit):
        _parse(Path("configs/tiny.yaml"), bad)
    assert "NoSuchResampler" in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end run through subprocesses (about a minute): `make test-slow`
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
        "--data.init_args.sources.pairs.init_args.writer.init_args.train=40",
        "--data.init_args.sources.mmc4.init_args.writer.init_args.train=8",
        "--data.init_args.sources.webvid.init_args.writer.init_args.train=8",
        "--data.init_args.sources.storyboard.init_args.writer.init_args.train=8",
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
    from emu_lightning.shapesworld.world import ShapesWorld

    image = ShapesWorld(image_size=32).image("val", 0)
    assert len(model.caption(image[None], max_new_tokens=3)) == 1
    import torch

    saved = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["hyper_parameters"]
    assert saved["resampler"]["class_path"].endswith("CausalTransformer")  # the config, not pickled modules
    assert "_instantiator" in saved
    assert json.dumps(saved)  # plain data


@pytest.mark.slow  # three stages end to end through subprocesses (over a minute): `make test-slow`
def test_the_three_stages_chain_from_the_command_line_and_chat_answers(tmp_path):
    """README's order: pretrain, decoder, instruct, each starting from the previous stage's final.ckpt by its config
    key (relative paths, so everything lands under this test's folder); then `emu-lightning chat` answers."""
    exe = [sys.executable, "-m", "emu_lightning.cli"]
    quick = ["--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    small = {
        "pretrain": [f"--data.init_args.sources.{s}.init_args.writer.init_args.train={n}"
                     for s, n in (("pairs", 24), ("mmc4", 4), ("webvid", 4), ("storyboard", 4))],
        "decoder": ["--model.decoder_sketch_fit=2", "--data.init_args.batch_size=4"],
        "instruct": ["--data.init_args.writer.init_args.train=16", "--data.init_args.writer.init_args.val=4",
                     "--data.init_args.batch_size=4"],
    }  # fmt: skip
    for stage in ("pretrain", "decoder", "instruct"):
        configs = [a for c in stage_configs(stage) for a in ("--config", str(ROOT / c))]
        run = subprocess.run([*exe, "fit", *configs, *quick, *small[stage]], capture_output=True, text=True,
                             cwd=tmp_path)  # fmt: skip
        assert run.returncode == 0, f"{stage}:\n{run.stderr[-3000:]}"
    finals = {s: tmp_path / "runs" / s / "final.ckpt" for s in ("tiny", "tiny-decoder", "tiny-instruct")}
    assert all(p.is_file() for p in finals.values()), sorted(map(str, tmp_path.rglob("*.ckpt")))
    import torch

    states = {s: torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for s, p in finals.items()}
    # each stage trained its own part and carried the rest over unchanged
    for key, value in states["tiny"].items():
        assert torch.equal(value, states["tiny-decoder"][key]), key
    for key, value in states["tiny-decoder"].items():
        wrapped = re.sub(r"([qkvo]_proj)\.weight$", r"\1.base_layer.weight", key)  # under a LoRA layer
        other = states["tiny-instruct"][wrapped]
        if other.shape != value.shape:  # Emu-I's [USER] and [ASSISTANT] rows, appended at the mean of the others
            n = value.shape[0]
            assert other.shape[0] == n + 2 and torch.equal(other[:n], value), key
            assert torch.allclose(other[n:], value.mean(0, keepdim=True).expand(2, -1)), key
        else:
            assert torch.equal(value, other), key
    assert any("lora_B" in k for k in states["tiny-instruct"])
    assert any(k.startswith("decoder.") for k in states["tiny-decoder"])

    from torchvision.utils import save_image

    from emu_lightning.shapesworld.world import ShapesWorld

    save_image(ShapesWorld(image_size=32).image("val", 0), tmp_path / "scene.png")
    for stage in ("tiny", "tiny-decoder"):  # a checkpoint loads without the earlier stages' files
        finals[stage].unlink()
    chat = [sys.executable, "-m", "emu_lightning.cli", "chat", "--ckpt", str(finals["tiny-instruct"]),
            "--max-new-tokens", "4"]  # fmt: skip
    text = "how many shapes are there? scene.png\nand what colour is the shape in the top left?\n"
    answers = []
    for extra in ([], ["--no-merge"]):
        out = subprocess.run(chat + extra, input=text, capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.splitlines()
        assert [line.split(":")[0] for line in lines] == ["user", "assistant", "user", "assistant"], out.stdout
        answers.append(lines)
    assert answers[0] == answers[1]  # merged adapters answer as the unmerged ones do
    missing = subprocess.run(chat, input="what is in missing.png", capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "no such file: 'missing.png'" in missing.stderr


def test_a_checkpoint_given_to_the_cli_replaces_the_stage_init_checkpoint(tmp_path):
    """`fit --ckpt_path` (resume) and `validate --ckpt_path` take every weight from that checkpoint: the stage's
    init_checkpoint (an earlier stage's file, here missing) is not read."""

    class Stop(Exception):
        pass

    class Capture(EmuCLI):
        def instantiate_classes(self) -> None:
            raise Stop(self.config[self.subcommand].model.init_checkpoint)

    configs = [a for c in stage_configs("instruct") for a in ("--config", str(ROOT / c))]
    import torch

    checkpoint = tmp_path / "instruct.ckpt"  # a Lightning checkpoint without hyperparameters to compare
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6"}, checkpoint)
    for subcommand in ("fit", "validate"):
        with pytest.raises(Stop) as stop:
            cli([subcommand, *configs, "--ckpt_path", str(checkpoint)], cli_class=Capture)
        assert stop.value.args == (None,)
    with pytest.raises(FileNotFoundError, match="--ckpt_path .*missing.ckpt' does not exist"):
        cli(["fit", *configs, "--ckpt_path", str(tmp_path / "missing.ckpt")], cli_class=Capture)
    with pytest.raises(Stop) as stop:
        cli(["fit", *configs], cli_class=Capture)
    assert stop.value.args == ("runs/tiny-decoder/final.ckpt",)
