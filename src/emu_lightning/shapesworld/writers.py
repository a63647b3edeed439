"""ShapesWorld written in every real on-disk format the library reads, so the offline default trains and evaluates
through the same readers as real data.

One function per format writes a split of ShapesWorld where a reader expects it: img2dataset webdataset pairs
(:func:`write_shapesworld_pairs`), MMC4 documents (:func:`write_shapesworld_mmc4`), WebVid clips
(:func:`write_shapesworld_webvid`), storyboards with subtitles (:func:`write_shapesworld_storyboard`), LLaVA
dialogues (:func:`write_shapesworld_llava`), and for evaluation OK-VQA (:func:`write_shapesworld_okvqa`) and VizWiz
(:func:`write_shapesworld_vizwiz`) question sets. :class:`ShapesWorldWriter` picks the one that matches a reader and
writes to the reader's own paths, once (a configured ``writer`` of a
:class:`~emu_lightning.data.StreamingDataModule`).
"""

from __future__ import annotations

import base64
import csv
import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from webdataset import TarWriter

from emu_lightning.conversation import IMAGE_TAG
from emu_lightning.data.instruct import InstructionConversations
from emu_lightning.data.mmc4 import MMC4Documents
from emu_lightning.data.modules import DataWriter
from emu_lightning.data.pairs import PIL_FORMATS, ImageTextShards, encode_image
from emu_lightning.data.storyboard import Cue, StoryboardVideos, write_vtt
from emu_lightning.data.streaming import StreamingSource, expand_urls
from emu_lightning.data.vqa import UNANSWERABLE
from emu_lightning.data.webvid import WebVidVideos, format_duration, write_mp4
from emu_lightning.progress import progress_bar
from emu_lightning.shapesworld.owned import write_once
from emu_lightning.shapesworld.world import BACKGROUND, CELL_NAMES, COLOURS, SHAPES, ShapesWorld


# ---------------------------------------------------------------------------------------------- img2dataset pairs
def shapesworld_caption(world: ShapesWorld, split: str, index: int, caption_ids: Sequence[int] | None) -> str:
    """The caption of item ``index`` that :class:`~emu_lightning.shapesworld.datamodule.ShapesWorldPairs` pairs with
    its image: one of ``caption_ids`` (all by default), drawn from the item's caption stream."""
    references = world.captions(world.scene(split, index))
    ids = list(caption_ids) if caption_ids is not None else list(range(len(references)))
    if not ids or any(not 0 <= c < len(references) for c in ids):
        raise ValueError(f"caption_ids {caption_ids} must be a non-empty list of indices below {len(references)}")
    return references[ids[int(world.rng(split, index, stream=2).integers(len(ids)))]]


def shapesworld_pair_record(
    world: ShapesWorld, split: str, index: int, image_format: str, caption_ids: Sequence[int] | None
) -> dict[str, Any]:
    """Item ``index`` of ``split`` as the tar sample img2dataset would write: key ``f"{index:09d}"``, the
    image (rendered as :class:`~emu_lightning.shapesworld.datamodule.ShapesWorldPairs` renders it), ``txt`` (the caption
    :func:`shapesworld_caption` picks) and ``json`` (img2dataset's ``key``, ``caption``, ``url``, ``status``,
    ``error_message``, ``width``, ``height``)."""
    key = f"{index:09d}"
    image = world.render(world.scene(split, index), world.rng(split, index, stream=1))
    caption = shapesworld_caption(world, split, index, caption_ids)
    meta = {
        "key": key,
        "caption": caption,
        "url": f"https://shapesworld.invalid/{split}/{key}.{image_format}",
        "status": "success",
        "error_message": None,
        "width": image.shape[2],
        "height": image.shape[1],
    }
    encoded = encode_image(image, image_format)
    return {"__key__": key, image_format: encoded, "txt": caption.encode(), "json": json.dumps(meta).encode()}


