"""LightningDataModules: what every one shares (:class:`EmuDataModule`) and the one over any on-disk reader
(:class:`StreamingDataModule`). Each yields interleaved samples and collates them with the model's SequenceBuilder."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from emu_lightning.data.streaming import ResumeState, StreamingSource, distributed_rank, latest_epoch
from emu_lightning.distributed import gather_objects
from emu_lightning.sequence import SequenceBuilder


class EmuDataModule(L.LightningDataModule):
    """Shared plumbing: the SequenceBuilder comes from the model being trained unless one is given, and the training
    stream's position travels in checkpoints.

    Every training loader is a stream (:class:`~emu_lightning.data.streaming.StreamingSource` or a mixture of them)
    whose samples carry their position. :meth:`on_before_batch_transfer` keeps the position of the last batch training
    consumed from each DataLoader worker; :meth:`state_dict` saves them (every rank's, under DDP) in the checkpoint,
    and after :meth:`load_state_dict` the next training loader continues from them: ``N`` steps, a checkpoint and a
    resume to ``2N`` see the batches of ``2N`` steps straight. With another number of processes or workers than saved,
    the streams start new passes instead (a warning says so).
    """

    def __init__(self, batch_size: int, num_workers: int, sequencer: SequenceBuilder | None) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.sequencer = batch_size, num_workers, sequencer
        self._positions: dict[int, dict[str, Any]] = {}  # worker slot -> position after its last consumed batch
        self._next_slot = 0  # the worker slot whose batch is due next
        self._saved: dict[str, Any] | None = None  # positions loaded from a checkpoint, for the next training loader

    # ------------------------------------------------------------------ the training stream's position
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "position" in batch:
            positions = [p for p in batch.pop("position") or [] if p is not None]
            if positions and self.trainer is not None and self.trainer.training:
                position = positions[-1]
                self._positions[position["slot"]] = position
                self._next_slot = (position["slot"] + 1) % position["workers"]
        return batch

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is saved, so the gather (a collective under DDP) is matched.
        mine = {"positions": dict(self._positions), "next_slot": self._next_slot, "workers": max(1, self.num_workers)}
        ranks = gather_objects(mine if self._positions else None)
        return {"data_positions": ranks} if any(r is not None for r in ranks) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict.get("data_positions")

    def resume(self, stream: Any) -> Any:
        """Set ``stream`` (a training stream) to continue from the positions loaded from a checkpoint, if any."""
        self._positions, self._next_slot = {}, 0
        if not self._saved:
            return stream
        rank, world = distributed_rank()
        workers = max(1, self.num_workers)
        mine = self._saved[rank] if len(self._saved) == world else None
        if mine is not None and mine["workers"] == workers:
            stream.resume_state = ResumeState({int(k): v for k, v in mine["positions"].items()}, mine["next_slot"])
            self._positions, self._next_slot = dict(stream.resume_state.positions), mine["next_slot"]
            return stream
        first = 1 + max(latest_epoch(r) for r in self._saved if r is not None)
        saved_workers = next(r["workers"] for r in self._saved if r is not None)
        rank_zero_warn(
            f"the checkpoint's data position was saved by {len(self._saved)} process(es) x {saved_workers} DataLoader "
            f"worker(s), this run has {world} x {workers}: the training streams cannot continue it and start new "
            f"passes (from pass {first}) instead, which do not replay the saved passes' order"
        )
        stream.resume_state = ResumeState({}, 0, first)
        return stream

    def loader(self, dataset: Dataset) -> DataLoader:
        """A loader in the dataset's order: a stream splits its units across ranks and workers itself; a map-style
        held-out set is split across ranks by Lightning's sampler."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.resolve_sequencer(),
        )

    def resolve_sequencer(self) -> SequenceBuilder:
        if self.sequencer is None:
            model = self.trainer.lightning_module if self.trainer is not None else None
            if model is None or getattr(model, "sequencer", None) is None:
                raise ValueError(
                    "no SequenceBuilder: pass `sequencer=` or attach the datamodule to a Trainer with an EmuModel"
                )
            self.sequencer = model.sequencer
        return self.sequencer

    def model_image_size(self) -> int | None:
        """The image side the attached model needs from its data (None before a model is attached): its vision
        backbone's input size, or in the decoder stage the larger of it and the decoder's
        (:attr:`EmuModel.data_image_size <emu_lightning.model.EmuModel.data_image_size>`)."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        if hasattr(model, "data_image_size"):
            return model.data_image_size
        return getattr(getattr(model, "vision", None), "image_size", None)

    def check_image_size(self, image_size: int) -> None:
        """Raise when the attached model needs another image size than the data gives."""
        expected = self.model_image_size()
        if expected is not None and image_size != expected:
            raise ValueError(
                f"data image_size {image_size} does not match the model's: it needs {expected} px images (the vision "
                "backbone's input size, or in the decoder stage the larger of it and the decoder's); leave the "
                "reader's image_size out to take it"
            )


class DataWriter(ABC):
    """Writes data in a reader's own format to the reader's own paths before training reads them (the way the
    offline default puts its toy world on disk: :class:`emu_lightning.shapesworld.ShapesWorldWriter`)."""

    @abstractmethod
    def write(self, reader: StreamingSource, split: str) -> None:
        """Write ``split`` (``train`` or ``val``) where ``reader`` reads it, unless it is there already."""


class StreamingDataModule(EmuDataModule):
    """One on-disk source: any :class:`~emu_lightning.data.streaming.StreamingSource` reader, given by ``class_path``.

    Training reads ``reader`` (shuffled, repeating); validation reads a copy of it with the arguments in ``val``
    changed (typically its paths), one pass in order. The readers split their units across ranks and workers
    themselves, so the loaders neither shuffle nor use a sampler; skipped samples travel in each batch's ``skipped``
    list and the model logs them.

    Args:
        reader: the training reader, e.g. ``{class_path: emu_lightning.data.MMC4Documents, init_args: {paths: ...}}``.
            Its ``image_size`` may be left out: it is the size the attached model needs (its vision backbone's, or
            in the decoder stage the larger of that and the decoder's).
        val: the held-out reader's arguments that differ from ``reader``'s, e.g. ``{paths: /data/mmc4/val.jsonl}``;
            none by default.
        writer: writes data to the readers' paths before training (:meth:`prepare_data`), e.g. ShapesWorld's;
            real data needs none.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes; each reads its own units.
        sequencer: a SequenceBuilder; by default the trained model's.
    """

    def __init__(
        self,
        reader: StreamingSource,
        val: dict[str, Any] | None = None,
        writer: DataWriter | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        sequencer: SequenceBuilder | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, sequencer)
        self.reader, self.writer = reader, writer
        self.val_reader = reader.held_out(**val) if val is not None else None

    def readers(self) -> list[StreamingSource]:
        return [self.reader] + ([self.val_reader] if self.val_reader is not None else [])

    def _fit_image_size(self) -> None:
        """Readers without an ``image_size`` take the model's; one with another size than the model's is an error."""
        for reader in self.readers():
            if getattr(reader, "image_size", 0) is None:
                size = self.model_image_size()
                if size is None:
                    raise ValueError(
                        f"{type(reader).__name__} has no image_size: give it, or attach the DataModule to a model"
                    )
                reader.image_size = size
            elif hasattr(reader, "image_size"):
                self.check_image_size(reader.image_size)

    def prepare_data(self) -> None:
        if self.writer is None:
            return
        self._fit_image_size()
        self.writer.write(self.reader, "train")
        if self.val_reader is not None:
            self.writer.write(self.val_reader, "val")

    def setup(self, stage: str | None = None) -> None:
        self._fit_image_size()
        for reader in self.readers():
            reader.units()  # missing or unreadable files fail now, not in the first batch

    def train_source(self) -> StreamingSource:
        """The training reader (what a :class:`MixtureDataModule` mixes)."""
        return self.reader

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.resume(self.reader))

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_reader is None else self.loader(self.val_reader)
