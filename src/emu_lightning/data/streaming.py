"""What every on-disk source shares: sharding across ranks and workers, seeded shuffling, and skipped samples.

A reader (:class:`StreamingSource`) lists its *units* (tar shards, jsonl files, csv rows, storyboard folders)
and turns one unit into samples. Units are split first across distributed ranks, then across the
DataLoader's workers, so each process reads a disjoint part of the data and no process copies the whole
dataset: this is how a source streams from object storage across nodes.

Bad samples (a corrupt image, a missing file, a malformed line, an empty caption, ...) are never fatal: the
reader reports them as :class:`Skip` records with a reason, counts them per reason in :attr:`skipped`, and
attaches the counts to the next sample it yields (``sample["skipped"]``), so the counts cross worker
processes inside the batches and the model logs them (``data/skipped/<source>/<reason>``). A pass over
the units that yields nothing raises :class:`DataSourceError` when the source as a whole has no usable sample
(a source whose every sample is bad stops the run with the reasons); a process (rank, worker) whose own units
happen to be all bad warns and, when training, reads every unit instead of stalling. Skips after the last
usable sample of a one-pass read reach :attr:`StreamingSource.skipped` and :meth:`StreamingSource.check`, but
no batch.

Training streams can resume where they stopped. Each sample of a repeating stream carries its stream's
``position`` after it (the pass, the place in that pass's unit order, and the records read of the current unit), and
the DataModule keeps the position of the last batch training consumed from each DataLoader worker
(:class:`ResumeState`) and saves it in the checkpoint. On resume every stream starts a new iterator at its saved
position: it opens the unit it was in and passes over the records it had already read there, never the units or
passes before, and workers take over the saved ones' roles so that batches come in the same order.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import braceexpand
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

T = TypeVar("T")


class DataSourceError(RuntimeError):
    """A source yielded no usable sample at all (every one was skipped, or there was nothing to read)."""


@dataclass(frozen=True)
class Skip:
    """A sample that cannot be used, and why: ``reason`` is a short stable key (counted), ``detail`` says which."""

    reason: str
    detail: str = ""


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from ``torch.distributed`` when initialised, else from the
    ``RANK`` / ``WORLD_SIZE`` environment variables that launchers set, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_slot(offset: int = 0) -> tuple[int, int]:
    """``(slot, num_workers)`` of this process's DataLoader worker (``(0, 1)`` without workers). The slot is the worker
    id shifted by ``offset``: a resumed loader's worker 0 takes over the role (units, seeds, position) of the worker
    whose batch was due next when the checkpoint was saved, so batches come in the same order as without the break."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + offset) % info.num_workers, info.num_workers


@dataclass
class ResumeState:
    """Where each worker of a resumed DataLoader starts: ``positions`` by slot (as the samples carried them),
    ``offset`` (see :func:`worker_slot`), and ``first_epoch``, the pass numbers that streams without a position start
    from (past every saved pass, so a restart without positions reads new orders rather than replaying old ones)."""

    positions: dict[int, dict[str, Any]]
    offset: int = 0
    first_epoch: int = 0


def latest_epoch(position: Any) -> int:
    """The highest pass number (``epoch``) in a saved position (nested for a mixture); -1 when there is none."""
    if isinstance(position, dict):
        own = position.get("epoch") if isinstance(position.get("epoch"), int) else -1
        return max([own, *(latest_epoch(v) for v in position.values())])
    return -1


def empty_source(source: StreamingSource, what: str) -> None:
    """A source with nothing to read: an error for training (it would vanish from every batch without a word), a
    warning for a one-pass (held-out) read."""
    if source.repeat:
        raise DataSourceError(f"source {source.name!r}: {what}; a training source must have samples to mix in")
    warnings.warn(f"source {source.name!r}: {what}; its held-out pass reads nothing", stacklevel=3)