def write_shapesworld_pairs(
    world: ShapesWorld,
    root: str | Path,
    split: str = "train",
    num_samples: int = 1000,
    shard_size: int = 100,
    image_format: str = "png",
    caption_ids: Sequence[int] | None = None,
) -> list[str]:
    """Write ``num_samples`` ShapesWorld pairs of ``split`` as img2dataset shards ``{root}/00000.tar``, ... of
    ``shard_size`` samples and return their paths (:func:`shard_pattern` gives the brace pattern).

    Sample ``i`` is :func:`shapesworld_pair_record`: key ``f"{i:09d}"``, members ``.png`` (or ``.jpg`` /
    ``.webp``; JPEG shifts ShapesWorld's colours, so PNG is the default), ``.txt`` and ``.json``.
    """
    if num_samples < 1 or shard_size < 1:
        raise ValueError(f"num_samples {num_samples} and shard_size {shard_size} must be positive")
    if image_format not in PIL_FORMATS:
        raise ValueError(f"image_format {image_format!r} is not one of {sorted(PIL_FORMATS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    with progress_bar(total=num_samples, desc=f"ShapesWorld pairs ({split})", unit="pair") as bar:
        for shard in range(math.ceil(num_samples / shard_size)):
            path = str(root / f"{shard:05d}.tar")
            with TarWriter(path, encoder=False, mtime=0) as sink:
                for index in range(shard * shard_size, min(num_samples, (shard + 1) * shard_size)):
                    sink.write(shapesworld_pair_record(world, split, index, image_format, caption_ids))
                    bar.update(1)
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- MMC4 documents
STORY_STREAM = 11
"""The :meth:`ShapesWorld.rng` stream of a story's layout (number of scenes, connectives, similarities)."""
OPENINGS = ("here is a story about shapes.", "a few boards of shapes.", "look at these shapes.")
CONNECTIVES = ("then the board changed.", "after that, a new board.", "the next one is different.")
LOW_SIM_PROB = 0.1
"""Share of the written images whose ``matched_sim`` falls below the default threshold 0.32."""


def shapesworld_story(
    world: ShapesWorld, split: str, doc: int, first_scene: int, images_per_doc: tuple[int, int]
) -> dict[str, Any]:
    """Document ``doc`` of ``split`` in MMC4's jsonl format: an opening sentence, then scenes ``first_scene``,
    ``first_scene + 1``, ... (between ``images_per_doc[0]`` and ``images_per_doc[1]`` of them), each a caption
    sentence, sometimes after a connective one. The image of a scene is named ``f"{split}_{scene:09d}.png"``
    and matched to its caption; about :data:`LOW_SIM_PROB` of the ``matched_sim`` values fall below 0.32."""
    rng = world.rng(split, doc, stream=STORY_STREAM)
    text_list = [OPENINGS[int(rng.integers(len(OPENINGS)))]]
    image_info = []
    for scene in range(first_scene, first_scene + int(rng.integers(images_per_doc[0], images_per_doc[1] + 1))):
        if rng.random() < 0.5:
            text_list.append(CONNECTIVES[int(rng.integers(len(CONNECTIVES)))])
        references = world.captions(world.scene(split, scene))
        text_list.append(references[int(rng.integers(len(references)))])
        sim = rng.uniform(0.20, 0.30) if rng.random() < LOW_SIM_PROB else rng.uniform(0.33, 0.45)
        name = f"{split}_{scene:09d}.png"
        image_info.append(
            {
                "image_name": name,
                "raw_url": f"https://shapesworld.invalid/images/{name}",
                "matched_text_index": len(text_list) - 1,
                "matched_sim": round(float(sim), 4),
            }
        )
    similarity = rng.uniform(0.05, 0.2, size=(len(image_info), len(text_list))).round(4)
    for i, info in enumerate(image_info):
        similarity[i, info["matched_text_index"]] = info["matched_sim"]
    return {
        "url": f"https://shapesworld.invalid/{split}/story/{doc}",
        "text_list": text_list,
        "image_info": image_info,
        "similarity_matrix": similarity.tolist(),
        "could_have_url_duplicate": 0,
    }


def write_shapesworld_mmc4(
    world: ShapesWorld,
    root: str | Path,
    split: str = "train",
    num_docs: int = 100,
    images_per_doc: tuple[int, int] = (2, 4),
    layout: str = "jsonl",
    docs_per_file: int = 50,
) -> list[str]:
    """Write ``num_docs`` ShapesWorld stories (:func:`shapesworld_story`) in an MMC4 layout and return the index
    files' paths.

    Each scene appears in one document only; scenes are numbered from 0 in document order. ``layout="jsonl"``
    writes ``{root}/docs_shard_{k:05d}_v2.jsonl`` files and the PNG images to ``{root}/images/`` (the reader's
    ``image_dir``); ``layout="wds"`` writes tar shards ``{root}/{k:05d}.tar`` whose samples (key
    ``f"{d:09d}"``) hold the document in a ``.json`` member, each image's PNG bytes in its ``image_base64``.
    """
    if not 1 <= images_per_doc[0] <= images_per_doc[1]:
        raise ValueError(f"images_per_doc {images_per_doc} must be (low, high) with 1 <= low <= high")
    if layout not in ("jsonl", "wds"):
        raise ValueError(f"layout {layout!r} must be 'jsonl' or 'wds'")
    if num_docs < 1 or docs_per_file < 1:
        raise ValueError(f"num_docs {num_docs} and docs_per_file {docs_per_file} must be positive")
    root = Path(root)
    (root / "images" if layout == "jsonl" else root).mkdir(parents=True, exist_ok=True)
    paths, scene = [], 0
    with progress_bar(total=num_docs, desc=f"ShapesWorld MMC4 documents ({split})", unit="doc") as bar:
        for k, first in enumerate(range(0, num_docs, docs_per_file)):
            docs = []
            for d in range(first, min(num_docs, first + docs_per_file)):
                doc = shapesworld_story(world, split, d, scene, images_per_doc)
                for info in doc["image_info"]:
                    data = encode_image(world.image(split, scene), "png")
                    if layout == "jsonl":
                        (root / "images" / info["image_name"]).write_bytes(data)
                    else:
                        info["image_base64"] = base64.b64encode(data).decode("ascii")
                    scene += 1
                docs.append(doc)
                bar.update(1)
            if layout == "jsonl":
                path = root / f"docs_shard_{k:05d}_v2.jsonl"
                path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
            else:
                path = root / f"{k:05d}.tar"
                with TarWriter(str(path), encoder=False, mtime=0) as sink:
                    for d, doc in enumerate(docs, first):
                        sink.write({"__key__": f"{d:09d}", "json": json.dumps(doc).encode()})
            paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------------------------- WebVid clips
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0), "up": (0.0, -1.0)}
"""Motion directions of ShapesWorld videos, as (dx, dy) in image coordinates."""


