"""LightningFT: fast monocular FLAME face tracking on CPU and GPU."""

__version__ = "0.1.0"
