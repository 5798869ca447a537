"""Progress bars for long phases: shown on a terminal, silent in logs and pipes.

Why tqdm: rate, ETA and terminal handling are well solved there; hand-written ``\\r`` lines are not.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, unit: str = "patient", desc: str = "") -> Iterator[T]:
    """``items`` with a progress bar on stderr when stderr is a terminal, unchanged otherwise."""
    yield from tqdm(items, total=total, unit=unit, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(),
                    dynamic_ncols=True, leave=False)
