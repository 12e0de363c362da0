"""Registers the C++ CPU backend ``cpp`` when the extension ``lslo_kernels._C`` is built.

The kernels live in ``csrc/`` and register, when ``_C`` is imported, the ops (schemas: ``spec.py``)

* ``torch.ops.lslo_cpp.forward`` / ``backward``: the backend's forward and backward;
* ``torch.ops.lslo_cpp.add_``: inference, the LoRA term added into the base output in place;
* ``torch.ops.lslo_cpp.lora``: training, y with its autograd node in C++;
* ``torch.ops.lslo_cpp.stage_factors``: decoding's factors staged once (``s_l (B_l * M_l)^T`` rows,
  what ``add_`` stages on every call), for ``linear_decode``; ``add_staged_`` is ``add_`` with them;
* ``torch.ops.lslo_cpp.linear_forward`` / ``linear_lora``: the frozen base Linear and the LoRA term
  in one op (the LoRA pass first, the base GEMM accumulating into its output), ``linear_lora``
  with its autograd in C++: training of an adapted ``nn.Linear``;
* ``torch.ops.lslo_cpp.linear_decode``: decoding, the same in one call (no h), optionally with
  ``stage_factors``' factors.

CPU; fp32, bf16, fp16, fp64. This module adds their fake (meta) implementations from ``spec.py``,
so ``torch.compile`` and ``torch.library.opcheck`` can trace them, and registers the backend with
the ops themselves (no Python wrapper on the hot path). Without ``_C`` the package keeps working on
the ``reference`` backend and :func:`lslo_kernels.get_backend` reports why ``cpp`` is missing.
"""

from __future__ import annotations

import importlib.util

import torch

from . import spec
from .backends import Backend, mark_unavailable, register_backend

__all__ = ["lora_add_cpp", "lora_autograd_cpp", "lora_backward_cpp", "lora_forward_cpp"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# The registered ops (OpOverloads), set when _C loads. Same arguments and results as the
# reference functions of the same role (lslo_kernels.reference).
lora_forward_cpp = lora_backward_cpp = lora_add_cpp = lora_autograd_cpp = None


def _register_fakes() -> None:
    for op in (spec.FORWARD, spec.BACKWARD, spec.ADD, spec.LORA, spec.LINEAR_FORWARD, spec.LINEAR):
        if _optional_op(op.name) is not None:
            torch.library.register_fake(f"lslo_cpp::{op.name}")(spec.FAKES[op.name])


def _optional_op(name: str):
    """An op of a newer _C than the one built here is absent until it is rebuilt: None, not an error."""
    try:
        return getattr(torch.ops.lslo_cpp, name).default
    except AttributeError:
        return None


_BUILD_COMMAND = "`pip install --no-build-isolation -e .` (with torch installed first)"

try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.lslo_cpp.*)
except ImportError as exc:  # the package works without it, on the reference backend
    if importlib.util.find_spec(f"{__package__}._C") is None:
        mark_unavailable("cpp", f"C++ extension lslo_kernels._C is not built; build it with {_BUILD_COMMAND}")
    else:  # built, but e.g. against another torch
        mark_unavailable("cpp", f"C++ extension lslo_kernels._C failed to load ({exc}); rebuild it with {_BUILD_COMMAND}")
else:
    _register_fakes()
    lora_forward_cpp = torch.ops.lslo_cpp.forward.default
    lora_backward_cpp = torch.ops.lslo_cpp.backward.default
    lora_add_cpp = torch.ops.lslo_cpp.add_.default
    lora_autograd_cpp = torch.ops.lslo_cpp.lora.default
    register_backend(
        Backend(
            name="cpp",
            forward=lora_forward_cpp,
            backward=lora_backward_cpp,
            supports_device=lambda device: device.type == "cpu",
            dtypes=DTYPES,
            add_=lora_add_cpp,
            autograd=lora_autograd_cpp,
            stage_factors=_optional_op("stage_factors"),
            linear=_optional_op("linear_lora"),
            linear_decode=_optional_op("linear_decode"),
            linear_forward=_optional_op("linear_forward"),
            checks_arguments=True,  # csrc's check_problem
            auto_priority=(("cpu", 10),),
            # Grouped q/k/v measured slower than the per-layer C++ autograd ops on the 2-core CPU
            # (benchmarks/bench_fastpath.py, benchmarks/README.md).
            shared_inputs=False,
        )
    )


def kernel_isa() -> str | None:
    """The CPU kernel variant of the C++ backend: ``"avx2"`` (AVX2 + FMA) or ``"baseline"``; None without ``_C``."""
    if lora_forward_cpp is None:
        return None
    return importlib.import_module(f"{__package__}._C").get_isa()


def set_min_parallel_work(work: int) -> int:
    """Set the work (in multiply-adds) below which the C++ kernels run on one thread; returns the previous value.

    ``0`` parallelises every call, a huge value none (``benchmarks/crossover.py`` measures where forking
    starts to pay). RuntimeError when the extension is not built.
    """
    if lora_forward_cpp is None:
        raise RuntimeError("lslo_kernels._C is not built: the C++ backend and its thread threshold are absent")
    return int(importlib.import_module(f"{__package__}._C").set_min_parallel_work(int(work)))


__all__ += ["kernel_isa", "set_min_parallel_work"]
