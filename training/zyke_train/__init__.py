"""zyke-train: datasets, LoRA training, evaluation and export for Zyke NPC models."""

from zyke import __version__

__all__ = ["__version__"]
