"""Registers the Triton backend when triton is importable and can run here.

It runs on CUDA devices, and on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter,
slow, for tests). :func:`register` can be called again, e.g. by a test that sets
``TRITON_INTERPRET=1`` after ``lslo_kernels`` was first imported.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

from .backends import Backend, mark_unavailable, register_backend

__all__ = ["register"]

_KERNELS_MODULE = f"{__package__}.triton_kernels"
_GEMM_MODULE = f"{__package__}.triton_gemm"


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def register() -> bool:
    """Register backend ``triton`` if it can run here, else record why not.

    Returns:
        True when the backend is registered.
    """
    if not (torch.cuda.is_available() or _interpret_requested()):
        mark_unavailable("triton", "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)")
        return False
    try:
        import triton  # noqa: F401

        kernels = importlib.import_module(_KERNELS_MODULE)
        # Triton picks compiled vs interpreted kernels when @triton.jit runs; rebuild them if
        # the interpreter was requested after the module was first imported.
        if kernels.INTERPRETED != _interpret_requested():
            kernels = importlib.reload(sys.modules[_KERNELS_MODULE])
        gemm = importlib.import_module(_GEMM_MODULE)
        if gemm.INTERPRETED != _interpret_requested():
            gemm = importlib.reload(sys.modules[_GEMM_MODULE])
    # Not only ImportError: a broken triton install fails at import with whatever its driver
    # probing raises, and the package must still import on the reference backend.
    except Exception as exc:  # noqa: BLE001
        mark_unavailable("triton", f"triton could not be imported ({type(exc).__name__}: {exc})")
        return False

    interpreted = kernels.INTERPRETED
    # The base GEMM and the LoRA term in one kernel where LSLO_TRITON_GEMM (or, unset, its measured
    # rule: off for now) says so; read here, so a test that changes it calls register() again.
    fused_gemm = gemm.enabled()

    def supports_device(device: torch.device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and interpreted)

    register_backend(
        Backend(
            name="triton",
            forward=kernels.lora_forward_triton,
            backward=kernels.lora_backward_triton,
            supports_device=supports_device,
            dtypes=(torch.float32, torch.float16, torch.bfloat16),
            # In place with LSLO_TRITON_FUSED; otherwise forward + copy, as ops.lora_add_call would.
            add_=kernels.lora_add_triton,
            mixed_factors=True,
            linear=gemm.linear_lora_triton if fused_gemm else None,
            linear_decode=gemm.linear_decode_triton if fused_gemm else None,
            checks_arguments=True,  # triton_kernels._check_common
            auto_priority=(("cuda", 10),),  # on the CPU (interpreter) only when asked for by name
        )
    )
    return True


register()
