"""lslo: Language-Specific LoRA (LSLo) for multilingual NMT, on a grouped mixed-language kernel."""

from __future__ import annotations

import importlib

from .config import LANGUAGE_SETS, RESOURCE_GROUPS, LSLoConfig
from .context import current_route, route
from .layer import LSLoLinear
from .model import (
    apply_lslo,
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
)

__version__ = "0.1.0"

# Names whose modules import transformers: loaded on first use so that `import lslo` stays light.
_LAZY = {"translate": ".inference", "ForcedLanguageTokens": ".inference", "lang_token_id": ".inference"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LANGUAGE_SETS",
    "RESOURCE_GROUPS",
    "ForcedLanguageTokens",
    "LSLoConfig",
    "LSLoLinear",
    "__version__",
    "apply_lslo",
    "current_route",
    "format_parameter_report",
    "forward_with_langs",
    "get_lslo_config",
    "lang_token_id",
    "load_adapters",
    "load_base_model",
    "lslo_modules",
    "merge_direction",
    "parameter_report",
    "remove_lslo",
    "route",
    "save_adapters",
    "translate",
]
