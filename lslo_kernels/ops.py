"""The grouped language-specific LoRA op: custom op registration, autograd and the public entry.

Layers: backend kernels (reference.py, cpp.py, triton_kernels.py) -> custom ops
``lslo::grouped_lora_fwd`` / ``lslo::grouped_lora_bwd`` (schema + fake impl so
``torch.compile(fullgraph=True)`` traces through them) -> autograd registered on the forward op
-> :func:`grouped_lora`, which validates its inputs where they enter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import get_backend, resolve_backend
from .reference import accum_dtype
from .routing import Routing

__all__ = ["grouped_lora", "validate_factors"]


@torch.library.custom_op("lslo::grouped_lora_fwd", mutates_args=())
def _grouped_lora_fwd(
    x: Tensor,
    base_out: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    prune_mask: Tensor,
    scales: Tensor,
    rank_offsets: Tensor,
    lang: Tensor,
    sorted_token_idx: Tensor,
    lang_offsets: Tensor,
    max_rank: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return get_backend(backend).forward(
        x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets,
        lang, sorted_token_idx, lang_offsets, max_rank,
    )


@_grouped_lora_fwd.register_fake
def _(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, lang, sorted_token_idx,
      lang_offsets, max_rank, backend):
    y = torch.empty_like(base_out, memory_format=torch.contiguous_format)
    h = x.new_empty((x.shape[0], max_rank), dtype=accum_dtype(x.dtype))
    return y, h


@torch.library.custom_op("lslo::grouped_lora_bwd", mutates_args=())
def _grouped_lora_bwd(
    grad_out: Tensor,
    x: Tensor,
    h: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    prune_mask: Tensor,
    scales: Tensor,
    rank_offsets: Tensor,
    lang: Tensor,
    sorted_token_idx: Tensor,
    lang_offsets: Tensor,
    max_rank: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return get_backend(backend).backward(
        grad_out, x, h, lora_a, lora_b, prune_mask, scales, rank_offsets,
        lang, sorted_token_idx, lang_offsets, max_rank,
    )


@_grouped_lora_bwd.register_fake
def _(grad_out, x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, lang, sorted_token_idx,
      lang_offsets, max_rank, backend):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(lora_a, memory_format=torch.contiguous_format),
        torch.empty_like(lora_b, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    (x, _base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, lang, sorted_token_idx,
     lang_offsets, max_rank, backend) = inputs
    _y, h = output
    ctx.save_for_backward(x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, lang,
                          sorted_token_idx, lang_offsets)
    ctx.max_rank = max_rank
    ctx.backend = backend


def _backward(ctx, grad_y, _grad_h):
    (x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, lang, sorted_token_idx,
     lang_offsets) = ctx.saved_tensors
    needs_x, needs_base, needs_a, needs_b = ctx.needs_input_grad[:4]
    grad_x = grad_a = grad_b = None
    if needs_x or needs_a or needs_b:
        grad_x, grad_a, grad_b = _grouped_lora_bwd(
            grad_y.contiguous(), x, h, lora_a, lora_b, prune_mask, scales, rank_offsets,
            lang, sorted_token_idx, lang_offsets, ctx.max_rank, ctx.backend,
        )
    return (
        grad_x if needs_x else None,
        grad_y if needs_base else None,  # y = base_out + LoRA term: identity for base_out
        grad_a if needs_a else None,
        grad_b if needs_b else None,
        None, None, None, None, None, None, None, None,
    )


_grouped_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def validate_factors(
    lora_a: Tensor, lora_b: Tensor, prune_mask: Tensor, scales: Tensor, rank_offsets: Tensor
) -> None:
    """Check the packed adapter storage of one layer; raise ValueError/TypeError naming the problem."""
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"lora_a must be (R, k) and lora_b (d, R); got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"total rank mismatch: lora_a has {lora_a.shape[0]} rows, lora_b {lora_b.shape[1]} columns")
    if prune_mask.shape != lora_b.shape:
        raise ValueError(f"prune_mask shape {tuple(prune_mask.shape)} != lora_b shape {tuple(lora_b.shape)}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_a dtype {lora_a.dtype} != lora_b dtype {lora_b.dtype}")
    if rank_offsets.dim() != 1 or rank_offsets.dtype != torch.int64:
        raise TypeError(f"rank_offsets must be a 1-D int64 tensor, got {rank_offsets.dtype} {tuple(rank_offsets.shape)}")
    if scales.shape != (rank_offsets.shape[0] - 1,):
        raise ValueError(f"scales must have one entry per language ({rank_offsets.shape[0] - 1}), got {tuple(scales.shape)}")


def grouped_lora(
    x: Tensor,
    base_out: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    prune_mask: Tensor,
    scales: Tensor,
    rank_offsets: Tensor,
    routing: Routing,
    max_rank: int,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Add each token's language-specific LoRA term to the base output, for a mixed batch.

    ``y_t = base_out_t + s_l * (B_l * M_l) @ A_l @ x_t`` with ``l = routing.lang[t]``;
    tokens with id -1 get ``y_t = base_out_t``. Differentiable in x, base_out, lora_a, lora_b.

    Args:
        x: (T, k) float32/bfloat16/float16/float64 input rows.
        base_out: (T, d) same dtype, output of the frozen base layer for x.
        lora_a: (R, k) A factors of all languages stacked (R = sum of ranks), dtype of x.
        lora_b: (d, R) B factors, columns ``rank_offsets[l]:rank_offsets[l+1]`` are language l's.
        prune_mask: (d, R) bool, False = pruned entry of B (gets zero gradient).
        scales: (L,) float32 scale per language.
        rank_offsets: (L + 1,) int64 cumulative ranks, on x's device.
        routing: :class:`Routing` of the T tokens (see :func:`build_routing`).
        max_rank: max rank over languages (width of the intermediate saved for backward).
        backend: "auto", "reference", "cpp" or "triton".
        validate: check shapes/dtypes/devices (cheap, no host sync).

    Returns:
        y: (T, d), dtype of x.
    """
    if validate:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.dim() != 2 or base_out.dim() != 2:
            raise ValueError(f"x must be (T, k) and base_out (T, d); got {tuple(x.shape)} and {tuple(base_out.shape)}")
        validate_factors(lora_a, lora_b, prune_mask, scales, rank_offsets)
        if x.shape[1] != lora_a.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features but lora_a expects in_features={lora_a.shape[1]}")
        if base_out.shape != (x.shape[0], lora_b.shape[0]):
            raise ValueError(f"base_out shape {tuple(base_out.shape)} != (T, d) = {(x.shape[0], lora_b.shape[0])}")
        if x.dtype != lora_a.dtype or base_out.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: x {x.dtype}, base_out {base_out.dtype}, lora factors {lora_a.dtype}")
        for name, t in (("base_out", base_out), ("lora_a", lora_a), ("lora_b", lora_b),
                        ("prune_mask", prune_mask), ("scales", scales), ("rank_offsets", rank_offsets),
                        ("routing.lang", routing.lang)):
            if t.device != x.device:
                raise ValueError(f"device mismatch: x on {x.device}, {name} on {t.device}")
        if routing.num_tokens != x.shape[0]:
            raise ValueError(f"routing covers {routing.num_tokens} tokens but x has {x.shape[0]} rows")
        if routing.num_languages != scales.shape[0]:
            raise ValueError(f"routing was built for {routing.num_languages} languages, layer has {scales.shape[0]}")
    backend = resolve_backend(backend, x.device, x.dtype)
    y, _h = _grouped_lora_fwd(
        x.contiguous(), base_out.contiguous(), lora_a.contiguous(), lora_b.contiguous(),
        prune_mask.contiguous(), scales, rank_offsets, routing.lang, routing.sorted_token_idx,
        routing.lang_offsets, int(max_rank), backend,
    )
    return y
