"""Data: the built-in ShapesWorld and one LightningDataModule per source."""

from emu_lightning.data.modules import EmuDataModule, ShapesWorldDataModule, ShapesWorldPairs
from emu_lightning.data.world import Scene, Shape, ShapesWorld

__all__ = ["EmuDataModule", "Scene", "Shape", "ShapesWorld", "ShapesWorldDataModule", "ShapesWorldPairs"]