def split_units(units: Sequence[Any], rank: int, world_size: int, worker: int, num_workers: int) -> list[Any]:
    """The units one (rank, worker) reads: every ``world_size``-th unit from ``rank``, then every
    ``num_workers``-th of those from ``worker``. Over all ranks and workers the parts are disjoint and cover
    ``units``; a process may get none when there are fewer units than processes."""
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"bad split: rank {rank} of {world_size}, worker {worker} of {num_workers}")
    return list(units[rank::world_size][worker::num_workers])


def add_skips(total: Counter, skipped: Any) -> None:
    """Add one sample's ``skipped`` counts (a ``{reason: n}`` mapping or None) to ``total``."""
    if isinstance(skipped, Mapping):
        total.update({str(k): int(v) for k, v in skipped.items()})


def batch_skips(batch: Mapping[str, Any]) -> dict[str, Counter]:
    """Per-source skip counts carried by a collated batch (its ``source`` and ``skipped`` lists)."""
    out: dict[str, Counter] = {}
    for source, skipped in zip(batch.get("source") or [], batch.get("skipped") or []):
        if skipped:
            add_skips(out.setdefault(str(source), Counter()), skipped)
    return out


def format_skips(totals: Mapping[str, Mapping[str, int]]) -> str:
    """One line per source: ``name: n skipped (reason: n, ...)``."""
    lines = []
    for source, reasons in sorted(totals.items()):
        n = sum(reasons.values())
        detail = ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"{source}: {n} skipped ({detail})")
    return "\n".join(lines)


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand brace patterns (``/d/{00000..00009}.tar``) in one URL or path or a list of them, keeping their order."""
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    return [url for pattern in patterns for url in braceexpand.braceexpand(os.fspath(pattern))]


def shuffled(records: Iterable[T], buffer_size: int, rng: np.random.Generator) -> Iterator[T]:
    """``records`` in a random order drawn through a buffer of ``buffer_size`` (webdataset's shuffle): memory
    stays bounded, and a unit no longer than the buffer is shuffled completely."""
    buffer: list[T] = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        k = int(rng.integers(buffer_size))
        buffer[k], record = record, buffer[k]
        yield record
    rng.shuffle(buffer)
    yield from buffer


class StreamingSource(IterableDataset):
    """A reader of one on-disk format, split across ranks and workers; subclasses define :meth:`units` and
    :meth:`read`.

    Args:
        name: the source's name in sample metadata and skip counts.
        shuffle: shuffle the units (seeded, a new order each pass) and let :meth:`read` shuffle within one.
        repeat: start a new pass when one ends (training); False: one pass (validation, checks).
        seed: seeds every random choice; a pass's draws depend on (seed, pass, unit), not on the worker.
        split_by_node: split units across distributed ranks (False: every rank reads all of them).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> StreamingSource:
        self = super().__new__(cls)
        self._given = (args, kwargs)  # what the reader was built with, for held_out (unpickling passes nothing)
        return self

    def __init__(
        self, name: str, shuffle: bool = True, repeat: bool = True, seed: int = 0, split_by_node: bool = True
    ) -> None:
        super().__init__()
        self.name, self.shuffle, self.repeat, self.seed, self.split_by_node = name, shuffle, repeat, seed, split_by_node
        self.skipped: Counter = Counter()
        """Skips counted in this process (all of them with ``num_workers=0``; each worker keeps its own)."""
        self._iterations = 0
        self.resume_state: ResumeState | None = None
        """Set before iterating to continue from saved positions (see the module docstring)."""
        self.skip_examples: dict[str, str] = {}
        """The first skip of each reason, naming its file and record (``shard.tar:000123: ...``)."""

    @property
    def init_args(self) -> dict[str, Any]:
        """The arguments this reader was built with, by name (defaults left out)."""
        args, kwargs = self._given
        return dict(inspect.signature(type(self)).bind_partial(*args, **kwargs).arguments)

    def held_out(self, **changes: Any) -> StreamingSource:
        """A one-pass, in-order copy of this reader for evaluation (named ``<name>_val``), with ``changes`` to its
        arguments (its paths, typically); a reader with a ``train`` switch (random frame times) gets ``train=False``."""
        parameters = inspect.signature(type(self)).parameters
        unknown = sorted(set(changes) - set(parameters))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no argument(s) {unknown}; it takes {list(parameters)}")
        fixed = {"shuffle": False, "repeat": False, **({"train": False} if "train" in parameters else {})}
        args = {**self.init_args, "name": f"{self.name}_val", **fixed, **changes}
        if getattr(self, "image_size", None) is not None and "image_size" in parameters:
            args.setdefault("image_size", self.image_size)
        return type(self)(**args)

    # ------------------------------------------------------------------ subclass interface
    def units(self) -> list[Any]:
        """The source's independent parts (shards, files, rows), in a fixed order."""
        raise NotImplementedError

    def read(self, unit: Any, rng: np.random.Generator) -> Iterator[dict[str, Any] | Skip]:
        """Samples (dicts with ``items``) and :class:`Skip` records of one unit; all randomness from ``rng``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ iteration
    def my_units(self, everything: list[tuple[int, Any]] | None = None) -> list[tuple[int, Any]]:
        """This process's units with their indices in :meth:`units` (or in ``everything``, their enumeration):
        split by rank (with ``split_by_node``), then by DataLoader worker."""
        everything = list(enumerate(self.units())) if everything is None else everything
        rank, world = distributed_rank() if self.split_by_node else (0, 1)
        worker, workers = worker_slot(self.resume_state.offset if self.resume_state else 0)
        return split_units(everything, rank, world, worker, workers)

    def start(self) -> tuple[int, dict[str, Any] | None]:
        """The first pass number of a new iteration and, when resuming, this worker's saved position."""
        self._iterations += 1  # a new iteration (a restarted loader) continues with new passes, not a replay
        resume = self.resume_state
        base = resume.first_epoch if resume is not None else 0
        position = None
        if resume is not None and self._iterations == 1:
            slot, _ = worker_slot(resume.offset)
            position = resume.positions.get(slot)
        return base + (self._iterations - 1) * 1_000_003, position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if hasattr(self, "image_size") and self.image_size is None:
            raise ValueError(
                f"source {self.name!r} has no image_size: give it, or read it through a DataModule attached to a model "
                "(which takes the vision backbone's)"
            )
        everything = list(enumerate(self.units()))
        if not everything and self.repeat:  # an empty training source would silently vanish from every batch
            raise DataSourceError(f"source {self.name!r} has nothing to read: it lists no units (no files or rows)")
        units = self.my_units(everything)
        if not units:
            if self.repeat and everything:  # a training process with nothing to read would stall the others
                raise DataSourceError(
                    f"source {self.name!r}: this process (rank, worker) has no units to read: "
                    f"{len(everything)} units for more ranks x workers; use fewer workers or more shards"
                )
            return
        epoch, position = self.start()
        first, read_before, every = 0, 0, False
        if position is not None:  # resume after the last sample this worker yielded before the checkpoint
            epoch, first, read_before, every = position["epoch"], position["k"], position["read"], position["all"]
            units = everything if every else units
        slot, workers = worker_slot(self.resume_state.offset if self.resume_state else 0)
        pending: Counter = Counter()
        while True:
            order = list(range(len(units)))
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            used, whole_pass = 0, first == 0 and read_before == 0
            for k in range(first, len(order)):
                index, unit = units[order[k]]
                rng = np.random.default_rng([self.seed, epoch, index, 1])
                read, skip = 0, read_before
                for sample in self.read(unit, rng):
                    read += 1
                    if read <= skip:  # read before the checkpoint: already trained on (or skipped and counted)
                        continue
                    if isinstance(sample, Skip):
                        pending[sample.reason] += 1
                        self.skipped[sample.reason] += 1
                        self.note_skip(unit, sample)
                        continue
                    sample = {**sample, "source": self.name, "skipped": dict(pending) if pending else None}
                    if self.repeat:
                        sample["position"] = {"epoch": epoch, "k": k, "read": read, "all": every, "slot": slot,
                                              "workers": workers}  # fmt: skip
                    pending.clear()
                    used += 1
                    yield sample
                read_before = 0
            first = 0
            if used == 0 and whole_pass:
                if len(units) == len(everything) or not self._any_usable(everything, units):
                    raise DataSourceError(f"source {self.name!r}: none of the samples in {len(everything)} units "
                                          f"could be used {self.skip_summary()}")  # fmt: skip
                if not self.repeat:
                    return
                # This process drew only bad units, but the source has good ones: read all of them rather than
                # stall (the parts of the processes overlap from now on).
                warnings.warn(
                    f"source {self.name!r}: the {len(units)} units of this process (rank, worker) hold no usable "
                    "sample; it reads all units from now on",
                    stacklevel=2,
                )
                units, every = everything, True
            if not self.repeat:
                return
            epoch += 1

    def describe(self, unit: Any) -> str:
        """How messages name a unit: its file."""
        return str(getattr(unit, "path", unit))

    def note_skip(self, unit: Any, skip: Skip) -> None:
        """Keep the first skip of each reason as an example that names the unit's file and the record."""
        if skip.reason in self.skip_examples:
            return
        name = self.describe(unit)
        named = name in skip.detail or Path(name).name in skip.detail
        self.skip_examples[skip.reason] = skip.detail if named else f"{name}: {skip.detail}".rstrip(": ")

    def skip_summary(self) -> str:
        """``(n skipped; reason: n, ...; e.g. reason: example, ...)`` or ``(they hold none)``."""
        if not self.skipped:
            return "(they hold none)"
        reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common())
        examples = "; ".join(f"{r}: {e}" for r, e in self.skip_examples.items())
        return f"({sum(self.skipped.values())} skipped; {reasons}; e.g. {examples})"

    def _any_usable(self, everything: list[tuple[int, Any]], tried: list[tuple[int, Any]]) -> bool:
        """Whether any unit outside ``tried`` yields a usable sample (read until the first one)."""
        seen = {index for index, _ in tried}
        for index, unit in everything:
            if index not in seen and any(not isinstance(s, Skip) for s in self.read(unit, np.random.default_rng(0))):
                return True
        return False

    def check(self, limit: int | None = None) -> dict[str, Any]:
        """Read the source once as training would (all units, this process alone) and report
        ``{"ok": samples usable, "skipped": samples skipped, "reasons": {reason: n}}``; :attr:`skip_examples` then
        holds the first skip of each reason, naming its file and record."""
        ok = skipped = 0
        reasons: Counter = Counter()
        self.skip_examples = {}
        for k, unit in enumerate(self.units()):
            for sample in self.read(unit, np.random.default_rng([self.seed, 0, k, 1])):
                if isinstance(sample, Skip):
                    skipped += 1
                    reasons[sample.reason] += 1
                    self.note_skip(unit, sample)
                else:
                    ok += 1
                if limit is not None and ok + skipped >= limit:
                    return {"ok": ok, "skipped": skipped, "reasons": dict(reasons)}
        return {"ok": ok, "skipped": skipped, "reasons": dict(reasons)}


class MapStyleSource(StreamingSource):
    """A map-style Dataset read as a stream: its indices are the units, split across ranks and workers and
    reshuffled each pass (seeded), so a map-style source mixes with on-disk ones.

    Args:
        dataset: a map-style Dataset (``__len__`` and ``__getitem__``) of samples (dicts with ``items``, or lists).
        name: the source's name in sample metadata.
        shuffle: a new seeded order of this process's indices each pass.
        repeat: start a new pass when one ends (training); False: one pass.
        seed: seeds the order.
    """

    def __init__(self, dataset: Dataset, name: str, shuffle: bool = True, repeat: bool = True, seed: int = 0) -> None:
        super().__init__(name, shuffle=shuffle, repeat=repeat, seed=seed)
        self.dataset = dataset

    def units(self) -> list[int]:
        return list(range(len(self.dataset)))

    def read(self, unit: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        sample = self.dataset[unit]
        yield sample if isinstance(sample, dict) else {"items": sample}
