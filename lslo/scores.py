"""ISE and LSP scores (paper Sections 4.2 and 7.3, Eq. 6; Appendix C): computed from a pruned model, saved,
read back, tabulated, and correlated with the languages' resource sizes.

- **ISE** (Section 4.2, Eq. 6; Tables 9-10): equal ranks in every module, layer-wise cross-language L1
  pruning to P_ISE, then ``Score(B) = #pruned(B) - P_ISE * #B`` for every language x module x layer.
  Negative = the language kept more of its B than the pool's average: it needs more space there.
- **LSP** (Section 7.3, Appendix D): one pool per language: which weight matrices matter most for it.
- **Correlations** (Appendix C, Tables 9-10): Pearson r and p-value (``scipy.stats.pearsonr``) between
  each module's per-language score (mean over layers) and the languages' bitext sizes with English
  (the paper's Tables 5/6 built in as :data:`PAPER_BITEXT_SIZES`; English has none there, so the
  paper's correlations run over 11 languages, which its p-values confirm).

Figures of these scores are in :mod:`lslo.plotting`, plans made from them in :mod:`lslo.plans`, the
training runs that produce them in :mod:`lslo.analysis` (which re-exports all three).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .config import RESOURCE_GROUPS
from .injection import get_lslo_config, lslo_modules
from .io import atomic_write_file
from .pruning import _check_ratio, pool_entries, subspace_scores

__all__ = [
    "MODULE_LABELS",
    "PAPER_BITEXT_SIZES",
    "SCORES_FORMAT",
    "check_equal_ranks",
    "format_correlations",
    "format_score_summary",
    "module_correlations",
    "module_label",
    "parse_size",
    "read_scores",
    "read_sizes",
    "score_matrix",
    "score_model",
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


def _sides_present(scores) -> list[str]:
    present = {r["side"] for r in _rows_of(scores)}
    sides = [s for s in _SIDES if s in present]
    if not sides:
        raise ValueError("the scores hold no module inside encoder/decoder layers: nothing to draw")
    return sides


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


def _help(text: str) -> dict[str, Any]:
    """The metadata of an arguments dataclass field: its ``--help`` text."""
    return {"help": text}
