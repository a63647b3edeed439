"""emu-lightning ablate: the runs it plans, what it reads back from each run, the report, and a real tiny ablation."""

import csv
import json
from pathlib import Path

import pytest

from emu_lightning import ablate
from emu_lightning.ablate import Run, fit_command, plan, read_metrics, report_markdown, run_overlay, summarize

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
MLP = str(ROOT / "configs" / "ablations" / "resampler-mlp.yaml")
PERCEIVER = str(ROOT / "configs" / "ablations" / "resampler-perceiver.yaml")


def test_plan_runs_every_variant_at_each_seed_on_the_base(tmp_path):
    runs = plan([TINY], [PERCEIVER, MLP], [0, 1], tmp_path)
    assert [(r.variant, r.seed) for r in runs] == [
        ("base", 0), ("resampler-perceiver", 0), ("resampler-mlp", 0),
        ("base", 1), ("resampler-perceiver", 1), ("resampler-mlp", 1),
    ]  # fmt: skip
    assert runs[0].configs == (TINY,) and runs[2].configs == (TINY, MLP)
    assert runs[4].folder == tmp_path / "resampler-perceiver" / "seed1"
    with pytest.raises(ValueError, match=r"repeated: \['resampler-mlp'\]"):
        plan([TINY], [MLP, MLP], [0], tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        plan([TINY], ["nope.yaml"], [0], tmp_path)
    with pytest.raises(ValueError, match="base config"):
        plan([], [MLP], [0], tmp_path)


def test_each_run_sets_its_seed_folder_loggers_and_the_same_step_budget(tmp_path):
    run = Run("resampler-mlp", 3, (TINY, MLP), tmp_path / "resampler-mlp" / "seed3")
    overlay = run_overlay(run, max_steps=None, keep_time_limit=False)
    assert overlay["seed_everything"] == 3 and overlay["trainer"]["max_time"] is None
    assert overlay["trainer"]["default_root_dir"] == str(run.folder) and "max_steps" not in overlay["trainer"]
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in overlay["trainer"]["logger"]] == [
        "CSVLogger",
        "TensorBoardLogger",
    ]
    kept = run_overlay(run, max_steps=50, keep_time_limit=True)["trainer"]
    assert "max_time" not in kept and kept["max_steps"] == 50
    command = fit_command(run, ["--trainer.val_check_interval", "10"])
    assert command[-8:] == ["--config", TINY, "--config", MLP, "--config", str(run.folder / "run.yaml"),
                            "--trainer.val_check_interval", "10"][-8:]  # fmt: skip
    assert "--ckpt_path" in fit_command(run, [], tmp_path / "last.ckpt")


def _write_csv(path, rows):
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_metrics_count_optimizer_steps_and_a_resumed_attempt_keeps_its_later_values(tmp_path):
    _write_csv(tmp_path / "a.csv", [{"epoch": 0, "step": 0, "train/ce": 5.0}, {"epoch": 0, "step": 1, "train/ce": 4.0},
                                    {"epoch": 0, "step": 1, "val/ce": 4.5, "eval/vqa_0shot": 10.0}])  # fmt: skip
    _write_csv(tmp_path / "b.csv", [{"epoch": 0, "step": 1, "train/ce": 3.9}, {"epoch": 0, "step": 3, "val/ce": 3.0,
                                    "eval/vqa_0shot": 30.0}])  # fmt: skip
    curves = read_metrics(tmp_path / "a.csv", tmp_path / "b.csv")
    assert curves == {"train/ce": [(1, 5.0), (2, 3.9)], "val/ce": [(2, 4.5), (4, 3.0)],
                      "eval/vqa_0shot": [(2, 10.0), (4, 30.0)]}  # fmt: skip


