"""The evaluation callbacks on ShapesWorld sets: each writes its set in the real format (COCO Karpathy, VQAv2, OK-VQA,
VizWiz, MSVD-QA, MSRVTT-QA, NExT-QA) into the run folder and evaluates it through the same readers as real files;
text-to-image adds the attribute accuracy.

The world is the training data's (:func:`find_world`), so held-out scenes come from the same distribution and
image size; without ShapesWorld training data, one at the model's image size.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L
import torch

from emu_lightning.eval.callbacks import CaptioningEval, TextToImageEval, VQAEval
from emu_lightning.eval.okvqa import OKVQAEval
from emu_lightning.eval.videoqa import MSRVTTQAEval, MSVDQAEval, NExTQAEval
from emu_lightning.eval.vizwiz import VizWizEval
from emu_lightning.shapesworld.metrics import shapes_attribute_accuracy_batch
from emu_lightning.shapesworld.owned import write_once
from emu_lightning.shapesworld.videoqa import (
    write_shapesworld_msrvtt_qa,
    write_shapesworld_msvd_qa,
    write_shapesworld_nextqa,
)
from emu_lightning.shapesworld.wordnet import write_shapesworld_wordnet
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import (
    UNANSWERABLE_SHARE,
    ShapesWorldWriter,
    write_shapesworld_okvqa,
    write_shapesworld_vizwiz,
)


def find_world(datamodule: Any, image_size: int | None = None) -> ShapesWorld | None:
    """The ShapesWorld a DataModule trains on: a :class:`ShapesWorldDataModule`'s, its ShapesWorld writer's, or the
    first of a mixture's sources that has one; None for real data. ``image_size`` is the model's: the world's when
    the DataModule leaves it to the model and is not attached to one yet."""
    from emu_lightning.shapesworld.datamodule import ShapesWorldDataModule

    if isinstance(datamodule, ShapesWorldDataModule):
        if datamodule.image_size is None and datamodule.model_image_size() is None:
            datamodule.image_size = image_size
        return datamodule.world
    writer, reader = getattr(datamodule, "writer", None), getattr(datamodule, "reader", None)
    if isinstance(writer, ShapesWorldWriter):
        size = reader.image_size or image_size
        return writer.world(size) if size is not None else None
    for source in getattr(datamodule, "sources", {}).values():
        world = find_world(source, image_size)
        if world is not None:
            return world
    return None


def _no_files(callback: Any, kwargs: dict[str, Any], names: tuple[str, ...]) -> None:
    """A ShapesWorld evaluation writes its own set: data files given to it would be silently ignored."""
    given = [n for n in names if kwargs.get(n) is not None]
    if given:
        base = next(c.__name__ for c in type(callback).__mro__[1:] if "ShapesWorld" not in c.__name__)
        raise ValueError(f"{type(callback).__name__} writes its own ShapesWorld set; for your files {given} use {base}")


def _world(trainer: L.Trainer, pl_module: Any) -> ShapesWorld:
    # a model without a vision backbone (a bare text-to-image generator) gets the default world's 32 pixels
    size = getattr(getattr(pl_module, "vision", None), "image_size", None) or 32
    world = find_world(trainer.datamodule, size)
    return world if world is not None else ShapesWorld(image_size=size)


class ShapesWorldCaptioningEval(CaptioningEval):
    """:class:`~emu_lightning.eval.callbacks.CaptioningEval` on a ShapesWorld set written in Karpathy's format.

    Args:
        support: training images written for demonstrations (the ``test`` split has ``num_queries`` images).
        kwargs: the schedule and prompt options of :class:`~emu_lightning.eval.callbacks.FewShotEval`.
    """

    writes_own_data = True

    def __init__(self, support: int = 200, **kwargs: Any) -> None:
        _no_files(self, kwargs, ("karpathy_json", "image_root", "annotations_json"))
        super().__init__(**kwargs)
        self.support = support

    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        world, sizes = _world(trainer, pl_module), {"train": self.support, "test": self.num_queries or 100}
        write_once(root / "coco", "coco", {**vars(world), "sizes": sizes},
                   functools.partial(world.write_coco_karpathy, root / "coco", sizes))  # fmt: skip
        return self.read(root / "coco" / "dataset_coco.json", root / "coco", None)


class ShapesWorldVQAEval(VQAEval):
    """:class:`~emu_lightning.eval.callbacks.VQAEval` on ShapesWorld sets written in the VQAv2 format.

    Args:
        support: training images (6 questions each) written for demonstrations.
        kwargs: the schedule and prompt options of :class:`~emu_lightning.eval.callbacks.FewShotEval`.
    """

    writes_own_data = True
    folder = "vqa"
    """The folder under the run's ``eval_data`` the sets are written to (and the name of their write-once marker)."""

    def __init__(self, support: int = 50, **kwargs: Any) -> None:
        _no_files(self, kwargs, ("questions_json", "annotations_json", "image_root", "support_questions_json",
                                 "support_annotations_json", "support_image_root"))  # fmt: skip
        super().__init__(**kwargs)
        self.support = support

    def write(self, world: ShapesWorld, root: Path, split: str, images: int) -> dict[str, Any]:
        """Write ``split``'s questions about ``images`` scenes under ``root``; the files, as ``write_vqav2`` gives."""
        return world.write_vqav2(root, split, images)

    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        world = _world(trainer, pl_module)
        folder = root / self.folder
        sizes = {"val": max(1, (self.num_queries or 100) // 6 + 1), "train": self.support}
        val, train = (write_once(folder, f"{self.folder}-{split}", {**vars(world), "images": n},
                                 functools.partial(self.write, world, folder, split, n))
                      for split, n in sizes.items())  # fmt: skip
        self.query_files = (val["questions"], val["annotations"], val["images"], val["image_template"])
        self.support_files = (train["questions"], train["annotations"], train["images"], train["image_template"])
        return super().examples(trainer, pl_module, root)


class ShapesWorldOKVQAEval(ShapesWorldVQAEval, OKVQAEval):
    """:class:`~emu_lightning.eval.okvqa.OKVQAEval` on ShapesWorld questions written in OK-VQA's files
    (:func:`~emu_lightning.shapesworld.writers.write_shapesworld_okvqa`: its file names, ``raw_answer`` and stemmed
    ``answer``, COCO-style image names) and read back through the VQAv2 reader, scored with OK-VQA's stemmed answers.

    An honest analogue of the format and the plumbing only: ShapesWorld's questions (colours, shapes, counts) need
    no outside knowledge, which is what OK-VQA measures.

    Args:
        support: training images (6 questions each) written for demonstrations.
        kwargs: the schedule and prompt options of :class:`~emu_lightning.eval.callbacks.FewShotEval`.
    """

    folder = "okvqa"

    def write(self, world: ShapesWorld, root: Path, split: str, images: int) -> dict[str, Any]:
        return write_shapesworld_okvqa(world, root, split, images)


class ShapesWorldVizWizEval(VizWizEval):
    """:class:`~emu_lightning.eval.vizwiz.VizWizEval` on ShapesWorld questions written in VizWiz's format (one
    question per image, :func:`~emu_lightning.shapesworld.writers.write_shapesworld_vizwiz`) and read back through
    the VizWiz reader. About ``unanswerable_share`` of them ask about a shape that is not in the scene (an empty cell,
    or a kind of shape it lacks): their 10 answers are "unanswerable" and ``answerable`` is 0.

    Always answering "unanswerable" scores the share of such questions among the evaluated ones (x100; the others
    never have "unanswerable" among their answers): the chance level of that answer. ShapesWorld training data has
    no unanswerable questions, so a model trained only on it has never seen the answer.

    Args:
        support: training questions written for demonstrations.
        unanswerable_share: share of unanswerable questions written, in both splits.
        kwargs: the protocol, schedule and prompt options of :class:`~emu_lightning.eval.vizwiz.VizWizEval`.
    """

    writes_own_data = True

    def __init__(self, support: int = 50, unanswerable_share: float = UNANSWERABLE_SHARE, **kwargs: Any) -> None:
        _no_files(self, kwargs, ("annotations_json", "image_root", "support_annotations_json", "support_image_root"))
        if not 0.0 <= unanswerable_share <= 1.0:
            raise ValueError(f"unanswerable_share {unanswerable_share} must be in [0, 1]")
        super().__init__(**kwargs)
        self.support, self.unanswerable_share = support, unanswerable_share

    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        world, share = _world(trainer, pl_module), self.unanswerable_share
        sizes = {"val": self.num_queries or 100, "train": self.support}
        val, train = (write_once(root / "vizwiz", f"vizwiz-{split}", {**vars(world), "questions": n, "share": share},
                                 functools.partial(write_shapesworld_vizwiz, world, root / "vizwiz", split, n, share))
                      for split, n in sizes.items())  # fmt: skip
        self.query_files = (val["annotations"], val["images"])
        self.support_files = (train["annotations"], train["images"])
        return super().examples(trainer, pl_module, root)


class _ShapesWorldVideoQA:
    """What the ShapesWorld video QA callbacks share: clips of moving shapes and their questions
    (:mod:`emu_lightning.shapesworld.videoqa`) written in the benchmark's layout into the run folder (the evaluated
    split, ``num_queries`` questions or a few more, and ``support`` training clips for demonstrations), read back
    through the benchmark's reader and scored as real files are."""

    writes_own_data = True
    eval_split = "test"
    file_args: tuple[str, ...] = ()
    """The data file arguments of the benchmark's callback (a ShapesWorld callback writes its own)."""
    num_queries: int | None

    def __init__(self, support: int = 20, **kwargs: Any) -> None:
        _no_files(self, kwargs, self.file_args)
        super().__init__(**kwargs)
        self.support = support

    def write(self, world: ShapesWorld, root: Path, split: str, videos: int) -> dict[str, Any]:
        """Write ``videos`` clips of ``split`` in the benchmark's layout under ``root``; the reader's paths."""
        raise NotImplementedError

    def files(self, paths: dict[str, Any], support: bool) -> tuple[Any, ...]:
        """The reader's arguments from :meth:`write`'s paths, in the order of the callback's ``read``."""
        raise NotImplementedError

    def examples(self, trainer: L.Trainer, pl_module: Any, root: Path) -> tuple[list, list]:
        world, folder = _world(trainer, pl_module), root / self.task_name
        # about five questions a clip (ShapesWorld asks at least two): enough clips for num_queries questions
        sizes = {self.eval_split: (self.num_queries or 100) // 2 + 1, "train": self.support}
        written = {split: write_once(folder, f"{self.task_name}-{split}", {**vars(world), "videos": n},
                                     functools.partial(self.write, world, folder, split, n))
                   for split, n in sizes.items()}  # fmt: skip
        self.query_files = self.files(written[self.eval_split], support=False)
        self.support_files = self.files(written["train"], support=True)
        return super().examples(trainer, pl_module, root)


class ShapesWorldMSVDQAEval(_ShapesWorldVideoQA, MSVDQAEval):
    """:class:`~emu_lightning.eval.videoqa.MSVDQAEval` on ShapesWorld clips written in MSVD-QA's layout (``.avi``
    clips under ``YouTubeClips`` with YouTube-like names, ``youtube_mapping.txt``, ``test_qa.json``), top-1 accuracy.

    Args:
        support: training clips written for demonstrations.
        kwargs: the options of :class:`~emu_lightning.eval.videoqa.VideoQAEval`.
    """

    file_args = ("qa_json", "video_root", "mapping", "support_qa_json", "support_video_root", "support_mapping")

    def write(self, world: ShapesWorld, root: Path, split: str, videos: int) -> dict[str, Any]:
        return write_shapesworld_msvd_qa(world, root, split, videos)

    def files(self, paths: dict[str, Any], support: bool) -> tuple[Any, ...]:
        return paths["qa_json"], paths["video_root"], paths["mapping"]


class ShapesWorldMSRVTTQAEval(_ShapesWorldVideoQA, MSRVTTQAEval):
    """:class:`~emu_lightning.eval.videoqa.MSRVTTQAEval` on ShapesWorld clips written in MSRVTT-QA's layout
    (``video<N>.mp4``, ``test_qa.json``), top-1 accuracy.

    Args:
        support: training clips written for demonstrations.
        kwargs: the options of :class:`~emu_lightning.eval.videoqa.VideoQAEval`.
    """

    file_args = ("qa_json", "video_root", "support_qa_json", "support_video_root")

    def write(self, world: ShapesWorld, root: Path, split: str, videos: int) -> dict[str, Any]:
        return write_shapesworld_msrvtt_qa(world, root, split, videos)

    def files(self, paths: dict[str, Any], support: bool) -> tuple[Any, ...]:
        return paths["qa_json"], paths["video_root"]


class ShapesWorldNExTQAEval(_ShapesWorldVideoQA, NExTQAEval):
    """:class:`~emu_lightning.eval.videoqa.NExTQAEval` on ShapesWorld clips written in NExT-QA open-ended's layout
    (``NExTVideo/<folder>/<video>.mp4``, ``map_vid_vidorID.json``, ``val.csv``, ``add_reference_answer_val.json``),
    scored with WUPS. Without ``wordnet``, WUPS reads the ShapesWorld WordNet
    (:func:`~emu_lightning.shapesworld.wordnet.write_shapesworld_wordnet`, written into the run folder): a small
    hand-made noun hierarchy of the world's answers (directions, colours, shapes, numbers), so that the score means
    the same on every machine; ``wordnet`` names a real WordNet 3.0 folder instead.

    Args:
        support: training clips written for demonstrations.
        kwargs: the options of :class:`~emu_lightning.eval.videoqa.NExTQAEval` (``wordnet``, ``threshold``, ...).
    """

    eval_split = "val"
    file_args = ("csv", "video_root", "map_json", "extra_answers_json", "support_csv", "support_video_root",
                 "support_map_json")  # fmt: skip

    def write(self, world: ShapesWorld, root: Path, split: str, videos: int) -> dict[str, Any]:
        return write_shapesworld_nextqa(world, root, split, videos)

    def files(self, paths: dict[str, Any], support: bool) -> tuple[Any, ...]:
        extra = None if support else paths["extra_answers_json"]
        return paths["csv_path"], paths["video_root"], paths["map_json"], extra

    def wordnet_path(self, root: Path) -> str | None:
        if self.wordnet_dir is not None:
            return self.wordnet_dir
        folder = root / "shapesworld-wordnet"
        write_once(folder, "wordnet", {}, functools.partial(write_shapesworld_wordnet, folder))
        return str(folder)


class ShapesWorldTextToImageEval(TextToImageEval):
    """:class:`~emu_lightning.eval.callbacks.TextToImageEval` on ShapesWorld's validation scenes (their positional
    captions and images), scored by FID and by the pixel-based attribute accuracy (is the requested colour and shape
    in the cell the caption names: :func:`~emu_lightning.shapesworld.metrics.shapes_attribute_accuracy_batch`)."""

    writes_own_data = True

    def __init__(self, **kwargs: Any) -> None:
        _no_files(self, kwargs, ("captions_json", "image_root"))
        super().__init__(**kwargs)

    def prompts(self, trainer: L.Trainer, pl_module: Any) -> tuple[list[tuple[Any, str]], Any, str]:
        world = _world(trainer, pl_module)
        self._scenes = {i: world.scene("val", i) for i in range(self.num_prompts)}
        # The caption that names positions: the attribute check looks for each shape in its cell.
        prompts = [(i, world.captions(scene)[1]) for i, scene in self._scenes.items()]
        real = lambda: torch.stack([world.image("val", i) for i in self._scenes])  # noqa: E731
        return prompts, real, f"shapesworld-val-seed{world.seed}-{world.image_size}px"

    def extra_scores(self, images: torch.Tensor, keys: list[Any]) -> dict[str, Any]:
        """The attribute accuracies over every shape of every image, and per image (each prompt's line of the
        predictions file): its accuracies, ``scene_correct`` (every shape has the right colour and a shape judged
        right; ``scene_accuracy`` is its mean) and the judgement of each shape."""
        acc = shapes_attribute_accuracy_batch(images, [self._scenes[k] for k in keys])
        per_sample = {
            k: {"attributes": {**{n: p[n] for n in ("colour_accuracy", "shape_accuracy", "size_accuracy")},
                               "scene_correct": all(r["colour_correct"] and r["shape_correct"] for r in p["shapes"]),
                               "shapes": p["shapes"]}}
            for k, p in zip(keys, acc["per_image"])
        }  # fmt: skip
        return {"attributes": {k: v for k, v in acc.items() if k != "per_image"}, "per_sample": per_sample}
