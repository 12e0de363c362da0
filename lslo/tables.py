"""The paper's tables and figures from per-direction score rows (no translation, no sacrebleu here).

- :func:`direction_group` / :func:`group_columns`: direction-group labels (H2H, H2M, ..., V2V) in
  H, M, L, V order.
- :func:`group_table` / :func:`format_table`: the paper's table (Tables 1-4), one column per
  direction group and two labelled averages: the mean over directions and the mean of the group means.
- :func:`write_scores`: per-direction CSV and JSON, written atomically.
- :func:`plot_epoch_curves` (Figure 3) and :func:`plot_group_bars` (a bar chart of the table).

The rows come from :func:`lslo.evaluate.evaluate`; every name here is also importable from ``lslo.evaluate``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .config import FLORES101_RESOURCE_GROUPS, GROUP_ORDER, LSLoConfig
from .io import atomic_write_file
from .plotting import _new_figure, _save_figure

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "direction_group",
    "format_table",
    "group_columns",
    "group_table",
    "plot_epoch_curves",
    "plot_group_bars",
    "write_scores",
]


class DescribesScoring(Protocol):
    """What :func:`write_scores` records of a scorer (:class:`lslo.evaluate.Scorer` is one)."""

    def describe(self) -> dict[str, Any]: ...

METRICS = ("spbleu", "chrf++", "bleu")



METRIC_LABELS = {"spbleu": "spBLEU", "chrf++": "chrF++", "bleu": "BLEU"}



AVG_DIRECTIONS = "AVG (directions)"



AVG_GROUPS = "AVG (groups)"



GroupOf = Callable[[str], "str | None"] | Mapping[str, str] | LSLoConfig



def _group_function(group_of: GroupOf | None) -> Callable[[str], str]:
    """A code -> group function that raises ValueError for a language without a group."""
    if group_of is None:
        lookup = FLORES101_RESOURCE_GROUPS.get
    elif isinstance(group_of, LSLoConfig):
        lookup = group_of.group_of
    elif isinstance(group_of, Mapping):
        lookup = group_of.get
    elif callable(group_of):
        lookup = group_of
    else:
        raise TypeError(f"group_of must be a callable, a mapping or an LSLoConfig, got {type(group_of).__name__}")

    def group(code: str) -> str:
        label = lookup(code)
        if not isinstance(label, str) or not label:
            raise ValueError(f"language {code!r} has no resource group (H, M, L, V): give it one with --groups "
                             f"{code}=V (group_of={{code: group}} in Python)")
        return label

    return group



def direction_group(src: str, tgt: str, group_of: GroupOf | None = None) -> str:
    """The direction-group label of ``src -> tgt``: ``"H2M"`` for a high- to a medium-resource language.

    Args:
        src, tgt: language codes.
        group_of: code -> resource group: a callable, a mapping or an :class:`LSLoConfig`
            (its ``group_of``); default the paper's table, then FLORES-101's
            (:data:`lslo.config.FLORES101_RESOURCE_GROUPS`).
    """
    group = _group_function(group_of)
    return f"{group(src)}2{group(tgt)}"



def _group_rank(label: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(label), "") if label in GROUP_ORDER else (len(GROUP_ORDER), label)



def group_columns(groups: Iterable[str]) -> list[str]:
    """Column labels for the resource groups present, in H, M, L, V order (other labels after, sorted).

    ``["H", "M", "V"]`` -> ``["H2H", "H2M", "H2V", "M2H", "M2M", "M2V", "V2H", "V2M", "V2V"]``.
    """
    present = sorted(set(groups), key=_group_rank)
    return [f"{a}2{b}" for a in present for b in present]



def _column_key(label: str):
    src, _, tgt = label.partition("2")
    return (_group_rank(src), _group_rank(tgt))



def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric



def _has(rows: Sequence[Mapping], metric: str) -> bool:
    return all(row.get(metric) is not None for row in rows)



def _default_metrics(row_sets: Iterable[Sequence[Mapping]]) -> tuple[str, ...]:
    """spBLEU where every row has it; otherwise chrF++ and BLEU (never a table labelled spBLEU without it)."""
    return ("spbleu",) if all(_has(rows, "spbleu") for rows in row_sets) else ("chrf++", "bleu")



def group_table(rows: Sequence[Mapping[str, Any]], *, metric: str | None = None,
                group_of: GroupOf | None = None) -> dict[str, Any]:
    """Mean score per direction group, and the two averages.

    Args:
        rows: per-direction rows (:func:`score_directions` / :func:`evaluate`); each needs src,
            tgt and the metric (and uses its ``group`` unless ``group_of`` is given).
        metric: "spbleu", "chrf++" or "bleu"; default spbleu when every row has it, else chrf++.
        group_of: code -> resource group, to regroup the rows.

    Returns:
        ``{"metric", "label", "columns": ["H2H", ...] (groups present, H, M, L, V order),
        "scores": {column: mean}, "directions": {column: count}, "num_directions",
        "avg_directions": mean over all directions, "avg_groups": mean of the column means}``.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to tabulate")
    metric = _check_metric(metric) if metric is not None else _default_metrics([rows])[0]
    if not _has(rows, metric):
        missing = next(f"{r.get('src')}-{r.get('tgt')}" for r in rows if r.get(metric) is None)
        if metric == "spbleu":
            raise ValueError(f"spBLEU is not available (direction {missing} has none: no SentencePiece model was "
                             "used); tabulate chrf++ or bleu")
        raise ValueError(f"direction {missing} has no {metric} score")
    group = _group_function(group_of)
    by_column: dict[str, list[float]] = {}
    for row in rows:
        label = row.get("group") if group_of is None and row.get("group") else f"{group(row['src'])}2{group(row['tgt'])}"
        by_column.setdefault(label, []).append(float(row[metric]))
    columns = sorted(by_column, key=_column_key)
    scores = {c: math.fsum(by_column[c]) / len(by_column[c]) for c in columns}
    values = [v for c in columns for v in by_column[c]]
    return {
        "metric": metric,
        "label": METRIC_LABELS[metric],
        "columns": columns,
        "scores": scores,
        "directions": {c: len(by_column[c]) for c in columns},
        "num_directions": len(values),
        "avg_directions": math.fsum(values) / len(values),
        "avg_groups": math.fsum(scores.values()) / len(scores),
    }



