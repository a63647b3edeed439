"""Progress bars with an ETA for the library's long loops (evaluation passes, RICES encoding, data writing and
checking, text-to-image generation), in one place so that they all behave alike.

- Only the global rank 0 shows bars (under DDP every rank runs the loop over its own shard; rank 0's is as long as
  any other's, so its ETA is the run's).
- ``EMU_PROGRESS=0`` (or ``false``, ``off``, ``no``) switches every bar off; anything else, or unset, leaves them on.
- On a terminal a bar redraws in place, at most twice a second. When stderr is not a terminal (a log file, SLURM's
  output, a CI job) a bar writes nothing for loops shorter than :data:`LOG_INTERVAL` seconds, then one line every
  :data:`LOG_INTERVAL` seconds and a last one when the loop ends, so logs are not flooded.

Bars go to stderr, never to stdout (which the data check uses for its JSON report).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

ENV = "EMU_PROGRESS"
"""The environment variable that switches bars off (``EMU_PROGRESS=0``)."""
LOG_INTERVAL = 30.0
"""Seconds between two lines of a bar when stderr is not a terminal (and before the first one)."""
_OFF = {"0", "false", "off", "no"}


def enabled() -> bool:
    """False when ``EMU_PROGRESS`` says off, or on a rank other than the global rank 0."""
    if os.environ.get(ENV, "").strip().lower() in _OFF:
        return False
    return _global_rank() == 0


def _global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    # Without a process group (yet): Lightning's rank, which it reads from what launchers set (RANK, SLURM_PROCID)
    # on import and sets itself when its strategy starts the processes.
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    leave: bool | None = None,
) -> tqdm:
    """A tqdm bar (iterate over it, or ``update`` it; use it as a context manager to close it), shown as the module
    docstring says; a disabled bar costs nothing and prints nothing.

    Args:
        iterable: what to iterate over (``None``: call ``update`` yourself).
        total: number of steps (default: ``len(iterable)`` when it has one).
        desc: what the loop does, e.g. ``"vqa 4-shot seed 0"``.
        unit: what one step is (``"query"``, ``"image"``, ``"file"``).
        leave: keep the finished bar on a terminal (default: yes); in logs the last line always stays.
    """
    if _interactive():
        options: dict[str, Any] = {"mininterval": 0.5, "dynamic_ncols": True, "leave": leave is None or leave}
    else:  # nothing for short loops, then a line every LOG_INTERVAL seconds and the last one
        options = {"mininterval": LOG_INTERVAL, "maxinterval": LOG_INTERVAL, "delay": LOG_INTERVAL, "leave": True}
        options["ncols"] = 100
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), file=sys.stderr, **options)
