"""Plots of the benchmark results, drawn only from the results CSV.

``python -m benchmarks.plots [results.csv] [out_dir] [--run RUN_ID]`` redraws them without
measuring anything. Figures (PNG, git-ignored):

``ratio_vs_base.png``   per headline setting (mode, T), each provider's time / base time at the
                        three M2M-124 shapes (median, p20-p80 bars).
``time_vs_T.png``       time per call against T (lang30, uniform, 30 languages), per shape and mode.
``time_vs_L.png``       time per call against the number of languages.
``ratio_<sweep>.png``   ratio to base for the categorical sweeps (spread, ranks, density).
"""

from __future__ import annotations

import argparse
from collections import OrderedDict, defaultdict
from pathlib import Path

from .report import PROVIDER_ORDER, latest_run
from .suite import read_rows

__all__ = ["plot_all"]

_MARKERS = "os^vD<>Pp*h"


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _providers(rows):
    present = {r["provider"] for r in rows} - {"-"}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def _style(provider, providers):
    """The same color, marker and label for a provider in every panel and figure."""
    i = PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER) + providers.index(provider)
    lslo = provider in ("reference", "cpp", "triton")
    if provider == "base":
        return {"marker": ".", "linestyle": ":", "linewidth": 1.5, "color": "black", "label": "base (floor)"}
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": "-" if lslo else "--", "color": f"C{i % 10}",
            "linewidth": 2.2 if lslo else 1.2, "label": f"lslo {provider}" if lslo else provider}


def _metric(rows, metric):
    return [r for r in rows if r["metric"] == metric and _num(r["p50"]) is not None]


