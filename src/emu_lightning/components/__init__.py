"""The four swappable component families; each is a LightningModule named from YAML by ``class_path``."""

from emu_lightning.components.base import LanguageModel, LMOutput, Resampler, VisionBackbone, VisualDecoder
from emu_lightning.components.decoder import DiffusionDecoder
from emu_lightning.components.llm import HFCausalLM, LoRA
from emu_lightning.components.resampler import (
    CausalTransformer,
    MLPProjector,
    PerceiverResampler,
    PooledProjector,
    PreNormCausalTransformer,
)
from emu_lightning.components.vision import TimmVisionBackbone

__all__ = [
    "CausalTransformer",
    "PreNormCausalTransformer",
    "DiffusionDecoder",
    "HFCausalLM",
    "LMOutput",
    "LanguageModel",
    "LoRA",
    "MLPProjector",
    "PerceiverResampler",
    "PooledProjector",
    "Resampler",
    "TimmVisionBackbone",
    "VisionBackbone",
    "VisualDecoder",
]
