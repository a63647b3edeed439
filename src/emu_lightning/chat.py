"""``emu-lightning chat``: talk to a trained EmuModel (an instruction-tuned one answers best).

    emu-lightning chat --ckpt runs/tiny-instruct/final.ckpt                     # interactive, in a terminal
    echo "what colour is the shape in the top left? scene.png" | emu-lightning chat --ckpt CKPT
    emu-lightning chat --ckpt CKPT < conversation.json                          # a whole conversation

Images and videos go inline in the text as file paths, anywhere in a turn: a word ending in ``.png``, ``.jpg``,
``.jpeg``, ``.webp``, ``.bmp`` or ``.gif`` is an image, one ending in ``.mp4``, ``.webm``, ``.mkv`` or ``.avi`` a
video (``--num-frames`` frames at segment centres); ``@`` before a path is allowed. They are resized to the
model's input size and placed where they stand in the text. The answer's tokens are printed as they come.

In a terminal: one line per user turn; ``/reset`` starts a new conversation, ``/exit`` (or an empty line, or
Ctrl-D) ends. When standard input is not a terminal it is read whole: a JSON conversation
(``[{"role": "user", "content": "..."}, ...]``, or LLaVA-style ``{"conversations": [{"from": "human", ...}]}``)
whose user turns are answered in order (given assistant turns are kept as history), or plain text with one user
turn per line. Each exchange is printed as ``user: ...`` / ``assistant: ...`` lines.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from emu_lightning.checkpoints import CheckpointError
from emu_lightning.conversation import ROLE_NAMES, SYSTEM, ConversationError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi")
_SUFFIX = "(?:" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES + VIDEO_SUFFIXES) + ")"
_MEDIA = re.compile(
    rf'"([^"]+{_SUFFIX})"|\'([^\']+{_SUFFIX})\'|@?([^\s"\'()\[\]<>,;]+?{_SUFFIX})(?=[.,;:!?)\]]*(?:\s|$))',
    re.IGNORECASE,
)
"""A media path: quoted (may hold spaces), or a word, which may be followed by punctuation ("see a.png, b.png.")."""


class MediaError(ValueError):
    """An inline image or video path that cannot be read."""


def parse_turn(text: str, image_size: int, num_frames: int = 8) -> list[Any]:
    """A user's text to items: inline image and video paths become ``(3, S, S)`` / ``(F, 3, S, S)`` tensors."""
    import av

    from emu_lightning.data.webvid import VideoError, read_clip
    from emu_lightning.images import ImageTransform

    items: list[Any] = []
    last = 0
    for match in _MEDIA.finditer(text):
        before = text[last : match.start()].strip()
        if before:
            items.append(before)
        given = next(g for g in match.groups() if g is not None)
        path = Path(given).expanduser()
        if not path.is_file():
            hint = "" if match.group(3) is None else " (quote a path that holds spaces)"
            raise MediaError(f"no such file: {str(path)!r}{hint}")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            image = ImageTransform(image_size).load(path)
            if image is None:
                raise MediaError(f"cannot read image {str(path)!r}")
            items.append(image)
        else:
            try:  # rng None: frames at the segment centres, as for evaluation
                frames, _ = read_clip(path, num_frames, image_size)
            except (VideoError, av.FFmpegError, OSError) as err:
                raise MediaError(f"cannot read video {str(path)!r}: {err}") from None
            items.append(frames)
        last = match.end()
    rest = text[last:].strip()
    if rest:
        items.append(rest)
    return items