def shapesworld_clip(
    world: ShapesWorld, split: str, index: int, num_frames: int, travel: float = 0.5
) -> tuple[Tensor, str]:
    """A moving-shape clip and its caption: every shape of scene ``index`` crosses ``travel`` of its cell in
    one direction (right, left, down or up) over ``num_frames`` frames; returns ``(F, 3, S, S)`` frames in
    [0, 1] and a caption like ``"a small red circle in the top left moves right."``."""
    scene = world.scene(split, index)
    rng = world.rng(split, index, stream=6)
    names = list(DIRECTIONS)
    moves = [names[int(rng.integers(len(names)))] for _ in scene.shapes]
    unit = np.array([DIRECTIONS[m] for m in moves])
    frames = []
    for k in range(num_frames):
        progress = k / (num_frames - 1) - 0.5 if num_frames > 1 else 0.0
        image = Image.new("RGB", (world.image_size, world.image_size), BACKGROUND)
        world.draw(scene, image, unit * progress * travel)
        frames.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    phrases = [f"a {s.name()} in the {scene.position(s)} moves {m}" for s, m in zip(scene.shapes, moves)]
    caption = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return torch.stack(frames), caption + "."


def write_shapesworld_webvid(
    world: ShapesWorld,
    root: str | Path,
    split: str = "train",
    num_videos: int = 64,
    num_frames: int = 16,
    fps: int = 8,
    travel: float = 0.5,
    codec: str | None = None,
) -> Path:
    """Write ShapesWorld moving-shape clips (:func:`shapesworld_clip`) in WebVid's layout: mp4 files at
    ``{root}/{page_dir}/{videoid}.mp4`` and ``{root}/results_{split}.csv``; returns the csv path."""
    root = Path(root)
    csv_path = root / f"results_{split}.csv"
    root.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for index in progress_bar(range(num_videos), desc=f"ShapesWorld WebVid clips ({split})", unit="video"):
            frames, caption = shapesworld_clip(world, split, index, num_frames, travel)
            videoid = str(ShapesWorld.image_id(split, index))
            page = index // 100 * 100
            page_dir = f"{page + 1:06d}_{page + 100:06d}"
            (root / page_dir).mkdir(exist_ok=True)
            write_mp4(root / page_dir / f"{videoid}.mp4", frames, fps, codec)
            url = f"shapesworld://{split}/{videoid}.mp4"
            writer.writerow([videoid, url, format_duration(num_frames / fps), page_dir, caption])
    return csv_path


