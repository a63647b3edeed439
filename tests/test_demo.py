import json

import pytest

from emu_lightning import demo


def test_demo_runs_and_the_loss_falls(tmp_path, capsys):
    results = demo.main(
        [
            "--num-eval", "8", "--show", "3",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=60", "--trainer.val_check_interval=60",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.init_args.val_size=64",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert results["steps"] == 60
    assert results["heldout_ce_before"] > 5.0  # about log(vocabulary) untrained
    assert results["heldout_ce_after"] < 0.5 * results["heldout_ce_before"]
    assert "held-out cross-entropy" in out and "val-0" in out
    saved = json.loads(next(tmp_path.rglob("demo.json")).read_text())
    assert saved["num_eval"] == 8 and len(saved["samples"]) == 3


@pytest.mark.slow
def test_full_demo_learns_to_caption(tmp_path):
    """The README's figures: the full 5-minute demo names the right coloured shapes most of the time."""
    results = demo.main([f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert results["heldout_ce_after"] < 0.1 * results["heldout_ce_before"]
    assert results["caption_accuracy"] > 0.5