def _legend(fig, axes):
    """One legend for the figure with every provider of any panel, right of the panels."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        order = [_style(p, list(PROVIDER_ORDER))["label"] for p in PROVIDER_ORDER]
        labels = sorted(seen, key=lambda label: order.index(label) if label in order else len(order))
        fig.legend([seen[label] for label in labels], labels, fontsize=7, loc="center left",
                   bbox_to_anchor=(1.0, 0.5))


def _grid(n):
    import math

    cols = min(3, n)
    return math.ceil(n / cols), cols


def _bars(ax, groups, providers, title):
    """groups: OrderedDict label -> {provider: row}."""
    import numpy as np

    shown = [p for p in providers if p != "base" and any(p in g for g in groups.values())]
    width = 0.8 / max(1, len(shown))
    xs = np.arange(len(groups))
    for i, p in enumerate(shown):
        med, lo, hi = [], [], []
        for g in groups.values():
            r = g.get(p)
            m = _num(r["p50"]) if r else float("nan")
            med.append(m)
            lo.append(m - _num(r["p20"]) if r else 0)
            hi.append(_num(r["p80"]) - m if r else 0)
        style = _style(p, providers)
        ax.bar(xs + (i - (len(shown) - 1) / 2) * width, med, width, yerr=[lo, hi], capsize=2, color=style["color"],
               label=style["label"], hatch=None if style["linestyle"] == "-" else "//", alpha=0.85)
    ax.axhline(1.0, color="black", linewidth=0.8)
    values = [v for c in ax.containers for v in getattr(c, "datavalues", []) if v > 0]
    if values and max(values) / min(values) > 20:  # slow baselines would flatten the interesting ones
        ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(list(groups), fontsize=8)
    ax.set_ylabel("time / base")
    ax.set_title(title, fontsize=9)


def _lines(ax, series, providers, xlabel, title, logx=True):
    """series: {provider: [(x, row)]}."""
    for p in providers:
        pts = sorted(series.get(p, []), key=lambda t: t[0])
        if len(pts) < 2:
            continue
        xs = [x for x, _ in pts]
        med = [_num(r["p50"]) for _, r in pts]
        lo = [_num(r["p20"]) for _, r in pts]
        hi = [_num(r["p80"]) for _, r in pts]
        style = _style(p, providers)
        ax.plot(xs, med, **style)
        ax.fill_between(xs, lo, hi, alpha=0.12, color=style["color"])
    if logx:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ms per call")
    ax.set_title(title, fontsize=9)


def plot_all(csv_path: Path, out_dir: Path, run_id: str | None = None) -> list[Path]:
    """Draw every figure the chosen run (default: the latest) has data for; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    run_id = run_id or latest_run(rows)
    rows = [r for r in rows if r["run_id"] == run_id and r["op"] == "lslo_linear"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        return []
    providers = _providers(rows)
    device = f"{rows[0]['device_name']}, {rows[0]['threads']} threads, torch {rows[0]['torch_version']}"
    written = []

    def save(fig, name, title):
        fig.suptitle(f"{title}\n{device}, run {run_id}", fontsize=9)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    def panel_figure(panels, panel_width, draw, name, title):
        # One subplot per panel key, spare grid cells blanked, one legend for the figure.
        nrows, ncols = _grid(len(panels))
        fig, axes = plt.subplots(nrows, ncols, figsize=(panel_width * ncols, 3.8 * nrows), squeeze=False)
        for ax, (key, content) in zip(axes.flat, panels.items()):
            draw(ax, key, content)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        _legend(fig, axes.flat)
        save(fig, name, title)

    def with_several_x(series):
        # A line needs two x values: drop groups where every provider has a single point.
        return OrderedDict((k, v) for k, v in series.items() if any(len({x for x, _ in pts}) > 1 for pts in v.values()))

    # 1. headline: ratio vs base per shape, one panel per (mode, T)
    ratios = _metric(rows, "ratio_vs_base")
    panels: OrderedDict = OrderedDict()
    for r in (r for r in ratios if r["sweep"] == "headline"):
        panels.setdefault((r["mode"], r["tokens"]), OrderedDict()).setdefault(
            f"{r['in_features']}->{r['out_features']}", {})[r["provider"]] = r
    if panels:
        panel_figure(panels, 5.5,
                     lambda ax, key, groups: _bars(ax, groups, providers, f"{key[0]}, T={key[1]}, lang30"),
                     "ratio_vs_base.png", "Layer time / frozen base nn.Linear time (lower is better, 1 = free)")

    times = _metric(rows, "time_ms")
    # 2. time vs T at the lang30 / uniform / 30-language point
    t_series: OrderedDict = OrderedDict()
    for r in times:
        if r["ranks"] == "lang30" and r["spread"] == "uniform" and r["languages"] == "30":
            key = (r["mode"], f"{r['in_features']}->{r['out_features']}")
            t_series.setdefault(key, defaultdict(list))[r["provider"]].append((int(r["tokens"]), r))
    t_series = with_several_x(t_series)
    if t_series:
        panel_figure(t_series, 5,
                     lambda ax, key, series: _lines(ax, series, providers, "tokens T", f"{key[0]}, {key[1]}, lang30"),
                     "time_vs_T.png", "Time per layer call against batch size")

    # 3. time vs L
    l_series: OrderedDict = OrderedDict()
    for r in (r for r in times if r["sweep"] == "L"):
        key = (r["mode"], r["tokens"], r["ranks"], f"{r['in_features']}->{r['out_features']}")
        l_series.setdefault(key, defaultdict(list))[r["provider"]].append((int(r["languages"]), r))
    l_series = with_several_x(l_series)
    if l_series:
        panel_figure(l_series, 5,
                     lambda ax, key, series: _lines(ax, series, providers, "languages L",
                                                    f"{key[0]}, T={key[1]}, {key[3]}, ranks {key[2]}"),
                     "time_vs_L.png", "Time per layer call against the number of languages")

    # 4. categorical sweeps: ratio vs base
    for sweep in ("spread", "spread_L100", "ranks", "density"):
        panels = OrderedDict()
        for r in (r for r in ratios if r["sweep"] == sweep):
            key = (r["mode"], r["tokens"], f"{r['in_features']}->{r['out_features']}")
            panels.setdefault(key, OrderedDict()).setdefault(r["x_value"], {})[r["provider"]] = r
        if not panels:
            continue
        panel_figure(panels, 6,
                     lambda ax, key, groups: _bars(ax, groups, providers, f"{key[0]}, T={key[1]}, {key[2]}"),
                     f"ratio_{sweep}.png", f"Layer time / base time across {sweep}")
    return written


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent / "results"
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, default=here / "results.csv")
    parser.add_argument("out_dir", nargs="?", type=Path, default=here)
    parser.add_argument("--run", default=None, help="run_id to plot (default: the latest)")
    args = parser.parse_args(argv)
    for path in plot_all(args.csv, args.out_dir, args.run):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
