"""Text and images through every kind of logger (TensorBoard and CSV for real; W&B and MLflow through fakes, as they
are not installed), the learning-rate monitor with and without a logger, and the progress bars' switches."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from test_callbacks import SceneRenderer, fit_generator

from emu_lightning import progress
from emu_lightning.progress import progress_bar
from emu_lightning.reporting import LearningRateMonitor, log_image, log_text, markdown_table
from emu_lightning.shapesworld import ShapesWorldTextToImageEval

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["id", "prediction", "references"]
ROWS = [[1, "a red circle", "a red circle / a small red circle"], [2, "two | three", "2"]]
IMAGE = torch.rand(3, 8, 12)


def trainer_with(logger, tmp_path):
    return L.Trainer(logger=logger, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False)  # fmt: skip


def test_markdown_table_escapes_cells():
    assert markdown_table(COLUMNS, ROWS).splitlines() == [
        "| id | prediction | references |",
        "|---|---|---|",
        "| 1 | a red circle | a red circle / a small red circle |",
        "| 2 | two \\| three | 2 |",
    ]


def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_gets_text_and_images(tmp_path):
    trainer = trainer_with(TensorBoardLogger(tmp_path), tmp_path)
    assert log_text(trainer, "eval/vqa_samples", COLUMNS, ROWS, step=400) == []
    assert log_image(trainer, "eval/text_to_image", IMAGE, step=400) == []
    trainer.logger.experiment.flush()
    events = read_tensorboard(trainer.logger.log_dir)
    (image,) = events.Images("eval/text_to_image")
    assert (image.step, image.width, image.height) == (400, 12, 8)
    (text,) = events.Tensors("eval/vqa_samples/text_summary")
    assert text.step == 400 and "| 2 | two \\| three | 2 |" in text.tensor_proto.string_val[0].decode()
    assert not list(tmp_path.rglob("media"))  # nothing written beside


def test_csv_and_other_loggers_get_files(tmp_path):
    trainer = trainer_with(CSVLogger(tmp_path), tmp_path)
    (text,) = log_text(trainer, "eval/vqa_samples", COLUMNS, ROWS, step=400)
    (png,) = log_image(trainer, "eval/text_to_image", IMAGE, step=400)
    assert text == Path(trainer.logger.log_dir) / "media" / "eval-vqa_samples-step0000400.md"
    assert text.read_text() == "# eval/vqa_samples at step 400\n\n" + markdown_table(COLUMNS, ROWS)
    assert png.name == "eval-text_to_image-step0000400.png"
    from PIL import Image

    saved = torch.from_numpy(__import__("numpy").asarray(Image.open(png))).permute(2, 0, 1)
    assert torch.equal(saved, (IMAGE * 255).round().to(torch.uint8))
    # no logger: nothing at all
    quiet = trainer_with(False, tmp_path / "quiet")
    assert log_text(quiet, "k", COLUMNS, ROWS, 1) == [] and log_image(quiet, "k", IMAGE, 1) == []
    assert not (tmp_path / "quiet").exists()
    with pytest.raises(ValueError, match="row 0 has 2 cells for 3 columns"):
        log_text(trainer, "k", COLUMNS, [[1, 2]], 1)
    with pytest.raises(ValueError, match=r"expected an image \(3, H, W\)"):
        log_image(trainer, "k", torch.rand(2, 3, 8, 8), 1)


class FakeWandb(WandbLogger):
    """WandbLogger's API without wandb (not installed): records the calls."""

    def __init__(self) -> None:  # no super().__init__: it needs wandb
        self.calls = []

    def log_text(self, key, columns=None, data=None, dataframe=None, step=None):
        self.calls.append(("text", key, columns, data, step))

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append(("image", key, images, step))


class FakeMlflowClient:
    def __init__(self) -> None:
        self.calls = []

    def log_text(self, run_id, text, artifact_file):
        self.calls.append(("text", run_id, text, artifact_file))

    def log_image(self, run_id, image, artifact_file=None, key=None, step=None):
        self.calls.append(("image", run_id, image, artifact_file))


class FakeMlflow(MLFlowLogger):
    """MLFlowLogger's API without mlflow (not installed): its client records the calls."""

    def __init__(self) -> None:  # no super().__init__: it needs mlflow
        self.client = FakeMlflowClient()

    @property
    def experiment(self):
        return self.client

    @property
    def run_id(self):
        return "run-7"


def test_wandb_and_mlflow_get_text_and_images(tmp_path):
    wandb, mlflow = FakeWandb(), FakeMlflow()
    trainer = trainer_with([wandb, mlflow], tmp_path)
    log_text(trainer, "eval/vqa_samples", COLUMNS, ROWS, step=400)
    log_image(trainer, "eval/text_to_image", IMAGE, step=400)
    text, image = wandb.calls
    assert text == ("text", "eval/vqa_samples", COLUMNS, [[1, "a red circle", ROWS[0][2]], [2, "two | three", "2"]],
                    400)  # fmt: skip
    assert image[:2] == ("image", "eval/text_to_image") and image[3] == 400
    assert image[2][0].shape == (8, 12, 3) and image[2][0].dtype.name == "uint8"
    text, image = mlflow.client.calls
    assert text == ("text", "run-7", markdown_table(COLUMNS, ROWS), "eval/vqa_samples/step0000400.md")
    assert image[:2] == ("image", "run-7") and image[3] == "eval/text_to_image/step0000400.png"
    assert image[2].shape == (8, 12, 3)
    assert not list(tmp_path.rglob("media"))


