"""Generated data (ShapesWorld written in a real format) never touches a user's files.

A writer may create files only in a folder that is absent or empty, or that holds nothing but files it wrote itself.
What it wrote is recorded in a marker, ``.<name>.json`` in the folder: the writer's arguments (``spec``), the files it
created with their sizes (the manifest), and what the writer returned. :func:`write_once` writes when the marker is
missing or its spec differs, reuses the files when the marker and its manifest match the folder, and refuses, naming
the folder and some of the files, when the folder holds anything no marker accounts for: a user who points a config
at their own shards (and leaves the ShapesWorld writer on) gets an error, never synthetic shards in their place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER_PREFIX = ".shapesworld-"


class ForeignFilesError(FileExistsError):
    """The folder a writer was given holds files that it did not write."""


def _files(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> size in bytes), markers excepted."""
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(MARKER_PREFIX)
    }


def _markers(root: Path) -> dict[str, dict[str, Any]]:
    """The markers in ``root`` by file name; unreadable ones count as absent (their files then count as foreign)."""
    markers = {}
    for path in root.glob(f"{MARKER_PREFIX}*.json") if root.is_dir() else []:
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict) and isinstance(marker.get("files"), dict):
            markers[path.name] = marker
    return markers


def _foreign(present: dict[str, int], markers: dict[str, dict[str, Any]]) -> list[str]:
    """Files no marker lists with their current size, sorted."""
    owned: dict[str, int] = {}
    for marker in markers.values():
        owned.update(marker["files"])
    return sorted(f for f, size in present.items() if owned.get(f) != size)


def write_once(root: str | Path, name: str, spec: dict[str, Any], write: Callable[[], Any]) -> Any:
    """Run ``write()`` to create generated files in ``root`` unless this writer's files are already there; return what
    ``write()`` returned (then or the time it ran; it must be JSON data, paths become strings).

    Args:
        root: the folder ``write`` creates its files in (subfolders included).
        name: the writer's name in the folder (its marker is ``.shapesworld-<name>.json``); several writers may share
            a folder (a train and a val split).
        spec: the writer's arguments; files written with another spec are written again.
        write: creates the files.
    Raises:
        ForeignFilesError: ``root`` holds files that no writer's marker accounts for (a user's data), named in the
            message; nothing is written.
    """
    root = Path(root)
    marker_path = root / f"{MARKER_PREFIX}{name}.json"
    spec = json.loads(json.dumps(spec, default=str))
    present, markers = _files(root), _markers(root)
    mine = markers.get(marker_path.name)
    if mine is not None and mine.get("spec") == spec and all(present.get(f) == n for f, n in mine["files"].items()):
        return mine.get("result")
    foreign = _foreign(present, markers)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ForeignFilesError(
            f"{root} holds files that ShapesWorld did not write ({shown}); it writes only into an empty or new folder "
            "or one it wrote itself. To train on these files, remove this source's ShapesWorld `writer`; to "
            "write ShapesWorld data, point the source's paths at another folder"
        )
    result = json.loads(json.dumps(write(), default=str))
    others: dict[str, int] = {}
    for other_name, other in markers.items():
        if other_name != marker_path.name:
            others.update(other["files"])
    files = {f: size for f, size in _files(root).items() if f not in others}
    marker_path.write_text(json.dumps({"spec": spec, "files": files, "result": result}))
    return result
