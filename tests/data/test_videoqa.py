"""Video QA readers: hand-made annotation files in MSVD-QA's, MSRVTT-QA's and NExT-OE's released formats, and tiny
real mp4 videos (solid colours changing per frame) decoded at segment centres."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from emu_lightning.data.videoqa import (
    VideoQAExample,
    load_clip,
    read_msrvtt_qa,
    read_msvd_qa,
    read_nextqa_oe,
    sample_frame_indices,
)

NUM_FRAMES = 20


def colour(i: int) -> tuple[int, int, int]:
    """Frame i's solid colour: red steps by 12 per frame, so the frame index reads back from the red channel."""
    return (12 * i, 240 - 12 * i, 60)


def write_video(path: Path, num_frames: int = NUM_FRAMES, size: int = 32, faststart: bool = False) -> Path:
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0"} if codec == "libx264" else {"qscale": "1"}
        for i in range(num_frames):
            rgb = np.empty((size, size, 3), dtype=np.uint8)
            rgb[:] = colour(i)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------------------- frame indices
def test_sample_frame_indices_are_segment_centres() -> None:
    # 20 frames, 8 segments of 2.5 frames: centres 1.25, 3.75, 6.25, 8.75, 11.25, 13.75, 16.25, 18.75 -> floor
    assert sample_frame_indices(20, 8) == [1, 3, 6, 8, 11, 13, 16, 18]
    assert sample_frame_indices(8, 8) == list(range(8))  # one frame per segment, centre 0.5 + k -> k
    assert sample_frame_indices(16, 4) == [2, 6, 10, 14]  # segments of 4, centres 2, 6, 10, 14
    # 3 frames, 8 segments of 3/8: centres 3/16, 9/16, 15/16, 21/16, 27/16, 33/16, 39/16, 45/16 -> repeats
    assert sample_frame_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert sample_frame_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 8)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0)


# ------------------------------------------------------------------------------------------------------- decoding
def test_load_clip_decodes_the_segment_centre_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4")
    clip = load_clip(path, n=8, image_size=16)
    assert clip is not None
    assert clip.shape == (8, 3, 16, 16) and clip.dtype.is_floating_point
    assert 0.0 <= clip.min() and clip.max() <= 1.0
    means = (clip.mean(dim=(2, 3)) * 255).numpy()  # (8, 3)
    expected = np.array([colour(i) for i in [1, 3, 6, 8, 11, 13, 16, 18]], dtype=np.float64)
    assert np.abs(means - expected).max() < 6, (means.round(), expected)
    frame_index = np.round(means[:, 0] / 12).astype(int).tolist()
    assert frame_index == [1, 3, 6, 8, 11, 13, 16, 18]


def test_load_clip_of_a_short_video_repeats_frames(tmp_path: Path) -> None:
    clip = load_clip(write_video(tmp_path / "short.mp4", num_frames=3), n=8, image_size=8)
    assert clip is not None and clip.shape == (8, 3, 8, 8)
    frame_index = np.round((clip.mean(dim=(2, 3)) * 255).numpy()[:, 0] / 12).astype(int).tolist()
    assert frame_index == [0, 0, 0, 1, 1, 2, 2, 2]


def test_load_clip_missing_or_corrupt_video_is_none_with_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="missing.mp4"):
        assert load_clip(tmp_path / "missing.mp4", n=8, image_size=16) is None
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video" * 50)
    with pytest.warns(UserWarning, match="garbage.mp4"):
        assert load_clip(tmp_path / "garbage.mp4", n=8, image_size=16) is None
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.warns(UserWarning, match="empty.mp4"):
        assert load_clip(tmp_path / "empty.mp4", n=8, image_size=16) is None
    good = write_video(tmp_path / "good.mp4").read_bytes()
    (tmp_path / "head.mp4").write_bytes(good[:200])  # cut inside the header: no decodable frames
    with pytest.warns(UserWarning, match="head.mp4"):
        assert load_clip(tmp_path / "head.mp4", n=8, image_size=16) is None
    # the index first (faststart), the frame data cut: the container declares 20 frames, decoding fails part way
    whole = write_video(tmp_path / "whole.mp4", faststart=True).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(whole[: int(len(whole) * 0.6)])
    with pytest.warns(UserWarning, match="truncated.mp4"):
        assert load_clip(tmp_path / "truncated.mp4", n=8, image_size=16) is None


