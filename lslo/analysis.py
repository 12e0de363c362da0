"""Architecture analyses of the paper and one step past it: Intrinsic Subspace Estimation (ISE),
language-specific pruning (LSP), their figures and correlations, and per-language rank plans.

- **ISE** (Section 4.2, Eq. 6; Figures 2 and 5; Tables 9-10): equal ranks in every module, layer-wise
  cross-language L1 pruning (one pool per encoder / decoder layer, all languages and modules) to
  P_ISE = 0.7 under the Gradual Pruning Schedule (E=2, k=8, T=15), then
  ``Score(B) = #pruned(B) - P_ISE * #B`` for every language x module x layer. Negative = the
  language kept more of its B than the pool's average: it needs more space there.
- **LSP** (Section 7.3, Appendix D; Figures 4 and 6): one pool per language, rank 8: which weight
  matrices matter most for each language.
- **Correlations** (Appendix C, Tables 9-10): Pearson r and p-value (``scipy.stats.pearsonr``) between
  each module's per-language score (mean over layers) and the languages' bitext sizes with English
  (the paper's Tables 5/6 built in as :data:`PAPER_BITEXT_SIZES`; English has none there, so the
  paper's correlations run over 11 languages, which its p-values confirm).
- **Plans** (:func:`plan_from_scores`): the paper's Limitations ask for per-language ranks and pruning
  ratios in place of coarse resource groups; a plan turns ISE scores into both under a parameter
  budget and writes a config file ``lslo train --config`` reads.
- **Weight Learning** (Section 4.1, Eq. 5; Figure 1): a source- and a target-indexed LSLo in every
  module, mixed by ``softmax`` of two logits per encoder/decoder layer (:func:`lslo.model.apply_weight_learning`),
  trained by the engine (``method="weight-learning"``); the larger weight per layer gives the index plan
  ``lslo train --index-plan`` reads (:func:`learn_index`).

Everything runs through :func:`lslo.train.train` (the same engine, CPU to many GPUs) and reads the
masks :func:`lslo.pruning.prune` wrote; the CLI verbs ``lslo estimate``, ``lslo plan`` and ``lslo learn-index``
only parse arguments and call :func:`estimate_subspace`, :func:`make_plan` and :func:`learn_index`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config import GROUP_ORDER, RESOURCE_GROUPS
from .io import atomic_write_file

__all__ = [
    "MODULE_LABELS",
    "PAPER_BITEXT_SIZES",
    "SCORES_FORMAT",
    "EstimateArguments",
    "EstimateResult",
    "LearnIndexArguments",
    "LearnIndexResult",
    "PlanArguments",
    "check_equal_ranks",
    "derive_index_plan",
    "estimate_subspace",
    "format_correlations",
    "format_index_weights",
    "format_plan",
    "format_score_summary",
    "language_demands",
    "learn_index",
    "learned_mix_weights",
    "load_weight_learning",
    "make_plan",
    "module_correlations",
    "module_label",
    "parse_budget",
    "parse_size",
    "plan_from_scores",
    "plan_train_config",
    "plot_index_weights",
    "plot_language_modules",
    "plot_layer_modules",
    "plot_per_language",
    "plot_per_layer",
    "read_index_plan",
    "read_scores",
    "read_sizes",
    "run_analyses",
    "save_weight_learning",
    "score_matrix",
    "score_model",
    "weight_learning_config",
    "weight_learning_state",
    "write_analysis",
    "write_index_plan",
    "write_plan_config",
    "write_scores",
]

SCORES_FORMAT = "lslo-subspace-scores"
_SCORES_VERSION = 1
SCORES_JSON = "subspace_scores.json"
SCORES_CSV = "subspace_scores.csv"
_POOLS = ("layer", "language")
_SIDES = ("encoder", "decoder")

# Bitext with English of FLORES-101 (paper Tables 5 and 6), in sentence pairs. English is the pivot:
# the tables give it none ("-"), and it is left out of the correlations, as in the paper (its
# p-values are those of n = 11 on lang12: r = 0.67 -> p = 0.024 at n = 11, 0.017 at n = 12).
PAPER_BITEXT_SIZES: dict[str, float | None] = {
    "en": None,
    "fr": 289e6, "de": 216e6, "it": 116e6, "pt": 137e6, "ru": 127e6, "es": 315e6,
    "ar": 25.2e6, "zh": 37.9e6, "nl": 82.4e6, "he": 6.64e6, "hi": 3.3e6, "ja": 23.2e6, "ko": 7.46e6,
    "mt": 5.82e6, "no": 10.9e6,
    "af": 570e3, "am": 339e3, "hy": 977e3, "ha": 335e3, "ny": 932e3, "sn": 877e3, "yo": 171e3, "zu": 123e3,
    "ff": 71e3, "kam": 50e3, "oc": 5.11e3, "or": 5e3, "sd": 21.8e3, "wo": 86.9e3,
}

# Module paths inside a layer -> the paper's column names (Figure 2: q, k, v, c-q, c-k, c-v, fc1, fc2).
MODULE_LABELS: dict[str, str] = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
    "encoder_attn.q_proj": "c-q", "encoder_attn.k_proj": "c-k", "encoder_attn.v_proj": "c-v",
    "encoder_attn.out_proj": "c-o", "fc1": "fc1", "fc2": "fc2",
}
_LABEL_ORDER = {label: i for i, label in enumerate(MODULE_LABELS.values())}
# Row-label colours of the paper's figures: high green, medium blue, (low orange), very low red.
_GROUP_COLOURS = {"H": "#2e7d32", "M": "#1565c0", "L": "#ef6c00", "V": "#c62828"}
_SIZE_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}


def module_label(module_type: str) -> str:
    """``"encoder_attn.v_proj"`` -> ``"c-v"`` (the paper's name); other paths are returned unchanged."""
    return MODULE_LABELS.get(module_type, module_type)


def _label_key(label: str) -> tuple[int, str]:
    return (_LABEL_ORDER.get(label, len(_LABEL_ORDER)), label)


# ===================================================================== scores
def check_equal_ranks(model: nn.Module) -> int:
    """The one rank every language has in every LSLo module of ``model``; ValueError otherwise.

    ISE compares languages inside one pool: with unequal ranks a language's share of a pool would
    follow its rank, not its need (the paper gives every language rank 8 for it).
    """
    from .model import get_lslo_config, lslo_modules

    config = get_lslo_config(model)
    if config is None:
        raise ValueError("subspace scores: the model carries no LSLo adapters (apply_lslo / load_adapters first)")
    ranks = {name: module.ranks for name, module in lslo_modules(model).items()}
    distinct = sorted({r for module_ranks in ranks.values() for r in module_ranks})
    if len(distinct) != 1:
        by_language = dict(zip(config.languages, config.language_ranks))
        raise ValueError(f"Intrinsic Subspace Estimation needs one rank for every language and module; this model's "
                         f"ranks are {by_language} (distinct ranks {distinct}): train with ranks='8'")
    return distinct[0]


def score_model(model: nn.Module, target: float, *, pool: str = "layer", check_target: bool = True) -> dict[str, Any]:
    """Eq. 6 scores of every language x module x layer of a pruned LSLo model, with what a plan needs.

    Args:
        model: a model with LSLo whose masks were set by :func:`lslo.prune` (``lslo train --prune``).
        target: P, the ratio the pools were pruned to (P_ISE or P_LSP).
        pool: ``"layer"`` (ISE: equal ranks required) or ``"language"`` (LSP).
        check_target: refuse a model whose pools are not pruned to exactly ``round(target * n)``
            entries (a run that ended before the Gradual Pruning Schedule reached P, or another P).

    Returns:
        The scores document: ``format``, ``version``, ``pool``, ``target``, ``rank`` (None for unequal
        ranks), ``languages``, ``ranks`` {code: rank}, ``target_modules``, ``ffn``, ``modules`` (one
        dict per LSLo module: name, side, layer, module, in_features, out_features: the LoRA widths)
        and ``rows`` (:func:`lslo.subspace_scores`: language, side, layer, module, numel, pruned, score).
    """
    from .model import get_lslo_config, lslo_modules
    from .pruning import _check_ratio, pool_entries, subspace_scores

    if pool not in _POOLS:
        raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
    target = _check_ratio(target, "target")
    config = get_lslo_config(model)
    if config is None:
        raise ValueError("subspace scores: the model carries no LSLo adapters (apply_lslo / load_adapters first)")
    rank = check_equal_ranks(model) if pool == "layer" else None
    if rank is None and len(set(config.language_ranks)) == 1:
        rank = config.language_ranks[0]
    rows = subspace_scores(model, target)
    if pool == "layer":
        outside = sorted({r["module"] for r in rows if r["side"] is None})
        if outside:
            raise ValueError(f"pool='layer' scores modules inside encoder/decoder layers; {outside} are not")
    if check_target:
        _check_pools(rows, target, pool)
    widths = {}
    for entry in pool_entries(model):
        widths.setdefault(entry.name, entry)
    modules = [{"name": name, "side": widths[name].side, "layer": widths[name].layer,
                "module": widths[name].module_type, "in_features": module.lora_in_features,
                "out_features": module.lora_out_features} for name, module in lslo_modules(model).items()]
    return {
        "format": SCORES_FORMAT, "version": _SCORES_VERSION, "pool": pool, "target": target, "rank": rank,
        "languages": list(config.languages), "ranks": dict(zip(config.languages, config.language_ranks)),
        "target_modules": config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules),
        "ffn": config.ffn, "modules": modules, "rows": rows,
    }