def _systems(systems) -> list[tuple[str, Any]]:
    items = list(systems.items()) if isinstance(systems, Mapping) else [tuple(s) for s in systems]
    if not items:
        raise ValueError("no systems to tabulate")
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"systems must map a name to its rows, got {item!r}")
    return items



def _is_table(entry) -> bool:
    return isinstance(entry, Mapping) and "scores" in entry and "avg_groups" in entry



def _format_params(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
            if value >= scale:
                return f"{value / scale:.1f}{suffix}"
        return f"{value:g}"
    return str(value)



def _render(header: list[str], body: list[list[str]], style: str) -> str:
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)])



def format_table(
    systems: Mapping[str, Any] | Sequence[tuple[str, Any]],
    *,
    metric: str | Sequence[str] | None = None,
    params: Mapping[str, int | str | None] | None = None,
    style: str = "markdown",
    digits: int = 2,
    group_of: GroupOf | None = None,
) -> str:
    """The paper's table: one row per system, one column per direction group, then both averages.

    Args:
        systems: name -> per-direction rows (or a :func:`group_table` result), in display order.
        metric: one metric or several (one table each). Default: spBLEU when every system has it;
            otherwise a chrF++ table and a BLEU table (nothing is labelled spBLEU without it).
        params: name -> trainable parameters (int, shown as 15.3M, or a string); adds a #Params column.
        style: "markdown" or "plain" (aligned columns for a terminal).
        digits: decimals shown.
        group_of: code -> resource group, to regroup rows.

    Returns:
        The table(s) as text; the metric names the first header cell, and a note under each table
        says what each AVG is.
    """
    if style not in ("markdown", "plain"):
        raise ValueError(f"style must be 'markdown' or 'plain', got {style!r}")
    items = _systems(systems)
    if metric is None:
        row_sets = [entry for _, entry in items if not _is_table(entry)]
        metrics = _default_metrics(row_sets)
        if any(_is_table(entry) for _, entry in items):
            metrics = (items[0][1]["metric"],) if _is_table(items[0][1]) else metrics
    else:
        metrics = (metric,) if isinstance(metric, str) else tuple(metric)
        if not metrics:
            raise ValueError("metric: empty list")
    blocks = []
    for name in metrics:
        _check_metric(name)
        tables = []
        for system, entry in items:
            if _is_table(entry):
                if entry["metric"] != name:
                    raise ValueError(f"system {system!r} was tabulated with {entry['metric']}, not {name}")
                tables.append(entry)
            else:
                tables.append(group_table(entry, metric=name, group_of=group_of))
        columns = sorted({c for t in tables for c in t["columns"]}, key=_column_key)
        header = [METRIC_LABELS[name]] + (["#Params"] if params is not None else []) + columns
        header += [AVG_DIRECTIONS, AVG_GROUPS]
        body = []
        for (system, _), table in zip(items, tables):
            cells = [system] + ([_format_params(params.get(system))] if params is not None else [])
            cells += [f"{table['scores'][c]:.{digits}f}" if c in table["scores"] else "-" for c in columns]
            cells += [f"{table['avg_directions']:.{digits}f}", f"{table['avg_groups']:.{digits}f}"]
            body.append(cells)
        counts = sorted({t["num_directions"] for t in tables})
        groups = sorted({len(t["columns"]) for t in tables})
        note = (f"{AVG_DIRECTIONS} = mean over all {'/'.join(map(str, counts))} directions; "
                f"{AVG_GROUPS} = mean of the {'/'.join(map(str, groups))} direction-group means.")
        blocks.append(_render(header, body, style) + "\n" + note)
    return "\n\n".join(blocks)



