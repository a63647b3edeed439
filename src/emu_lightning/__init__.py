"""emu-lightning: Emu (Generative Pretraining in Multimodality) on PyTorch Lightning."""

from emu_lightning.components import (
    CausalTransformer,
    HFCausalLM,
    LoRA,
    MLPProjector,
    PerceiverResampler,
    PooledProjector,
    TimmVisionBackbone,
)
from emu_lightning.conversation import conversation_items
from emu_lightning.data import MixtureDataModule, StreamingDataModule
from emu_lightning.model import EmuModel
from emu_lightning.sequence import SequenceBuilder
from emu_lightning.tokenizer import TrainedBPE, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CausalTransformer",
    "EmuModel",
    "HFCausalLM",
    "LoRA",
    "MLPProjector",
    "MixtureDataModule",
    "PerceiverResampler",
    "PooledProjector",
    "SequenceBuilder",
    "StreamingDataModule",
    "TimmVisionBackbone",
    "TrainedBPE",
    "conversation_items",
    "load_tokenizer",
]
