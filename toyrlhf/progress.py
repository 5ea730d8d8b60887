"""Progress bars that appear only for a person watching a terminal.

Experiments take ``progress: bool`` and wrap their outer loop in :func:`progress_bar`.  The bar
is drawn on stderr only when ``enabled`` is true *and* stderr is a TTY, so tests, CI logs,
notebooks' captured output and redirected runs stay quiet.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T],
    enabled: bool = False,
    desc: str | None = None,
    total: int | None = None,
) -> tqdm:
    """Wrap ``iterable`` in a tqdm bar shown only when ``enabled`` and stderr is a TTY.

    Parameters
    ----------
    iterable : iterable
        What to iterate over; yielded unchanged.
    enabled : bool
        Whether the caller wants a bar (an experiment's ``progress`` argument).
    desc : str, optional
        Label in front of the bar.
    total : int, optional
        Number of items, when ``len(iterable)`` is not available.

    Returns
    -------
    tqdm.tqdm
        Iterates like ``iterable``; when disabled, ``set_postfix`` and friends are no-ops.

    Examples
    --------
    >>> [x * x for x in progress_bar(range(3), enabled=False)]
    [0, 1, 4]
    """
    stream = sys.stderr
    show = bool(enabled) and stream is not None and hasattr(stream, "isatty") and stream.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=not show, file=stream,
                dynamic_ncols=True, leave=False)
