"""The ``README.md`` model card of an adapter folder (as PEFT writes one beside its adapters).

Built from what the folder holds: ``lslo_config.json`` (the LSLo config, the base model record,
the training recipe and the pruning ratios reached, when ``lslo train`` saved it) and the scores
``lslo eval`` wrote into ``<folder>/eval/``. Written by :func:`lslo.save_adapters` and rewritten
after ``lslo eval``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import LSLoConfig
from .io import atomic_write_file

__all__ = ["CARD_NAME", "model_card", "write_model_card"]

CARD_NAME = "README.md"
# The recipe's lines on the card, in this order (run_config.json holds every field).
_RECIPE_KEYS = ("preset", "method", "lr", "epochs", "warmup_updates", "max_tokens", "update_freq",
                "tokens_per_optimizer_step", "optimizer_steps", "seed", "label_smoothing", "adam_betas", "adam_eps",
                "weight_decay", "clip_norm", "dropout", "attention_dropout", "activation_dropout", "layerdrop",
                "sampling_temperature", "prune", "prune_start", "prune_duration", "prune_pool", "mixed_precision",
                "processes", "init", "ffn", "target_modules", "index_plan")


def _scores_section(directory: Path) -> list[str]:
    lines = []
    for path in sorted((directory / "eval").glob("scores_*.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a damaged score file is not the card's to report
        groups = document.get("groups") or {}
        metric = next((m for m in ("spbleu", "chrf++", "bleu") if m in groups), None)
        if metric is None:
            continue
        table = groups[metric]
        label = (document.get("metric_labels") or {}).get(metric, metric)
        columns = list(table.get("scores", {}))
        split = document.get("split", path.stem.removeprefix("scores_"))
        lines += [(f"{label} on FLORES {split} (`lslo eval`, beam {document.get('num_beams', '?')}, "
                  f"{document.get('eval_sentences') or 'all'} sentences per direction):"), "",
                  "| " + " | ".join([*columns, "AVG"]) + " |", "|" + "---|" * (len(columns) + 1),
                  "| " + " | ".join(f"{table['scores'][c]:.2f}" for c in columns)
                  + f" | {table.get('avg_directions', float('nan')):.2f} |", ""]
    return lines


def model_card(meta: Mapping[str, Any], directory: str | os.PathLike = "ADAPTERS") -> str:
    """The card's Markdown for an adapter folder's ``lslo_config.json`` contents ``meta``.

    Args:
        meta: the parsed ``lslo_config.json`` (``config``, ``base``, optional ``metadata`` with
            ``recipe`` and ``pruning``).
        directory: the folder; its ``eval/scores_*.json`` (if any) fill the scores section.

    Returns:
        The Markdown text.
    """
    directory = Path(directory)
    config = LSLoConfig.from_dict(meta["config"])
    base = meta.get("base") or {}
    extra = meta.get("metadata") or {}
    name = base.get("name_or_path") or "(not recorded)"
    tokenizer = base.get("tokenizer") or name
    lines = [f"# LSLo adapters for `{name}`", "",
             ("Language-Specific LoRA adapters (one low-rank adapter per language, routed by source or target "
             "language), saved by lslo."), "", "## Base model", "",
             f"- model: `{name}`" + (f" (hub revision `{base['revision']}`)" if base.get("revision") else ""),
             f"- tokenizer: `{tokenizer}`",
             "- shape: " + ", ".join(f"{k} {v}" for k, v in (meta.get("base_model") or {}).items()), "",
             "## Languages, groups and ranks", "",
             "| language | group | rank | pruned |", "|---|---|---|---|"]
    pruning = extra.get("pruning") or {}
    for code in config.languages:
        lines.append(f"| {code} | {config.group_of(code) or '?'} | {config.rank_of(code)} | "
                     f"{pruning.get(code, 0.0):.3f} |")
    lines += ["", "```", config.describe(), "```", ""]
    recipe = extra.get("recipe")
    if recipe:
        lines += ["## Training recipe (from run_config.json)", "", "| setting | value |", "|---|---|"]
        for key in _RECIPE_KEYS:
            if key in recipe:
                lines.append(f"| {key} | {recipe[key]} |")
        trainable = recipe.get("trainable_parameters")
        if isinstance(trainable, Mapping):
            lines.append(f"| trainable parameters | {trainable.get('total')} |")
        lines.append("")
    scores = _scores_section(directory)
    if scores:
        lines += ["## Scores", "", *scores]
    lines += ["## Load", "", "```python", "import lslo", "from transformers import AutoTokenizer", "",
              f"model = lslo.load_adapters(None, {str(directory)!r})  # loads the recorded base model too",
              f"tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})",
              (f"print(lslo.translate(model, tokenizer, ['Hello.'], [{config.languages[0]!r}], "
              f"[{config.languages[-1]!r}]))"), "```", "",
              ("Command line: `lslo translate --adapters DIR` (the base comes from this folder; `--model` must "
              "be the same base if given)."), ""]
    return "\n".join(lines)


def write_model_card(directory: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """(Re)write ``<directory>/README.md`` from its ``lslo_config.json`` (or ``meta``) and scores, atomically.

    Returns:
        The card's path.
    """
    directory = Path(directory)
    if meta is None:
        meta = json.loads((directory / "lslo_config.json").read_text(encoding="utf-8"))
    text = model_card(meta, directory)
    path = directory / CARD_NAME
    atomic_write_file(str(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
