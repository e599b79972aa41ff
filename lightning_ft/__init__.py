"""LightningFT: fast monocular FLAME face tracking on CPU and GPU."""

import os

# The fitting runs thousands of small torch ops; with OpenMP's default
# active waiting, idle threads spin against the working one (measured 3.7-4.4x
# slower whole runs on 2 cores at load 2-4, ~12x at load 8; benchmarks/RESULTS.md).
# Must be set before torch starts its OpenMP runtime; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
