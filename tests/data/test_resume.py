"""The training stream's position is part of the checkpoint: N steps, a checkpoint, and a resume to 2N give the losses
and batches of 2N steps straight (they used to replay the first N batches)."""

import lightning as L
import pytest
import torch
from conftest import make_model

from emu_lightning.data import ImageTextShards, MixtureDataModule, StreamingDataModule
from emu_lightning.shapesworld import ShapesWorldDataModule, ShapesWorldWriter


class Record(L.Callback):
    """Each step's loss and the ids of its batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.ids: list[list] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))
        self.ids.append(list(batch["id"]))


def _data(root, num_workers):
    shards = str(root / "pairs" / "{00000..00001}.tar")  # 2 shards of 7: a resume lands inside a shard
    sources = {
        "shapes": ShapesWorldDataModule(image_size=16, batch_size=2, train_size=40),
        "pairs": StreamingDataModule(
            ImageTextShards(shards, image_size=16, shuffle_buffer=4), writer=ShapesWorldWriter(train=14)
        ),
    }
    return MixtureDataModule(
        sources, batch_sizes={"shapes": 2, "pairs": 3}, num_workers=num_workers, val_source="shapes"
    )


def _fit(root, steps, num_workers=0, ckpt_path=None, save_every=None):
    record = Record()
    callbacks = [record]
    if save_every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=save_every,
                                                             save_top_k=-1))  # fmt: skip
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, callbacks=callbacks, default_root_dir=root,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(make_model(max_length=96), _data(root, num_workers), ckpt_path=ckpt_path)
    return record


@pytest.mark.parametrize("num_workers", [0, 2])
def test_n_steps_then_resume_to_2n_equals_2n_steps_straight(tmp_path, num_workers):
    straight = _fit(tmp_path, 10, num_workers)
    first = _fit(tmp_path, 5, num_workers, save_every=5)
    (checkpoint,) = (tmp_path / "ckpts").glob("*step=5.ckpt")
    assert torch.load(checkpoint, weights_only=True)["MixtureDataModule"]["data_positions"]  # the position is saved
    resumed = _fit(tmp_path, 10, num_workers, ckpt_path=checkpoint)
    assert first.ids == straight.ids[:5] and first.losses == straight.losses[:5]
    assert resumed.ids == straight.ids[5:]  # the batches continue, across the shards' insides and both workers
    assert resumed.losses == straight.losses[5:]  # bit for bit: weights, optimizer and data all restored


def test_another_worker_count_starts_new_passes_instead_of_replaying(tmp_path):
    straight = _fit(tmp_path, 6)
    _fit(tmp_path, 3, save_every=3)
    (checkpoint,) = (tmp_path / "ckpts").glob("*step=3.ckpt")
    with pytest.warns(UserWarning, match=r"saved by 1 process\(es\) x 1 DataLoader worker\(s\), this run has 1 x 2"):
        resumed = _fit(tmp_path, 6, num_workers=2, ckpt_path=checkpoint)
    assert resumed.ids[0] not in straight.ids  # neither a replay of the first batches nor a continuation
