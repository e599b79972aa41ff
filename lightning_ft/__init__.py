"""LightningFT: fast monocular face tracking (FLAME or the built-in ICT-FaceKit head) on CPU and GPU."""

__version__ = "0.1.0"
