"""Two processes on CPU (gloo), through the real `emu-lightning` command: a fit with the evaluation callbacks finishes
(it used to hang at its first validation), and its scores equal a one-process `validate` of the same checkpoint."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from emu_lightning.distributed import gather_dicts, on_all_ranks, rank_zero_first

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "emu_lightning.cli"]

# Two sources with two units each (so both ranks read their own), small held-out sets, short generations.
OVERLAY = """
trainer:
  max_steps: 2
  val_check_interval: 2
  limit_val_batches: 1.0
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: logs}
  callbacks:
    - class_path: emu_lightning.callbacks.FinalCheckpoint
      init_args: {path: final.ckpt}
    - class_path: emu_lightning.shapesworld.ShapesWorldCaptioningEval
      init_args: {shots: [0, 2], seeds: [0], num_queries: 10, support: 12, generation: {max_new_tokens: 6}}
    - class_path: emu_lightning.shapesworld.ShapesWorldVQAEval
      init_args: {shots: [0, 2], seeds: [0], num_queries: 10, support: 4, generation: {max_new_tokens: 3}}
data:
  class_path: emu_lightning.data.MixtureDataModule
  init_args:
    batch_sizes: {shapes: 4, pairs: 2}
    val_source: shapes
    sources:
      shapes:
        class_path: emu_lightning.shapesworld.ShapesWorldDataModule
        init_args: {image_size: 32, batch_size: 1, val_size: 8, vqa_prob: 0.25, examples_per_sample: 2}
      pairs:
        class_path: emu_lightning.data.StreamingDataModule
        init_args:
          reader:
            class_path: emu_lightning.data.ImageTextShards
            init_args: {urls: "data/pairs/{00000..00001}.tar", image_size: 32}
          writer: {class_path: emu_lightning.shapesworld.ShapesWorldWriter, init_args: {train: 16}}
"""


def _run(args, cwd, timeout=420):
    try:
        out = subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as err:  # the hang this test exists for
        raise AssertionError(f"{args[0]} did not finish in {timeout} s:\n{(err.stderr or b'')[-3000:]}") from None
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _scores(folder: Path, step: int) -> dict[str, dict]:
    return {task: json.loads((folder / "eval" / f"{task}-step{step:07d}.json").read_text())["shots"]
            for task in ("captioning", "vqa")}  # fmt: skip


def _val_ce(folder: Path) -> float:
    rows = [r for r in csv.DictReader((folder / "metrics.csv").open()) if r.get("val/ce")]
    return float(rows[-1]["val/ce"])


def test_two_process_fit_with_evaluations_finishes_with_the_one_process_scores(tmp_path):
    (tmp_path / "overlay.yaml").write_text(OVERLAY)
    configs = [
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--config",
        "overlay.yaml",
        "--trainer.default_root_dir=run",
    ]
    _run(["fit", *configs, "--trainer.devices=2", "--trainer.strategy=ddp"], tmp_path)
    two = next((tmp_path / "logs").glob("lightning_logs/version_0"))
    final = tmp_path / "run" / "final.ckpt"
    assert final.is_file()
    _run(["validate", *configs, f"--ckpt_path={final}"], tmp_path)
    one = next((tmp_path / "logs").glob("lightning_logs/version_1"))

    two_scores, one_scores = _scores(two, 2), _scores(one, 2)
    assert two_scores == one_scores  # every query predicted once, by one of the two ranks, and scored on the union
    assert two_scores["vqa"]["2"]["num_evaluated"] == 10 and two_scores["captioning"]["0"]["num_evaluated"] == 10
    # the held-out loss is the mean over both ranks' halves of the validation set (batches of one sample, so that the
    # halves batch alike), as one process sees it whole
    assert _val_ce(two) == pytest.approx(_val_ce(one), rel=1e-5)


def test_collectives_run_in_one_process():
    assert on_all_ranks(lambda: 3, "three") == 3
    assert rank_zero_first(lambda: "x", "x") == "x"
    assert gather_dicts(lambda: {1: "a"}, "one") == {1: "a"}
    with pytest.raises(KeyError):
        on_all_ranks(lambda: {}["missing"], "a lookup")
