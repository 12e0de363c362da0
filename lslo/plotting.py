"""Every figure of the analyses, drawn from saved results: ISE / LSP score heatmaps (paper Figures 2, 4, 5
and 6) and Weight Learning's mixing weights per layer (Figure 1).

Every figure is a bare Agg ``Figure`` written atomically (:func:`_new_figure`, :func:`_save_figure`);
the run figures of :mod:`lslo.evaluate` (per-epoch curves, group bars) are drawn with the same two.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import RESOURCE_GROUPS
from .io import atomic_write_file
from .scores import _GROUP_COLOURS, _languages_of, _rows_of, _sides_present, score_matrix
from .weight_learning import _check_weights

__all__ = [
    "plot_index_weights",
    "plot_language_modules",
    "plot_layer_modules",
    "plot_per_language",
    "plot_per_layer",
]


def _save_figure(figure, out_png: str | os.PathLike, dpi: int) -> Path:
    """Write ``figure`` as a PNG at ``out_png``, atomically; returns the path."""
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda temp: figure.savefig(temp, format="png", dpi=dpi, bbox_inches="tight"))
    return path


def _new_figure(**kwargs):
    # An Agg canvas on a bare Figure: no pyplot, no global backend switch, no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


# ===================================================================== scores
def _symmetric_norm(matrices):
    import numpy as np
    from matplotlib.colors import Normalize

    finite = [np.abs(m[np.isfinite(m)]).max() for m in matrices if np.isfinite(m).any()]
    vmax = max(finite, default=0.0) or 1.0
    return Normalize(vmin=-vmax, vmax=vmax)


def _draw(ax, matrix, row_labels, column_labels, norm, *, title: str, ylabel: str | None, row_colours=None,
          show_rows: bool = True, fontsize: float = 8):
    # RdBu maps low values to red: a negative score (more space needed) is red, as the paper's figures.
    image = ax.imshow(matrix, cmap="RdBu", norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(column_labels)), column_labels, fontsize=fontsize)
    ax.set_yticks(range(len(row_labels)), row_labels if show_rows else [], fontsize=fontsize)
    if row_colours and show_rows:
        for tick, colour in zip(ax.get_yticklabels(), row_colours):
            tick.set_color(colour)
    ax.set_title(title, fontsize=fontsize + 1)
    if ylabel and show_rows:
        ax.set_ylabel(ylabel, fontsize=fontsize)
    return image


def _colours(labels, group_of):
    group_of = group_of or RESOURCE_GROUPS.get
    return [_GROUP_COLOURS.get(group_of(code), "black") for code in labels]


def _colourbar(figure, image, axes):
    bar = figure.colorbar(image, ax=list(axes), shrink=0.8, pad=0.02)
    bar.set_label("Score (Eq. 6); red: needs more space", fontsize=8)


def _side_panels(scores, out_png, *, by: str, ylabel: str, title: str | None, group_of, dpi: int):
    sides = _sides_present(scores)
    panels = [(side, *score_matrix(scores, side=side, by=by)) for side in sides]
    norm = _symmetric_norm([m for *_, m in panels])
    height = max(3.0, 0.3 * max(len(rows) for _, rows, _, _ in panels) + 1.5)
    figure = _new_figure(figsize=(4.0 * len(sides) + 1.5, height))
    axes = figure.subplots(1, len(sides), squeeze=False, gridspec_kw={
        "width_ratios": [max(len(columns), 1) for _, _, columns, _ in panels]})[0]
    image = None
    for k, (ax, (side, rows, columns, matrix)) in enumerate(zip(axes, panels)):
        colours = _colours(rows, group_of) if by == "language" else None
        image = _draw(ax, matrix, rows, columns, norm, title=side.capitalize(), ylabel=ylabel, row_colours=colours,
                      show_rows=k == 0, fontsize=9)
    _colourbar(figure, image, axes)
    if title:
        figure.suptitle(title)
    _save_figure(figure, out_png, dpi)
    return figure


def plot_language_modules(scores, out_png: str | os.PathLike, *, title: str | None = None, group_of=None,
                          dpi: int = 120):
    """Figure 2 of the paper: languages x modules, mean over layers; an encoder and a decoder panel.

    Args:
        scores: a scores document (:func:`score_model`) or its rows.
        out_png: the PNG to write (atomically).
        title: figure title.
        group_of: code -> resource group, colours the language labels (default: the paper's groups).
        dpi: resolution.

    Returns:
        The matplotlib ``Figure`` (one heatmap axes per side present, one colour bar), already saved.
    """
    return _side_panels(scores, out_png, by="language", ylabel="Language id", title=title, group_of=group_of, dpi=dpi)


def plot_layer_modules(scores, out_png: str | os.PathLike, *, title: str | None = None, dpi: int = 120):
    """Figure 4 of the paper: layers x modules, mean over languages; an encoder and a decoder panel.

    Returns:
        The matplotlib ``Figure`` (one heatmap axes per side present, one colour bar), already saved.
    """
    return _side_panels(scores, out_png, by="layer", ylabel="Layer id", title=title, group_of=None, dpi=dpi)


def _panel_grid(scores, out_png, keys, *, by: str, select: str, panel_title, title, group_of, dpi, ylabel: str):
    """One panel (an encoder and a decoder heatmap side by side) per key, in a grid of up to 3 panels a row."""
    if not keys:
        raise ValueError(f"no {select} to draw a panel for")
    sides = _sides_present(scores)
    panels = [[(side, *score_matrix(scores, side=side, by=by, **{select: key})) for side in sides] for key in keys]
    norm = _symmetric_norm([m for panel in panels for *_, m in panel])
    per_row = min(3, len(keys))
    grid_rows = math.ceil(len(keys) / per_row)
    n_rows = max(len(rows) for panel in panels for _, rows, _, _ in panel)
    figure = _new_figure(figsize=(per_row * (3.2 * len(sides)) + 1.5, grid_rows * max(2.6, 0.25 * n_rows + 1.4)))
    ratios = [max(len(columns), 1) for _, _, columns, _ in panels[0]] * per_row
    axes = figure.subplots(grid_rows, per_row * len(sides), squeeze=False, gridspec_kw={"width_ratios": ratios})
    used = []
    image = None
    for index, (key, panel) in enumerate(zip(keys, panels)):
        grid_row, grid_col = divmod(index, per_row)
        for s, (side, rows, columns, matrix) in enumerate(panel):
            ax = axes[grid_row, grid_col * len(sides) + s]
            colours = _colours(rows, group_of) if by == "language" else None
            image = _draw(ax, matrix, rows, columns, norm, title=f"{panel_title(key)}: {side}",
                          ylabel=ylabel if grid_col == 0 else None,
                          row_colours=colours, show_rows=s == 0, fontsize=7)
            used.append(ax)
    for ax in axes.ravel():
        if ax not in used:
            ax.remove()
    _colourbar(figure, image, used)
    if title:
        figure.suptitle(title)
    _save_figure(figure, out_png, dpi)
    return figure


def plot_per_layer(scores, out_png: str | os.PathLike, *, title: str | None = None, group_of=None, dpi: int = 100):
    """Figure 5 of the paper: one panel per layer (languages x modules, encoder and decoder heatmaps).

    Returns:
        The matplotlib ``Figure``: for each layer index present, one heatmap axes per side that has
        that layer (``2 x layers`` for equal depths), one shared colour bar; already saved.
    """
    layers = sorted({r["layer"] for r in _rows_of(scores) if r["side"] is not None})
    return _panel_grid(scores, out_png, layers, by="language", select="layer",
                       panel_title=lambda k: f"Layer {k + 1}", title=title, group_of=group_of, dpi=dpi,
                       ylabel="Language id")


def plot_per_language(scores, out_png: str | os.PathLike, *, title: str | None = None, dpi: int = 100):
    """Figure 6 of the paper: one panel per language (layers x modules, encoder and decoder heatmaps).

    Returns:
        The matplotlib ``Figure`` (one heatmap axes per side for each language), already saved.
    """
    rows = _rows_of(scores)
    languages = _languages_of(scores, rows)
    return _panel_grid(scores, out_png, languages, by="layer", select="language", panel_title=str, title=title,
                       group_of=None, dpi=dpi, ylabel="Layer id")


# ============================================================ weight learning
def plot_index_weights(weights: Mapping[str, Sequence[Sequence[float]]], out_png: str | os.PathLike, *,
                       title: str | None = None, dpi: int = 120):
    """Figure 1 of the paper: enc_src, enc_tgt, dec_src and dec_tgt weights over the layers.

    Returns:
        The matplotlib ``Figure`` (one axes, two lines per side), already saved.
    """
    weights = _check_weights(weights)
    figure = _new_figure(figsize=(6.0, 3.8))
    ax = figure.subplots()
    styles = {"encoder": ("enc", "-"), "decoder": ("dec", "--")}
    for side, pairs in weights.items():
        prefix, style = styles[side]
        layers = list(range(1, len(pairs) + 1))
        ax.plot(layers, [p[0] for p in pairs], style, marker="o", markersize=3, label=f"{prefix}_src weights")
        ax.plot(layers, [p[1] for p in pairs], style, marker="s", markersize=3, label=f"{prefix}_tgt weights")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Layer")
    ax.set_ylabel("Weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "Weight Learning: source vs target index per layer")
    _save_figure(figure, out_png, dpi)
    return figure
