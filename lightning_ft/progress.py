"""Progress bars that stay quiet when output is not a terminal."""

from __future__ import annotations

import sys
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
