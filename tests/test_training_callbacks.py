"""FinalCheckpoint never replaces another run's weights; SIGTERM saves a resumable checkpoint and exits non-zero."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_model

from emu_lightning.callbacks import FinalCheckpoint
from emu_lightning.shapesworld import ShapesWorldDataModule

ROOT = Path(__file__).resolve().parents[1]


def _fit(root: Path, steps: int, final: FinalCheckpoint, ckpt_path: str | None = None) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, default_root_dir=root, logger=False,
                        callbacks=[final, L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpts", save_last=True)],
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(make_model(), ShapesWorldDataModule(image_size=16, batch_size=2, train_size=32), ckpt_path=ckpt_path)
    return trainer


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_final_checkpoint_never_replaces_another_runs_weights(tmp_path):
    final = tmp_path / "final.ckpt"
    _fit(tmp_path, 3, FinalCheckpoint("final.ckpt"))
    assert _step(final) == 3
    assert json.loads((tmp_path / ".final.ckpt.json").read_text())["step"] == 3
    # a later, unrelated 2-step fit with the same root stops before its first step and leaves the file alone
    with pytest.raises(FileExistsError, match=f"{final} holds the final weights of another run \\(step 3"):
        _fit(tmp_path, 2, FinalCheckpoint("final.ckpt"))
    assert _step(final) == 3
    # the run itself, resumed, replaces its own file (its identity travels in the checkpoint)
    _fit(tmp_path, 5, FinalCheckpoint("final.ckpt"), ckpt_path=str(tmp_path / "ckpts" / "last.ckpt"))
    assert _step(final) == 5
    # a file FinalCheckpoint did not write is not replaced either; overwrite: true replaces it, with a warning
    final.write_bytes(b"someone else's")
    (tmp_path / ".final.ckpt.json").unlink()
    with pytest.raises(FileExistsError, match="a file that FinalCheckpoint did not write"):
        _fit(tmp_path, 1, FinalCheckpoint("final.ckpt"))
    with pytest.warns(UserWarning, match="replacing .*final.ckpt"):
        _fit(tmp_path, 1, FinalCheckpoint("final.ckpt", overwrite=True))
    assert _step(final) == 1


STEPS = """
from pathlib import Path
from lightning.pytorch.callbacks import Callback

class StepFile(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.is_global_zero:
            Path("step").write_text(str(trainer.global_step))
"""

OVERLAY = """
trainer:
  max_steps: 100000
  max_time: null
  limit_val_batches: 0
  enable_progress_bar: false
  callbacks:
    - class_path: steps.StepFile
    - class_path: emu_lightning.callbacks.FinalCheckpoint
data:
  class_path: emu_lightning.shapesworld.ShapesWorldDataModule
  init_args: {image_size: 32, batch_size: 4, val_size: 8}
"""


def _preempt(tmp_path: Path, extra: list[str]) -> subprocess.CompletedProcess:
    """Start a fit, send SIGTERM to its (first) process after two steps, and wait for it to end."""
    (tmp_path / "step").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "emu_lightning.cli", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
           "--config", "overlay.yaml", "--trainer.default_root_dir=run", *extra]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((tmp_path / "step").exists() and int((tmp_path / "step").read_text() or 0) >= 2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the fit did not reach step 2:\n{process.communicate()[1][-3000:]}")
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("SIGTERM did not stop the fit") from None
    return subprocess.CompletedProcess(cmd, process.returncode, out, err)


# Two processes (the ranks agree on the step to stop at) take ~40 s more: `make test-slow`.
@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["1-process", "2-process-ddp"])
def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(tmp_path, devices):
    (tmp_path / "steps.py").write_text(STEPS)
    (tmp_path / "overlay.yaml").write_text(OVERLAY)
    extra = ["--trainer.devices=2", "--trainer.strategy=ddp"] if devices == 2 else []
    stopped = _preempt(tmp_path, extra)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    (saved,) = (tmp_path / "run").rglob("checkpoints/preempted.ckpt")
    step = _step(saved)
    assert step >= 2 and f"SIGTERM: saved a resumable checkpoint at step {step}" in stopped.stderr
    assert f"--ckpt_path {saved.relative_to(tmp_path)}" in stopped.stderr
    # every rank stopped at that step: the file holds the last step both took
    assert int((tmp_path / "step").read_text()) == step
    resumed = subprocess.run(
        [sys.executable, "-m", "emu_lightning.cli", "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config",
         "overlay.yaml", "--trainer.default_root_dir=run", f"--ckpt_path={saved}", f"--trainer.max_steps={step + 2}",
         *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert int((tmp_path / "step").read_text()) == step + 2 and _step(tmp_path / "run" / "final.ckpt") == step + 2
