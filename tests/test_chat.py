"""`emu-lightning chat`: inline media paths, conversations from standard input, streamed answers."""

import io
import json

import pytest
import torch
from conftest import make_model
from torchvision.utils import save_image

from emu_lightning.chat import MediaError, Session, parse_turn, read_conversation, run_stdin
from emu_lightning.conversation import ConversationError
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import write_shapesworld_webvid


def test_inline_image_and_video_paths_become_items(tmp_path):
    world = ShapesWorld(image_size=16)
    save_image(world.image("val", 0), tmp_path / "a.png")
    csv = write_shapesworld_webvid(world, tmp_path / "videos", num_videos=1, num_frames=8, fps=8)
    video = next((csv.parent).rglob("*.mp4"))
    items = parse_turn(f"compare {tmp_path / 'a.png'} with @{video} please", image_size=16, num_frames=4)
    assert items[0] == "compare" and items[2] == "with" and items[4] == "please"
    torch.testing.assert_close(items[1], world.image("val", 0), atol=1 / 255, rtol=0)  # PNG round trip
    assert items[3].shape == (4, 3, 16, 16) and items[3].dtype == torch.uint8
    assert parse_turn("no media here, e.g. a .png file.", 16) == ["no media here, e.g. a .png file."]
    # punctuation after a path, brackets around it, quotes around a path with spaces
    a = tmp_path / "a.png"
    (tmp_path / "my scene.png").write_bytes(a.read_bytes())
    for text in (f"what is in {a}?", f"({a})", f"look: {a}.", f'"{tmp_path / "my scene.png"}" what?'):
        assert sum(isinstance(i, torch.Tensor) for i in parse_turn(text, 16)) == 1, text
    both = parse_turn(f"compare {a}, {a}.", 16)
    assert [type(i).__name__ for i in both] == ["str", "Tensor", "str", "Tensor", "str"]  # "compare", ",", "."
    with pytest.raises(MediaError, match="quote a path that holds spaces"):
        parse_turn(f"{tmp_path}/my missing.png", 16)
    with pytest.raises(MediaError, match="no such file: 'missing.png'"):
        parse_turn("what is missing.png", 16)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(MediaError, match="cannot read image"):
        parse_turn(f"{tmp_path / 'broken.png'}", 16)


def test_conversations_from_standard_input():
    assert read_conversation("hello\n\nhow many?\n") == [
        {"role": "user", "content": "hello"},
        {"role": "user", "content": "how many?"},
    ]
    llava = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello."}]}
    assert read_conversation(json.dumps(llava)) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello."},
    ]
    assert read_conversation('[{"role": "user", "content": "hi"}]') == [{"role": "user", "content": "hi"}]
    assert read_conversation("[note] a line that is not json") == [
        {"role": "user", "content": "[note] a line that is not json"}
    ]
    assert read_conversation("  \n") == []
    with pytest.raises(ConversationError, match="does not parse"):
        read_conversation("[{'role': 'user'}")
    with pytest.raises(ConversationError, match="needs a role"):
        read_conversation('[{"role": "robot", "content": "hi"}]')


def test_stdin_answers_each_user_turn_and_keeps_given_history():
    model = make_model(num_queries=4, max_length=96)
    out = io.StringIO()
    session = Session(model, out, system="be brief.", max_new_tokens=3, num_frames=8)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."},
             {"role": "user", "content": "how many shapes?"}, {"role": "user", "content": "and colours?"}]  # fmt: skip
    assert run_stdin(session, json.dumps(turns)) == 0
    lines = out.getvalue().splitlines()
    # the given exchange is history; each user turn without an answer is answered in order
    assert [line.split(":")[0] for line in lines] == ["user", "assistant", "user", "assistant"]
    assert lines[0] == "user: how many shapes?" and lines[2] == "user: and colours?"
    roles = [t["role"] for t in session.history]
    assert roles[:3] == ["user", "assistant", "user"] and session.history[1]["content"] == "hello."
    with pytest.raises(ConversationError, match="must follow a user turn"):
        run_stdin(Session(model, out, None, 3, 8), json.dumps(turns[1:2] + turns[:1]))
    for nothing_to_answer in ("", json.dumps(turns[:2])):
        with pytest.raises(ConversationError, match="no user turn to answer"):
            run_stdin(Session(model, out, None, 3, 8), nothing_to_answer)
