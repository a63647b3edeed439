"""emu-lightning: Emu (Generative Pretraining in Multimodality) on PyTorch Lightning."""

# ruff: noqa: E402
import os

# OpenMP's threads busy-wait between parallel regions by default; with other processes on the same cores (a shared
# machine) they spin on cores others need and CPU training runs several times slower (benchmarks/busy_machine.py).
# PASSIVE makes them sleep instead. It must be set before torch loads the OpenMP runtime, so it takes effect for the
# `emu-lightning` command and `python -m emu_lightning...` (this package is imported first), not for a session that
# imported torch before emu_lightning; an OMP_WAIT_POLICY already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
