"""lslo_kernels: the grouped mixed-language LoRA op and its backends.

Backends: ``reference`` (pure PyTorch, always there), ``cpp`` (C++/OpenMP extension
``lslo_kernels._C``, CPU), ``triton`` (GPU; CPU under ``TRITON_INTERPRET=1``).
Missing compiled backends are reported once and ``auto`` falls back to ``reference``.
"""

from __future__ import annotations

from . import backends, reference, spec

# Optional backends register themselves on import; each records why when it can't.
from . import cpp_backend as _cpp_backend  # noqa: F401
from . import triton_backend as _triton_backend  # noqa: F401
from .backends import available_backends, get_backend, resolve_backend
from .ops import grouped_lora, grouped_lora_, validate_factors
from .reference import lora_add_reference, lora_backward_reference, lora_forward_reference
from .routing import Routing, build_routing, check_lang_ids, expand_lang_ids, route_tokens

__all__ = [
    "Routing",
    "available_backends",
    "backends",
    "build_routing",
    "check_lang_ids",
    "expand_lang_ids",
    "get_backend",
    "grouped_lora",
    "grouped_lora_",
    "lora_add_reference",
    "lora_backward_reference",
    "lora_forward_reference",
    "reference",
    "resolve_backend",
    "route_tokens",
    "spec",
    "validate_factors",
]