# ---------------------------------------------------------------------------------------------- storyboards
def write_shapesworld_storyboard(
    world: ShapesWorld,
    root: str | Path,
    split: str = "train",
    num_videos: int = 16,
    frames_per_video: int = 4,
    seconds_per_frame: float = 2.0,
    subtitles: str = "vtt",
) -> Path:
    """Write ShapesWorld storyboards in this module's layout and return ``{root}/index_{split}.jsonl``.

    Video ``i`` shows the successive scenes ``i * frames_per_video + k`` (PNG frames at
    ``k * seconds_per_frame`` seconds); its subtitles say what is on screen: one cue per frame, from the
    frame's time to the next one's, with the scene's positional caption. ``subtitles="vtt"`` writes a WebVTT
    file per video, ``"json"`` puts the cues inline in the index.
    """
    if subtitles not in ("vtt", "json"):
        raise ValueError(f"subtitles {subtitles!r} must be 'vtt' or 'json'")
    root = Path(root)
    index_path = root / f"index_{split}.jsonl"
    (root / "subtitles").mkdir(parents=True, exist_ok=True)
    with index_path.open("w") as index:
        for i in progress_bar(range(num_videos), desc=f"ShapesWorld storyboards ({split})", unit="video"):
            video_id = f"{split}_{i:06d}"
            folder = root / "frames" / video_id
            folder.mkdir(parents=True, exist_ok=True)
            frames, cues = [], []
            for k in range(frames_per_video):
                scene_index = i * frames_per_video + k
                image = world.image(split, scene_index)
                name = f"frames/{video_id}/{k:03d}.png"
                Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / name)
                time = k * seconds_per_frame
                frames.append({"time": time, "image": name})
                caption = world.captions(world.scene(split, scene_index))[1]
                cues.append(Cue(time, time + seconds_per_frame, caption))
            if subtitles == "vtt":
                vtt = f"subtitles/{video_id}.vtt"
                (root / vtt).write_text(write_vtt(cues))
                entry: str | list = vtt
            else:
                entry = [{"start": c.start, "end": c.end, "text": c.text} for c in cues]
            index.write(json.dumps({"video_id": video_id, "frames": frames, "subtitles": entry}) + "\n")
    return index_path


