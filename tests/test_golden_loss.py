"""Golden losses: the tiny config trains exactly as it did, step by step.

`configs/tiny.yaml` with its seed, on the CPU, 20 optimizer steps over its whole data mixture (ShapesWorld written in
every real format, in small amounts): each step's training loss must equal the checked-in value in
``golden/tiny_losses.json`` at rtol 1e-4. Moving code must not change a number; a change that is meant to alter
training (a new default, another data order) regenerates the file, and its commit says why:

    .venv/bin/python tests/test_golden_loss.py          # rewrites tests/golden/tiny_losses.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"
STEPS = 20
ARGS = [
    "--config",
    str(ROOT / "configs" / "tiny.yaml"),
    f"--trainer.max_steps={STEPS}",
    "--trainer.limit_val_batches=0",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    # little ShapesWorld data on disk, written under the working directory
    "--data.init_args.sources.pairs.init_args.writer.init_args.train=40",
    "--data.init_args.sources.mmc4.init_args.writer.init_args.train=8",
    "--data.init_args.sources.webvid.init_args.writer.init_args.train=8",
    "--data.init_args.sources.storyboard.init_args.writer.init_args.train=8",
]


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def train_losses(workdir: Path) -> list[float]:
    """Each step's training loss of the tiny config, run in ``workdir``."""
    from emu_lightning.cli import cli

    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        run = cli([*ARGS, f"--trainer.default_root_dir={workdir / 'run'}"], run=False)
        recorder = LossRecorder()
        run.trainer.callbacks.append(recorder)
        run.trainer.fit(run.model, run.datamodule)
    finally:
        torch.use_deterministic_algorithms(False)
        os.chdir(cwd)
    return recorder.losses


def test_tiny_config_trains_to_the_golden_losses(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    losses = train_losses(tmp_path)
    assert len(losses) == len(golden["losses"]) == STEPS
    mismatches = [
        f"step {i}: {got:.6f} != golden {want:.6f}"
        for i, (got, want) in enumerate(zip(losses, golden["losses"]))
        if abs(got - want) > 1e-4 * abs(want)
    ]
    assert not mismatches, (
        "training changed (if that is intended, regenerate with `.venv/bin/python tests/test_golden_loss.py` and "
        "say why in the commit):\n" + "\n".join(mismatches)
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        losses = train_losses(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(
        json.dumps(
            {
                "what": f"configs/tiny.yaml, seed 0, CPU: the training loss of each of the first {STEPS} steps",
                "args": ARGS[2:],
                "torch": torch.__version__,
                "losses": losses,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {GOLDEN.relative_to(ROOT)}: {', '.join(f'{x:.4f}' for x in losses)}", file=sys.stderr)
