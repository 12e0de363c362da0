"""Registers the C++ CPU backend ``cpp`` when the extension ``lslo_kernels._C`` is built.

The kernels live in ``csrc/`` and register the ops ``torch.ops.lslo_cpp.forward`` and
``torch.ops.lslo_cpp.backward`` (CPU; fp32, bf16, fp16, fp64) when ``_C`` is imported. This
module adds their fake (meta) implementations, so ``torch.compile`` and ``torch.library.opcheck``
can trace them, and registers the backend. Without ``_C`` the package keeps working on the
``reference`` backend and :func:`lslo_kernels.get_backend` reports why ``cpp`` is missing.
"""

from __future__ import annotations

import importlib.util

import torch

from .backends import Backend, mark_unavailable, register_backend
from .reference import accum_dtype

__all__ = ["lora_backward_cpp", "lora_forward_cpp"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def lora_forward_cpp(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, lang, sorted_token_idx,
                     lang_offsets, max_rank):
    """Forward of the grouped op on CPU; arguments and results as
    :func:`lslo_kernels.reference.lora_forward_reference` (all tensors contiguous, on CPU).

    Returns:
        y: (T, d) dtype of x; h: (T, max_rank) fp32 (fp64 for fp64 x).
    """
    return torch.ops.lslo_cpp.forward(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, lang,
                                      sorted_token_idx, lang_offsets, max_rank)


def lora_backward_cpp(grad_out, x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, lang, sorted_token_idx,
                      lang_offsets, max_rank):
    """Backward of the grouped op's LoRA term on CPU; arguments and results as
    :func:`lslo_kernels.reference.lora_backward_reference`.

    Returns:
        grad_x: (T, k) dtype of x; grad_a: (R, k) dtype of lora_a; grad_b: (d, R) dtype of lora_b,
        zero where ``prune_mask`` is False.
    """
    return torch.ops.lslo_cpp.backward(grad_out, x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, lang,
                                       sorted_token_idx, lang_offsets, max_rank)


def _register_fakes() -> None:
    @torch.library.register_fake("lslo_cpp::forward")
    def _(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, lang, sorted_token_idx, lang_offsets,
          max_rank):
        y = torch.empty_like(base_out, memory_format=torch.contiguous_format)
        h = x.new_empty((x.shape[0], max_rank), dtype=accum_dtype(x.dtype))
        return y, h

    @torch.library.register_fake("lslo_cpp::backward")
    def _(grad_out, x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, lang, sorted_token_idx, lang_offsets,
          max_rank):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(lora_a, memory_format=torch.contiguous_format),
            torch.empty_like(lora_b, memory_format=torch.contiguous_format),
        )


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
    register_backend(
        Backend(
            name="cpp",
            forward=lora_forward_cpp,
            backward=lora_backward_cpp,
            supports_device=lambda device: device.type == "cpu",
            dtypes=DTYPES,
        )
    )
