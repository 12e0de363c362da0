"""lslo: Language-Specific LoRA (LSLo) for multilingual NMT, on a grouped mixed-language kernel."""

from __future__ import annotations

import importlib

from .config import LANGUAGE_SETS, RESOURCE_GROUPS, LSLoConfig
from .context import current_route, route
from .layer import LSLoDualLinear, LSLoLinear, LSLoMix
from .model import (
    apply_lslo,
    apply_weight_learning,
    format_parameter_report,
    forward_with_langs,
    get_lslo_config,
    load_adapters,
    load_base_model,
    lslo_modules,
    merge_direction,
    parameter_report,
    remove_lslo,
    save_adapters,
    weight_learning_config,
    weight_learning_mixes,
)
from .pruning import gradual_pruning_ratio, prune, pruning_summary, subspace_scores

__version__ = "0.1.0"

# Names whose modules import transformers: loaded on first use so that `import lslo` stays light.
# (The engine's `train` function is not one of them: `lslo.train` is its module; use
# `from lslo.train import train`.)
_LAZY = {"translate": ".inference", "ForcedLanguageTokens": ".inference", "lang_token_id": ".tokenization",
         "TrainArguments": ".train", "evaluate_run": ".train", "EvalArguments": ".train"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LANGUAGE_SETS",
    "RESOURCE_GROUPS",
    "EvalArguments",
    "ForcedLanguageTokens",
    "LSLoConfig",
    "LSLoDualLinear",
    "LSLoLinear",
    "LSLoMix",
    "TrainArguments",
    "__version__",
    "apply_lslo",
    "apply_weight_learning",
    "current_route",
    "evaluate_run",
    "format_parameter_report",
    "forward_with_langs",
    "get_lslo_config",
    "gradual_pruning_ratio",
    "lang_token_id",
    "load_adapters",
    "load_base_model",
    "lslo_modules",
    "merge_direction",
    "parameter_report",
    "prune",
    "pruning_summary",
    "remove_lslo",
    "route",
    "save_adapters",
    "subspace_scores",
    "translate",
    "weight_learning_config",
    "weight_learning_mixes",
]