# ------------------------------------------------------------------------------------------------------- MSVD-QA
MSVD_QA = [
    {"answer": "dog", "id": 0, "question": "what is playing?", "video_id": 1},
    {"answer": "run", "id": 1, "question": "what does the man do?", "video_id": 2},
]


def test_read_msvd_qa_with_the_youtube_mapping(tmp_path: Path) -> None:
    qa = write_json(tmp_path / "test_qa.json", MSVD_QA)
    mapping = tmp_path / "youtube_mapping.txt"
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n\n")
    clips = tmp_path / "YouTubeClips"
    clips.mkdir()
    (clips / "-7KMZQEsJW4_205_208.mp4").write_bytes(b"")  # only an .mp4 copy of vid2: that one is used
    examples = read_msvd_qa(qa, clips, mapping)
    assert examples == [
        VideoQAExample("0", "1", clips / "-4wsuPCjDBc_5_15.avi", "what is playing?", ("dog",)),
        VideoQAExample("1", "2", clips / "-7KMZQEsJW4_205_208.mp4", "what does the man do?", ("run",)),
    ]


def test_read_msvd_qa_without_mapping_uses_vid_names(tmp_path: Path) -> None:
    qa = write_json(tmp_path / "test_qa.json", MSVD_QA)
    write_video(tmp_path / "vid2.mp4")
    examples = read_msvd_qa(qa, tmp_path)
    assert [e.video_path.name for e in examples] == ["vid1.avi", "vid2.mp4"]
    assert load_clip(examples[1].video_path, n=8, image_size=8).shape == (8, 3, 8, 8)
    with pytest.warns(UserWarning, match="vid1.avi"):
        assert load_clip(examples[0].video_path, n=8, image_size=8) is None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid json"),
        (json.dumps({"questions": []}), "must be a json list"),
        (json.dumps([]), "has no entries"),
        (json.dumps([MSVD_QA[0], {"answer": "x", "id": 5, "video_id": 3}]), r"entry 1 \(id 5\).*'question'"),
        (json.dumps([{"answer": "x", "id": "7", "question": "q", "video_id": 3}]), r"entry 0 \(id '7'\).*'id'"),
        (json.dumps([{"answer": "", "id": 7, "question": "q", "video_id": 3}]), "'answer' must be non-empty"),
        (json.dumps([MSVD_QA[0], MSVD_QA[0]]), "appears twice"),
        (json.dumps(["entry"]), "entry 0 .* is a str"),
    ],
)
def test_read_msvd_qa_broken_files(tmp_path: Path, content: str, match: str) -> None:
    qa = tmp_path / "test_qa.json"
    qa.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        read_msvd_qa(qa, tmp_path)
    assert "test_qa.json" in str(info.value)


