"""Data: the built-in ShapesWorld, one reader and one LightningDataModule per source, and their mixture."""

from emu_lightning.data.instruct import InstructionConversations, InstructionDataModule, write_shapesworld_llava
from emu_lightning.data.mixture import MixedStream, MixtureDataModule
from emu_lightning.data.mmc4 import MMC4DataModule, MMC4Documents
from emu_lightning.data.modules import EmuDataModule, ShapesWorldDataModule, ShapesWorldPairs, StreamingDataModule
from emu_lightning.data.pairs import ImageTextDataModule, ImageTextShards
from emu_lightning.data.storyboard import StoryboardDataModule, StoryboardVideos
from emu_lightning.data.streaming import DataSourceError, Skip, StreamingSource
from emu_lightning.data.webvid import WebVidDataModule, WebVidVideos
from emu_lightning.data.world import Scene, Shape, ShapesWorld

__all__ = [
    "DataSourceError",
    "EmuDataModule",
    "ImageTextDataModule",
    "ImageTextShards",
    "InstructionConversations",
    "InstructionDataModule",
    "MMC4DataModule",
    "MMC4Documents",
    "MixedStream",
    "MixtureDataModule",
    "Scene",
    "Shape",
    "ShapesWorld",
    "ShapesWorldDataModule",
    "ShapesWorldPairs",
    "Skip",
    "StoryboardDataModule",
    "StoryboardVideos",
    "StreamingDataModule",
    "StreamingSource",
    "WebVidDataModule",
    "WebVidVideos",
    "write_shapesworld_llava",
]
