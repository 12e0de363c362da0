"""Registry of the grouped-LoRA backends.

A backend is a pair of plain functions taking exactly the inputs of the op's contract
(:data:`lslo_kernels.spec.FORWARD` and :data:`~lslo_kernels.spec.BACKWARD`, e.g.
:func:`lslo_kernels.reference.lora_forward_reference`), a predicate saying which devices it runs
on, and optionally two fast entries: ``add_`` (inference, adds the LoRA term into the base output
in place, :data:`~lslo_kernels.spec.ADD`) and ``autograd`` (training, a differentiable op whose
autograd lives in compiled code, :data:`~lslo_kernels.spec.LORA`). :func:`register_backend`
refuses a backend whose functions drift from the contract. The custom op (``ops.py``) dispatches
on the backend's name, so a compiled graph records the choice as a constant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference
from .spec import (
    ADD,
    BACKWARD,
    FORWARD,
    LINEAR,
    LINEAR_DECODE,
    LINEAR_FORWARD,
    LORA,
    STAGE_FACTORS,
    check_signature,
)

__all__ = ["Backend", "available_backends", "check_backend", "get_backend", "register_backend", "resolve_backend"]

logger = logging.getLogger("lslo_kernels")


@dataclass(frozen=True)
class Backend:
    """One implementation of the op.

    Attributes:
        name: what ``backend=`` selects.
        forward: ``spec.FORWARD`` -> (y, h).
        backward: ``spec.BACKWARD`` -> (grad_x, grad_a, grad_b, grad_scales).
        supports_device: whether it runs on a device.
        dtypes: dtypes of x it accepts.
        add_: optional ``spec.ADD``, inference in place into the base output (no h).
        autograd: optional ``spec.LORA``, y with its backward registered in compiled code.
        mixed_factors: takes float32 factors with fp16/bf16 x (``spec.mixed_factors``), so that a
            layer under autocast passes its fp32 master factors without casting them (and their
            gradients back) on every call.
        stage_factors: optional, for decoding loops: ``stage_factors(lora_b, prune_mask, scales,
            rank_offsets)`` returns the factors ``add_`` would stage on every call, prepared once,
            for ``linear_decode``'s ``staged``. The caller keeps the staged tensor while B, the mask
            and the scales are unchanged (``LSLoLinear`` keys it on their version counters).
        linear_decode: optional, decoding in one call: ``spec.LINEAR_FORWARD``'s arguments plus
            ``staged`` (``stage_factors``' tensor, or None), returns y = x W^T + bias + LoRA term (no
            h, no autograd).
        linear: optional ``spec.LINEAR``: the frozen base Linear and the LoRA term in one op with
            its autograd (``y = x W^T + bias + LoRA term``), which saves the separate pass of the
            LoRA term over the base output and autograd's sum of the two gradients of x.
        linear_forward: optional ``spec.LINEAR_FORWARD`` (no autograd): y = x W^T + bias + LoRA term
            and h, what a shared-input group (``shared.py``) runs per projection.
        shared_forward: optional, a shared-input group natively: ``shared_forward(x, weights,
            biases, factors, sorted_token_idx, lang_offsets)`` with one weight, bias and
            ``shared.LoRAFactors`` per projection returns one (y, h) per projection, as
            ``linear_forward`` would for each (the backward stays per projection: ``backward``).
        checks_arguments: its ``add_`` and ``linear_decode`` check every argument against x and the
            routing themselves (shapes, dtypes, devices, layouts, token and language counts), so a
            caller that planned a call may skip its own checks (``LSLoLinear``'s decoding plan).
        shared_inputs: whether layers of one input (q/k/v) should run as one grouped call on it
            (``lslo.shared_inputs``): off where the backend's per-layer entry is cheaper than the
            group's one Python autograd node (``cpp``: its per-layer op and backward are C++).
        auto_priority: (device type, priority) pairs: ``backend="auto"`` takes, among the backends
            that run on the device, the one of highest priority there (``"*"``: any device type).
        slow_fallback: the backend ``auto`` takes only when nothing faster is there (the reference
            loop): taking it logs a warning naming why the others are missing.
    """

    name: str
    forward: Callable
    backward: Callable
    supports_device: Callable[[torch.device], bool]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    add_: Callable | None = None
    autograd: Callable | None = None
    mixed_factors: bool = False
    stage_factors: Callable | None = None
    linear: Callable | None = None
    linear_decode: Callable | None = None
    linear_forward: Callable | None = None
    shared_forward: Callable | None = None
    checks_arguments: bool = False
    shared_inputs: bool = True
    auto_priority: tuple[tuple[str, int], ...] = ()
    slow_fallback: bool = False

    def priority_on(self, device_type: str) -> int | None:
        """Its ``auto`` priority on a device type, None where ``auto`` does not consider it."""
        found = dict(self.auto_priority)
        return found.get(device_type, found.get("*"))


_BACKENDS: dict[str, Backend] = {}
_unavailable_reasons: dict[str, str] = {}


def check_backend(backend: Backend) -> None:
    """Raise TypeError when a backend's functions do not take the op's contract (``spec.py``)."""
    check_signature(backend.forward, FORWARD, f"backend {backend.name!r} forward")
    check_signature(backend.backward, BACKWARD, f"backend {backend.name!r} backward")
    if backend.add_ is not None:
        check_signature(backend.add_, ADD, f"backend {backend.name!r} add_")
    if backend.autograd is not None:
        check_signature(backend.autograd, LORA, f"backend {backend.name!r} autograd")
    if backend.linear is not None:
        check_signature(backend.linear, LINEAR, f"backend {backend.name!r} linear")
    if backend.linear_forward is not None:
        check_signature(backend.linear_forward, LINEAR_FORWARD, f"backend {backend.name!r} linear_forward")
    if backend.linear_decode is not None:
        check_signature(backend.linear_decode, LINEAR_DECODE, f"backend {backend.name!r} linear_decode")
    if backend.stage_factors is not None:
        check_signature(backend.stage_factors, STAGE_FACTORS, f"backend {backend.name!r} stage_factors")


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; its functions must follow the contract."""
    check_backend(backend)
    _BACKENDS[backend.name] = backend
    _unavailable_reasons.pop(backend.name, None)


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
    ranked = sorted(((b.priority_on(device.type), b.name) for b in _BACKENDS.values()
                     if b.priority_on(device.type) is not None), key=lambda pair: (-pair[0], pair[1]))
    for _priority, candidate in ranked:
        backend = _BACKENDS[candidate]
        if not backend.supports_device(device):
            continue
        if dtype is not None and dtype not in backend.dtypes:
            continue
        if backend.slow_fallback and device.type not in _warned_fallback:
            _warned_fallback.add(device.type)
            missing = "; ".join(f"{name}: {why}" for name, why in sorted(_unavailable_reasons.items())) or "none registered"
            logger.warning("lslo: no faster backend on %s (%s); using the slow %r backend", device.type, missing,
                           candidate)
        return candidate
    return "reference"


register_backend(
    Backend(
        name="reference",
        forward=reference.lora_forward_reference,
        backward=reference.lora_backward_reference,
        supports_device=lambda device: True,
        add_=reference.lora_add_reference,
        mixed_factors=True,
        auto_priority=(("*", 0),),
        slow_fallback=True,
    )
)
