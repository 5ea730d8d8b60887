"""Shared figure style, figure creation and reproducible saving.

Conventions
-----------
* Every plot function draws on a given :class:`matplotlib.axes.Axes`; an experiment's
  ``figure(result)`` creates the figure with :func:`new_figure` and builds it inside
  ``with style():`` so that titles and labels get the shared font sizes.
* Figures are created without pyplot (no global figure registry, nothing to close) on the
  Agg canvas; in a notebook, a figure left as a cell's last expression is still displayed.
* :func:`save_figure` writes PNG and SVG atomically and bit-for-bit reproducibly: no
  software/date metadata and a fixed ``svg.hashsalt`` for the SVG element ids.

Examples
--------
>>> import numpy as np
>>> with style():
...     fig, ax = new_figure()
...     _ = ax.plot(np.arange(3), np.arange(3) ** 2, label="squares")
...     _ = ax.legend()
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from cycler import cycler
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._io import atomic_write_bytes

__all__ = ["COLORS", "PANEL_SIZE", "STYLE", "style", "apply_style", "new_figure", "save_figure"]

#: Okabe–Ito colour-blind-safe palette (black last, yellow late: it is faint on white).
COLORS: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)

#: Settings that make saved files independent of time and software version strings.
_REPRODUCIBLE: dict[str, Any] = {"svg.hashsalt": "toyrlhf", "svg.fonttype": "path"}

#: The shared rcParams.
STYLE: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "figure.constrained_layout.use": True,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 13,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=list(COLORS)),
    "lines.linewidth": 1.8,
    "lines.markersize": 5,
    "legend.frameon": False,
    "image.cmap": "viridis",
    **_REPRODUCIBLE,
}

#: Default size of one panel in inches (width, height).
PANEL_SIZE: tuple[float, float] = (4.5, 3.4)


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Apply :data:`STYLE` for the duration of a ``with`` block (``matplotlib.rc_context``)."""
    with mpl.rc_context(STYLE):
        yield


def apply_style() -> None:
    """Apply :data:`STYLE` globally, e.g. at the top of a notebook."""
    mpl.rcParams.update(STYLE)


def new_figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float] | None = None,
    sharex: bool | str = False,
    sharey: bool | str = False,
    squeeze: bool = True,
    **subplot_kw: Any,
) -> tuple[Figure, Any]:
    """Create a styled figure with a grid of axes and constrained layout.

    Parameters
    ----------
    nrows, ncols : int
        Grid of panels.
    figsize : (float, float), optional
        Size in inches; default :data:`PANEL_SIZE` times ``(ncols, nrows)``.
    sharex, sharey : bool or {"row", "col", "all", "none"}
        Passed to :meth:`matplotlib.figure.Figure.subplots`.
    squeeze : bool
        If True (default) a 1x1 grid returns a single ``Axes`` and a 1-D grid a 1-D array,
        as :func:`matplotlib.pyplot.subplots` does; if False always a 2-D array.
    **subplot_kw
        Passed to each ``add_subplot`` (e.g. ``projection="3d"``).

    Returns
    -------
    fig : matplotlib.figure.Figure
        On an Agg canvas, not registered with pyplot.
    axes : Axes or numpy.ndarray of Axes
    """
    for name, n in (("nrows", nrows), ("ncols", ncols)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if figsize is None:
        figsize = (PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows)
    with style():
        fig = Figure(figsize=figsize, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=squeeze,
                            subplot_kw=subplot_kw or None)
        # Tick labels are created lazily at draw time; freeze their size now.
        for ax in np.atleast_1d(axes).ravel():
            ax.tick_params(labelsize=STYLE["xtick.labelsize"])
    return fig, axes


def _stem(stem_path: str | os.PathLike[str]) -> Path:
    p = Path(stem_path)
    return p.with_suffix("") if p.suffix.lower() in (".png", ".svg") else p


def save_figure(
    fig: Figure,
    stem_path: str | os.PathLike[str],
    *,
    formats: Sequence[str] = ("png", "svg"),
    dpi: float | None = None,
) -> tuple[Path, ...]:
    """Save ``fig`` as ``<stem_path>.png`` and ``<stem_path>.svg``, atomically and reproducibly.

    Saving the same figure twice, in one process or two, gives identical bytes (for a given
    matplotlib and FreeType): PNG without the ``Software`` text chunk, SVG without a date and
    with a fixed ``svg.hashsalt``.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    stem_path : str or os.PathLike
        Path without extension (a trailing ``.png``/``.svg`` is dropped).  Parent directories
        are created.
    formats : sequence of {"png", "svg"}
    dpi : float, optional
        Raster resolution; default :data:`STYLE`'s ``savefig.dpi``.

    Returns
    -------
    tuple of pathlib.Path
        The files written, in the order of ``formats``.
    """
    metadata = {"png": {"Software": None}, "svg": {"Date": None}}
    stem = _stem(stem_path)
    dpi = STYLE["savefig.dpi"] if dpi is None else dpi
    written = []
    for fmt in formats:
        if fmt not in metadata:
            raise ValueError(f"formats must be among {sorted(metadata)}, got {fmt!r}")
        buf = io.BytesIO()
        with mpl.rc_context(_REPRODUCIBLE):
            fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata[fmt],
                        facecolor=STYLE["savefig.facecolor"])
        written.append(atomic_write_bytes(stem.with_name(f"{stem.name}.{fmt}"), buf.getvalue()))
    return tuple(written)

