"""Data: one reader per real on-disk format, the DataModule that reads any of them, and their mixture."""

from emu_lightning.data.instruct import InstructionConversations
from emu_lightning.data.mixture import MixedStream, MixtureDataModule
from emu_lightning.data.mmc4 import MMC4Documents
from emu_lightning.data.modules import DataWriter, EmuDataModule, StreamingDataModule
from emu_lightning.data.pairs import ImageTextShards
from emu_lightning.data.storyboard import StoryboardVideos
from emu_lightning.data.streaming import DataSourceError, MapStyleSource, Skip, StreamingSource
from emu_lightning.data.webvid import WebVidVideos

__all__ = [
    "DataSourceError",
    "DataWriter",
    "EmuDataModule",
    "ImageTextShards",
    "InstructionConversations",
    "MMC4Documents",
    "MapStyleSource",
    "MixedStream",
    "MixtureDataModule",
    "Skip",
    "StoryboardVideos",
    "StreamingDataModule",
    "StreamingSource",
    "WebVidVideos",
]
