"""Whether a figure can be drawn: matplotlib is a declared dependency, yet an image built by hand (a GPU
cluster's, say) may lack it. Then the figure is left out with one warning and the numbers are written all the
same: a finished training run, evaluation or benchmark never ends in a traceback over its chart."""

from __future__ import annotations

import sys
from pathlib import Path


def can_draw(path: str | Path) -> bool:
    """True when the figure for `path` can be drawn; else the warning, and an earlier run's figure at `path` is
    removed (it would stand beside numbers it does not show)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        Path(path).unlink(missing_ok=True)
        print(f"warning: matplotlib is not installed: {path} is not drawn", file=sys.stderr, flush=True)
        return False
    return True
