"""ShapesWorld: the offline default's synthetic world of coloured shapes, and everything the library needs to train
and evaluate on it without downloads. The library itself never imports it: configs, the demo and tests use it by name.

- :class:`ShapesWorld` (:mod:`.world`): seeded scenes, images, reference captions, VQA questions, COCO Karpathy and
  VQAv2 files.
- :class:`ShapesWorldWriter` (:mod:`.writers`): the world written in every real on-disk format, to a reader's paths
  (the ``writer`` of a :class:`~emu_lightning.data.StreamingDataModule`).
- :class:`ShapesWorldDataModule` (:mod:`.datamodule`): pairs and questions generated in memory;
  :class:`ShapesWorldVideoQADataModule` (:mod:`.videoqa`): clips of moving shapes and questions about their motion.
- :class:`ShapesWorldCaptioningEval`, :class:`ShapesWorldVQAEval`, :class:`ShapesWorldOKVQAEval`,
  :class:`ShapesWorldVizWizEval`, :class:`ShapesWorldVisDialEval`, :class:`ShapesWorldMSVDQAEval`,
  :class:`ShapesWorldMSRVTTQAEval`, :class:`ShapesWorldNExTQAEval`, :class:`ShapesWorldTextToImageEval`
  (:mod:`.eval`, :mod:`.dialog`): the evaluation callbacks on ShapesWorld sets, written in each benchmark's format.
- :func:`shapes_attribute_accuracy` (:mod:`.metrics`): does a generated image show the scene's shapes.
- :func:`corpus`: the text the tiny model's tokenizer is trained on
  (``TrainedBPE(emu_lightning.shapesworld.corpus)``), and :func:`tokenizer`, that tokenizer.
"""

from transformers import PreTrainedTokenizerFast

from emu_lightning.shapesworld.datamodule import ShapesWorldDataModule, ShapesWorldPairs
from emu_lightning.shapesworld.dialog import ShapesWorldVisDialEval
from emu_lightning.shapesworld.eval import (
    ShapesWorldCaptioningEval,
    ShapesWorldMSRVTTQAEval,
    ShapesWorldMSVDQAEval,
    ShapesWorldNExTQAEval,
    ShapesWorldOKVQAEval,
    ShapesWorldTextToImageEval,
    ShapesWorldVizWizEval,
    ShapesWorldVQAEval,
    find_world,
)
from emu_lightning.shapesworld.metrics import shapes_attribute_accuracy, shapes_attribute_accuracy_batch
from emu_lightning.shapesworld.videoqa import (
    ShapesWorldVideoQA,
    ShapesWorldVideoQADataModule,
    write_shapesworld_msrvtt_qa,
    write_shapesworld_msvd_qa,
    write_shapesworld_nextqa,
)
from emu_lightning.shapesworld.world import Scene, Shape, ShapesWorld
from emu_lightning.shapesworld.writers import (
    ShapesWorldWriter,
    write_shapesworld_llava,
    write_shapesworld_mmc4,
    write_shapesworld_pairs,
    write_shapesworld_storyboard,
    write_shapesworld_webvid,
)
from emu_lightning.tokenizer import TrainedBPE


def corpus() -> list[str]:
    """The text of the default world's captions and questions (and every word it uses): what the tiny model's
    tokenizer is trained on."""
    return ShapesWorld().corpus()


def tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` trained on :func:`corpus`, with Emu's tokens."""
    return TrainedBPE(corpus, vocab_size)()


__all__ = [
    "Scene",
    "Shape",
    "ShapesWorld",
    "ShapesWorldCaptioningEval",
    "ShapesWorldDataModule",
    "ShapesWorldMSRVTTQAEval",
    "ShapesWorldMSVDQAEval",
    "ShapesWorldNExTQAEval",
    "ShapesWorldPairs",
    "ShapesWorldOKVQAEval",
    "ShapesWorldTextToImageEval",
    "ShapesWorldVisDialEval",
    "ShapesWorldVizWizEval",
    "ShapesWorldVQAEval",
    "ShapesWorldVideoQA",
    "ShapesWorldVideoQADataModule",
    "ShapesWorldWriter",
    "corpus",
    "find_world",
    "shapes_attribute_accuracy",
    "shapes_attribute_accuracy_batch",
    "tokenizer",
    "write_shapesworld_llava",
    "write_shapesworld_mmc4",
    "write_shapesworld_msrvtt_qa",
    "write_shapesworld_msvd_qa",
    "write_shapesworld_nextqa",
    "write_shapesworld_pairs",
    "write_shapesworld_storyboard",
    "write_shapesworld_webvid",
]