def _pool_key(row: Mapping[str, Any], pool: str) -> str:
    return row["language"] if pool == "language" else f"{row['side']}.{row['layer']}"


def _check_pools(rows: Sequence[Mapping[str, Any]], target: float, pool: str) -> None:
    totals: dict[str, list[int]] = {}
    for row in rows:
        total = totals.setdefault(_pool_key(row, pool), [0, 0])
        total[0] += row["pruned"]
        total[1] += row["numel"]
    for name, (pruned, numel) in totals.items():
        # prune() prunes round(ratio * n) entries of a pool (torch's rule), masks only grow.
        if pruned != round(target * numel):
            raise ValueError(
                f"pool {name} is pruned to {pruned / numel:.3f}, not the target {target}: the adapters were not pruned "
                f"with pool={pool!r} at that ratio, or the run ended before the Gradual Pruning Schedule reached it "
                "(it needs epochs >= prune_start + prune_duration)")


def write_scores(document: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write a scores document as ``subspace_scores.json`` and ``subspace_scores.csv`` (atomically).

    Returns:
        ``{"json": path, "csv": path}``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["language", "side", "layer", "module", "label", "numel", "pruned",
                                                "score"], lineterminator="\n")
    writer.writeheader()
    for row in document["rows"]:
        writer.writerow({**row, "label": module_label(row["module"])})
    text = json.dumps(document, indent=1, allow_nan=False)
    paths = {"json": out / SCORES_JSON, "csv": out / SCORES_CSV}
    atomic_write_file(paths["json"], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    atomic_write_file(paths["csv"], lambda tmp: Path(tmp).write_text(buffer.getvalue(), encoding="utf-8"))
    return paths


def read_scores(path: str | os.PathLike) -> dict[str, Any]:
    """A scores document written by :func:`write_scores` (the JSON file, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_JSON
    if not path.is_file():
        raise ValueError(f"{path}: no such scores file (lslo estimate writes {SCORES_JSON})")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON scores file ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != SCORES_FORMAT:
        raise ValueError(f"{path} is not an lslo scores file (no \"format\": \"{SCORES_FORMAT}\")")
    missing = [k for k in ("pool", "target", "languages", "modules", "rows") if k not in document]
    if missing:
        raise ValueError(f"{path} lacks {missing}: damaged scores file")
    return document


def _rows_of(scores) -> list[Mapping[str, Any]]:
    if isinstance(scores, Mapping):
        return scores["rows"]
    return list(scores)


def _languages_of(scores, rows) -> list[str]:
    if isinstance(scores, Mapping) and "languages" in scores:
        return list(scores["languages"])
    return list(dict.fromkeys(r["language"] for r in rows))


def score_matrix(scores, *, side: str, by: str = "language", layer: int | None = None,
                 language: str | None = None, value: str = "score") -> tuple[list[str], list[str], Any]:
    """A heatmap's numbers: rows are languages (``by="language"``, mean over layers) or layers
    (``by="layer"``, mean over languages), columns the module types of ``side``.

    Args:
        scores: a scores document or its rows.
        side: ``"encoder"`` or ``"decoder"``.
        by: ``"language"`` or ``"layer"``.
        layer: keep only this layer (0-based): Figure 5's panels.
        language: keep only this language: Figure 6's panels.
        value: the row field averaged (``"score"``, ``"pruned"``).

    Returns:
        (row labels, column labels, matrix of shape (rows, columns) float64; NaN where no module).
        Layer labels count from 1, as the paper's figures.
    """
    import numpy as np

    if side not in _SIDES:
        raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
    if by not in ("language", "layer"):
        raise ValueError(f"by must be 'language' or 'layer', got {by!r}")
    rows = [r for r in _rows_of(scores) if r["side"] == side and (layer is None or r["layer"] == layer)
            and (language is None or r["language"] == language)]
    columns = sorted({module_label(r["module"]) for r in rows}, key=_label_key)
    if by == "language":
        keys = [c for c in _languages_of(scores, _rows_of(scores)) if any(r["language"] == c for r in rows)]
        key_of = lambda r: r["language"]
        labels = keys
    else:
        keys = sorted({r["layer"] for r in rows})
        key_of = lambda r: r["layer"]
        labels = [str(k + 1) for k in keys]
    sums = np.zeros((len(keys), len(columns)))
    counts = np.zeros((len(keys), len(columns)))
    row_index = {k: i for i, k in enumerate(keys)}
    column_index = {c: j for j, c in enumerate(columns)}
    for r in rows:
        i, j = row_index[key_of(r)], column_index[module_label(r["module"])]
        sums[i, j] += float(r[value])
        counts[i, j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return labels, columns, matrix


def format_score_summary(scores: Mapping[str, Any], group_of=None) -> str:
    """Terminal summary: each language's score per side and in total, neediest first."""
    rows = _rows_of(scores)
    group_of = group_of or RESOURCE_GROUPS.get
    demands = language_demands(scores)
    per_side: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (r["language"], r["side"])
        per_side[key] = per_side.get(key, 0.0) + r["score"]
    pool = scores.get("pool", "layer") if isinstance(scores, Mapping) else "layer"
    target = scores.get("target") if isinstance(scores, Mapping) else None
    title = "Intrinsic Subspace Estimation" if pool == "layer" else "language-specific pruning"
    lines = [(f"{title}: Score(B) = #pruned - {target} * #B summed over modules and layers "
              "(negative = needs more space); kept = share of its B entries that survived"),
             f"{'language':<9} {'group':<5} {'encoder':>10} {'decoder':>10} {'total':>10} {'kept':>6}"]
    for code in sorted(demands, key=lambda c: demands[c]["score"]):
        enc, dec = per_side.get((code, "encoder"), 0.0), per_side.get((code, "decoder"), 0.0)
        lines.append(f"{code:<9} {group_of(code) or '?':<5} {enc:>10.1f} {dec:>10.1f} "
                     f"{demands[code]['score']:>10.1f} {demands[code]['kept']:>6.3f}")
    return "\n".join(lines)


# ===================================================================== figures
def _figure_tools():
    from .evaluate import _new_figure, _save_figure

    return _new_figure, _save_figure


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


def _sides_present(scores) -> list[str]:
    present = {r["side"] for r in _rows_of(scores)}
    sides = [s for s in _SIDES if s in present]
    if not sides:
        raise ValueError("the scores hold no module inside encoder/decoder layers: nothing to draw")
    return sides


def _colours(labels, group_of):
    group_of = group_of or RESOURCE_GROUPS.get
    return [_GROUP_COLOURS.get(group_of(code), "black") for code in labels]


def _colourbar(figure, image, axes):
    bar = figure.colorbar(image, ax=list(axes), shrink=0.8, pad=0.02)
    bar.set_label("Score (Eq. 6); red: needs more space", fontsize=8)


def _side_panels(scores, out_png, *, by: str, ylabel: str, title: str | None, group_of, dpi: int):
    new_figure, save_figure = _figure_tools()
    sides = _sides_present(scores)
    panels = [(side, *score_matrix(scores, side=side, by=by)) for side in sides]
    norm = _symmetric_norm([m for *_, m in panels])
    height = max(3.0, 0.3 * max(len(rows) for _, rows, _, _ in panels) + 1.5)
    figure = new_figure(figsize=(4.0 * len(sides) + 1.5, height))
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
    save_figure(figure, out_png, dpi)
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
    new_figure, save_figure = _figure_tools()
    if not keys:
        raise ValueError(f"no {select} to draw a panel for")
    sides = _sides_present(scores)
    panels = [[(side, *score_matrix(scores, side=side, by=by, **{select: key})) for side in sides] for key in keys]
    norm = _symmetric_norm([m for panel in panels for *_, m in panel])
    per_row = min(3, len(keys))
    grid_rows = math.ceil(len(keys) / per_row)
    n_rows = max(len(rows) for panel in panels for _, rows, _, _ in panel)
    figure = new_figure(figsize=(per_row * (3.2 * len(sides)) + 1.5, grid_rows * max(2.6, 0.25 * n_rows + 1.4)))
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
    save_figure(figure, out_png, dpi)
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


# =============================================================== correlations
def parse_size(value) -> float:
    """``289e6``, ``"289M"``, ``"5.11K"``, ``"86,900"`` -> a number of sentence pairs (> 0)."""
    if isinstance(value, bool):
        raise TypeError(f"a bitext size must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip().replace(",", "").replace("_", "")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGbB]?)", text)
        if not match:
            raise ValueError(f"a bitext size must be a number such as 289e6, '289M' or '5.11K', got {value!r}")
        number = float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()]
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"a bitext size must be a positive number, got {value!r}")
    return number


