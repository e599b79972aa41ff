"""Terminal output: progress bars that stay quiet when output is not a
terminal, and the filter for third-party native log lines."""

from __future__ import annotations

import io
import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T],
    total: Optional[int] = None,
    desc: str = "",
    enabled: Optional[bool] = None,
    unit: str = "frame",
) -> Iterator[T]:
    """Wrap `iterable` in a tqdm bar; disabled unless stderr is a TTY.

    `enabled=None` decides from the terminal, so batch jobs writing to log
    files (Slurm, nohup) get no carriage-return noise.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    return iter(
        tqdm(iterable, total=total, desc=desc, disable=not enabled, unit=unit,
             leave=False, dynamic_ncols=True)
    )


@contextmanager
def elapsed_bar(desc: str, enabled: Optional[bool] = None, every: float = 0.5) -> Iterator[None]:
    """A bar with the seconds spent, for a stage that reports no progress of
    its own (calibration, fitting), refreshed every `every` seconds from a
    thread; like `progress`, only on a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield
        return
    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", leave=False, dynamic_ncols=True)
    stop = threading.Event()

    def tick():
        while not stop.wait(every):
            bar.refresh()

    thread = threading.Thread(target=tick, name="lightning_ft-elapsed", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


# Lines third-party native code (mediapipe's absl/glog logging, TFLite)
# writes straight to file descriptor 2 on every run: W0000/I0000 records and
# two banners. Errors (E, F) are kept.
NATIVE_NOISE = re.compile(rb"^(?:[WI]\d{4} [\d:.]+ +\d+ [^\]]*\] |INFO: Created TensorFlow Lite |"
                          rb"WARNING: All log messages before absl::InitializeLog\(\) is called)")


@contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Drop NATIVE_NOISE lines that native code writes to file descriptor 2,
    for the duration of the block (the command line's entry point; the
    library itself never touches the process's descriptors). Python's own
    stderr keeps writing to the original descriptor directly, so progress
    bars and terminal detection are unchanged. Does nothing when sys.stderr
    is not descriptor 2 (e.g. captured by a test harness)."""
    try:
        if sys.stderr.fileno() != 2:
            raise ValueError
    except (AttributeError, ValueError, io.UnsupportedOperation):
        yield
        return
    sys.stderr.flush()
    original_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    python_stderr = sys.stderr
    sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(original_fd), "w"), encoding=python_stderr.encoding,
                                  errors="backslashreplace", line_buffering=True)
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def forward():
        with io.FileIO(read_fd, "r") as pipe:
            for line in io.BufferedReader(pipe):
                if not NATIVE_NOISE.match(line):
                    try:
                        os.write(original_fd, line)
                    except OSError:  # stderr closed: keep draining, or native writers would block
                        pass

    thread = threading.Thread(target=forward, name="lightning_ft-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original_fd, 2)  # closes the pipe's last write end: the reader ends
        thread.join(timeout=2.0)
        sys.stderr.close()
        sys.stderr = python_stderr
        os.close(original_fd)
