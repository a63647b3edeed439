"""ShapesWorld image-text pairs and questions generated in memory, as a map-style Dataset and a DataModule."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, Dataset

from emu_lightning.data.modules import EmuDataModule
from emu_lightning.data.streaming import MapStyleSource
from emu_lightning.sequence import END_OF_CHUNK, SequenceBuilder
from emu_lightning.shapesworld.world import ShapesWorld


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


class ShapesWorldDataModule(EmuDataModule):
    """ShapesWorld image-text pairs: procedurally generated, seeded, with a held-out split from other seeds.

    Args:
        image_size: rendered image side in pixels; by default the attached model's vision backbone's.
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
        image_size: int | None = None,
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
        self.image_size, self.seed = image_size, seed
        self.world_args = dict(min_shapes=min_shapes, max_shapes=max_shapes, grid=grid, seed=seed)
        self.sizes = {"train": train_size, "val": val_size}
        self.mix = dict(
            image_first_prob=image_first_prob,
            vqa_prob=vqa_prob,
            examples_per_sample=examples_per_sample,
            captions=captions,
        )
        self._world: ShapesWorld | None = None
        # bad world or mix arguments fail here, not at the first batch (captions and checks need no image size)
        ShapesWorldPairs(ShapesWorld(image_size=image_size or 8 * grid, **self.world_args), "train", 1, **self.mix)

    @property
    def world(self) -> ShapesWorld:
        """The world, rendered at ``image_size`` (by default the attached model's vision backbone's)."""
        if self._world is None:
            size = self.image_size or self.model_image_size()
            if size is None:
                raise ValueError("ShapesWorldDataModule has no image_size: give it, or attach it to a model")
            self._world = ShapesWorld(image_size=size, **self.world_args)
            self._sets = {s: ShapesWorldPairs(self._world, s, n, **self.mix) for s, n in self.sizes.items()}
        return self._world

    @property
    def train_set(self) -> ShapesWorldPairs:
        return self.world and self._sets["train"]

    @property
    def val_set(self) -> ShapesWorldPairs:
        return self.world and self._sets["val"]

    def setup(self, stage: str | None = None) -> None:
        self.check_image_size(self.world.image_size)

    def train_dataloader(self) -> DataLoader:
        # a seeded stream over the scenes (a new order each pass), which resumes where a checkpoint left it
        return self.loader(self.resume(MapStyleSource(self.train_set, "shapes", seed=self.seed)))

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set)
