"""Several sources in one training stream: mixed by ratio, or with a fixed number of samples of each per batch.

Emu pretrains on image-text pairs, interleaved documents and videos at once, with a fixed number of samples of
each source in every batch (128/128/64/16/16 in the paper). :class:`MixtureDataModule` takes the per-source
DataModules as init arguments and reads each source as a stream that splits its own units across ranks and
DataLoader workers (:class:`~emu_lightning.data.streaming.StreamingSource`); :class:`MixedStream` interleaves
those streams in every worker, with the choice of source seeded per (rank, worker).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, IterableDataset

from emu_lightning.data.modules import EmuDataModule, StreamingDataModule
from emu_lightning.data.streaming import MapStyleSource, ResumeState, StreamingSource, distributed_rank, worker_slot
from emu_lightning.sequence import SequenceBuilder


def check_mixture(
    names: list[str], ratios: Mapping[str, float] | None, batch_sizes: Mapping[str, int] | None
) -> dict[str, float]:
    """Validate a mixture over the sources ``names``; returns the given weights (``ratios`` or ``batch_sizes``).

    Exactly one of ``ratios`` / ``batch_sizes`` must be given and name every source, with no value below zero
    and a positive total.
    """
    if (ratios is None) == (batch_sizes is None):
        raise ValueError("give exactly one of `ratios` and `batch_sizes`")
    kind, weights = ("ratios", ratios) if ratios is not None else ("batch_sizes", batch_sizes)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{kind} name unknown sources {unknown}; the sources are {names}")
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(f"{kind} lack sources {missing}: give every source a value (0 leaves it out)")
    negative = {name: value for name, value in weights.items() if value < 0}
    if negative:
        raise ValueError(f"{kind} {negative} must not be negative")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{kind} {dict(weights)} must have a positive total")
    return {name: weights[name] for name in names}


class MixedStream(IterableDataset):
    """Interleaves named streams in each worker: one sample at a time from a source drawn by ``ratios``, or
    whole batches (lists) with exactly ``batch_sizes[name]`` samples of each source.

    Each stream splits its own units across ranks and workers. A stream that ends is dropped when it is a single
    pass (``repeat=False``), so a finite mixture ends when all its streams have ended, its last batches short of
    the ended sources. A repeating stream never ends: a reader with nothing to read in this process raises
    :class:`~emu_lightning.data.streaming.DataSourceError` itself.

    Args:
        streams: the sources by name.
        ratios: probability that a sample comes from each source (normalised); exclusive with ``batch_sizes``.
        batch_sizes: samples of each source in every yielded batch; exclusive with ``ratios``.
        seed: seeds the choice of source; each (rank, worker) draws its own sequence.
    """

    def __init__(
        self,
        streams: Mapping[str, StreamingSource],
        ratios: Mapping[str, float] | None = None,
        batch_sizes: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        weights = check_mixture(list(streams), ratios, batch_sizes)
        self.streams = {name: streams[name] for name, weight in weights.items() if weight > 0}
        self.weights = {name: weights[name] for name in self.streams}
        self.batched = batch_sizes is not None
        self.seed = seed
        self.resume_state: ResumeState | None = None
        """Set before iterating to continue from saved positions (``streaming.ResumeState``)."""
        self._iterations = 0

    def __iter__(self) -> Iterator[dict[str, Any] | list[dict[str, Any]]]:
        rank, _ = distributed_rank()
        self._iterations += 1
        resume = self.resume_state if self._iterations == 1 else None  # a restarted loader starts new passes
        slot, workers = worker_slot(resume.offset if resume is not None else 0)
        position = resume.positions.get(slot) if resume is not None else None
        last = dict((position or {}).get("streams", {}))  # each stream's position after the last sample drawn
        for name, stream in self.streams.items():  # this worker's copies of the streams continue where it was
            saved = {slot: last[name]} if name in last else {}
            stream.resume_state = None if resume is None else ResumeState(saved, resume.offset, resume.first_epoch)
        iterators = {name: iter(stream) for name, stream in self.streams.items()}
        if self.batched:
            return self._batches(iterators, last, slot, workers)
        rng = np.random.default_rng([self.seed, rank, slot])
        if position is not None and position.get("rng") is not None:
            rng.bit_generator.state = position["rng"]
        return self._samples(iterators, rng, last, slot, workers)

    @staticmethod
    def _next(iterators: dict[str, Iterator], name: str, last: dict[str, Any]) -> dict[str, Any] | None:
        """The next sample of ``name`` (its stream's position moved to ``last``), or None (and ``name`` dropped) when
        its single pass has ended."""
        try:
            sample = next(iterators[name])
        except StopIteration:
            del iterators[name]
            return None
        if "position" in sample:
            sample = dict(sample)
            last[name] = sample.pop("position")
        return sample

    def _position(self, last: dict[str, Any], slot: int, workers: int, rng: np.random.Generator | None) -> dict:
        return {"streams": dict(last), "rng": None if rng is None else rng.bit_generator.state, "slot": slot,
                "workers": workers}  # fmt: skip

    def _samples(self, iterators: dict[str, Iterator], rng: np.random.Generator, last: dict[str, Any], slot: int,
                 workers: int) -> Iterator[dict]:  # fmt: skip
        while iterators:
            names = list(iterators)
            p = np.array([self.weights[name] for name in names], dtype=float)
            sample = self._next(iterators, names[rng.choice(len(names), p=p / p.sum())], last)
            if sample is not None:
                if last:
                    sample["position"] = self._position(last, slot, workers, rng)
                yield sample

    def _batches(self, iterators: dict[str, Iterator], last: dict[str, Any], slot: int, workers: int
                 ) -> Iterator[list[dict]]:  # fmt: skip
        while iterators:
            batch = []
            for name, size in self.weights.items():
                for _ in range(int(size)):
                    sample = self._next(iterators, name, last) if name in iterators else None
                    if sample is not None:
                        batch.append(sample)
            if batch:
                if last:  # the position after the whole batch rides on its last sample
                    batch[-1]["position"] = self._position(last, slot, workers, None)
                yield batch


class MixtureDataModule(EmuDataModule):
    """Trains on several sources at once, mixed by ratio or with a fixed number of samples of each per batch.

    Every process reads a disjoint part of every source: each source splits its units across distributed ranks
    and DataLoader workers. Samples keep their ``source`` (so a batch's ``source`` list gives its composition);
    a map-style source's is its name here. The child DataModules get this module's trainer and sequencer, and
    its ``prepare_data``, ``setup`` and ``teardown`` calls; validation uses one child's loader.

    Args:
        sources: the DataModules to mix, by name: StreamingDataModules (their ``train_source()``) or any with a
            map-style ``train_set`` (read as a seeded stream, split across ranks and workers).
        ratios: probability that a sample comes from each source (normalised; 0 leaves a source out); exclusive
            with ``batch_sizes``.
        batch_sizes: samples of each source in every batch (the paper: 128/128/64/16/16); exclusive with
            ``ratios``.
        batch_size: samples per batch with ``ratios``; with ``batch_sizes`` the batch is their sum.
        num_workers: DataLoader worker processes; each reads its own part of every source.
        seed: seeds the choice of source and the order of map-style sources.
        val_source: the source whose validation loader is used; by default the first that has one.
        sequencer: a SequenceBuilder; by default the trained model's.
    """

    def __init__(
        self,
        sources: dict[str, EmuDataModule],
        ratios: dict[str, float] | None = None,
        batch_sizes: dict[str, int] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        val_source: str | None = None,
        sequencer: SequenceBuilder | None = None,
    ) -> None:
        if not sources:
            raise ValueError("a mixture needs at least one source")
        check_mixture(list(sources), ratios, batch_sizes)
        if val_source is not None and val_source not in sources:
            raise ValueError(f"val_source {val_source!r} is not one of the sources {list(sources)}")
        super().__init__(sum(batch_sizes.values()) if batch_sizes else batch_size, num_workers, sequencer)
        self.sources, self.ratios, self.batch_sizes = dict(sources), ratios, batch_sizes
        self.seed, self.val_source = seed, val_source

    def _attach(self, module: EmuDataModule) -> None:
        """Give a child this module's trainer (its checks against the model) and sequencer (if it has none)."""
        module.trainer = self.trainer
        if module.sequencer is None:
            module.sequencer = self.sequencer

    def prepare_data(self) -> None:
        for module in self.sources.values():
            self._attach(module)  # a writer writes at the model's image size
            module.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for module in self.sources.values():
            self._attach(module)
            module.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        for module in self.sources.values():
            module.teardown(stage)

    def train_stream(self, name: str) -> StreamingSource:
        """Source ``name``'s training stream: its ``train_source()``, or its map-style ``train_set`` as a stream."""
        module = self.sources[name]
        if isinstance(module, StreamingDataModule):
            return module.train_source()
        dataset = getattr(module, "train_set", None)
        if isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
            return MapStyleSource(dataset, name, seed=self.seed)
        raise ValueError(
            f"source {name!r} ({type(module).__name__}) has no training stream: expected a StreamingDataModule "
            "or a DataModule with a map-style `train_set`"
        )

    def train_dataloader(self) -> DataLoader:
        weights = self.ratios if self.ratios is not None else self.batch_sizes
        streams = {name: self.train_stream(name) for name, weight in weights.items() if weight > 0}
        active = {name: weights[name] for name in streams}
        mixed = MixedStream(
            streams,
            ratios=active if self.ratios is not None else None,
            batch_sizes=active if self.batch_sizes is not None else None,
            seed=self.seed,
        )
        return DataLoader(
            self.resume(mixed),
            batch_size=None if self.batch_sizes is not None else self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.resolve_sequencer(),
        )

    def val_dataloader(self) -> DataLoader | list:
        names = [self.val_source] if self.val_source is not None else list(self.sources)
        for name in names:
            module = self.sources[name]
            if type(module).val_dataloader is L.LightningDataModule.val_dataloader:
                loader = []
            else:
                self.resolve_sequencer()  # the child collates with it unless it has its own
                self._attach(module)
                loader = module.val_dataloader()
            if not (isinstance(loader, (list, tuple)) and len(loader) == 0):
                return loader
            if self.val_source is not None:
                raise ValueError(f"val_source {name!r} ({type(module).__name__}) has no validation loader")
        return []
