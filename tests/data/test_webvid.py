"""WebVid reader: real csv + mp4 files written by ShapesWorld, broken ones, frame sampling, sharding."""

import csv
import inspect
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from emu_lightning import shapesworld
from emu_lightning.data import StreamingDataModule
from emu_lightning.data.streaming import DataSourceError
from emu_lightning.data.webvid import WebVidVideos, parse_duration, read_clip, sample_times, write_mp4
from emu_lightning.sequence import SequenceBuilder, to_unit_range
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import shapesworld_clip, write_shapesworld_webvid

HEADER = ["videoid", "contentUrl", "duration", "page_dir", "name"]


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(image_size=32)


@pytest.fixture(scope="module")
def webvid(world, tmp_path_factory) -> Path:
    """Six ShapesWorld clips (16 frames at 8 fps, 32 px) in WebVid's layout; returns the csv."""
    return write_shapesworld_webvid(world, tmp_path_factory.mktemp("webvid"), num_videos=6, num_frames=16, fps=8)


def counting_video(num_frames: int) -> torch.Tensor:
    """Frames whose grey level encodes their index (8 + 15 k), so a decoded frame says which one it is."""
    return torch.stack([torch.full((3, 32, 32), (8 + 15 * k) / 255) for k in range(num_frames)])


def frame_indices(video: torch.Tensor) -> list[int]:
    return ((to_unit_range(video).mean(dim=(1, 2, 3)) * 255 - 8) / 15).round().int().tolist()


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([HEADER, *rows])
    return path


def counting_webvid(root: Path, num_videos: int = 2, num_frames: int = 16) -> Path:
    (root / "p").mkdir(parents=True)
    for i in range(num_videos):
        write_mp4(root / "p" / f"{i}.mp4", counting_video(num_frames), fps=8)
    return write_csv(root / "count.csv", [[str(i), "", "PT00H00M02S", "p", f"clip {i}"] for i in range(num_videos)])


def videos(sample: dict) -> torch.Tensor:
    (video,) = [item for item in sample["items"] if isinstance(item, torch.Tensor)]
    return to_unit_range(video)


def test_parse_duration():
    assert parse_duration("PT00H00M12S") == 12
    assert parse_duration("PT1H2M3.5S") == 3723.5
    assert parse_duration("PT2M") == 120
    assert parse_duration(" 12.5 ") == 12.5
    for bad in ["", "PT", "12s", "PT12X", "-1", "nan", "P1D"]:
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_sample_times_centres_and_segments():
    assert sample_times(2.0, 8) == [0.125 + 0.25 * k for k in range(8)]
    draws = [sample_times(2.0, 8, np.random.default_rng(seed)) for seed in range(3)]
    for times in draws:
        assert all(0.25 * k <= t < 0.25 * (k + 1) for k, t in enumerate(times))
    assert draws[0] != draws[1] and draws[0] == sample_times(2.0, 8, np.random.default_rng(0))


def test_writer_layout_and_round_trip(world, webvid):
    with webvid.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == HEADER and len(rows) == 7
    videoid, _, duration, page_dir, caption = rows[1]
    assert (videoid, duration, page_dir) == ("0", "PT00H00M02S", "000001_000100")
    assert (webvid.parent / page_dir / f"{videoid}.mp4").is_file()
    scene = world.scene("train", 0)
    assert ShapesWorld.caption_correct(caption, scene)
    assert len(re.findall(r" moves (right|left|up|down)", caption)) == len(scene.shapes) and caption.endswith(".")
    with av.open(str(webvid.parent / page_dir / f"{videoid}.mp4")) as container:
        assert container.streams.video[0].codec_context.name in ("h264", "mpeg4")
    decoded, times = read_clip(webvid.parent / page_dir / f"{videoid}.mp4", 16, 32)  # every frame, at its start
    rendered, _ = shapesworld_clip(world, "train", 0, 16)
    assert times == [k / 8 for k in range(16)]
    assert (to_unit_range(decoded) - rendered).abs().mean() < 0.03  # lossy h264, 4:2:0 chroma
    assert (rendered[0] - rendered[-1]).abs().mean() > 0.05  # the shapes do move


