"""Collectives that every process reaches at the same point, and that fail together instead of hanging.

Under DDP a collective (a gather, a broadcast, a barrier, and also Lightning's ``trainer.log_dir``, which
broadcasts) returns only when every rank has called it. Code that lets one rank raise, return early or take a
rank-only branch with a collective in it leaves the other ranks waiting forever. The helpers here run a piece of
work on every rank, exchange whether it failed, and raise on every rank when it failed on any, so that all ranks
leave through the same exception and none waits at the next collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


class RankFailure(RuntimeError):
    """Raised on every rank when a piece of work failed on another rank (the message names it)."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process). A collective."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_all_ranks(work: Callable[[], T], what: str) -> T:
    """``work()`` on this rank; when it raised here or on any other rank, raise on every rank. A collective.

    The rank where ``work`` failed re-raises its own exception; the others raise :class:`RankFailure` naming it.
    """
    try:
        result, error = work(), None
    except Exception as err:  # handed to every rank below, then re-raised
        result, error = None, err
    if not is_distributed():
        if error is not None:
            raise error
        return result  # type: ignore[return-value]
    failures = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, message) for r, message in enumerate(failures) if message is not None]
    if failed:
        where, message = failed[0]
        raise RankFailure(f"{what} failed on rank {where}: {message}")
    return result  # type: ignore[return-value]


def rank_zero_first(work: Callable[[], T], what: str) -> T:
    """``work()`` on rank 0, then on the other ranks (rank 0 writes files that the others then read); fails on every
    rank when it fails on any. A collective."""
    zero = rank() == 0
    first = on_all_ranks(lambda: work() if zero else None, what)
    rest = on_all_ranks(lambda: None if zero else work(), what)
    return first if zero else rest  # type: ignore[return-value]


def gather_dicts(work: Callable[[], dict[Any, Any]], what: str) -> dict[Any, Any]:
    """The union of the dicts ``work()`` returns on every rank; fails on every rank when it fails on any. A
    collective."""
    mine = on_all_ranks(work, what)
    merged: dict[Any, Any] = {}
    for part in gather_objects(mine):
        merged.update(part)
    return merged
