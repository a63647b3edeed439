"""The data check command: every format from ShapesWorld files with some samples broken, counted exactly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from webdataset import TarWriter

from emu_lightning.data import check
from emu_lightning.data.pairs import shard_pattern
from emu_lightning.data.webvid import write_mp4
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import (
    shapesworld_pair_record,
    write_shapesworld_llava,
    write_shapesworld_mmc4,
    write_shapesworld_pairs,
    write_shapesworld_storyboard,
    write_shapesworld_webvid,
)

SIZE = ["--image-size", "32"]


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(image_size=32)


def run_check(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict]:
    """``check.main(argv)`` in this process: its exit code and the one JSON object it prints."""
    code = check.main(list(argv))
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, f"expected one JSON line, got {out!r}"
    return code, json.loads(out)


def counts(report: dict) -> dict:
    return {k: report[k] for k in ("ok", "skipped", "reasons")}


def without_examples(report):
    """The report without its examples, which every reason has one of (checked here)."""
    assert set(report.get("examples", {})) == set(report.get("reasons", {}))
    return {k: v for k, v in report.items() if k != "examples"}


def write_tar(path: Path, records: list[dict]) -> str:
    with TarWriter(str(path), encoder=False, mtime=0) as sink:
        for record in records:
            sink.write(record)
    return str(path)


# ---------------------------------------------------------------------- webdataset
@pytest.fixture(scope="module")
def pairs(world, tmp_path_factory) -> tuple[str, str, str]:
    """Two good shards of 3 pairs (a brace pattern), a shard of 3 bad pairs and 1 good one, a missing shard."""
    root = tmp_path_factory.mktemp("pairs")
    write_shapesworld_pairs(world, root, num_samples=6, shard_size=3)
    records = [shapesworld_pair_record(world, "train", i, "png", None) for i in range(10, 14)]
    del records[0]["txt"]
    records[1]["png"] = records[1]["png"][:40]  # truncated PNG
    records[2]["txt"] = b"  \n"
    mixed = write_tar(root / "mixed.tar", records)
    return shard_pattern(root, 2), mixed, str(root / "missing.tar")


def test_webdataset_counts_good_and_broken_pairs(pairs, capsys):
    pattern, mixed, missing = pairs
    code, report = run_check(capsys, "--format", "webdataset", pattern, mixed, missing, *SIZE)
    assert code == 0
    assert without_examples(report) == {
        "format": "webdataset",
        "paths": [pattern, mixed, missing],
        "ok": 7,
        "skipped": 4,
        "reasons": {"missing_caption": 1, "corrupt_image": 1, "empty_caption": 1, "unreadable_shard": 1},
    }
    # each reason's first case names the shard and the sample's key (the missing shard: its path)
    assert report["examples"]["corrupt_image"].startswith(f"{mixed}:000000011: ")
    assert report["examples"]["missing_caption"] == f"{mixed}:000000010"
    assert report["examples"]["unreadable_shard"].startswith(f"{missing}: ")


def test_limit_stops_early(pairs, capsys):
    pattern, mixed, _ = pairs
    code, report = run_check(capsys, "--format", "webdataset", mixed, pattern, "--limit", "2", *SIZE)
    assert code == 1 and counts(report) == {
        "ok": 0,
        "skipped": 2,
        "reasons": {"missing_caption": 1, "corrupt_image": 1},
    }
    code, report = run_check(capsys, "--format", "webdataset", mixed, "--limit", "4", *SIZE)
    assert code == 0 and (report["ok"], report["skipped"]) == (1, 3)
    with pytest.raises(SystemExit) as error:
        check.main(["--format", "webdataset", mixed, "--limit", "0"])
    assert error.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_the_module_runs_as_a_command(pairs):
    """``python -m emu_lightning.data.check`` in a fresh process (one, as importing the package takes seconds):
    one JSON line on stdout, and exit status 1 for a source without a usable sample."""
    _, mixed, _ = pairs
    command = [sys.executable, "-m", "emu_lightning.data.check", "--format", "webdataset", mixed, "--limit", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *SIZE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stdout.count("\n") == 1
    assert without_examples(json.loads(done.stdout)) == {
        "format": "webdataset",
        "paths": [mixed],
        "ok": 0,
        "skipped": 3,
        "reasons": {"missing_caption": 1, "corrupt_image": 1, "empty_caption": 1},
    }


# ---------------------------------------------------------------------- MMC4
def break_images(image_dir: Path, docs: list[dict]) -> None:
    """Document 0 loses one of its two images (file deleted), document 1 both (bytes corrupted)."""
    (image_dir / docs[0]["image_info"][0]["image_name"]).unlink()
    for info in docs[1]["image_info"]:
        (image_dir / info["image_name"]).write_bytes(b"\x89PNG\r\n\x1a\n but no more")


MMC4_REASONS = {"missing_image": 1, "corrupt_image": 2, "no_images": 1, "malformed_json": 1}


def test_mmc4_jsonl_with_an_image_dir(world, tmp_path, capsys):
    paths = write_shapesworld_mmc4(world, tmp_path, num_docs=4, images_per_doc=(2, 2), docs_per_file=2)
    docs = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines()]
    break_images(tmp_path / "images", docs)
    with open(paths[1], "a") as f:
        f.write("{not json\n")
    args = ["--format", "mmc4", *paths, *SIZE, "--sim-threshold", "0"]  # keep every image: exact counts
    code, report = run_check(capsys, *args, "--image-dir", str(tmp_path / "images"))
    assert code == 0
    assert without_examples(report) == {
        "format": "mmc4",
        "paths": paths,
        "ok": 3,
        "skipped": 5,
        "reasons": MMC4_REASONS,
    }
    # Without --image-dir the images are looked for next to the jsonl files, where there are none.
    code, report = run_check(capsys, *args)
    assert code == 1
    assert counts(report) == {
        "ok": 0,
        "skipped": 4 * 2 + 4 + 1,
        "reasons": {"missing_image": 8, "no_images": 4, "malformed_json": 1},
    }
    # A glob pattern and the default threshold 0.32: document 1's first image (matched_sim 0.2461) is filtered
    # without being counted, so only its second one counts as corrupt.
    assert [info["matched_sim"] < 0.32 for doc in docs for info in doc["image_info"]] == [0, 0, 1, 0, 0, 0, 0, 0]
    images = ["--image-dir", str(tmp_path / "images")]
    code, report = run_check(capsys, "--format", "mmc4", str(tmp_path / "*.jsonl"), *images, *SIZE)
    assert code == 0
    assert counts(report) == {
        "ok": 3,
        "skipped": 4,
        "reasons": {"missing_image": 1, "corrupt_image": 1, "no_images": 1, "malformed_json": 1},
    }


def test_mmc4_tar_shards(world, tmp_path, capsys):
    paths = write_shapesworld_mmc4(world, tmp_path, num_docs=4, images_per_doc=(2, 2), docs_per_file=2, layout="wds")
    plain = write_shapesworld_mmc4(world, tmp_path / "src", num_docs=2, images_per_doc=(2, 2), layout="jsonl")
    docs = [json.loads(line) for line in Path(plain[0]).read_text().splitlines()]
    for d in docs:
        for info in d["image_info"]:
            info["image_base64"] = "bm90IGFuIGltYWdl"  # valid base64 of b"not an image"
    del docs[1]["image_info"][0]["image_base64"]
    broken = write_tar(
        tmp_path / "broken.tar",
        [
            {"__key__": "a", "json": json.dumps(docs[0]).encode()},  # both images corrupt
            {"__key__": "b", "json": json.dumps(docs[1]).encode()},  # one missing, one corrupt
            {"__key__": "c", "txt": b"no json member"},
        ],
    )
    missing = str(tmp_path / "missing.tar")
    code, report = run_check(capsys, "--format", "mmc4", *paths, broken, missing, *SIZE, "--sim-threshold", "0")
    assert code == 0
    assert counts(report) == {
        "ok": 4,
        "skipped": 3 + 2 + 1 + 1 + 1,
        "reasons": {"corrupt_image": 3, "no_images": 2, "missing_image": 1, "malformed_json": 1, "unreadable_file": 1},
    }


# ---------------------------------------------------------------------- WebVid
def test_webvid_with_a_video_dir_elsewhere(world, tmp_path, capsys):
    videos = tmp_path / "videos"
    written = write_shapesworld_webvid(world, videos, num_videos=4, num_frames=8, fps=8)
    csv_path = tmp_path / "meta" / "results.csv"
    csv_path.parent.mkdir()
    shutil.move(written, csv_path)
    lines = csv_path.read_text().splitlines()
    page, first = lines[1].split(",")[3], lines[1].split(",")[0]
    lines += [
        f"{first},,PT00H00M01S,{page},",  # empty caption
        "1,2,3",  # wrong number of fields
        f"404,,PT00H00M01S,{page},a clip that was never downloaded",
    ]
    csv_path.write_text("\n".join(lines) + "\n")
    mp4s = sorted((videos / page).glob("*.mp4"))
    mp4s[1].write_bytes(mp4s[1].read_bytes()[:300])  # truncated
    mp4s[2].write_bytes(b"not an mp4 at all" * 10)
    args = ["--format", "webvid", str(csv_path), *SIZE, "--num-frames", "4"]
    code, report = run_check(capsys, *args, "--video-dir", str(videos))
    assert code == 0
    assert without_examples(report) == {
        "format": "webvid",
        "paths": [str(csv_path)],
        "ok": 2,
        "skipped": 5,
        "reasons": {"corrupt_video": 2, "empty_caption": 1, "malformed_row": 1, "missing_video": 1},
    }
    # Without --video-dir, the clips are looked for next to the csv.
    code, report = run_check(capsys, *args)
    assert code == 1
    assert counts(report) == {
        "ok": 0,
        "skipped": 7,
        "reasons": {"missing_video": 5, "empty_caption": 1, "malformed_row": 1},
    }


# ---------------------------------------------------------------------- storyboards
def test_storyboard_drops_frames_and_documents(world, tmp_path, capsys):
    index = write_shapesworld_storyboard(world, tmp_path / "sb", num_videos=3, frames_per_video=2)
    (tmp_path / "sb" / "frames" / "train_000000" / "001.png").unlink()  # the document keeps its other frame
    (tmp_path / "sb" / "frames" / "train_000002" / "000.png").write_bytes(b"garbage")
    (tmp_path / "sb" / "subtitles" / "train_000001.vtt").unlink()  # the whole document goes
    with index.open("a") as f:
        f.write("{not json\n")
    reasons = {"missing_frame": 1, "corrupt_frame": 1, "missing_subtitles": 1, "malformed_json": 1}
    code, report = run_check(capsys, "--format", "storyboard", str(index), *SIZE)
    assert code == 0
    assert without_examples(report) == {
        "format": "storyboard",
        "paths": [str(index)],
        "ok": 2,
        "skipped": 4,
        "reasons": reasons,
    }
    # An index kept apart from its frames and subtitles: --root says where they are.
    moved = tmp_path / "index.jsonl"
    shutil.move(index, moved)
    code, report = run_check(capsys, "--format", "storyboard", str(moved), *SIZE, "--root", str(tmp_path / "sb"))
    assert code == 0 and counts(report) == {"ok": 2, "skipped": 4, "reasons": reasons}
    code, report = run_check(capsys, "--format", "storyboard", str(moved), *SIZE)
    assert code == 1 and counts(report) == {
        "ok": 0,
        "skipped": 4,
        "reasons": {"missing_subtitles": 3, "malformed_json": 1},
    }


# ---------------------------------------------------------------------- instruction conversations
def chat(*values: str) -> list[dict]:
    """Alternating human / gpt turns."""
    return [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(values)]


def test_llava_with_an_image_dir_elsewhere(world, tmp_path, capsys):
    written = write_shapesworld_llava(world, tmp_path / "sw", num_dialogues=4)
    entries = json.loads(written.read_text())
    assert entries[2]["image"] == "images/shapes_train_000000000002.png"  # no other dialogue shows scene 2
    (tmp_path / "sw" / entries[2]["image"]).write_bytes(b"garbage")
    entries += [
        {"id": "x", "image": "images/none.png", "conversations": chat("<image>\nwhat?", "a shape.")},
        {"id": "y", "conversations": chat("<image>\nwhat?", "a shape.")},  # a tag without an image
    ]
    path = tmp_path / "meta" / "llava.json"
    path.parent.mkdir()
    path.write_text(json.dumps(entries))
    code, report = run_check(capsys, "--format", "llava", str(path), *SIZE, "--image-dir", str(tmp_path / "sw"))
    assert code == 0
    assert without_examples(report) == {
        "format": "llava",
        "paths": [str(path)],
        "ok": 3,
        "skipped": 3,
        "reasons": {"corrupt_image": 1, "missing_image": 1, "image_tag_mismatch": 1},
    }
    # Without --image-dir, the images are looked for next to the json, where there are none.
    code, report = run_check(capsys, "--format", "llava", str(path), *SIZE)
    assert code == 1
    assert counts(report) == {"ok": 0, "skipped": 6, "reasons": {"missing_image": 5, "image_tag_mismatch": 1}}


def test_sharegpt_and_alpaca(tmp_path, capsys):
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(
        json.dumps(
            [
                {"id": "a", "conversations": chat("hi", "hello.")},
                {"id": "b", "conversations": [{"from": "gpt", "value": "i start."}, *chat("ok", "fine.")]},
                {"id": "c", "conversations": [{"from": "human", "value": "hi"}, *chat("again", "x.")]},
                {"id": "d", "conversations": chat("hi", " ")},
            ]
        )
    )
    code, report = run_check(capsys, "--format", "sharegpt", str(sharegpt))
    assert code == 0 and counts(report) == {
        "ok": 2,
        "skipped": 3,
        "reasons": {"dropped_leading_turn": 1, "bad_roles": 1, "empty_turn": 1},
    }
    alpaca = tmp_path / "alpaca.jsonl"
    lines = [{"instruction": "say hi.", "input": "", "output": "hi."}, {"instruction": "say hi.", "input": ""}]
    alpaca.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{not json\n")
    code, report = run_check(capsys, "--format", "alpaca", str(alpaca))
    assert code == 0 and counts(report) == {"ok": 1, "skipped": 2, "reasons": {"missing_field": 1, "malformed_json": 1}}


@pytest.mark.parametrize(
    ("fmt", "entries"),
    [
        ("videochat", [{"video": "clip.mp4", "QA": [{"q": "what?", "a": "a clip."}]},
                       {"video": "gone.mp4", "QA": [{"q": "what?", "a": "a clip."}]}]),
        ("video_chatgpt", [{"video_id": "clip", "q": "what?", "a": "a clip."},
                           {"video_id": "gone", "q": "what?", "a": "a clip."}]),
    ],
)  # fmt: skip
def test_video_instructions_with_a_video_dir_elsewhere(fmt, entries, tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    write_mp4(tmp_path / "videos" / "clip.mp4", torch.rand(8, 3, 32, 32), fps=8)
    path = tmp_path / f"{fmt}.json"
    path.write_text(json.dumps(entries))
    args = ["--format", fmt, str(path), *SIZE, "--num-frames", "4"]
    code, report = run_check(capsys, *args, "--video-dir", str(tmp_path / "videos"))
    assert code == 0
    assert without_examples(report) == {
        "format": fmt,
        "paths": [str(path)],
        "ok": 1,
        "skipped": 1,
        "reasons": {"missing_video": 1},
    }
    code, report = run_check(capsys, *args)
    assert code == 1 and counts(report) == {"ok": 0, "skipped": 2, "reasons": {"missing_video": 2}}


# ---------------------------------------------------------------------- nothing usable
def test_an_all_bad_source_exits_1_with_its_reasons(pairs, tmp_path, capsys):
    _, mixed, _ = pairs
    bad = write_tar(tmp_path / "bad.tar", [{"__key__": "x", "png": b"broken", "txt": b"a caption"}])
    code, report = run_check(capsys, "--format", "webdataset", bad, *SIZE)
    assert code == 1
    assert counts(report) == {"ok": 0, "skipped": 1, "reasons": {"corrupt_image": 1}} and "error" not in report


@pytest.mark.parametrize(
    ("fmt", "name", "expected"),
    [
        ("webdataset", "gone.tar", {"reasons": {"unreadable_shard": 1}}),
        ("mmc4", "gone.jsonl", {"reasons": {"unreadable_file": 1}}),
        ("mmc4", "gone_*.jsonl", {"error": "ValueError: paths pattern"}),
        ("mmc4", "gone.txt", {"error": "ValueError: "}),
        ("webvid", "gone.csv", {"error": "FileNotFoundError: WebVid csv"}),
        ("storyboard", "gone.jsonl", {"error": "FileNotFoundError: storyboard index"}),
        ("llava", "gone.json", {"error": "FileNotFoundError: instruction file"}),
        ("alpaca", "gone.txt", {"error": "ValueError: "}),
    ],
)
def test_a_missing_path_exits_1(fmt, name, expected, tmp_path, capsys):
    path = str(tmp_path / name)
    code, report = run_check(capsys, "--format", fmt, path)
    assert code == 1 and report["format"] == fmt and report["paths"] == [path] and report["ok"] == 0
    if "reasons" in expected:
        assert report["reasons"] == expected["reasons"] and "error" not in report
    else:
        assert report["error"].startswith(expected["error"]) and report["reasons"] == {} and report["skipped"] == 0
