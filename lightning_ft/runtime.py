"""Process-wide thread settings, made by the entry points (the CLI, the
worker processes, the benchmarks, the test suite), never by importing the
library: a program that imports `lightning_ft` keeps its environment.

They must run before torch starts its OpenMP runtime and before cv2 is first
imported, so an entry point calls `configure_threads()` before it imports
the pipeline. A variable the user has set wins.
"""

from __future__ import annotations

import os


def configure_threads() -> None:
    """Set the OpenMP spin and OpenCV pool defaults of a tracking process."""
    # The fitting runs thousands of small torch ops, each an OpenMP parallel
    # region. libgomp's default lets idle threads spin 300k rounds between them,
    # which competes with the working thread and other jobs on a loaded machine
    # (whole runs 3.7-4.4x slower on 2 cores at load 2-4, ~12x at load 8), while
    # never spinning (OMP_WAIT_POLICY=PASSIVE) pays a wake-up per op on an idle
    # one (calibration 8.9 s vs 5.3 s). A short spin keeps most of both: 6.3 s
    # idle, 11.2 s beside two busy processes (PASSIVE 10.0 s, default 20.4 s);
    # benchmarks/RESULTS.md.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "2000")
    # OpenCV's own thread pool (crops, colour conversion, JPEG) only adds work
    # here: those calls already run in the input stage's decoding and cache
    # threads beside the landmark detector, and with 2 pool threads a 512 px crop
    # took 2.4 ms CPU for 1.2 ms wall, a JPEG encode 1.8 ms CPU for the same wall
    # as 1 thread (1.1 ms). On 2 cores the stage cost 14.2-15.3 CPU-ms per frame
    # with the pool, 11.5-13.3 without.
    os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")


def openmp_settings() -> str:
    """The OpenMP variables this process started torch with (for benchmark headers)."""
    keys = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    return " ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ) or "OpenMP defaults"
