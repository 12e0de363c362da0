"""Registry of the grouped-LoRA backends.

A backend is a pair of plain functions with the signatures of
:func:`lslo_kernels.reference.lora_forward_reference` and
:func:`lslo_kernels.reference.lora_backward_reference`, plus a predicate saying which
devices it runs on. The custom op (``ops.py``) dispatches on the backend's name, so a
compiled graph records the choice as a constant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

__all__ = ["Backend", "register_backend", "get_backend", "available_backends", "resolve_backend"]

logger = logging.getLogger("lslo_kernels")


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    supports_device: Callable[[torch.device], bool]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


_BACKENDS: dict[str, Backend] = {}
# Order of preference of ``auto`` for each device type; first available wins.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}
_unavailable_reasons: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def mark_unavailable(name: str, reason: str) -> None:
    """Record why a backend could not be loaded (shown in errors and logged once)."""
    _unavailable_reasons[name] = reason


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the registered backends, optionally only those that run on ``device``."""
    if device is None:
        return sorted(_BACKENDS)
    device = torch.device(device)
    return sorted(n for n, b in _BACKENDS.items() if b.supports_device(device))


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        why = _unavailable_reasons.get(name)
        known = ", ".join(["auto", *sorted(_BACKENDS)])
        if why:
            raise ValueError(f"backend {name!r} is not available: {why}") from None
        raise ValueError(f"unknown backend {name!r}; available: {known}") from None


_warned_fallback: set[str] = set()


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn ``"auto"`` into a concrete backend name for ``device``; check explicit names."""
    device = torch.device(device)
    if name != "auto":
        backend = get_backend(name)
        if not backend.supports_device(device):
            raise ValueError(f"backend {name!r} does not run on device {device}")
        if dtype is not None and dtype not in backend.dtypes:
            raise TypeError(f"backend {name!r} does not support dtype {dtype}")
        return name
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        backend = _BACKENDS.get(candidate)
        if backend is None or not backend.supports_device(device):
            continue
        if dtype is not None and dtype not in backend.dtypes:
            continue
        if candidate == "reference" and device.type not in _warned_fallback:
            _warned_fallback.add(device.type)
            preferred = _AUTO_ORDER.get(device.type, ("reference",))[0]
            logger.warning(
                "lslo: backend %r unavailable on %s (%s); using the slow 'reference' backend",
                preferred,
                device.type,
                _unavailable_reasons.get(preferred, "not registered"),
            )
        return candidate
    return "reference"


register_backend(
    Backend(
        name="reference",
        forward=reference.lora_forward_reference,
        backward=reference.lora_backward_reference,
        supports_device=lambda device: True,
    )
)