# ---------------------------------------------------------------------------------------------- LLaVA dialogues
DIALOGUE_STREAM = 7
"""The :meth:`ShapesWorld.rng` stream of a dialogue's kind, questions and number of turns."""
DIALOGUE_KINDS = {"describe": 0.2, "answer": 0.4, "count": 0.2, "compare": 0.2}
"""The kinds of ShapesWorld dialogues and how often each is drawn."""
MAX_TURNS = 3
DESCRIBE_PROMPTS = ("describe the image.", "what is in this picture?", "what do you see?", "describe the shapes.")
COMPARE_PROMPTS = {
    "which image has more shapes?": ("the first image.", "the second image."),
    "which image has fewer shapes?": ("the second image.", "the first image."),
}
"""Two-image questions, with the answer when the first image has more shapes and when the second has."""
SAME_NUMBER = "they have the same number of shapes."


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def shapesworld_dialogue(world: ShapesWorld, split: str, index: int) -> tuple[dict[str, Any], list[int]]:
    """Dialogue ``index`` of ``split`` in LLaVA's format (its ``image`` still to be filled in), with its kind
    (``describe``, ``answer``, ``count`` or ``compare``) in ``"kind"``, and the scene indices of its images.

    The first user turn carries the image tag(s) and asks the kind's question: ``describe`` one of
    :data:`DESCRIBE_PROMPTS`, ``answer`` one of :meth:`ShapesWorld.questions` about colours, shapes and presence,
    ``count`` how many shapes (of one colour) there are, ``compare`` which of two images (scenes ``index`` and
    ``index + 1``) has more or fewer shapes. 0 to ``MAX_TURNS - 1`` more turns ask further questions about the
    same image(s) without tags. Answers are short and written as the VQA examples write them
    (``f"{qa.answer}."``); descriptions are the caption that names positions (``captions[1]``).
    """
    rng = world.rng(split, index, stream=DIALOGUE_STREAM)
    kind = list(DIALOGUE_KINDS)[int(rng.choice(len(DIALOGUE_KINDS), p=list(DIALOGUE_KINDS.values())))]
    scene = world.scene(split, index)
    caption = world.captions(scene)[1]
    if kind == "compare":
        other = world.scene(split, index + 1)
        counts = len(scene.shapes), len(other.shapes)
        question = _pick(rng, list(COMPARE_PROMPTS))
        more_first, more_second = COMPARE_PROMPTS[question]
        answer = SAME_NUMBER if counts[0] == counts[1] else more_first if counts[0] > counts[1] else more_second
        scenes, first = [index, index + 1], (question, answer)
        pool = [
            ("how many shapes are in the first image?", f"{counts[0]}."),
            ("how many shapes are in the second image?", f"{counts[1]}."),
            ("describe the first image.", caption),
            ("describe the second image.", world.captions(other)[1]),
        ]
    else:
        qas = world.questions(split, index)
        pool = [(qa.question, f"{qa.answer}.") for qa in qas] + [(_pick(rng, DESCRIBE_PROMPTS), caption)]
        if kind == "describe":
            first = pool[-1]
        elif kind == "answer":  # the questions about colours, shapes and presence; counting is the count kind's
            first = _pick(rng, [(qa.question, f"{qa.answer}.") for qa in qas if qa.answer_type != "number"])
        else:  # count all shapes, or those of one colour (present or not)
            colour = _pick(rng, list(COLOURS)) if rng.random() < 0.5 else _pick(rng, scene.shapes).colour
            count = sum(s.colour == colour for s in scene.shapes)
            first = _pick(rng, [("how many shapes are there?", f"{len(scene.shapes)}."),
                                (f"how many {colour} shapes are there?", f"{count}.")])  # fmt: skip
        scenes = [index]
    pool = [qa for qa in pool if qa[0] != first[0]]
    more = int(rng.integers(MAX_TURNS))
    follow = [pool[int(k)] for k in rng.choice(len(pool), size=min(more, len(pool)), replace=False)]
    conversations = []
    for k, (question, answer) in enumerate([first, *follow]):
        prompt = f"{IMAGE_TAG}\n" * len(scenes) + question if k == 0 else question
        conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    entry = {"id": f"shapesworld_{split}_{index:06d}", "kind": kind, "conversations": conversations}
    return entry, scenes


def write_shapesworld_llava(
    world: ShapesWorld, root: str | Path, split: str = "train", num_dialogues: int = 100
) -> Path:
    """Write ``num_dialogues`` ShapesWorld dialogues (:func:`shapesworld_dialogue`) in LLaVA-Instruct's format:
    ``{root}/llava_{split}.json`` and PNG images in ``{root}/images/``, named in the json relative to ``root``
    (the reader's default ``image_dir``). Returns the json's path."""
    if num_dialogues < 1:
        raise ValueError(f"num_dialogues {num_dialogues} must be positive")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names: dict[int, str] = {}
    entries = []
    for index in progress_bar(range(num_dialogues), desc=f"ShapesWorld LLaVA dialogues ({split})", unit="dialogue"):
        entry, scenes = shapesworld_dialogue(world, split, index)
        for scene in scenes:
            if scene not in names:  # a compare dialogue shows the next dialogue's scene too
                names[scene] = "images/" + world._save_image(root / "images", split, scene)
        entry["image"] = names[scenes[0]] if len(scenes) == 1 else [names[s] for s in scenes]
        entries.append(entry)
    path = root / f"llava_{split}.json"
    path.write_text(json.dumps(entries, indent=1))
    return path