_CSV_FIELDS = ("src", "tgt", "direction", "group", "n", *METRICS)



def _write_text(path: Path, text: str) -> None:
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write_file(path, write)



def write_scores(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    name: str = "scores",
    scorer: DescribesScoring | None = None,
    metadata: Mapping[str, Any] | None = None,
    group_of: GroupOf | None = None,
) -> dict[str, Path]:
    """Write per-direction scores as ``<name>.csv`` and ``<name>.json`` in ``out_dir``, atomically.

    The JSON holds the rows (without hypotheses), the direction-group table of every metric the
    rows have, ``spbleu_available``, the scorer's sacrebleu signatures and SentencePiece file (when
    ``scorer`` is given) and ``metadata``. Rows that carry ``"hypotheses"`` also get
    ``<name>.hyp/<src>-<tgt>.txt``, one translation per line (line breaks inside one become spaces).

    Args:
        rows: per-direction rows (:func:`evaluate`).
        out_dir: directory (created if missing).
        name: file stem.
        scorer: the :class:`Scorer` used, to record how the scores were computed.
        metadata: more JSON-ready fields (system name, epoch, checkpoint, ...).
        group_of: code -> resource group, to regroup the rows in the tables.

    Returns:
        ``{"csv": path, "json": path}`` (+ ``"hypotheses": directory``).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to write")
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_FIELDS)
    for row in rows:
        writer.writerow(["" if row.get(k) is None else row.get(k) for k in _CSV_FIELDS])
    paths = {"csv": out / f"{name}.csv", "json": out / f"{name}.json"}
    _write_text(paths["csv"], buffer.getvalue())

    present = [m for m in METRICS if _has(rows, m)]
    document: dict[str, Any] = {
        "spbleu_available": "spbleu" in present,
        "metric_labels": {m: METRIC_LABELS[m] for m in present},
        "rows": [{k: v for k, v in row.items() if k != "hypotheses"} for row in rows],
        "groups": {m: group_table(rows, metric=m, group_of=group_of) for m in present},
    }
    if scorer is not None:
        document["scorer"] = scorer.describe()
    if metadata:
        document.update(dict(metadata))
    _write_text(paths["json"], json.dumps(document, indent=1, ensure_ascii=False, allow_nan=False) + "\n")

    if any("hypotheses" in row for row in rows):
        hyp_dir = out / f"{name}.hyp"
        hyp_dir.mkdir(exist_ok=True)
        for row in rows:
            if "hypotheses" in row:
                lines = (" ".join(h.splitlines()) for h in row["hypotheses"])
                _write_text(hyp_dir / f"{row['src']}-{row['tgt']}.txt", "".join(line + "\n" for line in lines))
        paths["hypotheses"] = hyp_dir
    return paths



def _scores_of(entry, metric: str, group_of) -> dict[str, float]:
    """Group scores of one history entry: rows, a group_table() result or {column: score}."""
    if _is_table(entry):
        if entry["metric"] != metric:
            raise ValueError(f"a history entry was tabulated with {entry['metric']}, not {metric}")
        return dict(entry["scores"])
    if isinstance(entry, Mapping):
        return {str(k): float(v) for k, v in entry.items()}
    return group_table(entry, metric=metric, group_of=group_of)["scores"]



def _entry_metric(entries: Iterable) -> str:
    row_sets = []
    for entry in entries:
        if _is_table(entry):
            return entry["metric"]
        if not isinstance(entry, Mapping):
            row_sets.append(entry)
    if not row_sets:  # bare {column: score} mappings: guessing would risk calling chrF++ "spBLEU"
        raise ValueError("these scores don't say which metric they are: pass metric='spbleu', 'chrf++' or 'bleu'")
    return _default_metrics(row_sets)[0]



def plot_epoch_curves(
    history: Mapping[str, Sequence[Any] | Mapping[int, Any]],
    out_png: str | os.PathLike,
    *,
    groups: Sequence[str] = ("H2H", "V2V"),
    metric: str | None = None,
    pretrained: Any = None,
    group_of: GroupOf | None = None,
    title: str | None = None,
    dpi: int = 120,
):
    """Figure 3 of the paper: a direction group's score per epoch, one line per system.

    Args:
        history: system -> its evaluations per epoch: a list (epochs 1, 2, ...) or {epoch: entry};
            an entry is per-direction rows, a :func:`group_table` result or {column: score}.
        out_png: the PNG to write (atomically).
        groups: one panel per direction group (any column present, e.g. "H2M").
        metric: default spBLEU when the rows have it, else chrF++; required when every entry is a
            bare {column: score} mapping.
        pretrained: the zero-shot model's entry (same kinds): a dashed horizontal line per panel.
        group_of: code -> resource group, for rows.
        title: figure title.
        dpi: resolution.

    Returns:
        The matplotlib ``Figure`` (one axes per group), already saved.
    """
    if not history:
        raise ValueError("history is empty: no system to plot")
    groups = [groups] if isinstance(groups, str) else list(groups)
    if not groups:
        raise ValueError("groups is empty")
    series = {}
    for system, epochs in history.items():
        pairs = sorted(epochs.items()) if isinstance(epochs, Mapping) else list(enumerate(epochs, start=1))
        if not pairs:
            raise ValueError(f"system {system!r} has no epochs")
        series[system] = pairs
    every_entry = [e for pairs in series.values() for _, e in pairs] + ([pretrained] if pretrained is not None else [])
    metric = _check_metric(metric) if metric is not None else _entry_metric(every_entry)
    curves = {s: [(epoch, _scores_of(e, metric, group_of)) for epoch, e in pairs] for s, pairs in series.items()}
    baseline = _scores_of(pretrained, metric, group_of) if pretrained is not None else None
    available = {c for points in curves.values() for _, scores in points for c in scores}
    for column in groups:
        if column not in available:
            raise ValueError(f"direction group {column!r} is in no evaluation; available: "
                             f"{', '.join(sorted(available, key=_column_key))}")

    figure = _new_figure(figsize=(5.0 * len(groups), 3.8))
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    label = METRIC_LABELS[metric]
    for ax, column in zip(axes, groups):
        for system, points in curves.items():
            xs = [epoch for epoch, scores in points if column in scores]
            ys = [scores[column] for _, scores in points if column in scores]
            ax.plot(xs, ys, marker="o", markersize=3, label=system)
        if baseline is not None and column in baseline:
            ax.axhline(baseline[column], linestyle="--", color="gray", label="Pretrain")
        ax.set_title(f"{column} {label} per epoch")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    _save_figure(figure, out_png, dpi)
    return figure



def plot_group_bars(
    systems: Mapping[str, Any] | Sequence[tuple[str, Any]],
    out_png: str | os.PathLike,
    *,
    metric: str | None = None,
    group_of: GroupOf | None = None,
    title: str | None = None,
    dpi: int = 120,
):
    """A bar chart of :func:`format_table`: per column (groups, then both AVGs) one bar per system.

    Args:
        systems: name -> per-direction rows (or a :func:`group_table` result).
        out_png: the PNG to write (atomically).
        metric: default spBLEU when every system has it, else chrF++.
        group_of: code -> resource group, for rows.
        title: axes title (default names the metric).
        dpi: resolution.

    Returns:
        The matplotlib ``Figure`` (one axes), already saved.
    """
    items = _systems(systems)
    metric = _check_metric(metric) if metric is not None else _entry_metric([e for _, e in items])
    tables = [(s, e if _is_table(e) else group_table(e, metric=metric, group_of=group_of)) for s, e in items]
    for system, table in tables:
        if table["metric"] != metric:
            raise ValueError(f"system {system!r} was tabulated with {table['metric']}, not {metric}")
    columns = sorted({c for _, t in tables for c in t["columns"]}, key=_column_key)
    labels = columns + ["AVG\n(dir.)", "AVG\n(groups)"]
    figure = _new_figure(figsize=(max(6.0, 0.8 * len(labels) * max(1, len(tables)) ** 0.5 + 2), 4.0))
    ax = figure.subplots()
    width = 0.8 / len(tables)
    for k, (system, table) in enumerate(tables):
        values = [table["scores"].get(c, math.nan) for c in columns] + [table["avg_directions"], table["avg_groups"]]
        ax.bar([i + (k - (len(tables) - 1) / 2) * width for i in range(len(labels))], values, width, label=system)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_title(title or f"{METRIC_LABELS[metric]} by direction group")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    _save_figure(figure, out_png, dpi)
    return figure
