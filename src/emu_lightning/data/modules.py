"""LightningDataModules. Each yields interleaved samples and collates them with the model's SequenceBuilder."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from emu_lightning.data.owned import write_once
from emu_lightning.data.streaming import (
    MapStyleSource,
    ResumeState,
    StreamingSource,
    distributed_rank,
    expand_urls,
    latest_epoch,
)
from emu_lightning.data.world import ShapesWorld
from emu_lightning.distributed import gather_objects
from emu_lightning.sequence import END_OF_CHUNK, SequenceBuilder


class ShapesWorldPairs(Dataset):
    """Image-text pairs (and optionally questions) from ShapesWorld; item ``i`` of ``split`` never changes.

    The image comes before the caption (captioning) or after it (text-to-image), at random per pair, as in
    Emu's pretraining on image-text pairs. With ``vqa_prob > 0`` some examples are questions about the image
    (``question: ... answer:`` without loss, then the answer), in the format the VQA evaluation prompts with;
    with ``examples_per_sample > 1`` a sample chains that many examples of different scenes, so the model
    also sees several images in one sequence, as few-shot prompts show them: the ``j``-th example follows
    ``j - 1`` others, so every context from 0 to ``examples_per_sample - 1`` earlier examples is trained. A
    fixed count keeps the samples of a batch about equally long, with little padding. Examples are
    separated by ``END_OF_CHUNK`` (EOS), so the model learns to stop after one, as the evaluation's
    demonstrations end with ``{end}``.

    Args:
        world: the ShapesWorld generator.
        split: ``train``, ``val`` or ``test``.
        size: number of samples.
        image_first_prob: probability that a pair's image precedes its caption.
        vqa_prob: probability that an example is a question-answer pair instead of a caption pair.
        examples_per_sample: examples chained in one sample.
        captions: which of each scene's reference captions (by index into :meth:`ShapesWorld.captions`) a
            pair may use, one drawn at random; all of them by default.
    """

    def __init__(
        self,
        world: ShapesWorld,
        split: str,
        size: int,
        image_first_prob: float = 0.5,
        vqa_prob: float = 0.0,
        examples_per_sample: int = 1,
        captions: list[int] | None = None,
    ) -> None:
        for name, p in (("image_first_prob", image_first_prob), ("vqa_prob", vqa_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} {p} is not a probability")
        if examples_per_sample < 1:
            raise ValueError(f"examples_per_sample {examples_per_sample} must be at least 1")
        self.world, self.split, self.size, self.image_first_prob = world, split, size, image_first_prob
        self.vqa_prob, self.examples_per_sample = vqa_prob, examples_per_sample
        available = len(world.captions(world.scene(split, 0)))
        if captions is not None and (not captions or any(not 0 <= c < available for c in captions)):
            raise ValueError(f"captions {captions} must be a non-empty list of indices below {available}")
        self.captions = list(captions) if captions is not None else list(range(available))

    def __len__(self) -> int:
        return self.size

    def _pair(self, index: int) -> tuple[list[Any], list[str]]:
        scene = self.world.scene(self.split, index)
        image = self.world.render(scene, self.world.rng(self.split, index, stream=1))
        rng = self.world.rng(self.split, index, stream=2)
        references = self.world.captions(scene)
        caption = references[self.captions[int(rng.integers(len(self.captions)))]]
        return ([image, caption] if rng.random() < self.image_first_prob else [caption, image]), references

    def _qa(self, index: int) -> tuple[list[Any], list[str]]:
        qas = self.world.questions(self.split, index)
        qa = qas[int(self.world.rng(self.split, index, stream=5).integers(len(qas)))]
        prompt = {"text": f"question: {qa.question} answer:", "loss": False}
        return [self.world.image(self.split, index), prompt, f" {qa.answer}."], list(qa.answers)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        if self.vqa_prob == 0.0 and self.examples_per_sample == 1:
            items, references = self._pair(index)
        else:
            rng = self.world.rng(self.split, index, stream=4)
            items, references = [], []
            for j in range(self.examples_per_sample):
                sub = index * self.examples_per_sample + j  # distinct scenes for the chained examples
                example, refs = self._qa(sub) if rng.random() < self.vqa_prob else self._pair(sub)
                items += [END_OF_CHUNK, *example] if items else example  # EOS between examples
                references = references or refs
        return {"items": items, "id": f"{self.split}-{index}", "index": index, "references": references}


class EmuDataModule(L.LightningDataModule):
    """Shared plumbing: the SequenceBuilder comes from the model being trained unless one is given, and the training
    stream's position travels in checkpoints.

    Every training loader is a stream (:class:`~emu_lightning.data.streaming.StreamingSource` or a mixture of them)
    whose samples carry their position. :meth:`on_before_batch_transfer` keeps the position of the last batch training
    consumed from each DataLoader worker; :meth:`state_dict` saves them (every rank's, under DDP) in the checkpoint,
    and after :meth:`load_state_dict` the next training loader continues from them: ``N`` steps, a checkpoint and a
    resume to ``2N`` see the batches of ``2N`` steps straight. With another number of processes or workers than saved,
    the streams start new passes instead (a warning says so).
    """

    def __init__(self, batch_size: int, num_workers: int, sequencer: SequenceBuilder | None) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.sequencer = batch_size, num_workers, sequencer
        self._positions: dict[int, dict[str, Any]] = {}  # worker slot -> position after its last consumed batch
        self._next_slot = 0  # the worker slot whose batch is due next
        self._saved: dict[str, Any] | None = None  # positions loaded from a checkpoint, for the next training loader

    # ------------------------------------------------------------------ the training stream's position
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "position" in batch:
            positions = [p for p in batch.pop("position") or [] if p is not None]
            if positions and self.trainer is not None and self.trainer.training:
                position = positions[-1]
                self._positions[position["slot"]] = position
                self._next_slot = (position["slot"] + 1) % position["workers"]
        return batch

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is saved, so the gather (a collective under DDP) is matched.
        mine = {"positions": dict(self._positions), "next_slot": self._next_slot, "workers": max(1, self.num_workers)}
        ranks = gather_objects(mine if self._positions else None)
        return {"data_positions": ranks} if any(r is not None for r in ranks) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict.get("data_positions")

    def resume(self, stream: Any) -> Any:
        """Set ``stream`` (a training stream) to continue from the positions loaded from a checkpoint, if any."""
        self._positions, self._next_slot = {}, 0
        if not self._saved:
            return stream
        rank, world = distributed_rank()
        workers = max(1, self.num_workers)
        mine = self._saved[rank] if len(self._saved) == world else None
        if mine is not None and mine["workers"] == workers:
            stream.resume_state = ResumeState({int(k): v for k, v in mine["positions"].items()}, mine["next_slot"])
            self._positions, self._next_slot = dict(stream.resume_state.positions), mine["next_slot"]
            return stream
        first = 1 + max(latest_epoch(r) for r in self._saved if r is not None)
        saved_workers = next(r["workers"] for r in self._saved if r is not None)
        rank_zero_warn(
            f"the checkpoint's data position was saved by {len(self._saved)} process(es) x {saved_workers} DataLoader "
            f"worker(s), this run has {world} x {workers}: the training streams cannot continue it and start new "
            f"passes (from pass {first}) instead, which do not replay the saved passes' order"
        )
        stream.resume_state = ResumeState({}, 0, first)
        return stream

    def loader(self, dataset: Dataset) -> DataLoader:
        """A loader in the dataset's order: a stream splits its units across ranks and workers itself; a map-style
        held-out set is split across ranks by Lightning's sampler."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.resolve_sequencer(),
        )

    def resolve_sequencer(self) -> SequenceBuilder:
        if self.sequencer is None:
            model = self.trainer.lightning_module if self.trainer is not None else None
            if model is None or getattr(model, "sequencer", None) is None:
                raise ValueError(
                    "no SequenceBuilder: pass `sequencer=` or attach the datamodule to a Trainer with an EmuModel"
                )
            self.sequencer = model.sequencer
        return self.sequencer

    def check_image_size(self, image_size: int) -> None:
        """Raise when the attached model's vision backbone expects another image size than the data gives."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        vision = getattr(model, "vision", None)
        if vision is not None and getattr(vision, "image_size", None) not in (None, image_size):
            raise ValueError(
                f"data image_size {image_size} does not match the vision backbone's image_size {vision.image_size}"
            )


class ShapesWorldDataModule(EmuDataModule):
    """ShapesWorld image-text pairs: procedurally generated, seeded, with a held-out split from other seeds.

    Args:
        image_size: rendered image side in pixels (must match the vision backbone's input size).
        min_shapes: fewest shapes per scene.
        max_shapes: most shapes per scene.
        grid: scenes are a grid x grid board (2 or 3).
        seed: the world's seed; scenes are a pure function of (seed, split, index).
        train_size: training scenes per epoch.
        val_size: held-out scenes (the ``val`` split, drawn from another seed stream).
        image_first_prob: probability that the image precedes its caption.
        vqa_prob: probability that an example is a ShapesWorld question with its answer.
        examples_per_sample: examples chained in one sample (few-shot-like interleaving).
        captions: indices of the reference captions a pair may use (:meth:`ShapesWorld.captions`: 1 and 2
            name every shape's position); all five by default.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        sequencer: a SequenceBuilder; by default the trained model's.
    """

    def __init__(
        self,
        image_size: int = 32,
        min_shapes: int = 1,
        max_shapes: int = 3,
        grid: int = 2,
        seed: int = 0,
        train_size: int = 100_000,
        val_size: int = 256,
        image_first_prob: float = 0.5,
        vqa_prob: float = 0.0,
        examples_per_sample: int = 1,
        captions: list[int] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        sequencer: SequenceBuilder | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, sequencer)
        self.world = ShapesWorld(
            image_size=image_size, min_shapes=min_shapes, max_shapes=max_shapes, grid=grid, seed=seed
        )
        self.seed = seed
        mix = dict(
            image_first_prob=image_first_prob,
            vqa_prob=vqa_prob,
            examples_per_sample=examples_per_sample,
            captions=captions,
        )
        self.train_set = ShapesWorldPairs(self.world, "train", train_size, **mix)
        self.val_set = ShapesWorldPairs(self.world, "val", val_size, **mix)

    def setup(self, stage: str | None = None) -> None:
        self.check_image_size(self.world.image_size)

    def train_dataloader(self) -> DataLoader:
        # a seeded stream over the scenes (a new order each pass), which resumes where a checkpoint left it
        return self.loader(self.resume(MapStyleSource(self.train_set, "shapes", seed=self.seed)))

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set)


class StreamingDataModule(EmuDataModule):
    """A DataModule over :class:`~emu_lightning.data.streaming.StreamingSource` readers: subclasses build the
    training reader (shuffled, repeating) and optionally a held-out one (one pass, in order).

    The readers split their units across ranks and workers themselves, so the loaders neither shuffle nor
    use a sampler; skipped samples travel in each batch's ``skipped`` list and the model logs them.

    With ``shapesworld``, :meth:`prepare_data` first writes ShapesWorld data in the source's format to its
    configured paths (once: a marker file in their folder records it), so the offline default trains through
    the same readers as real data. It writes only into an absent or empty folder or one it wrote itself
    (:func:`~emu_lightning.data.owned.write_once`): a folder with other files (a user's data) is an error.
    ``shapesworld`` holds the number of ``train`` and ``val`` samples and any :class:`ShapesWorld` arguments but
    the image size (the DataModule's), e.g. ``{train: 2000, val: 64}``.
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        sequencer: SequenceBuilder | None,
        seed: int = 0,
        shapesworld: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, sequencer)
        self.seed = seed
        self.shapesworld = dict(shapesworld) if shapesworld is not None else None
        self._world: ShapesWorld | None = None

    @property
    def world(self) -> ShapesWorld | None:
        """The ShapesWorld that ``shapesworld`` writes (at the DataModule's ``image_size``); None without it."""
        if self.shapesworld is not None and self._world is None:
            args = {k: v for k, v in self.shapesworld.items() if k not in ("train", "val")}
            self._world = ShapesWorld(image_size=self.image_size, **args)
        return self._world

    # ------------------------------------------------------------------ subclass interface
    def train_source(self) -> StreamingSource:
        raise NotImplementedError

    def val_source(self) -> StreamingSource | None:
        return None

    def paths(self, split: str) -> str | list[str] | None:
        """The configured files of ``split`` (``train`` or ``val``), where ShapesWorld data is written."""
        raise NotImplementedError(f"{type(self).__name__} cannot write ShapesWorld data")

    def write_shapesworld(self, root: Path, split: str, num_samples: int, num_files: int) -> list[str]:
        """Write ``num_samples`` ShapesWorld samples of ``split`` into ``root`` as ``num_files`` files (where
        the format has several) and return the index files' paths."""
        raise NotImplementedError(f"{type(self).__name__} cannot write ShapesWorld data")

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        if self.shapesworld is None:
            return
        for split in ("train", "val"):
            num, configured = int(self.shapesworld.get(split, 0)), self.paths(split)
            if num <= 0 or configured is None:
                continue
            expected = [str(Path(p)) for p in expand_urls(configured)]
            root = Path(expected[0]).parent
            spec = {**self.shapesworld, "image_size": self.world.image_size, "files": len(expected)}
            write = functools.partial(self.write_shapesworld, root, split, num, len(expected))
            written = {str(Path(p)) for p in write_once(root, split, spec, write)}
            if set(expected) != written or any(Path(p).parent != root for p in expected):
                raise ValueError(
                    f"{type(self).__name__}: ShapesWorld wrote {sorted(written)} for {split}, but the configured "
                    f"paths are {expected}: configure the paths it writes"
                )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.resume(self.train_source()))

    def val_dataloader(self) -> DataLoader | list:
        source = self.val_source()
        return [] if source is None else self.loader(source)
