"""Progress bars for evaluation loops: tqdm on rank 0 when stderr is a terminal, silent otherwise
(logs, CI, the other ranks)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
    """``iterable`` wrapped in a transient tqdm bar named ``desc``."""
    shown = sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0
    return tqdm(iterable, desc=desc, total=total, disable=not shown, leave=False, dynamic_ncols=True)
