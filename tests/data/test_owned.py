"""ShapesWorld writers create files only in an empty folder or one they wrote: a user's data is never replaced."""

import json

import pytest

from emu_lightning.data import ImageTextShards, StreamingDataModule, WebVidVideos
from emu_lightning.shapesworld import ShapesWorldWriter
from emu_lightning.shapesworld.owned import ForeignFilesError, write_once


def pairs(urls, train):
    """The tiny config's pairs source: img2dataset shards at ``urls`` with ShapesWorld's writer on."""
    return StreamingDataModule(ImageTextShards(urls, image_size=32), writer=ShapesWorldWriter(train=train))


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_users_shards_are_never_replaced(tmp_path):
    """The tiny config copied, `urls` pointed at the user's shards, the writer `{train: 4000}` left in."""
    mine = tmp_path / "laion"
    mine.mkdir()
    for k in range(4):
        (mine / f"{k:05d}.tar").write_bytes(f"my shard {k}".encode())
    before = _snapshot(mine)
    data = pairs(str(mine / "{00000..00003}.tar"), 4000)
    with pytest.raises(ForeignFilesError, match=f"{mine} holds files that ShapesWorld did not write \\(00000.tar, "):
        data.prepare_data()
    assert _snapshot(mine) == before  # nothing replaced, no marker that would pass them off as generated


def test_a_users_webvid_folder_gets_no_videos(tmp_path):
    mine = tmp_path / "webvid"
    mine.mkdir()
    (mine / "results_2M_train.csv").write_text("videoid,contentUrl,duration,page_dir,name\n")
    reader = WebVidVideos(str(mine / "results_2M_train.csv"), image_size=32)
    data = StreamingDataModule(reader, writer=ShapesWorldWriter(train=400))
    with pytest.raises(ForeignFilesError, match="results_2M_train.csv"):
        data.prepare_data()
    assert [p.name for p in mine.rglob("*")] == ["results_2M_train.csv"]


def test_written_once_reused_rewritten_only_while_the_folder_is_its_own(tmp_path):
    root = tmp_path / "pairs"
    urls = str(root / "{00000..00001}.tar")
    pairs(urls, 8).prepare_data()  # an absent folder: written
    marker = json.loads((root / ".shapesworld-train.json").read_text())
    assert sorted(marker["files"]) == ["00000.tar", "00001.tar"] and marker["spec"]["train"] == 8
    written = _snapshot(root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.iterdir()}
    pairs(urls, 8).prepare_data()  # the same spec: reused as it is
    assert {p: p.stat().st_mtime_ns for p in root.iterdir()} == mtimes
    pairs(urls, 12).prepare_data()  # another spec: its own files, rewritten
    assert _snapshot(root) != written
    (root / "notes.txt").write_text("mine")  # a user's file in the folder: no more rewriting there
    with pytest.raises(ForeignFilesError, match="notes.txt"):
        pairs(urls, 16).prepare_data()
    (root / "notes.txt").unlink()
    (root / "00001.tar").write_bytes(b"edited by hand")  # a generated file changed since: not ours any more
    with pytest.raises(ForeignFilesError, match="00001.tar"):
        pairs(urls, 16).prepare_data()


def test_a_marker_without_a_manifest_proves_nothing(tmp_path):
    """Earlier versions' markers held the spec alone: the files beside them may be anyone's."""
    (tmp_path / "00000.tar").write_bytes(b"x")
    (tmp_path / ".shapesworld-train.json").write_text(json.dumps({"train": 8, "image_size": 32}))
    with pytest.raises(ForeignFilesError, match="00000.tar"):
        write_once(tmp_path, "train", {"train": 8}, lambda: None)


def test_splits_share_a_folder(tmp_path):
    calls = []

    def writer(name):
        def write():
            calls.append(name)
            (tmp_path / f"{name}.bin").write_bytes(name.encode())
            return [str(tmp_path / f"{name}.bin")]

        return write

    assert write_once(tmp_path, "train", {"n": 1}, writer("train")) == [str(tmp_path / "train.bin")]
    assert write_once(tmp_path, "val", {"n": 1}, writer("val")) == [str(tmp_path / "val.bin")]
    assert write_once(tmp_path, "train", {"n": 1}, writer("train")) == [str(tmp_path / "train.bin")]  # from its marker
    assert calls == ["train", "val"]
    assert json.loads((tmp_path / ".shapesworld-val.json").read_text())["files"] == {"val.bin": 3}