def test_eval_takes_the_frame_shown_at_each_segment_centre(tmp_path, world, webvid):
    write_mp4(tmp_path / "a.mp4", counting_video(16), fps=8)
    video, times = read_clip(tmp_path / "a.mp4", 8, 32)
    assert frame_indices(video) == [1, 3, 5, 7, 9, 11, 13, 15] and times == [k / 8 for k in range(1, 16, 2)]
    write_mp4(tmp_path / "b.mp4", counting_video(10), fps=8)  # centres 0.156, 0.469, 0.781, 1.094 s
    assert frame_indices(read_clip(tmp_path / "b.mp4", 4, 32)[0]) == [1, 3, 6, 8]
    source = WebVidVideos(webvid, num_frames=8, image_size=32, train=False, shuffle=False, repeat=False)
    for i, sample in enumerate(source):
        rendered, _ = shapesworld_clip(world, "train", i, 16)
        video = videos(sample)
        assert video.shape == (8, 3, 32, 32) and video.dtype == torch.float32
        assert 0 <= video.min() and video.max() <= 1
        centre, before = (video - rendered[1::2]).abs().mean(), (video - rendered[0::2]).abs().mean()
        assert centre < 0.03 and centre < before


def test_train_sampling_stays_in_segments_and_follows_the_seed(tmp_path):
    path = counting_webvid(tmp_path)
    picks = {}
    for seed in range(4):
        source = WebVidVideos(path, num_frames=8, image_size=32, seed=seed, shuffle=False, repeat=False)
        samples = list(source)
        for sample in samples:
            assert [i // 2 for i in frame_indices(videos(sample))] == list(range(8))  # frame 2k or 2k+1
            assert all(0.25 * k <= t < 0.25 * (k + 1) for k, t in enumerate(sample["times"]))
        picks[seed] = [tuple(frame_indices(videos(s))) for s in samples]
    again = WebVidVideos(path, num_frames=8, image_size=32, seed=0, shuffle=False, repeat=False)
    assert [tuple(frame_indices(videos(s))) for s in again] == picks[0]
    assert len({tuple(p) for p in picks.values()}) > 1


def test_video_first_prob(webvid):
    def first_is_video(p: float) -> list[bool]:
        source = WebVidVideos(webvid, image_size=32, video_first_prob=p, shuffle=False, repeat=False)
        return [isinstance(s["items"][0], torch.Tensor) for s in source]

    assert first_is_video(1.0) == [True] * 6 and first_is_video(0.0) == [False] * 6


def broken_webvid(root: Path, good: Path) -> Path:
    """A csv mixing each kind of bad row with good ones."""
    (root / "p").mkdir(parents=True)
    good_mp4 = next(good.parent.glob("*/0.mp4")).read_bytes()
    (root / "p" / "ok1.mp4").write_bytes(good_mp4)
    (root / "p" / "ok2.mp4").write_bytes(good_mp4)
    (root / "p" / "trunc.mp4").write_bytes(good_mp4[: len(good_mp4) // 2])
    (root / "p" / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    write_mp4(root / "p" / "short.mp4", counting_video(5), fps=8)
    rows = [
        ["ok1", "", "PT00H00M02S", "p", "a good clip"],
        ["trunc", "", "PT00H00M02S", "p", "a truncated clip"],
        ["garbage", "", "PT00H00M02S", "p", "random bytes"],
        ["gone", "", "PT00H00M02S", "p", "a missing clip"],
        ["short", "", "PT00H00M01S", "p", "five frames"],
        ["ok1", "", "PT00H00M02S", "p"],  # a field short
        ["ok1", "", "PT12X", "p", "a bad duration"],
        ["ok1", "", "PT00H00M02S", "p", "  "],
        ["ok2", "", "2", "p", "plain seconds"],
    ]
    return write_csv(root / "broken.csv", rows)


EXPECTED_SKIPS = {"corrupt_video": 2, "missing_video": 1, "too_few_frames": 1, "malformed_row": 2, "empty_caption": 1}


def test_skip_reasons_are_counted_exactly(tmp_path, webvid):
    path = broken_webvid(tmp_path, webvid)
    source = WebVidVideos(path, num_frames=8, image_size=32, rows_per_unit=4, shuffle=False, repeat=False)
    assert source.check() == {"ok": 2, "skipped": 7, "reasons": EXPECTED_SKIPS}
    samples = list(source)
    assert [s["id"] for s in samples] == ["ok1", "ok2"]
    assert dict(source.skipped) == EXPECTED_SKIPS
    carried = {}
    for sample in samples:
        for reason, n in (sample["skipped"] or {}).items():
            carried[reason] = carried.get(reason, 0) + n
    assert carried == EXPECTED_SKIPS  # the last row is good, so every skip rides on a sample


def test_a_source_with_no_usable_row_raises_with_its_reasons(tmp_path, webvid):
    path = broken_webvid(tmp_path, webvid)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for line in lines if not line.startswith(("ok1,,PT00H00M02S,p,a good", "ok2"))))
    source = WebVidVideos(path, image_size=32, repeat=True)
    with pytest.raises(DataSourceError, match="7 skipped") as error:
        next(iter(source))
    for reason, n in EXPECTED_SKIPS.items():
        assert f"{reason}: {n}" in str(error.value)


def test_csv_errors_are_clear(tmp_path):
    # the csv is indexed on first use (a writer may create it after the reader is built)
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        WebVidVideos(tmp_path / "nowhere.csv").units()
    (tmp_path / "other.csv").write_text("id,caption\n1,a cat\n")
    with pytest.raises(ValueError, match=r"missing \['videoid', 'page_dir', 'name'\]"):
        WebVidVideos(tmp_path / "other.csv").units()


def test_a_header_only_csv_is_an_error_for_training_and_a_warning_held_out(tmp_path):
    """It used to drop the source from every batch without a word."""
    path = tmp_path / "results_train.csv"
    path.write_text("videoid,contentUrl,duration,page_dir,name\n")
    with pytest.raises(DataSourceError, match=f"WebVid csv \\['{path}'\\] holds a header but no rows"):
        WebVidVideos(path, image_size=32, repeat=True).units()
    with pytest.warns(UserWarning, match="holds a header but no rows; its held-out pass reads nothing"):
        assert list(WebVidVideos(path, image_size=32, repeat=False)) == []


def test_units_are_row_chunks_and_workers_split_them(webvid):
    def source() -> WebVidVideos:
        return WebVidVideos(webvid, num_frames=4, image_size=32, rows_per_unit=2, repeat=False, seed=3)

    assert [(u.first, u.rows) for u in source().units()] == [(0, 2), (2, 2), (4, 2)]
    single = {s["id"]: s for s in source()}
    loader = DataLoader(source(), batch_size=None, num_workers=2)
    parallel = [s for s in loader]
    assert sorted(s["id"] for s in parallel) == sorted(single) == [str(i) for i in range(6)]
    for sample in parallel:  # the same frames whichever process reads the row
        assert sample["times"] == single[sample["id"]]["times"]
        assert torch.equal(videos(sample), videos(single[sample["id"]]))


def test_datamodule(webvid):
    sequencer = SequenceBuilder(shapesworld.tokenizer(), num_queries=2, max_length=256)
    reader = WebVidVideos(webvid, num_frames=4, image_size=32)
    data = StreamingDataModule(reader, val={"csv": str(webvid)}, batch_size=4, sequencer=sequencer)
    batches = iter(data.train_dataloader())
    for _ in range(3):  # 12 samples from 6 rows: the training reader repeats
        batch = next(batches)
        assert batch["image_counts"].tolist() == [4, 4, 4, 4] and batch["images"].shape == (16, 3, 32, 32)
    val = list(data.val_dataloader())
    assert [i for b in val for i in b["id"]] == [str(i) for i in range(6)]
    assert all(t == [0.25, 0.75, 1.25, 1.75] for b in val for t in b["times"])
    for documented in (StreamingDataModule, WebVidVideos):  # the DataModule's and the reader's arguments
        doc = inspect.getdoc(documented)
        for name in inspect.signature(documented).parameters:
            assert re.search(rf"^\s+{name}: \S", doc, re.M), f"{documented.__name__}: {name} lacks a line in Args"


def test_a_stream_without_timing_uses_the_csv_duration(tmp_path):
    """A raw h264 stream has no timestamps nor duration: frames are timed at the rate FFmpeg guesses (25 fps)
    over the csv's duration, and frames that stop a whole segment short of it make the video unusable."""
    with av.open(str(tmp_path / "raw.mp4"), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        for frame in (counting_video(16) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    video, times = read_clip(tmp_path / "raw.mp4", 8, 32, duration=0.64)  # 16 frames at 1/25 s
    assert frame_indices(video) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert times == pytest.approx([k / 25 for k in range(1, 16, 2)])
    (tmp_path / "p").mkdir()
    (tmp_path / "raw.mp4").rename(tmp_path / "p" / "raw.mp4")
    source = WebVidVideos(write_csv(tmp_path / "raw.csv", [["raw", "", "PT00H00M02S", "p", "x"]]), image_size=32)
    assert source.check()["reasons"] == {"corrupt_video": 1}
    (skip,) = source.read(source.units()[0], np.random.default_rng(0))
    assert "frames end at 0.60s of a 2.00s video" in skip.detail