def read_sizes(path: str | os.PathLike) -> dict[str, float]:
    """Bitext (or pretraining) sizes per language from a file.

    Formats: JSON ``{"xx": 1200000, "yy": "5K"}``, or text lines ``code<TAB|,|=|space>size``
    (``#`` comments and a header line ``language,size`` are skipped). Sizes take K/M/G suffixes.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--sizes file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--sizes {path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--sizes {path} must hold an object {{code: size}}")
        items = list(data.items())
    else:
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = [p for p in re.split(r"[\t,=; ]+", line) if p]
            if len(parts) != 2:
                raise ValueError(f"--sizes {path} line {number}: expected 'code size', got {line!r}")
            if not items and not re.fullmatch(r"[a-z]{2,3}(_[A-Za-z]{4})?", parts[0]):
                continue  # a header such as "language,size": its first cell is no language code
            items.append((parts[0], parts[1]))
    sizes = {}
    for code, value in items:
        try:
            sizes[str(code)] = parse_size(value)
        except ValueError as exc:
            raise ValueError(f"--sizes {path}: {code}: {exc}") from None
    if not sizes:
        raise ValueError(f"--sizes {path} holds no sizes")
    return sizes


def _pearson(xs, ys) -> tuple[float, float]:
    from scipy.stats import pearsonr

    if len(set(ys)) < 2 or len(set(xs)) < 2:
        return math.nan, math.nan  # a constant input has no correlation (scipy warns and returns NaN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pearsonr(xs, ys)
    return float(result.statistic), float(result.pvalue)


def _language_module_means(rows, side: str) -> dict[str, dict[str, float]]:
    """{module label: {language: mean score over layers}} for one side."""
    sums: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r["side"] != side:
            continue
        entry = sums.setdefault(module_label(r["module"]), {}).setdefault(r["language"], [0.0, 0])
        entry[0] += r["score"]
        entry[1] += 1
    return {m: {c: s / n for c, (s, n) in by_code.items()} for m, by_code in sums.items()}


def module_correlations(scores, sizes: Mapping[str, float | None] | None = None, *, log_sizes: bool = False,
                        min_languages: int = 3) -> dict[str, Any]:
    """Tables 9-10: Pearson r and p-value between each module's per-language score (mean over layers)
    and the languages' bitext sizes, per side, with the AVG row (means of r and p, as the paper).

    Args:
        scores: a scores document or its rows.
        sizes: code -> size (None = unknown); default :data:`PAPER_BITEXT_SIZES`. Languages without a
            size are left out (English in the paper).
        log_sizes: correlate with log10(size) instead of the raw size (the paper uses raw sizes).
        min_languages: fewer languages with a size than this -> ValueError.

    Returns:
        ``{"languages": [...], "sizes": {...}, "log_sizes": bool, "encoder"/"decoder": {"modules":
        [{"module", "r", "p", "n"}], "avg": {"r", "p"}}, "overall": {"r", "p", "n"}}``; ``overall``
        correlates each language's total score over every module and layer. r is NaN where the
        scores are constant.
    """
    rows = _rows_of(scores)
    sizes = PAPER_BITEXT_SIZES if sizes is None else sizes
    languages = [c for c in _languages_of(scores, rows) if sizes.get(c) is not None]
    if len(languages) < min_languages:
        raise ValueError(f"correlations need sizes for at least {min_languages} languages; sizes are known for "
                         f"{languages} of {_languages_of(scores, rows)} (give --sizes FILE)")
    values = {c: float(sizes[c]) for c in languages}
    if log_sizes:
        values = {c: math.log10(v) for c, v in values.items()}
    xs = [values[c] for c in languages]
    out: dict[str, Any] = {"languages": languages, "sizes": {c: float(sizes[c]) for c in languages},
                           "log_sizes": log_sizes}
    for side in _sides_present(rows):
        means = _language_module_means(rows, side)
        table = []
        for module in sorted(means, key=_label_key):
            ys = [means[module].get(c, math.nan) for c in languages]
            r, p = _pearson(xs, ys)
            table.append({"module": module, "r": r, "p": p, "n": len(languages)})
        finite = [t for t in table if math.isfinite(t["r"])]
        avg = {"r": sum(t["r"] for t in finite) / len(finite) if finite else math.nan,
               "p": sum(t["p"] for t in finite) / len(finite) if finite else math.nan}
        out[side] = {"modules": table, "avg": avg}
    totals = {c: 0.0 for c in languages}
    for r in rows:
        if r["language"] in totals:
            totals[r["language"]] += r["score"]
    r, p = _pearson(xs, [totals[c] for c in languages])
    out["overall"] = {"r": r, "p": p, "n": len(languages)}
    return out


def format_correlations(correlations: Mapping[str, Any]) -> str:
    """Tables 9 and 10 of the paper as text, one per side, and the overall correlation."""
    what = "log10 bitext size" if correlations.get("log_sizes") else "bitext size"
    lines = []
    for number, side in ((9, "encoder"), (10, "decoder")):
        if side not in correlations:
            continue
        n = correlations[side]["modules"][0]["n"] if correlations[side]["modules"] else 0
        lines.append(f"Table {number} ({side}): Pearson correlation of the module's score with the {what} "
                     f"(n = {n} languages)")
        lines.append(f"{'Module':<8} {'Coefficient':>11} {'P-value':>9}")
        for t in correlations[side]["modules"]:
            lines.append(f"{t['module']:<8} {t['r']:>11.2f} {t['p']:>9.3f}")
        lines.append(f"{'AVG':<8} {correlations[side]['avg']['r']:>11.2f} {correlations[side]['avg']['p']:>9.3f}")
        lines.append("")
    overall = correlations["overall"]
    lines.append(f"Overall (each language's total score): r = {overall['r']:.2f}, p = {overall['p']:.3g}, "
                 f"n = {overall['n']}")
    return "\n".join(lines)


# ============================================================ estimate (ISE)
def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass
class EstimateArguments:
    """Everything ``lslo estimate`` takes; each field is also the flag ``--field-name``.

    Training goes through :func:`lslo.train.train` with equal ranks, ``prune=prune_ratio`` and
    ``prune_pool=pool``; any other training setting comes from ``train_config`` (a file of
    :class:`lslo.train.TrainArguments` fields).
    """

    model: str = field(default="facebook/flores101_mm100_615M", metadata=_help("base model: hub id or folder"))
    output_dir: str | None = field(default=None, metadata=_help(
        "where scores, figures and tables go (the training run in <output-dir>/run)"))
    flores_dir: str | None = field(default=None, metadata=_help("FLORES-101/200 folder (dev/ trains)"))
    train_tsv: str | None = field(default=None, metadata=_help("training pairs TSV instead of FLORES dev"))
    languages: str | None = field(default=None, metadata=_help("lang12, lang30, all, or comma-separated codes"))
    groups: str | None = field(default=None, metadata=_help("resource groups of extra languages: 'xx=V,yy=H'"))
    pool: str = field(default="layer", metadata=_help(
        "layer: Intrinsic Subspace Estimation (one pool per encoder/decoder layer across languages); language: "
        "language-specific pruning (one pool per language)"))
    rank: int = field(default=8, metadata=_help("the rank of every language in every module"))
    prune_ratio: float = field(default=0.7, metadata=_help("P_ISE / P_LSP, the final ratio of every pool"))
    prune_start: int = field(default=2, metadata=_help("E: last epoch without pruning"))
    prune_duration: int = field(default=8, metadata=_help("k: epochs over which pruning reaches its ratio"))
    epochs: int = field(default=15, metadata=_help("T: training epochs (>= prune_start + prune_duration)"))
    target_modules: str = field(default="all", metadata=_help("all, attn, fc, names or a regex"))
    index_plan: str = field(default="paper", metadata=_help("paper, src, tgt, or a JSON plan file"))
    ffn: str = field(default="full", metadata=_help("full or reference (adapt only d_model units of fc1/fc2)"))
    init: str = field(default="lora", metadata=_help("lora or reference (the authors' A initialisation)"))
    lr: float | None = field(default=None, metadata=_help("peak learning rate (default 3e-3)"))
    max_tokens: int | None = field(default=None, metadata=_help("token budget of a batch per process (default 4096)"))
    warmup_updates: int | None = field(default=None, metadata=_help("inverse-sqrt warm-up steps (default 4000)"))
    seed: int = field(default=1, metadata=_help("random seed"))
    mixed_precision: str | None = field(default=None, metadata=_help(
        "no, bf16 or fp16 (default: as lslo train resolves it: accelerate's setting, else bf16/fp16 on a GPU, fp32 on CPU)"))
    cpu: bool = field(default=False, metadata=_help("train on the CPU even when a GPU is present"))
    train_config: str | None = field(default=None, metadata=_help(
        "a toml/json/yaml file of further `lslo train` settings (max_length, update_freq, ...)"))
    adapters: str | None = field(default=None, metadata=_help(
        "score these pruned adapters (an earlier run's final/) instead of training"))
    sizes: str | None = field(default=None, metadata=_help(
        "bitext/pretraining sizes per language (JSON or 'code size' lines); they add to and override the "
        "paper's Tables 5/6"))
    log_sizes: bool = field(default=False, metadata=_help("correlate with log10(size) (the paper: raw sizes)"))
    resume: bool = field(default=False, metadata=_help("continue the training run in <output-dir>/run"))
    overwrite: bool = field(default=False, metadata=_help("replace an earlier run in <output-dir>/run"))
    progress: bool = field(default=True, metadata=_help("progress bars"))

    def __post_init__(self) -> None:
        from .pruning import _check_ratio

        if self.pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {self.pool!r}")
        for name in ("rank", "prune_duration", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.prune_start, bool) or not isinstance(self.prune_start, int) or self.prune_start < 0:
            raise ValueError(f"prune_start must be an int >= 0, got {self.prune_start!r}")
        ratio = _check_ratio(self.prune_ratio, "prune_ratio")
        if ratio == 0.0:
            raise ValueError("prune_ratio must be > 0: scores compare how much of each B a pool prunes")
        if self.adapters is None and self.epochs < self.prune_start + self.prune_duration:
            raise ValueError(f"epochs={self.epochs} ends before the Gradual Pruning Schedule reaches prune_ratio "
                             f"(epoch prune_start + prune_duration = {self.prune_start + self.prune_duration}); "
                             "raise epochs or shorten the schedule")

    def train_arguments(self, overrides: Mapping[str, Any] | None = None):
        """The :class:`lslo.train.TrainArguments` of the pruning run (``train_config`` under these fields)."""
        from .train import TrainArguments, load_config_file

        if self.output_dir is None:
            raise ValueError("--output-dir is required")
        values = load_config_file(self.train_config) if self.train_config else {}
        for name in ("ranks", "prune", "prune_pool", "method"):
            if name in values:
                raise ValueError(f"--train-config sets {name!r}, which lslo estimate decides (rank/pool/prune_ratio)")
        if values.get("max_steps") is not None:
            raise ValueError("--train-config sets max_steps: the run could end before pruning reaches its ratio")
        values.update({
            "model": self.model, "output_dir": str(Path(self.output_dir) / "run"), "method": "lslo",
            "ranks": str(self.rank), "prune": str(self.prune_ratio), "prune_pool": self.pool,
            "prune_start": self.prune_start, "prune_duration": self.prune_duration, "epochs": self.epochs,
            "target_modules": self.target_modules, "index_plan": self.index_plan, "ffn": self.ffn, "init": self.init,
            "seed": self.seed, "mixed_precision": self.mixed_precision, "cpu": self.cpu, "resume": self.resume,
            "overwrite": self.overwrite, "progress": self.progress,
        })
        for name in ("flores_dir", "train_tsv", "languages", "groups", "lr", "max_tokens", "warmup_updates"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        values.update(overrides or {})
        return TrainArguments(**values)


@dataclass
class EstimateResult:
    """What :func:`estimate_subspace` produced."""

    output_dir: Path
    scores: dict[str, Any]
    correlations: dict[str, Any] | None
    files: dict[str, Path]
    summary: str
    run_dir: Path | None = None


def _figure_names(pool: str) -> list[tuple[str, str]]:
    # The paper draws Figures 2 and 5 from ISE and 4 and 6 from LSP; all four are cheap, so both pools
    # draw all of them, the pool's own figures first.
    isef = [("fig2_language_modules", "Figure 2"), ("fig5_per_layer", "Figure 5")]
    lspf = [("fig4_layer_modules", "Figure 4"), ("fig6_per_language", "Figure 6")]
    return isef + lspf if pool == "layer" else lspf + isef


def write_analysis(scores: Mapping[str, Any], output_dir: str | os.PathLike, *,
                   sizes: Mapping[str, float | None] | None = None, log_sizes: bool = False,
                   group_of=None) -> tuple[dict[str, Path], dict[str, Any] | None, str]:
    """Write the scores (CSV, JSON), the four figures and the correlation tables of a scores document.

    Returns:
        (files by name, correlations or None when fewer than 3 languages have a size, summary text).
    """
    out = Path(output_dir)
    files = {f"scores_{k}": v for k, v in write_scores(scores, out).items()}
    pool = scores.get("pool", "layer")
    plotters = {"fig2_language_modules": lambda p: plot_language_modules(scores, p, group_of=group_of),
                "fig5_per_layer": lambda p: plot_per_layer(scores, p, group_of=group_of),
                "fig4_layer_modules": lambda p: plot_layer_modules(scores, p),
                "fig6_per_language": lambda p: plot_per_language(scores, p)}
    for name, _ in _figure_names(pool):
        path = out / f"{name}.png"
        plotters[name](path)
        files[name] = path
    summary = [format_score_summary(scores, group_of)]
    merged = {**PAPER_BITEXT_SIZES, **(sizes or {})}
    correlations = None
    try:
        correlations = module_correlations(scores, merged, log_sizes=log_sizes)
    except ValueError as exc:
        summary.append(f"(no correlations: {exc})")
    if correlations is not None:
        table = format_correlations(correlations)
        summary.append(table)
        text = json.dumps(correlations, indent=1, allow_nan=True)
        files["correlations_json"] = out / "correlations.json"
        files["correlations_txt"] = out / "correlations.txt"
        atomic_write_file(files["correlations_json"], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        atomic_write_file(files["correlations_txt"], lambda tmp: Path(tmp).write_text(table + "\n", encoding="utf-8"))
    return files, correlations, "\n\n".join(summary)


def estimate_subspace(args: EstimateArguments, *, train_overrides: Mapping[str, Any] | None = None) -> EstimateResult:
    """Intrinsic Subspace Estimation (``pool="layer"``) or language-specific pruning (``"language"``).

    Trains LSLo with one rank for every language and module through :func:`lslo.train.train`, pruning
    every pool to ``prune_ratio`` under the Gradual Pruning Schedule (unless ``args.adapters`` names
    pruned adapters to score), then writes to ``args.output_dir``: ``subspace_scores.{json,csv}``,
    ``fig2_language_modules.png``, ``fig5_per_layer.png``, ``fig4_layer_modules.png``,
    ``fig6_per_language.png`` and ``correlations.{json,txt}`` (Tables 9-10).

    Args:
        args: the :class:`EstimateArguments`.
        train_overrides: more :class:`lslo.train.TrainArguments` fields (win over ``train_config``).

    Returns:
        An :class:`EstimateResult`. Under several processes only the main one scores and writes;
        the others return an empty result after training.
    """
    from .model import load_adapters, load_base_model, read_adapter_config

    if args.output_dir is None:
        raise ValueError("--output-dir is required")
    out = Path(args.output_dir)
    sizes = read_sizes(args.sizes) if args.sizes else None  # a bad file fails before hours of training
    run_dir = None
    if args.adapters is not None:
        read_adapter_config(args.adapters)  # a missing or damaged folder fails before the model loads
        adapters = Path(args.adapters)
    else:
        from .train import train

        train_args = args.train_arguments(train_overrides)
        result = train(train_args)
        run_dir, adapters = result.output_dir, result.final_dir
        if result.stopped_early:
            raise ValueError(f"the run in {run_dir} stopped early (max_steps): its pools never reached prune_ratio")
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return EstimateResult(out, {}, None, {}, "", run_dir)
    model = load_base_model(args.model)
    load_adapters(model, adapters)
    scores = score_model(model, args.prune_ratio, pool=args.pool)
    scores.update({"model": args.model, "adapters": str(adapters), "prune_start": args.prune_start,
                   "prune_duration": args.prune_duration, "epochs": args.epochs})
    files, correlations, summary = write_analysis(scores, out, sizes=sizes, log_sizes=args.log_sizes)
    return EstimateResult(out, scores, correlations, files, summary, run_dir)


# ======================================================================= plans
def language_demands(scores) -> dict[str, dict[str, float]]:
    """Per language over all modules and layers: ``score`` (sum of Eq. 6), ``numel`` and ``pruned`` (its
    B entries) and ``kept`` = 1 - pruned / numel, the share of its B that survived the shared pools."""
    totals: dict[str, list[float]] = {}
    for r in _rows_of(scores):
        total = totals.setdefault(r["language"], [0.0, 0, 0])
        total[0] += r["score"]
        total[1] += r["numel"]
        total[2] += r["pruned"]
    return {c: {"score": s, "numel": n, "pruned": p, "kept": 1.0 - p / n if n else 0.0}
            for c, (s, n, p) in totals.items()}


def _parameters_per_rank(scores: Mapping[str, Any]) -> int:
    """LoRA parameters one unit of rank costs a language: the sum over modules of (in + out)."""
    modules = scores.get("modules")
    if not modules:
        raise ValueError("the scores document lists no modules (write it with lslo estimate / score_model)")
    return sum(int(m["in_features"]) + int(m["out_features"]) for m in modules)


def parse_budget(budget, scores: Mapping[str, Any], *, groups: Mapping[str, str] | None = None) -> tuple[int, str]:
    """A budget of trainable LSLo parameters for the languages and modules of ``scores``.

    Args:
        budget: a number of parameters (``15335424``, ``"15.3M"``, ``"500K"``), or ranks in any form
            ``LSLoConfig.ranks`` takes (``"2;2;8"`` per resource group, ``"en=2,oc=8"``): the budget
            of that setting on the same languages and modules (pruning not subtracted, as the paper's
            #Params).
        scores: the scores document (languages, module widths).
        groups: resource groups of languages outside the paper's tables.

    Returns:
        (parameters, a description of where the number came from).
    """
    from .config import LSLoConfig

    per_rank = _parameters_per_rank(scores)
    text = str(budget).strip()
    if isinstance(budget, str) and (";" in text or "=" in text):
        ranks: Any = text
        if "=" in text:
            ranks = {}
            for part in text.split(","):
                key, _, value = part.partition("=")
                try:
                    ranks[key.strip()] = int(value)
                except ValueError:
                    raise ValueError(f"--budget {text!r}: rank of {key.strip()!r} is not an int: {value!r}") from None
        try:
            config = LSLoConfig(languages=list(scores["languages"]), ranks=ranks, groups=groups)
        except ValueError as exc:
            raise ValueError(f"--budget {text!r}: {exc}") from None
        total = sum(config.language_ranks) * per_rank
        return total, f"{text} ({', '.join(f'{c}={r}' for c, r in zip(config.languages, config.language_ranks))})"
    try:
        total = parse_size(budget)
    except ValueError:
        raise ValueError(f"--budget must be a number of parameters ('15.3M') or ranks ('2;2;8', 'en=2,oc=8'), "
                         f"got {budget!r}") from None
    return int(total), f"{int(total):,} parameters"


def _water_fill(weights: Sequence[float], total: float, floor: float = 1.0) -> list[float]:
    """x_l = max(floor, lam * w_l) with sum x_l = total (total >= floor * len(weights))."""
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in fixed]
        mass = sum(weights[i] for i in free)
        remaining = total - floor * len(fixed)
        if not free or mass <= 0:
            share = remaining / len(free) if free else 0.0
            return [floor if i in fixed else max(floor, share) for i in range(len(weights))]
        lam = remaining / mass
        newly = {i for i in free if lam * weights[i] < floor}
        if not newly:
            return [floor if i in fixed else lam * weights[i] for i in range(len(weights))]
        fixed |= newly


def plan_from_scores(scores, budget, *, sharpness: float = 4.0, max_prune: float = 0.9,
                     groups: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Per-language ranks and pruning ratios from ISE scores, under a budget of trainable parameters.

    The rule, and why:

    1. **Demand.** ISE prunes each layer's B entries of all languages in one L1 pool; a language whose
       entries grew larger keeps more of them (negative Eq. 6 score). Its demand is ``kept_l``, the
       share of its B entries that survived, over all modules and layers (``(1 - P) - score_l / #B_l``).
       The kept share, not the raw score, because it is a size: it can be compared with a rank.
    2. **Ranks.** The budget buys ``R = floor(budget / c)`` units of rank, ``c`` = the parameters one
       unit of rank costs a language (sum over the modules of in + out features; every language has
       LSLo in every module). Ranks are proportional to ``kept_l ** sharpness`` with a floor of 1
       (water-filling: ``r_l = max(1, lam * kept_l ** sharpness)``, ``sum r_l = R``), then rounded to
       integers by largest remainder (ties to the needier language) so that ``sum r_l <= R``: the plan
       never exceeds the budget, and uses all of it but less than one unit of rank. ``sharpness`` > 1
       widens the gap between needy and frugal languages (the paper's 2;2;8 is a ratio of 4).

       **Default sharpness 4, and why.** The kept share understates differences in demand: under ISE
       every language has the same rank, and training spreads even a small update over all of it,
       so a language that needs a quarter of the subspace still keeps much of its B. On demo-like
       set-ups (rank 8, P = 0.7, pretraining sizes 25-46x apart) the kept shares span only a ratio of
       1.3-1.5 (0.27-0.36 on 9 languages; 0.25-0.38 on the demo's 7): sharpness 1 turns that into
       ranks 3-5 at the 2;2;8 budget, close to equal ranks, which the paper finds worse than its
       groups. Sharpness 4 turns a ratio of 1.33-1.5 into 3.2-5, around the 1:4 of 2;2;8 that the
       paper found by trial. The value was chosen from the kept shares and the paper's ratio before
       any plan was evaluated, not tuned on evaluation scores. ``lslo demo --analyses`` trains plans
       at sharpness 1 and 4 and reports both. Measured there (2026-11-27, BLEU, 100 devtest
       sentences x 42 directions), against 2;2;8+GPS(0.9) at the same 126,464 parameters:
       sharpness 4 (ranks 2,2,2 / 2,3 / 7,8) ties (40.41 vs 40.41 AVG), sharpness 1 (ranks 3-5)
       loses 0.72 +- 0.21.
    3. **Pruning ratios.** The paper found that high-resource languages fine-tune best in an even
       smaller subspace than rank 2 (GPS 0.9, Section 6.3; pruned entries still count as parameters
       in its #Params). ISE measured, by the same L1 criterion GPS uses, how much smaller each
       language's useful subspace is than the neediest one's: ``kept_l / kept_max``. The plan prunes
       the rest, ``p_l = 1 - kept_l / kept_max``, capped at ``max_prune`` (the paper's largest ratio,
       0.9) and rounded to 0.01; ratios under 0.05 are dropped (a schedule for nothing). The neediest
       language is never pruned. ``max_prune=0`` turns pruning off.

    Args:
        scores: an ISE scores document (``pool="layer"``, equal ranks; the modules' widths inside).
        budget: see :func:`parse_budget`.
        sharpness: exponent on the demand (> 0).
        max_prune: the largest pruning ratio, in [0, 1).
        groups: resource groups of languages outside the paper's tables (for a ``'2;2;8'`` budget).

    Returns:
        ``{"languages", "ranks" {code: int}, "prune" {code: ratio}, "demand" {code: kept},
        "continuous_ranks", "budget", "budget_from", "parameters" (what the ranks cost),
        "parameters_per_rank", "sharpness", "max_prune", "target_modules", "ffn", "pool", "target"}``.
    """
    if isinstance(scores, Mapping) and scores.get("pool", "layer") != "layer":
        raise ValueError(f"a plan needs Intrinsic Subspace Estimation scores (pool 'layer'), got pool "
                         f"{scores.get('pool')!r}: language-specific pruning compares modules, not languages")
    if isinstance(sharpness, bool) or not isinstance(sharpness, (int, float)) or not (0 < sharpness < math.inf):
        raise ValueError(f"sharpness must be a positive number, got {sharpness!r}")
    from .pruning import _check_ratio

    max_prune = _check_ratio(max_prune, "max_prune")
    languages = list(scores["languages"])
    demands = language_demands(scores)
    missing = [c for c in languages if c not in demands]
    if missing:
        raise ValueError(f"the scores have no rows for languages {missing}")
    per_rank = _parameters_per_rank(scores)
    total, described = parse_budget(budget, scores, groups=groups)
    units = total // per_rank
    if units < len(languages):
        budget_text = described if described.endswith(" parameters") else f"{described} = {total:,} parameters"
        raise ValueError(f"budget {budget_text} is smaller than one rank-1 adapter per language: "
                         f"{len(languages)} languages x {per_rank:,} parameters = {len(languages) * per_rank:,}")
    weights = [max(demands[c]["kept"], 0.0) ** sharpness for c in languages]
    continuous = _water_fill(weights, float(units))
    ranks = [max(1, math.floor(x + 1e-9)) for x in continuous]
    leftover = units - sum(ranks)
    order = sorted(range(len(languages)), key=lambda i: (-(continuous[i] - math.floor(continuous[i] + 1e-9)),
                                                          -weights[i], i))
    for i in order[:max(leftover, 0)]:
        ranks[i] += 1
    kept_max = max(demands[c]["kept"] for c in languages)
    prune = {}
    for code in languages:
        ratio = 0.0 if kept_max <= 0 else min(max_prune, 1.0 - demands[code]["kept"] / kept_max)
        ratio = round(ratio, 2)
        if ratio >= 0.05:
            prune[code] = min(ratio, max_prune)
    return {
        "languages": languages, "ranks": dict(zip(languages, ranks)), "prune": prune,
        "demand": {c: demands[c]["kept"] for c in languages}, "scores": {c: demands[c]["score"] for c in languages},
        "continuous_ranks": dict(zip(languages, continuous)), "budget": total, "budget_from": described,
        "parameters": sum(ranks) * per_rank, "parameters_per_rank": per_rank, "sharpness": sharpness,
        "max_prune": max_prune, "target_modules": scores.get("target_modules", "all"), "ffn": scores.get("ffn", "full"),
        "pool": scores.get("pool", "layer"), "target": scores.get("target"),
    }


def format_plan(plan: Mapping[str, Any], group_of=None) -> str:
    """The plan as a table: language, group, demand (kept share), rank, pruning ratio."""
    group_of = group_of or RESOURCE_GROUPS.get
    lines = [(f"plan under {plan['budget_from']}: {plan['parameters']:,} of {plan['budget']:,} parameters "
              f"({plan['parameters_per_rank']:,} per unit of rank)"),
             f"{'language':<9} {'group':<5} {'kept':>6} {'rank':>5} {'prune':>6}"]
    for code in plan["languages"]:
        lines.append(f"{code:<9} {group_of(code) or '?':<5} {plan['demand'][code]:>6.3f} {plan['ranks'][code]:>5} "
                     f"{plan['prune'].get(code, 0.0):>6.2f}")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def plan_train_config(plan: Mapping[str, Any], *, index_plan: str | None = None) -> dict[str, Any]:
    """The :class:`lslo.train.TrainArguments` fields a plan sets (``lslo train --config`` reads them)."""
    config: dict[str, Any] = {
        "method": "lslo",
        "languages": ",".join(plan["languages"]),
        "ranks": ",".join(f"{c}={plan['ranks'][c]}" for c in plan["languages"]),
        # A list of names becomes the regex that matches the same module paths (--target-modules is one string).
        "target_modules": plan["target_modules"] if isinstance(plan["target_modules"], str)
        else "|".join(f".*\\.{re.escape(m)}" for m in plan["target_modules"]),
        "ffn": plan["ffn"],
    }
    if plan["prune"]:
        config["prune"] = ",".join(f"{c}={r}" for c, r in plan["prune"].items())
        config["prune_pool"] = "language"
    if index_plan is not None:
        config["index_plan"] = str(index_plan)
    return config


def write_plan_config(plan: Mapping[str, Any], path: str | os.PathLike, *, index_plan: str | None = None) -> Path:
    """Write the plan as a ``lslo train --config`` file (``.toml`` with the plan in comments, or ``.json``)
    and its details beside it (``<stem>.details.json``). Both atomically. Returns the config path."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"plan output {path}: use a .toml or .json file name")
    config = plan_train_config(plan, index_plan=index_plan)
    if path.suffix == ".json":
        text = json.dumps(config, indent=2) + "\n"
    else:
        header = ["# lslo plan: per-language ranks and pruning ratios from Intrinsic Subspace Estimation",
                  *(f"# {line}" for line in format_plan(plan).splitlines()),
                  "# Use: lslo train --config THIS_FILE --model ... --flores-dir ... --output-dir ...", ""]
        text = "\n".join(header) + "".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    details = path.with_name(path.stem + ".details.json")
    detail_text = json.dumps({**plan, "train_config": config}, indent=1)
    atomic_write_file(details, lambda tmp: Path(tmp).write_text(detail_text, encoding="utf-8"))
    return path


@dataclass
class PlanArguments:
    """Everything ``lslo plan`` takes."""

    scores: str | None = field(default=None, metadata=_help(
        "ISE scores: subspace_scores.json or the lslo estimate --pool layer output folder"))
    budget: str = field(default="H=2,M=2,L=8,V=8", metadata=_help(
        "trainable-parameter budget: ranks whose cost to match ('2;2;8' per resource group present, 'en=2,oc=8', "
        "'H=2,V=8') or a number ('15.3M'); default the paper's ranks per group"))
    output: str | None = field(default=None, metadata=_help(
        "the config file to write, .toml or .json (default: <scores folder>/plan.toml)"))
    sharpness: float = field(default=4.0, metadata=_help(
        "ranks grow as demand ** sharpness (default 4: ISE's kept shares understate the spread of demand)"))
    max_prune: float = field(default=0.9, metadata=_help("largest pruning ratio (0 = no pruning)"))
    groups: str | None = field(default=None, metadata=_help("resource groups of extra languages: 'xx=V,yy=H'"))
    index_plan: str | None = field(default=None, metadata=_help("index plan for the config (e.g. a learn-index file)"))


def make_plan(args: PlanArguments) -> tuple[dict[str, Any], Path]:
    """``lslo plan``: read ISE scores, make the plan, write the config file. Returns (plan, config path)."""
    if args.scores is None:
        raise ValueError("--scores is required (lslo estimate's subspace_scores.json or its folder)")
    scores = read_scores(args.scores)
    groups = None
    if args.groups:
        groups = {}
        for part in args.groups.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"--groups expects 'code=GROUP' entries, got {part!r}")
            groups[key.strip()] = value.strip()
    plan = plan_from_scores(scores, args.budget, sharpness=args.sharpness, max_prune=args.max_prune, groups=groups)
    scores_path = Path(args.scores)
    default_dir = scores_path if scores_path.is_dir() else scores_path.parent
    output = Path(args.output) if args.output else default_dir / "plan.toml"
    return plan, write_plan_config(plan, output, index_plan=args.index_plan)


# ======================================================================== demo
def _group_means(totals: Mapping[str, float], group_of) -> dict[str, float]:
    by_group: dict[str, list[float]] = {}
    for code, value in totals.items():
        group = group_of(code)
        if group is not None:
            by_group.setdefault(group, []).append(value)
    return {g: sum(by_group[g]) / len(by_group[g]) for g in GROUP_ORDER if g in by_group}


def run_analyses(model_dir: str | os.PathLike, flores_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 languages: str | Sequence[str] | None = None, resource_sizes: Mapping[str, float] | None = None,
                 group_of=None, epochs: int = 6, prune_start: int = 1, prune_duration: int = 3, rank: int = 8,
                 prune_ratio: float = 0.7, budget: str = "H=2,M=2,L=8,V=8", lr: float = 3e-3, max_tokens: int = 1024,
                 warmup_updates: int = 20, seed: int = 1, progress: bool = False, weight_learning: bool = True,
                 wl_epochs: int | None = None, train_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ISE, a plan and Weight Learning on a small set-up (the demo's), and whether ISE recovers the known
    resource levels.

    Runs :func:`estimate_subspace` (pool ``"layer"``, rank ``rank`` everywhere, GPS to ``prune_ratio``
    over ``epochs`` epochs) into ``out_dir/ise``, correlates each language's score with its
    ``resource_sizes`` (e.g. the pretraining sentences of the demo's synthetic languages: the analogue
    of Tables 9-10), and makes a plan (:func:`plan_from_scores`) at the budget of ``budget`` ranks,
    written to ``out_dir/plan.toml``. With ``weight_learning`` (and an lslo that has the dual-routing
    layers) it first runs :func:`learn_index` into ``out_dir/wl`` and the plan's config uses the learned
    index plan.

    "Recovered" means: the overall Pearson correlation between each language's total score and
    log10(size) is positive with p < 0.05 (lower resource -> more negative score -> more space).
    Raw sizes (the paper's choice) are reported too; on sizes spanning orders of magnitude the log
    is the fairer test of a monotone trend.

    Args:
        model_dir: the base model folder (with its tokenizer).
        flores_dir: FLORES-layout folder of the fine-tuning data (dev/ trains).
        out_dir: where everything goes.
        languages: codes (default: every language of ``resource_sizes``, else the run's default).
        resource_sizes: code -> pretraining data size; default :data:`PAPER_BITEXT_SIZES`.
        group_of: code -> resource group (default: the paper's groups) for the group means.
        epochs, prune_start, prune_duration, rank, prune_ratio: the ISE run (defaults sized for a tiny
            model on a CPU; the paper's are 15, 2, 8, 8, 0.7).
        budget: the plan's budget (see :func:`parse_budget`); default the paper's ranks of the resource
            groups present (2;2;8 on lang12), so the plan competes with them at equal size.
        lr, max_tokens, warmup_updates, seed, progress, train_overrides: training settings.
        weight_learning: also run Weight Learning (skipped, with a note, when lslo lacks the dual layers).
        wl_epochs: epochs of Weight Learning (default ``epochs``).

    Returns:
        ``{"estimate": EstimateResult, "correlation_log": {...}, "correlation_raw": {...},
        "group_means": {group: mean total score}, "groups_ordered": bool, "recovered": bool,
        "plan": plan dict, "plan_config": path, "index": LearnIndexResult or None, "summary": str}``.
    """
    out = Path(out_dir)
    group_of = group_of or RESOURCE_GROUPS.get
    if languages is None and resource_sizes:
        languages = list(resource_sizes)
    if languages is not None and not isinstance(languages, str):
        languages = ",".join(languages)
    sizes_file = None
    if resource_sizes is not None:
        sizes = {str(c): parse_size(v) for c, v in resource_sizes.items()}
        out.mkdir(parents=True, exist_ok=True)
        sizes_file = out / "resource_sizes.json"
        text = json.dumps(sizes, indent=1)
        atomic_write_file(sizes_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    args = EstimateArguments(model=str(model_dir), output_dir=str(out / "ise"), flores_dir=str(flores_dir),
                             languages=languages, pool="layer", rank=rank, prune_ratio=prune_ratio,
                             prune_start=prune_start, prune_duration=prune_duration, epochs=epochs, lr=lr,
                             max_tokens=max_tokens, warmup_updates=warmup_updates, seed=seed, cpu=True,
                             sizes=str(sizes_file) if sizes_file else None, overwrite=True, progress=progress)
    index = None
    notes = []
    if weight_learning:
        try:
            _weight_learning_api()
        except RuntimeError as exc:
            notes.append(f"Weight Learning skipped: {exc}")
        else:
            index = learn_index(LearnIndexArguments(
                model=str(model_dir), output_dir=str(out / "wl"), flores_dir=str(flores_dir), languages=languages,
                rank=rank, epochs=wl_epochs or epochs, lr=lr, max_tokens=max_tokens, warmup_updates=warmup_updates,
                seed=seed, cpu=True, overwrite=True, progress=progress), train_overrides=train_overrides)
    estimate = estimate_subspace(args, train_overrides=train_overrides)
    scores = estimate.scores
    # The demo's sizes are the truth of its languages: the paper's numbers must not fill gaps.
    merged = {c: parse_size(v) for c, v in resource_sizes.items()} if resource_sizes else PAPER_BITEXT_SIZES
    correlation_raw = module_correlations(scores, merged, log_sizes=False)
    correlation_log = module_correlations(scores, merged, log_sizes=True)
    totals = {c: d["score"] for c, d in language_demands(scores).items()}
    group_means = _group_means(totals, group_of)
    overall = correlation_log["overall"]
    recovered = bool(math.isfinite(overall["r"]) and overall["r"] > 0 and overall["p"] < 0.05)
    plan = plan_from_scores(scores, budget)
    plan_path = write_plan_config(plan, out / "plan.toml",
                                  index_plan=str(index.files["index_plan"]) if index is not None else None)
    ordered = [g for g in GROUP_ORDER if g in group_means]
    monotone = all(group_means[a] >= group_means[b] for a, b in itertools.pairwise(ordered))
    lines = [*notes, *([index.summary, ""] if index is not None else []), estimate.summary, "",
             (f"ISE vs resource sizes (each language's total score): log10 sizes r = {overall['r']:.2f} "
              f"(p = {overall['p']:.3g}); raw sizes r = {correlation_raw['overall']['r']:.2f} "
              f"(p = {correlation_raw['overall']['p']:.3g}); n = {overall['n']}"),
             ("mean total score by resource group: " + ", ".join(f"{g} {v:.1f}" for g, v in group_means.items())
              + (" (ordered H > ... > V as expected)" if monotone else " (NOT ordered by resource level)")),
             f"ISE recovers the resource levels: {'yes' if recovered else 'no'}", "", format_plan(plan, group_of),
             f"plan config: {plan_path}"]
    return {"estimate": estimate, "correlation_raw": correlation_raw, "correlation_log": correlation_log,
            "group_means": group_means, "groups_ordered": monotone, "recovered": recovered, "plan": plan,
            "plan_config": plan_path, "index": index, "summary": "\n".join(lines)}


# ============================================================ weight learning
WL_FORMAT = "lslo-weight-learning"
WL_CONFIG_NAME = "lslo_weight_learning.json"
WL_WEIGHTS_NAME = "lslo_weight_learning.safetensors"
INDEX_PLAN_FORMAT = "lslo-index-plan"
_WL_LAYER = re.compile(r"(?:^|\.)(encoder|decoder)\.layers\.(\d+)$")


def _weight_learning_api():
    """(apply_weight_learning, weight_learning_mixes, weight_learning_config) of lslo.model."""
    from . import model as model_module

    api = tuple(getattr(model_module, name, None)
                for name in ("apply_weight_learning", "weight_learning_mixes", "weight_learning_config"))
    if any(function is None for function in api):
        raise RuntimeError("Weight Learning needs lslo.model.apply_weight_learning / weight_learning_mixes / "
                           "weight_learning_config (the dual-routing layers), which this lslo lacks")
    return api


def weight_learning_config(model: nn.Module):
    """The :class:`lslo.LSLoConfig` :func:`lslo.model.apply_weight_learning` used on ``model``, or None
    (:func:`lslo.model.weight_learning_config`, re-exported here for the Weight-Learning file helpers)."""
    _, _, config_of = _weight_learning_api()
    return config_of(model)


def _dual_modules(model: nn.Module) -> dict[str, nn.Module]:
    from .layer import LSLoDualLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LSLoDualLinear)}