def test_other_ranks_log_nothing(tmp_path, monkeypatch):
    wandb = FakeWandb()
    trainer = trainer_with(wandb, tmp_path)
    monkeypatch.setattr(type(trainer), "is_global_zero", property(lambda self: False))
    log_text(trainer, "k", COLUMNS, ROWS, 1)
    log_image(trainer, "k", IMAGE, 1)
    assert wandb.calls == []


def test_text_to_image_grid_and_prompts_reach_tensorboard(tmp_path):
    """The evaluation's grid goes through the logger (here TensorBoard, for real) with the prompts of its cells,
    beside the learning rate of the monitor in the configs."""
    cb = ShapesWorldTextToImageEval(every_n_steps=2, on_validation=False, num_prompts=8, steps=2, strict=True)
    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, callbacks=[cb, LearningRateMonitor(logging_interval="step")],
                        logger=TensorBoardLogger(tmp_path), log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(SceneRenderer(), data)
    trainer.logger.experiment.flush()
    events = read_tensorboard(trainer.logger.log_dir)
    (image,) = events.Images("eval/text_to_image")
    assert image.step == 2 and image.width == 2 + 8 * (32 + 2)  # make_grid: 8 per row, 2-pixel padding
    (text,) = events.Tensors("eval/text_to_image_prompts/text_summary")
    assert "| 0 | 0 | " + cb._prompts[0][1] + " |" in text.tensor_proto.string_val[0].decode()
    assert [s.value for s in events.Scalars("lr-SGD")] == pytest.approx([0.1, 0.1])


def test_learning_rate_monitor_without_a_logger_notes_and_goes_on(tmp_path, caplog):
    lightning_monitor = L.pytorch.callbacks.LearningRateMonitor(logging_interval="step")
    with pytest.raises(Exception, match="no logger"):  # why the configs use this subclass
        fit_generator(tmp_path / "lightning", SceneRenderer(), lightning_monitor)
    monitor = LearningRateMonitor(logging_interval="step")
    fit_generator(tmp_path / "ours", SceneRenderer(), monitor)  # logger=False: trains to the end
    assert "the learning rate is not logged" in caplog.text
    assert monitor.lrs == {}


def _callbacks(*configs):
    merged = {}
    for config in configs:
        merged.update(yaml.safe_load((ROOT / config).read_text()).get("trainer", {}))
    return [c["class_path"] for c in merged.get("callbacks", [])]


@pytest.mark.parametrize(
    "stack",
    [
        ["configs/tiny.yaml"],
        ["configs/tiny.yaml", "configs/stages/pretrain.yaml"],
        ["configs/tiny.yaml", "configs/stages/decoder.yaml"],
        ["configs/tiny.yaml", "configs/stages/decoder.yaml", "configs/stages/instruct.yaml"],
        ["configs/emu-14b.yaml"],
        ["configs/emu-14b.yaml", "configs/emu-i.yaml"],
        ["configs/emu-14b.yaml", "configs/scale/emu-14b-fsdp.yaml"],
        ["configs/emu-14b.yaml", "configs/stages/decoder.yaml", "configs/scale/emu-14b-decoder-fsdp.yaml"],
        ["configs/emu-14b.yaml", "configs/stages/decoder.yaml", "configs/stages/instruct.yaml",
         "configs/scale/emu-14b-instruct-fsdp.yaml"],
    ],
    ids=lambda stack: "+".join(Path(c).stem for c in stack),
)  # fmt: skip
def test_every_training_config_monitors_the_learning_rate(stack):
    """A later config's callbacks list replaces the earlier one: every stack a run trains with keeps the monitor."""
    assert _callbacks(*stack).count("emu_lightning.reporting.LearningRateMonitor") == 1


def test_progress_bars_switch_off_and_stay_quiet_in_logs(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.enabled()
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv(progress.ENV, off)
        assert not progress.enabled() and progress_bar(range(3)).disable
    monkeypatch.setenv(progress.ENV, "1")
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert not progress.enabled()  # only the global rank 0 shows bars
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    # stderr is not a terminal here (captured): a short loop prints nothing, a long one a line every LOG_INTERVAL s
    bar = progress_bar(range(5), desc="short", unit="query")
    assert not bar.disable and bar.delay == bar.mininterval == progress.LOG_INTERVAL >= 10
    assert sum(bar) == 10
    with progress_bar(total=4, desc="manual") as manual:
        manual.update(4)
    assert capsys.readouterr().err == ""