# ---------------------------------------------------------------------------------------------- OK-VQA and VizWiz
def write_shapesworld_okvqa(world: ShapesWorld, root: str | Path, split: str = "val", num_images: int = 100) -> dict:
    """Write ShapesWorld questions (:meth:`ShapesWorld.questions`, six per image) in OK-VQA's layout:
    ``{root}/OpenEnded_mscoco_{split}2014_questions.json``, ``{root}/mscoco_{split}2014_annotations.json`` and the
    images as ``{root}/{split}2014/COCO_{split}2014_{image_id:012d}.png``. Each answer has OK-VQA v1.1's
    ``raw_answer`` and its stemmed ``answer`` (:func:`~emu_lightning.eval.okvqa.okvqa_stem`; ShapesWorld's answers
    stem to themselves). Returns the paths and the ``image_template``, as :meth:`ShapesWorld.write_vqav2` does.

    The questions need no outside knowledge: the set tests OK-VQA's files and scoring, not what OK-VQA measures."""
    from emu_lightning.eval.okvqa import okvqa_stem

    root, subtype = Path(root), f"{split}2014"
    (root / subtype).mkdir(parents=True, exist_ok=True)
    template = f"COCO_{subtype}_{{image_id:012d}}.png"  # PNG: no JPEG colour shifts
    questions, annotations = [], []
    for index in progress_bar(range(num_images), desc=f"ShapesWorld OK-VQA ({split})", unit="image"):
        image_id = world.image_id(split, index)
        png = encode_image(world.image(split, index), "png")
        (root / subtype / template.format(image_id=image_id)).write_bytes(png)
        for qa in world.questions(split, index):
            questions.append({"image_id": image_id, "question": qa.question, "question_id": qa.question_id})
            answers = [{"answer_id": k + 1, "raw_answer": a, "answer_confidence": "yes", "answer": okvqa_stem(a)}
                       for k, a in enumerate(qa.answers)]  # fmt: skip
            annotations.append({"image_id": image_id, "answer_type": "other", "question_type": "other",
                                "question_id": qa.question_id, "answers": answers, "confidence": 3})  # fmt: skip
    common = {"data_type": "mscoco", "data_subtype": subtype, "license": {"name": "ShapesWorld (synthetic)"}}
    paths = {"questions": root / f"OpenEnded_mscoco_{subtype}_questions.json",
             "annotations": root / f"mscoco_{subtype}_annotations.json", "images": root / subtype,
             "image_template": template}  # fmt: skip
    paths["questions"].write_text(json.dumps({**common, "task_type": "Open-Ended", "questions": questions}))
    paths["annotations"].write_text(json.dumps({**common, "annotations": annotations}))
    return paths


VIZWIZ_STREAM = 13
"""The :meth:`ShapesWorld.rng` stream of a VizWiz entry's question."""
UNANSWERABLE_SHARE = 0.25
"""Default share of ShapesWorld's VizWiz questions that cannot be answered (VizWiz val: about 28%)."""


def _unanswerable_questions(world: ShapesWorld, scene: Any) -> list[str]:
    """Questions whose premise the scene does not satisfy: about an empty cell, or a kind of shape it lacks."""
    empty = [CELL_NAMES[world.grid][c] for c in range(world.grid * world.grid)
             if c not in {s.cell for s in scene.shapes}]  # fmt: skip
    absent = [k for k in SHAPES if k not in {s.shape for s in scene.shapes}]
    return ([f"what colour is the shape in the {p}?" for p in empty] + [f"what shape is in the {p}?" for p in empty]
            + [f"what colour is the {k}?" for k in absent])  # fmt: skip