def test_read_msvd_qa_missing_files_and_bad_mapping(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        read_msvd_qa(tmp_path / "nowhere.json", tmp_path)
    qa = write_json(tmp_path / "test_qa.json", MSVD_QA)
    with pytest.raises(FileNotFoundError, match="youtube_mapping.txt"):
        read_msvd_qa(qa, tmp_path, tmp_path / "youtube_mapping.txt")
    mapping = tmp_path / "youtube_mapping.txt"
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\nbroken line here\n")
    with pytest.raises(ValueError, match="line 2 of .*youtube_mapping.txt"):
        read_msvd_qa(qa, tmp_path, mapping)
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\n")
    with pytest.raises(ValueError, match=r"entry 1 \(id 1\).*video_id 2 \(vid2\) is not in"):
        read_msvd_qa(qa, tmp_path, mapping)


# ------------------------------------------------------------------------------------------------------- MSRVTT-QA
def test_read_msrvtt_qa(tmp_path: Path) -> None:
    qa = write_json(
        tmp_path / "test_qa.json",
        [
            {"answer": "man", "category_id": 9, "id": 158581, "question": "who is talking?", "video_id": 7010},
            {"answer": "song", "category_id": 0, "id": 158582, "question": "what is sung?", "video_id": 7011},
        ],
    )
    examples = read_msrvtt_qa(qa, tmp_path / "TestVideo")
    assert examples[0] == VideoQAExample(
        "158581", "7010", tmp_path / "TestVideo" / "video7010.mp4", "who is talking?", ("man",)
    )
    assert [e.key for e in examples] == ["158581", "158582"]
    write_json(qa, [{"answer": "man", "category_id": 9, "id": 1, "question": "who?"}])
    with pytest.raises(ValueError, match=r"entry 0 \(id 1\) of .*test_qa.json has no 'video_id'"):
        read_msrvtt_qa(qa, tmp_path)


# ------------------------------------------------------------------------------------------------------- NExT-QA
NEXT_CSV = (
    "video,frame_count,width,height,question,answer,qid,type\n"
    "3233088823,462,640,480,how is the bulldozer controlled,from the drivers cabin,3,CH\n"
    "4010069381,369,640,480,what are the people doing in the video,performing,9,TC\n"
    "4010069381,369,640,480,why does the lady walk away,help man do something else,3,CW\n"
)


def test_read_nextqa_oe_with_map_and_extra_answers(tmp_path: Path) -> None:
    csv_path = tmp_path / "val.csv"
    csv_path.write_text(NEXT_CSV)
    map_json = write_json(
        tmp_path / "map_vid_vidorID.json", {"3233088823": "1001/3233088823", "4010069381": "0000/4010069381"}
    )
    extra = write_json(tmp_path / "add_reference_answer_val.json", {"4010069381": {"9": "play music"}})
    root = tmp_path / "NExTVideo"
    examples = read_nextqa_oe(csv_path, root, map_json, extra)
    assert examples[0] == VideoQAExample(
        "3233088823_3",
        "3233088823",
        root / "1001" / "3233088823.mp4",
        "how is the bulldozer controlled",
        ("from the drivers cabin",),
        "CH",
    )
    assert examples[1].answers == ("performing", "play music")
    assert [e.key for e in examples] == ["3233088823_3", "4010069381_9", "4010069381_3"]
    assert [e.question_type for e in examples] == ["CH", "TC", "CW"]
    # without a map: <root>/<video>.mp4, and a real video there decodes
    root.mkdir()
    write_video(root / "3233088823.mp4")
    examples = read_nextqa_oe(csv_path, root)
    assert examples[0].video_path == root / "3233088823.mp4"
    assert load_clip(examples[0].video_path, 8, 8).shape == (8, 3, 8, 8)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("video,question,answer,qid\n1,q,a,0\n", r"missing \['type'\]"),
        ("", r"missing \['video', 'question'"),
        ("video,frame_count,width,height,question,answer,qid,type\n", "no rows"),
        (NEXT_CSV + "5,10,640,480,a question,an answer,0\n", "line 5 of .*val.csv has 7 fields"),
        (NEXT_CSV + "5,10,640,480,a question,,0,CW\n", r"line 5 of .*val.csv \(video '5', qid '0'\).*\['answer'\]"),
        (NEXT_CSV + "4010069381,369,640,480,again,yes,9,DB\n", "line 5 .*qid 9 appears twice"),
    ],
)
def test_read_nextqa_oe_broken_csv(tmp_path: Path, content: str, match: str) -> None:
    csv_path = tmp_path / "val.csv"
    csv_path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        read_nextqa_oe(csv_path, tmp_path)
    assert "val.csv" in str(info.value)


def test_read_nextqa_oe_missing_files_and_bad_map(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="test.csv"):
        read_nextqa_oe(tmp_path / "test.csv", tmp_path)
    csv_path = tmp_path / "val.csv"
    csv_path.write_text(NEXT_CSV)
    with pytest.raises(FileNotFoundError, match="map_vid_vidorID.json"):
        read_nextqa_oe(csv_path, tmp_path, tmp_path / "map_vid_vidorID.json")
    map_json = write_json(tmp_path / "map_vid_vidorID.json", {"3233088823": "1001/3233088823"})
    with pytest.raises(ValueError, match="line 3 of .*val.csv: video 4010069381 is not in .*map_vid_vidorID.json"):
        read_nextqa_oe(csv_path, tmp_path, map_json)
    write_json(map_json, ["not", "a", "map"])
    with pytest.raises(ValueError, match="map_vid_vidorID.json.*must be a json object"):
        read_nextqa_oe(csv_path, tmp_path, map_json)