def _result(variant, seed, cider, vqa, ce, steps=100):
    return {"variant": variant, "seed": seed, "steps": steps, "step_time": 0.1 + seed / 100, "params": 2_000_000,
            "trainable_params": 2_000_000, "final": {"train/ce": ce, "eval/captioning_4shot": cider,
            "eval/vqa_4shot": vqa}, "curves": {"eval/vqa_4shot": [[50, vqa / 2], [100, vqa]]}}  # fmt: skip


def test_the_report_gives_mean_and_std_over_seeds(tmp_path):
    results = [_result("base", 0, 100.0, 40.0, 1.0), _result("base", 1, 110.0, 50.0, 1.2),
               _result("resampler-mlp", 0, 80.0, 30.0, 1.5)]  # fmt: skip
    rows = summarize(results)
    assert [r["variant"] for r in rows] == ["base", "resampler-mlp"] and rows[0]["seeds"] == 2
    assert rows[0]["eval/captioning_4shot"] == pytest.approx((105.0, 7.0710678))  # sample std over the 2 seeds
    assert rows[0]["train/ce"] == pytest.approx((1.1, 0.1414214)) and rows[1]["eval/vqa_4shot"] == (30.0, 0.0)
    table = report_markdown(rows, planned_steps=100)
    assert "| base | 2 | 2.00 | 100 | 0.105 ± 0.007 | 1.100 ± 0.141 | 105.0 ± 7.1 | 45.0 ± 7.1 |" in table
    assert "| resampler-mlp | 1 | 2.00 | 100 | 0.100 | 1.500 | 80.0 | 30.0 |" in table
    for r in results:
        folder = tmp_path / r["variant"] / f"seed{r['seed']}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(r))
    ablate.write_report(tmp_path, 100)
    with open(tmp_path / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["variant"] for row in table] == ["base", "resampler-mlp"]
    assert float(table[0]["eval/captioning_4shot_mean"]) == 105.0 and float(table[1]["eval/vqa_4shot_std"]) == 0.0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![evaluation curves](curves.png)" in (tmp_path / "report.md").read_text()


QUICK = """
trainer:
  max_steps: 2
  val_check_interval: 1
  limit_val_batches: 1
  log_every_n_steps: 1
  callbacks:
    - class_path: emu_lightning.shapesworld.ShapesWorldVQAEval
      init_args: {shots: [0], seeds: [0], num_queries: 4, support: 8, generation: {num_beams: 1, max_new_tokens: 2}}
data:
  init_args: {batch_size: 4}
"""


def test_a_tiny_ablation_trains_reports_and_skips_what_is_done(tmp_path, capsys):
    quick = tmp_path / "quick.yaml"
    quick.write_text(QUICK)
    out = tmp_path / "ablation"
    args = ["--config", TINY, "--config", str(quick), "--variant", MLP, "--seeds", "1", "--out", str(out)]
    assert ablate.main(args) == 0
    results = ablate.load_results(out)
    assert [(r["variant"], r["seed"], r["steps"]) for r in results] == [("base", 0, 2), ("resampler-mlp", 0, 2)]
    base, mlp = results
    assert base["params"] > mlp["params"] > 0  # the MLP projector is smaller than the Causal Transformer
    assert set(base["curves"]["eval/vqa_0shot"][i][0] for i in range(2)) == {1, 2}  # evaluated after steps 1 and 2
    assert base["step_time"] > 0 and {"train/ce", "train/mse", "val/ce", "eval/vqa_0shot"} <= set(base["final"])
    for r in results:  # the scores are the run's own evaluation reports'
        report = json.loads((out / r["variant"] / "seed0" / "eval" / "vqa-step0000002.json").read_text())
        assert r["final"]["eval/vqa_0shot"] == pytest.approx(report["shots"]["0"]["mean"])
    table = (out / "report.md").read_text()
    assert "| base | 1 |" in table and "| resampler-mlp | 1 |" in table and (out / "curves.png").is_file()
    capsys.readouterr()
    assert ablate.main(args) == 0  # again: nothing trains
    assert capsys.readouterr().out.count("result there") == 2