def weight_learning_state(model: nn.Module) -> dict[str, Any]:
    """Every tensor Weight Learning trains or needs to reload: ``{name}.src.lora_A`` ... of each dual
    module (factors, mask, ranks, scales of both sets) and ``{layer}.lslo_mix.logits`` of each layer."""
    config = weight_learning_config(model)
    if config is None:
        raise ValueError("the model carries no Weight Learning layers (lslo.model.apply_weight_learning)")
    _, mixes, _ = _weight_learning_api()
    tensors = {}
    for name, module in _dual_modules(model).items():
        for index in ("src", "tgt"):
            for key, tensor in getattr(module, index).adapter_state_dict().items():
                tensors[f"{name}.{index}.{key}"] = tensor.detach().to("cpu").contiguous()
    for layer, mix in mixes(model).items():
        tensors[f"{layer}.lslo_mix.logits"] = mix.logits.detach().to("cpu").contiguous()
    return tensors


def save_weight_learning(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write a Weight-Learning model's trainable state (safetensors) and config (JSON), all-or-nothing.

    The training engine saves ``method="weight-learning"`` runs (checkpoints and ``final/``) with it;
    :func:`load_weight_learning` reads it back onto a fresh base model.
    """
    from safetensors.torch import save_file

    from .io import atomic_directory
    from .model import model_fingerprint

    tensors = weight_learning_state(model)
    meta = {"format": WL_FORMAT, "version": 1, "config": weight_learning_config(model).to_dict(),
            "base_model": model_fingerprint(model), "mix_weights": _mix_weights_json(learned_mix_weights(model))}
    text = json.dumps(meta, indent=2, allow_nan=False)
    with atomic_directory(directory, replaceable=(WL_CONFIG_NAME, WL_WEIGHTS_NAME)) as staging:
        save_file(tensors, os.path.join(staging, WL_WEIGHTS_NAME))
        Path(staging, WL_CONFIG_NAME).write_text(text, encoding="utf-8")


def load_weight_learning(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load what :func:`save_weight_learning` wrote into ``model`` (applying Weight Learning if needed).

    Refused with ValueError: another base model, another config than the one already applied, a
    tensor file that does not cover exactly the model's dual layers and mixes. Returns ``model``.
    """
    import torch
    from safetensors.torch import load_file

    from .config import LSLoConfig
    from .io import recover_directory
    from .model import model_fingerprint

    apply, mixes, _ = _weight_learning_api()
    directory = Path(directory)
    recover_directory(directory)
    config_path, weights_path = directory / WL_CONFIG_NAME, directory / WL_WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{directory} holds no Weight-Learning state ({WL_CONFIG_NAME} and {WL_WEIGHTS_NAME})")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        config = LSLoConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} is damaged or not a Weight-Learning config ({exc})") from None
    if meta.get("format") != WL_FORMAT:
        raise ValueError(f"{config_path} is not a Weight-Learning config (format {meta.get('format')!r})")
    fingerprint = model_fingerprint(model)
    differences = [k for k, v in meta.get("base_model", {}).items() if fingerprint.get(k) != v]
    if differences:
        raise ValueError(f"{directory} was saved for a different base model (differs in {differences})")
    current = weight_learning_config(model)
    if current is None:
        apply(model, config)
    elif current.to_dict() != config.to_dict():
        raise ValueError(f"{directory} holds Weight Learning of another config than the model's")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 (any failure to deserialise means a damaged file)
        raise ValueError(f"{weights_path}: damaged or not a safetensors file ({exc})") from None
    expected = set(weight_learning_state(model))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{weights_path} does not match the model's Weight-Learning layers: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, module in _dual_modules(model).items():
            for index in ("src", "tgt"):
                prefix = f"{name}.{index}."
                getattr(module, index).load_adapter_state_dict(
                    {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        for layer, mix in mixes(model).items():
            mix.logits.copy_(tensors[f"{layer}.lslo_mix.logits"])
    return model


def learned_mix_weights(model: nn.Module) -> dict[str, list[tuple[float, float]]]:
    """Each layer's ``(w_src, w_tgt) = softmax(logits)`` (Eq. 5), by side, in layer order.

    Returns:
        ``{"encoder": [(w_src, w_tgt), ...], "decoder": [...]}``; ValueError when the model has no
        mixes or a layer of a side has none (every layer needs a weight for an index plan).
    """
    import torch

    _, mixes, _ = _weight_learning_api()
    found: dict[str, dict[int, tuple[float, float]]] = {}
    for layer, mix in mixes(model).items():
        match = _WL_LAYER.search(layer)
        if match is None:
            continue
        with torch.no_grad():
            w = mix().double().tolist()
        found.setdefault(match.group(1), {})[int(match.group(2))] = (float(w[0]), float(w[1]))
    if not found:
        raise ValueError("the model has no Weight-Learning mixes (lslo.model.apply_weight_learning)")
    out = {}
    for side in _SIDES:
        if side not in found:
            continue
        layers = found[side]
        missing = [i for i in range(max(layers) + 1) if i not in layers]
        if missing:
            raise ValueError(f"{side} layers {missing} have no Weight-Learning mix: no index can be derived for them")
        out[side] = [layers[i] for i in range(len(layers))]
    return out


def _mix_weights_json(weights: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[dict[str, float]]]:
    return {side: [{"layer": i + 1, "w_src": w[0], "w_tgt": w[1]} for i, w in enumerate(values)]
            for side, values in weights.items()}


def _check_weights(weights: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[tuple[float, float]]]:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("mix weights must be {'encoder': [(w_src, w_tgt), ...], 'decoder': [...]}")
    out = {}
    for side, values in weights.items():
        if side not in _SIDES:
            raise ValueError(f"mix weights: unknown side {side!r}; use 'encoder' and 'decoder'")
        pairs = []
        for i, pair in enumerate(values):
            pair = (pair["w_src"], pair["w_tgt"]) if isinstance(pair, Mapping) else tuple(pair)
            if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair):
                raise ValueError(f"mix weights[{side!r}][{i}] must be two finite numbers (w_src, w_tgt), got {pair!r}")
            pairs.append((float(pair[0]), float(pair[1])))
        if not pairs:
            raise ValueError(f"mix weights[{side!r}] is empty")
        out[side] = pairs
    return out


def derive_index_plan(weights: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[str]]:
    """The index with the larger weight in every layer (paper Section 4.1): ``"src"`` where
    ``w_src > w_tgt``, else ``"tgt"`` (a tie, as untrained logits give, keeps the target index that
    every decoder layer and the top of the encoder follow in the paper's Figure 1).

    Returns:
        ``{"encoder": ["src", ...], "decoder": [...]}``, as ``LSLoConfig.index_plan`` takes it.
    """
    return {side: ["src" if w_src > w_tgt else "tgt" for w_src, w_tgt in pairs]
            for side, pairs in _check_weights(weights).items()}


def plot_index_weights(weights: Mapping[str, Sequence[Sequence[float]]], out_png: str | os.PathLike, *,
                       title: str | None = None, dpi: int = 120):
    """Figure 1 of the paper: enc_src, enc_tgt, dec_src and dec_tgt weights over the layers.

    Returns:
        The matplotlib ``Figure`` (one axes, two lines per side), already saved.
    """
    new_figure, save_figure = _figure_tools()
    weights = _check_weights(weights)
    figure = new_figure(figsize=(6.0, 3.8))
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
    save_figure(figure, out_png, dpi)
    return figure


def write_index_plan(weights: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike) -> Path:
    """Write the derived index plan as ``lslo train --index-plan FILE`` reads it (JSON, atomically):
    ``{"format", "index_plan": {"encoder": [...], "decoder": [...]}, "num_layers", "weights"}``."""
    weights = _check_weights(weights)
    plan = derive_index_plan(weights)
    document = {"format": INDEX_PLAN_FORMAT, "index_plan": plan,
                "num_layers": {side: len(v) for side, v in plan.items()}, "weights": _mix_weights_json(weights)}
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"index plan {path}: use a .json file name (lslo train --index-plan reads JSON)")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=1)
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def read_index_plan(path: str | os.PathLike, *, num_encoder_layers: int | None = None,
                    num_decoder_layers: int | None = None) -> dict[str, list[str] | str]:
    """An index plan file (``{"index_plan": {...}}`` or the plan itself), checked against a model's depth.

    ValueError naming the file when it is not JSON, holds no valid plan, or was learned for another
    number of encoder/decoder layers than given.
    """
    from .config import LSLoConfig

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"index plan file {path} does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"index plan file {path} is not valid JSON ({exc})") from None
    plan = document.get("index_plan", document) if isinstance(document, dict) else document
    try:
        plan = LSLoConfig(languages=["en"], ranks=1, index_plan=plan).index_plan
    except ValueError as exc:
        raise ValueError(f"index plan file {path}: {exc}") from None
    for side, depth in (("encoder", num_encoder_layers), ("decoder", num_decoder_layers)):
        value = plan.get(side) if isinstance(plan, Mapping) else None
        if depth is not None and isinstance(value, list) and len(value) != depth:
            raise ValueError(f"index plan file {path} was learned for a {len(value)}-layer {side}; this model's "
                             f"{side} has {depth} layers")
    return plan


