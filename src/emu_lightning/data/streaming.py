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
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import braceexpand
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

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


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (``/d/{00000..00009}.tar``) in one URL or a list of them, keeping their order."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    return [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]


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

    def __init__(
        self, name: str, shuffle: bool = True, repeat: bool = True, seed: int = 0, split_by_node: bool = True
    ) -> None:
        super().__init__()
        self.name, self.shuffle, self.repeat, self.seed, self.split_by_node = name, shuffle, repeat, seed, split_by_node
        self.skipped: Counter = Counter()
        """Skips counted in this process (all of them with ``num_workers=0``; each worker keeps its own)."""
        self._iterations = 0

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
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return split_units(everything, rank, world, worker, workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        everything = list(enumerate(self.units()))
        units = self.my_units(everything)
        if not units:
            if self.repeat and everything:  # a training process with nothing to read would stall the others
                raise DataSourceError(
                    f"source {self.name!r}: this process (rank, worker) has no units to read: "
                    f"{len(everything)} units for more ranks x workers; use fewer workers or more shards"
                )
            return
        pending: Counter = Counter()
        self._iterations += 1  # a new iteration (a restarted loader) continues with new passes, not a replay
        epoch = (self._iterations - 1) * 1_000_003
        while True:
            order = list(range(len(units)))
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            used = 0
            for k in order:
                index, unit = units[k]
                rng = np.random.default_rng([self.seed, epoch, index, 1])
                for sample in self.read(unit, rng):
                    if isinstance(sample, Skip):
                        pending[sample.reason] += 1
                        self.skipped[sample.reason] += 1
                        continue
                    sample = {**sample, "source": self.name, "skipped": dict(pending) if pending else None}
                    pending.clear()
                    used += 1
                    yield sample
            if used == 0:
                if len(units) == len(everything) or not self._any_usable(everything, units):
                    reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common())
                    raise DataSourceError(
                        f"source {self.name!r}: none of the samples in {len(everything)} units could be used "
                        + (f"({sum(self.skipped.values())} skipped; {reasons})" if reasons else "(they hold none)")
                    )
                if not self.repeat:
                    return
                # This process drew only bad units, but the source has good ones: read all of them rather than
                # stall (the parts of the processes overlap from now on).
                warnings.warn(
                    f"source {self.name!r}: the {len(units)} units of this process (rank, worker) hold no usable "
                    "sample; it reads all units from now on",
                    stacklevel=2,
                )
                units = everything
            if not self.repeat:
                return
            epoch += 1

    def _any_usable(self, everything: list[tuple[int, Any]], tried: list[tuple[int, Any]]) -> bool:
        """Whether any unit outside ``tried`` yields a usable sample (read until the first one)."""
        seen = {index for index, _ in tried}
        for index, unit in everything:
            if index not in seen and any(not isinstance(s, Skip) for s in self.read(unit, np.random.default_rng(0))):
                return True
        return False

    def check(self, limit: int | None = None) -> dict[str, Any]:
        """Read the source once as training would (all units, this process alone) and report
        ``{"ok": samples usable, "skipped": samples skipped, "reasons": {reason: n}}``."""
        ok = skipped = 0
        reasons: Counter = Counter()
        for k, unit in enumerate(self.units()):
            for sample in self.read(unit, np.random.default_rng([self.seed, 0, k, 1])):
                if isinstance(sample, Skip):
                    skipped += 1
                    reasons[sample.reason] += 1
                else:
                    ok += 1
                if limit is not None and ok + skipped >= limit:
                    return {"ok": ok, "skipped": skipped, "reasons": dict(reasons)}
        return {"ok": ok, "skipped": skipped, "reasons": dict(reasons)}
