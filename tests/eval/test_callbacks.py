"""Each evaluation callback runs inside a tiny fit and in `validate`, logs, and writes its reports."""

import json

import lightning as L
import pytest
from conftest import make_model

from emu_lightning.data.modules import ShapesWorldDataModule
from emu_lightning.eval.callbacks import CaptioningEval, VQAEval


def fit_with(tmp_path, callback, steps=2):
    model = make_model(max_length=256)
    dm = ShapesWorldDataModule(image_size=16, batch_size=4, val_size=8, train_size=64)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=1, val_check_interval=steps, callbacks=[callback],
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, dm)
    return trainer, model, dm


def test_vqa_eval_runs_in_a_tiny_fit_and_in_validate(tmp_path):
    cb = VQAEval(every_n_steps=1, shots=[0, 2], seeds=[0, 1], num_queries=12, shapesworld_support=4,
                 generation={"max_new_tokens": 2}, strict=True)  # fmt: skip
    trainer, model, dm = fit_with(tmp_path, cb)
    # every 1 step (steps 1, 2) and at the validation run at step 2
    assert [h["step"] for h in cb.history] == [1, 2, 2]
    last = cb.history[-1]
    assert set(last["shots"]) == {0, 2} and last["shots"][2]["num_evaluated"] == 12
    assert 0.0 <= last["shots"][0]["mean"] <= 100.0
    reports = sorted((tmp_path / "lightning_logs").rglob("eval/vqa-step*.json"))
    assert reports and json.loads(reports[-1].read_text())["shots"]["2"]["per_seed"]
    assert (reports[-1].with_suffix(".md")).read_text().startswith("# vqa at step 2")
    metrics = (next((tmp_path / "lightning_logs").rglob("metrics.csv"))).read_text()
    assert "eval/vqa_2shot" in metrics and "eval/vqa_0shot_std" in metrics
    trainer.validate(model, dm)
    assert len(cb.history) == 4


def test_captioning_eval_with_rices_and_text_only_zero_shot(tmp_path):
    cb = CaptioningEval(shots=[0, 2], num_queries=4, shapesworld_support=10, selection="rices",
                        zero_shot_text_demos=2, generation={"max_new_tokens": 4}, strict=True)  # fmt: skip
    fit_with(tmp_path, cb)
    (result,) = cb.history
    assert result["selection"] == "rices" and result["shots"][0]["num_evaluated"] == 4
    assert result["shots"][2]["mean"] >= 0.0


def test_failures_are_logged_unless_strict(tmp_path):
    bad = CaptioningEval(karpathy_json=str(tmp_path / "missing.json"), image_root=str(tmp_path), shots=[0])
    with pytest.warns(UserWarning, match="missing.json"):
        fit_with(tmp_path, bad)  # training goes on
    strict = CaptioningEval(karpathy_json=str(tmp_path / "missing.json"), image_root=str(tmp_path), strict=True)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        fit_with(tmp_path / "strict", strict)