def _help_field(default, text: str):
    return field(default=default, metadata=_help(text))


@dataclass
class LearnIndexArguments:
    """Everything ``lslo learn-index`` takes (Weight Learning, paper Sections 4.1 and 6.1)."""

    model: str = _help_field("facebook/flores101_mm100_615M", "base model: hub id or folder")
    output_dir: str | None = _help_field(None, "where the weights, Figure 1 and the index plan go (the run in "
                                               "<output-dir>/run)")
    flores_dir: str | None = _help_field(None, "FLORES-101/200 folder (dev/ trains)")
    train_tsv: str | None = _help_field(None, "training pairs TSV instead of FLORES dev")
    languages: str | None = _help_field(None, "lang12, lang30, all, or comma-separated codes")
    groups: str | None = _help_field(None, "resource groups of extra languages: 'xx=V,yy=H'")
    rank: int = _help_field(8, "rank of every language in both the source- and the target-indexed LSLo")
    epochs: int = _help_field(15, "training epochs")
    target_modules: str = _help_field("all", "all, attn, fc, names or a regex")
    ffn: str = _help_field("full", "full or reference (adapt only d_model units of fc1/fc2)")
    init: str = _help_field("lora", "lora or reference (the authors' A initialisation)")
    lr: float | None = _help_field(None, "peak learning rate (default 3e-3)")
    max_tokens: int | None = _help_field(None, "token budget of a batch per process (default 4096)")
    warmup_updates: int | None = _help_field(None, "inverse-sqrt warm-up steps (default 4000)")
    max_steps: int | None = _help_field(None, "stop after this many optimizer steps")
    seed: int = _help_field(1, "random seed")
    mixed_precision: str | None = _help_field(None, "no, bf16 or fp16 (default: as lslo train resolves it)")
    cpu: bool = _help_field(False, "train on the CPU even when a GPU is present")
    train_config: str | None = _help_field(None, "a toml/json/yaml file of further `lslo train` settings")
    adapters: str | None = _help_field(None, "read the weights of an earlier Weight-Learning run's final/ "
                                             "instead of training")
    resume: bool = _help_field(False, "continue the training run in <output-dir>/run")
    overwrite: bool = _help_field(False, "replace an earlier run in <output-dir>/run")
    progress: bool = _help_field(True, "progress bars")

    def __post_init__(self) -> None:
        for name in ("rank", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    def train_arguments(self, overrides: Mapping[str, Any] | None = None):
        """The :class:`lslo.train.TrainArguments` of the Weight-Learning run (``method="weight-learning"``)."""
        from .train import TrainArguments, load_config_file

        if self.output_dir is None:
            raise ValueError("--output-dir is required")
        values = load_config_file(self.train_config) if self.train_config else {}
        for name in ("ranks", "prune", "method", "index_plan"):
            if name in values:
                raise ValueError(f"--train-config sets {name!r}, which lslo learn-index decides")
        values.update({
            "model": self.model, "output_dir": str(Path(self.output_dir) / "run"), "method": "weight-learning",
            "ranks": str(self.rank), "epochs": self.epochs, "target_modules": self.target_modules, "ffn": self.ffn,
            "init": self.init, "seed": self.seed, "mixed_precision": self.mixed_precision, "cpu": self.cpu,
            "resume": self.resume, "overwrite": self.overwrite, "progress": self.progress,
        })
        for name in ("flores_dir", "train_tsv", "languages", "groups", "lr", "max_tokens", "warmup_updates",
                     "max_steps"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        values.update(overrides or {})
        return TrainArguments(**values)


@dataclass
class LearnIndexResult:
    """What :func:`learn_index` produced: the weights per layer, the derived plan, the files written."""

    output_dir: Path
    weights: dict[str, list[tuple[float, float]]]
    index_plan: dict[str, list[str]]
    files: dict[str, Path]
    summary: str
    run_dir: Path | None = None


def format_index_weights(weights: Mapping[str, Sequence[Sequence[float]]]) -> str:
    """The learned weights and the derived index per layer, as a table."""
    plan = derive_index_plan(weights)
    lines = [f"{'side':<8} {'layer':>5} {'w_src':>7} {'w_tgt':>7}  index"]
    for side, pairs in _check_weights(weights).items():
        for i, (w_src, w_tgt) in enumerate(pairs):
            lines.append(f"{side:<8} {i + 1:>5} {w_src:>7.3f} {w_tgt:>7.3f}  {plan[side][i]}")
    return "\n".join(lines)


def learn_index(args: LearnIndexArguments, *, train_overrides: Mapping[str, Any] | None = None) -> LearnIndexResult:
    """Weight Learning: train source- and target-indexed LSLo mixed per layer (Eq. 5), derive the index plan.

    Trains through :func:`lslo.train.train` (``method="weight-learning"``; equal ranks, every target
    module, both routings, two logits per encoder/decoder layer shared by its modules), unless
    ``args.adapters`` names an earlier run's ``final/``; then writes to ``args.output_dir``:
    ``mix_weights.json`` (w_src, w_tgt per layer), ``fig1_index_weights.png`` (Figure 1) and
    ``index_plan.json`` (the larger weight per layer) for ``lslo train --index-plan``.

    Returns:
        A :class:`LearnIndexResult` (empty on the non-main processes of a multi-process run).
    """
    from .model import load_base_model

    if args.output_dir is None:
        raise ValueError("--output-dir is required")
    _weight_learning_api()  # fail before training when this lslo has no dual layers
    out = Path(args.output_dir)
    run_dir = None
    if args.adapters is not None:
        state_dir = Path(args.adapters)
        if not (state_dir / WL_CONFIG_NAME).is_file():
            raise ValueError(f"{state_dir} holds no Weight-Learning state ({WL_CONFIG_NAME}); give a learn-index "
                             "run's final/ folder")
    else:
        from .train import train

        result = train(args.train_arguments(train_overrides))
        run_dir, state_dir = result.output_dir, result.final_dir
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return LearnIndexResult(out, {}, {}, {}, "", run_dir)
    model = load_base_model(args.model)
    load_weight_learning(model, state_dir)
    weights = learned_mix_weights(model)
    plan = derive_index_plan(weights)
    out.mkdir(parents=True, exist_ok=True)
    files = {"weights": out / "mix_weights.json", "figure1": out / "fig1_index_weights.png",
             "index_plan": out / "index_plan.json"}
    text = json.dumps({"weights": _mix_weights_json(weights), "state": str(state_dir)}, indent=1)
    atomic_write_file(files["weights"], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    plot_index_weights(weights, files["figure1"])
    write_index_plan(weights, files["index_plan"])
    summary = (f"Weight Learning (Eq. 5): softmax mixing weights per layer and the index with the larger one\n"
               f"{format_index_weights(weights)}\n"
               f"train with it: lslo train --index-plan {files['index_plan']} ...")
    return LearnIndexResult(out, weights, plan, files, summary, run_dir)
