"""Progress bars (tqdm, with ETA) for long jobs other than training: evaluation passes, checkpoint
conversion, teacher retraining. Training has its own log lines and TensorBoard.

A bar is shown only on a terminal and only by rank 0: a log file or a pipe gets no bar lines,
and N ranks do not draw N bars over each other.
"""

from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm

from tinyclip_ds import distributed


def enabled() -> bool:
    """Whether this process draws progress bars: stderr is a terminal and this is rank 0."""
    return sys.stderr.isatty() and distributed.rank() == 0


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
             **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or one updated by hand: ``bar.update(n)``), disabled where
    `enabled` is false; it vanishes when done (``leave=False``) unless asked to stay."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, total=total, desc=desc, disable=not enabled(), dynamic_ncols=True, **kwargs)