def shapesworld_vizwiz_entry(
    world: ShapesWorld, split: str, index: int, unanswerable_share: float = UNANSWERABLE_SHARE, answers: bool = True
) -> dict[str, Any]:
    """Entry ``index`` of ``split`` in VizWiz's format, about scene ``index``: image ``VizWiz_{split}_{index:08d}.png``.

    With probability ``unanswerable_share`` (when the scene allows one) the question asks about a shape that is not
    there (an empty cell, or a kind of shape the scene lacks): its 10 answers are ``"unanswerable"``, ``answerable``
    0 and ``answer_type`` ``"unanswerable"``, as VizWiz writes such questions. Otherwise it is one of the scene's
    :meth:`ShapesWorld.questions`, with its annotators' answers, ``answerable`` 1 and its answer type. Without
    ``answers`` (a test split) only ``image`` and ``question`` are written."""
    rng = world.rng(split, index, stream=VIZWIZ_STREAM)
    scene = world.scene(split, index)
    entry: dict[str, Any] = {"image": f"VizWiz_{split}_{index:08d}.png"}
    impossible = _unanswerable_questions(world, scene)
    if rng.random() < unanswerable_share and impossible:
        entry["question"] = _pick(rng, impossible)
        given, answerable, answer_type = [UNANSWERABLE] * 10, 0, UNANSWERABLE
    else:
        qa = _pick(rng, world.questions(split, index))
        entry["question"], given, answerable, answer_type = qa.question, list(qa.answers), 1, qa.answer_type
    if answers:
        entry.update(answers=[{"answer": a, "answer_confidence": "yes"} for a in given], answerable=answerable,
                     answer_type=answer_type)  # fmt: skip
    return entry


def write_shapesworld_vizwiz(
    world: ShapesWorld,
    root: str | Path,
    split: str = "val",
    num_questions: int = 100,
    unanswerable_share: float = UNANSWERABLE_SHARE,
    answers: bool = True,
) -> dict[str, Path]:
    """Write ``num_questions`` ShapesWorld entries (:func:`shapesworld_vizwiz_entry`) in VizWiz's layout:
    ``{root}/annotations/{split}.json`` and the images in ``{root}/{split}/``. Returns ``{"annotations", "images"}``."""
    if not 0.0 <= unanswerable_share <= 1.0:
        raise ValueError(f"unanswerable_share {unanswerable_share} must be in [0, 1]")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    entries = []
    for index in progress_bar(range(num_questions), desc=f"ShapesWorld VizWiz ({split})", unit="question"):
        entry = shapesworld_vizwiz_entry(world, split, index, unanswerable_share, answers)
        (root / split / entry["image"]).write_bytes(encode_image(world.image(split, index), "png"))
        entries.append(entry)
    paths = {"annotations": root / "annotations" / f"{split}.json", "images": root / split}
    paths["annotations"].write_text(json.dumps(entries))
    return paths


# ---------------------------------------------------------------------------------------------- the writer
def _pairs(world: ShapesWorld, reader: ImageTextShards, root: Path, split: str, n: int, files: int) -> list[str]:
    return write_shapesworld_pairs(world, root, split, n, shard_size=math.ceil(n / files))


def _mmc4(world: ShapesWorld, reader: MMC4Documents, root: Path, split: str, n: int, files: int) -> list[str]:
    layout = "wds" if expand_urls(reader.init_args["paths"])[0].endswith(".tar") else "jsonl"
    if layout == "jsonl" and (reader.image_dir is None or Path(reader.image_dir) != root / "images"):
        raise ValueError(f"ShapesWorld's jsonl layout puts the images in {root / 'images'}: set image_dir to it")
    return write_shapesworld_mmc4(world, root, split, n, layout=layout, docs_per_file=math.ceil(n / files))


def _webvid(world: ShapesWorld, reader: WebVidVideos, root: Path, split: str, n: int, files: int) -> list[str]:
    if reader.video_dir is not None and reader.video_dir != root:
        raise ValueError(f"ShapesWorld writes the videos beside the csv: set video_dir to {root} or leave it out")
    return [str(write_shapesworld_webvid(world, root, split, num_videos=n))]


def _storyboard(world: ShapesWorld, reader: StoryboardVideos, root: Path, split: str, n: int, files: int) -> list[str]:
    return [str(write_shapesworld_storyboard(world, root, split, num_videos=n))]


