"""Shared-input groups: the LoRA terms of several projections of ONE input in one op call.

Self-attention's q/k/v read the same hidden states, cross-attention's k/v the same encoder output.
Called one by one, each projection is its own op call (its own autograd node, launches and reads
of x). :func:`shared_input_lora` takes x once with the frozen base Linears and the packed factors
of every projection (:class:`LoRAFactors`, one per projection) and returns each projection's output
``y_p = x W_p^T + bias_p + s_{p,l} (B_{p,l} * M_{p,l}) A_{p,l} x`` from one autograd node.

A backend may implement the group's forward natively (``Backend.shared_forward``, e.g. one
shrink over the ranks concatenated per language; the backward is each projection's); otherwise
the group runs each projection's own kernels inside the one node (``linear_forward`` where the
backend has it, else the base GEMM and ``forward``), so on the ``reference`` backend every output
and every factor gradient is the same computation as the separate calls. The adapter storage stays
per projection: pruning masks, saved adapters and optimizer state are untouched by grouping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import get_backend
from .routing import Routing

__all__ = ["LoRAFactors", "shared_input_lora"]


class LoRAFactors(NamedTuple):
    """The packed adapter storage of one layer, as the op takes it (``spec.FACTORS`` plus max_rank).

    Attributes:
        lora_a: (R, k) A factors of all languages stacked, R = sum of ranks.
        lora_b: (d, R) B factors.
        prune_mask: (d, R) bool, True = entry of B kept.
        scales: (L,) float32 (or float64) scale per language.
        rank_offsets: (L + 1,) int64 cumulative ranks.
        max_rank: max_l r_l.
    """

    lora_a: Tensor
    lora_b: Tensor
    prune_mask: Tensor
    scales: Tensor
    rank_offsets: Tensor
    max_rank: int


# Per projection, what _SharedLoRA.apply takes after the shared arguments.
_PER_PROJECTION = 7  # weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets


def _member_forward(impl, x, weight, bias, factors: LoRAFactors, sorted_token_idx, lang_offsets):
    a, b, mask, scales, offsets, max_rank = factors
    if impl.linear_forward is not None:
        return impl.linear_forward(x, weight, bias, a, b, mask, scales, offsets, sorted_token_idx, lang_offsets,
                                   max_rank)
    base_out = F.linear(x, weight, bias)
    return impl.forward(x, base_out, a, b, mask, scales, offsets, sorted_token_idx, lang_offsets, max_rank)


class _SharedLoRA(torch.autograd.Function):
    """One autograd node for a group of projections of one x (see the module docstring).

    ``apply(x, sorted_token_idx, lang_offsets, backend, max_ranks, *per_projection)`` with
    ``per_projection`` = (weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets) per
    projection; returns one y (T, d_p) per projection. The base weights are frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, x, sorted_token_idx, lang_offsets, backend, max_ranks, *flat):
        impl = get_backend(backend)
        members = [flat[i:i + _PER_PROJECTION] for i in range(0, len(flat), _PER_PROJECTION)]
        factors = [LoRAFactors(*m[2:], max_rank) for m, max_rank in zip(members, max_ranks)]
        if impl.shared_forward is not None:
            outs = impl.shared_forward(x, [m[0] for m in members], [m[1] for m in members], factors,
                                       sorted_token_idx, lang_offsets)
        else:
            outs = [_member_forward(impl, x, m[0], m[1], f, sorted_token_idx, lang_offsets)
                    for m, f in zip(members, factors)]
        ys = tuple(y for y, _h in outs)
        saved = [x, sorted_token_idx, lang_offsets]
        for m, (_y, h) in zip(members, outs):
            saved += [m[0], h, *m[2:]]
        ctx.save_for_backward(*saved)
        ctx.max_ranks, ctx.backend, ctx.num_members = max_ranks, backend, len(members)
        ctx.set_materialize_grads(False)
        return ys

    @staticmethod
    def backward(ctx, *grad_ys):
        saved = ctx.saved_tensors
        x, sorted_token_idx, lang_offsets = saved[:3]
        impl = get_backend(ctx.backend)
        grads: list = [None] * (5 + _PER_PROJECTION * ctx.num_members)
        grad_x = None
        needs = ctx.needs_input_grad
        for p, grad_y in enumerate(grad_ys):
            if grad_y is None:
                continue
            weight, h, a, b, mask, scales, offsets = _member_saved(saved, p)
            grad_y = grad_y.contiguous()
            gx, ga, gb, gs = impl.backward(grad_y, x, h, a, b, mask, scales, offsets, sorted_token_idx, lang_offsets,
                                           ctx.max_ranks[p])
            if needs[0]:
                gx = gx.addmm_(grad_y, weight) if gx.dtype == grad_y.dtype else gx + grad_y @ weight
                grad_x = gx if grad_x is None else grad_x.add_(gx)
            base = 5 + _PER_PROJECTION * p
            grads[base + 2] = ga if needs[base + 2] else None
            grads[base + 3] = gb if needs[base + 3] else None
            grads[base + 5] = gs if needs[base + 5] else None
        grads[0] = grad_x
        return tuple(grads)


def _member_saved(saved, p: int):
    """(weight, h, lora_a, lora_b, prune_mask, scales, rank_offsets) of projection p."""
    start = 3 + 7 * p
    return tuple(saved[start:start + 7])


def shared_input_lora(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                      factors: Sequence[LoRAFactors], routing: Routing, backend: str) -> tuple[Tensor, ...]:
    """Each projection's ``x W_p^T + bias_p + LoRA_p(x)`` for projections sharing x, in one op call.

    No validation (the layers check their inputs); the backend is resolved; the base weights are
    frozen (their gradients are not computed).

    Args:
        x: (T, k) contiguous input rows.
        weights: per projection (d_p, k) frozen base weight, dtype of x.
        biases: per projection (d_p,) or None.
        factors: per projection the :class:`LoRAFactors` (dtype of x), k input features.
        routing: the :class:`Routing` of the T tokens (the same for every projection).
        backend: a resolved backend name.

    Returns:
        One y (T, d_p) per projection, dtype of x.
    """
    if not (len(weights) == len(biases) == len(factors)) or not factors:
        raise ValueError(f"one weight, bias and factor set per projection, got {len(weights)}, {len(biases)}, "
                         f"{len(factors)}")
    flat = []
    for weight, bias, f in zip(weights, biases, factors):
        flat += [weight, bias, f.lora_a, f.lora_b, f.prune_mask, f.scales, f.rank_offsets]
    max_ranks = tuple(int(f.max_rank) for f in factors)
    return _SharedLoRA.apply(x, routing.sorted_token_idx, routing.lang_offsets, backend, max_ranks, *flat)
