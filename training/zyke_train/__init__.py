"""zyke-train: datasets, LoRA training, evaluation and export for Zyke NPC models."""

__version__ = "0.1.0"