def _llava(
    world: ShapesWorld, reader: InstructionConversations, root: Path, split: str, n: int, files: int
) -> list[str]:
    if reader.format != "llava":
        raise ValueError(f"ShapesWorld writes LLaVA dialogues only: set format to 'llava', not {reader.format!r}")
    if reader.image_dir is not None and reader.image_dir != root:
        raise ValueError(
            f"ShapesWorld names its images relative to the json's folder: set image_dir to {root} or leave it out"
        )
    return [str(write_shapesworld_llava(world, root, split, num_dialogues=n))]


FORMATS: dict[type, tuple[str, Callable[..., list[str]]]] = {
    ImageTextShards: ("urls", _pairs),
    MMC4Documents: ("paths", _mmc4),
    WebVidVideos: ("csv", _webvid),
    StoryboardVideos: ("paths", _storyboard),
    InstructionConversations: ("paths", _llava),
}
"""Each reader the writer serves: the argument naming its files, and the function writing ShapesWorld there."""
UNSPLIT_NAMES = (ImageTextShards, MMC4Documents)
"""Formats whose files are named without their split (``00000.tar``): each split needs a folder of its own."""


class ShapesWorldWriter(DataWriter):
    """Writes ShapesWorld in a reader's format to the reader's configured paths, before training reads them.

    It writes only into an absent or empty folder, or one it wrote itself with the same settings (a marker file
    records them, :func:`~emu_lightning.shapesworld.owned.write_once`): a folder holding anything else (a user's
    data) is an error, and a second run reads what the first wrote. The world's images have the reader's
    ``image_size``. Pairs and MMC4 files are named without their split, so their held-out files need another folder.

    Args:
        train: samples (pairs, documents, videos or dialogues) written for the training reader.
        val: samples written for the held-out reader (``val`` of the DataModule), if it has one.
        min_shapes: fewest shapes per scene.
        max_shapes: most shapes per scene.
        grid: scenes are a grid x grid board (2 or 3).
        seed: the world's seed.
    """

    def __init__(
        self, train: int = 1000, val: int = 0, min_shapes: int = 1, max_shapes: int = 3, grid: int = 2, seed: int = 0
    ) -> None:
        if train < 0 or val < 0:
            raise ValueError(f"train {train} and val {val} must be >= 0")
        self.sizes = {"train": train, "val": val}
        self.world_args = dict(min_shapes=min_shapes, max_shapes=max_shapes, grid=grid, seed=seed)
        self._roots: dict[str, Path] = {}  # the folder each split was written to

    def world(self, image_size: int) -> ShapesWorld:
        """The world written, at ``image_size`` pixels."""
        return ShapesWorld(image_size=image_size, **self.world_args)

    def write(self, reader: StreamingSource, split: str) -> None:
        num = self.sizes[split]
        if num <= 0:
            return
        kind = next((k for k in FORMATS if isinstance(reader, k)), None)
        if kind is None:
            raise TypeError(
                f"ShapesWorld writes {[k.__name__ for k in FORMATS]}, not {type(reader).__name__}: give this reader "
                "your own files and no writer"
            )
        argument, write_format = FORMATS[kind]
        expected = [str(Path(p)) for p in expand_urls(reader.init_args[argument])]
        root = Path(expected[0]).parent
        shared = [s for s, r in self._roots.items() if s != split and r == root]
        if shared and isinstance(reader, UNSPLIT_NAMES):
            raise ValueError(
                f"{kind.__name__} files are named without their split: the {split} files would overwrite the "
                f"{shared[0]} files in {root}; give the {split} reader a folder of its own"
            )
        self._roots[split] = root
        world = self.world(reader.image_size)
        spec = {**vars(world), "format": kind.__name__, "files": len(expected), split: num}
        write = functools.partial(write_format, world, reader, root, split, num, len(expected))
        written = {str(Path(p)) for p in write_once(root, split, spec, write)}
        if set(expected) != written or any(Path(p).parent != root for p in expected):
            raise ValueError(
                f"ShapesWorld wrote {sorted(written)} for {split}, but the reader's {argument} are {expected}: "
                "configure the paths it writes"
            )
