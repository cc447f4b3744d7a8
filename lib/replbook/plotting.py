"""One plot style for the whole book; figures are PNG."""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt

STYLE = {
    "figure.figsize": (6.4, 3.6),
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
}
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def setup() -> None:
    """Apply the book's style; inline figures render as PNG (what nbcheck and the site read)."""
    matplotlib.rcParams.update(STYLE)
    matplotlib.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=PALETTE)
    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
    except ImportError:  # outside IPython
        pass


def figure(ncols: int = 1, nrows: int = 1, width: float | None = None, height: float | None = None,
           grid: bool = False):
    """``fig, ax = figure()`` — one axes; ``fig, axes = figure(3, grid=True)`` — always a
    2-D array of axes (``axes[row, col]``, ``axes.flat``), whatever the count."""
    w, h = STYLE["figure.figsize"]
    return plt.subplots(nrows, ncols, figsize=(width or w * max(1, ncols) * 0.75, height or h * nrows),
                        squeeze=not grid, layout="constrained")