def read_conversation(text: str) -> list[dict[str, str]]:
    """Standard input's conversation: JSON (a list of ``{"role", "content"}`` turns, or a dict with LLaVA-style
    ``conversations``) or plain text with one user turn per non-empty line."""
    stripped = text.strip()
    data = None
    if stripped[:1] in ("[", "{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            if re.match(r"\[\s*\{|\{\s*\"", stripped):  # it is meant as JSON; plain text may start with "[" too
                raise ConversationError(f"standard input looks like JSON but does not parse: {err}") from None
    if data is not None:
        turns = data.get("conversations", data.get("messages")) if isinstance(data, dict) else data
        if not isinstance(turns, list):
            raise ConversationError("a JSON conversation is a list of turns or a dict with 'conversations'")
        out = []
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise ConversationError(f"turn {k} is not an object: {turn!r}")
            role = ROLE_NAMES.get(str(turn.get("role", turn.get("from", ""))).lower())
            content = turn.get("content", turn.get("value"))
            if role not in ("user", "assistant") or not isinstance(content, str):
                raise ConversationError(f"turn {k} needs a role (user/assistant) and text content: {turn!r}")
            out.append({"role": role, "content": content})
        return out
    return [{"role": "user", "content": line.strip()} for line in stripped.splitlines() if line.strip()]


class Session:
    """A conversation with a model: user text in, streamed answers out."""

    def __init__(self, model: Any, out: TextIO, system: str | None, max_new_tokens: int, num_frames: int) -> None:
        self.model, self.out, self.system = model, out, system
        self.max_new_tokens, self.num_frames = max_new_tokens, num_frames
        self.history: list[dict[str, Any]] = []

    def user_items(self, text: str) -> list[Any]:
        return parse_turn(text, self.model.vision.image_size, self.num_frames)

    def answer(self, text: str, prefix: str = "") -> str:
        """Answer one user turn, streaming the reply to ``out`` after ``prefix``; the exchange joins the history."""
        turn = {"role": "user", "content": self.user_items(text)}
        self.out.write(prefix)
        self.out.flush()
        streamed: list[str] = []

        def emit(piece: str) -> None:
            piece = piece.lstrip() if not streamed else piece
            streamed.append(piece)
            self.out.write(piece)
            self.out.flush()

        reply = self.model.chat(self.history + [turn], system=self.system, max_new_tokens=self.max_new_tokens,
                                stream=emit)  # fmt: skip
        self.out.write("\n")
        self.out.flush()
        if reply:  # an empty answer cannot be a turn of the history: the exchange is left out
            self.history += [turn, {"role": "assistant", "content": reply}]
        return reply


def load_model(path: str, merge: bool = True) -> Any:
    """An EmuModel from a checkpoint, for inference on CPU; LoRA adapters merged unless ``merge`` is False."""
    from emu_lightning.model import EmuModel

    if not Path(path).is_file():
        raise SystemExit(f"checkpoint {path!r} does not exist")
    try:
        model = EmuModel.load_from_checkpoint(path, map_location="cpu")
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if merge and model.llm.has_lora:
        model.merge_lora()
    return model.eval()


def run_stdin(session: Session, text: str) -> int:
    turns = read_conversation(text)
    if not turns or turns[-1]["role"] != "user":
        raise ConversationError("standard input holds no user turn to answer (the last turn must be the user's)")
    for k, turn in enumerate(turns):
        if turn["role"] == "assistant":  # given history
            if not session.history or session.history[-1]["role"] != "user":
                raise ConversationError(f"turn {k}: an assistant turn must follow a user turn")
            session.history.append({"role": "assistant", "content": turn["content"]})
            continue
        if k + 1 < len(turns) and turns[k + 1]["role"] == "assistant":
            session.history.append({"role": "user", "content": session.user_items(turn["content"])})
            continue
        session.out.write(f"user: {turn['content']}\n")
        session.answer(turn["content"], prefix="assistant: ")
    return 0


def run_terminal(session: Session) -> int:
    print("emu-lightning chat: one line per turn; inline image/video paths; /reset, /exit", file=sys.stderr)
    while True:
        try:
            text = input("user> ").strip()
        except EOFError:
            print()
            return 0
        if not text or text == "/exit":
            return 0
        if text == "/reset":
            session.history = []
            continue
        try:
            session.answer(text, prefix="assistant> ")
        except (MediaError, ConversationError) as err:
            print(f"error: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="emu-lightning chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="an EmuModel checkpoint (e.g. the instruct stage's final.ckpt)")
    p.add_argument("--system", default=SYSTEM, help="system message ('' for none); default: instruction tuning's")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled from an inline video")
    p.add_argument("--no-merge", action="store_true", help="keep LoRA adapters unmerged (slower, same answers)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(args.ckpt, merge=not args.no_merge)
    session = Session(model, sys.stdout, args.system or None, args.max_new_tokens, args.num_frames)
    if sys.stdin.isatty():
        return run_terminal(session)
    try:
        return run_stdin(session, sys.stdin.read())
    except (MediaError, ConversationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
