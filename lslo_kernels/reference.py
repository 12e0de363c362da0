"""Pure-PyTorch reference of the grouped language-specific LoRA op.

Written for clarity, not speed: a Python loop over languages. It is the truth every other
backend is tested against, the fallback when no compiled backend is available, and the
"reference" provider of the benchmarks.

Notation (shared by every backend):
    x:            (T, k)   input rows
    base_out:     (T, d)   output of the frozen base layer for those rows
    lora_a:       (R, k)   A factors of all languages stacked along the rank, R = sum_l r_l
    lora_b:       (d, R)   B factors, language l owns columns rank_offsets[l]:rank_offsets[l+1]
    prune_mask:   (d, R)   bool, True = entry of B kept, False = pruned
    scales:       (L,)     float32, scale s_l of each language
    rank_offsets: (L + 1,) int64, cumulative ranks
    routing:      sorted_token_idx (T,), lang_offsets (L + 1,)  (see routing.py)
    max_rank:     int, max_l r_l: width of the saved intermediate h

    h_t = A_l x_t                      (r_l,)  kept in fp32 (fp64 for fp64 inputs)
    y_t = base_out_t + s_l (B_l * M_l) h_t
    d s_l = sum_{t in l} <dy_t, (B_l * M_l) h_t>

The argument lists are the contract of ``spec.py`` (FORWARD, BACKWARD, ADD).
"""

from __future__ import annotations

import torch

from .spec import accum_dtype, mixed_factors

__all__ = ["accum_dtype", "lora_add_reference", "lora_backward_reference", "lora_forward_reference"]


def _segments(rank_offsets: torch.Tensor, lang_offsets: torch.Tensor):
    # The reference may synchronise: it is the slow, obvious path.
    ro = rank_offsets.tolist()
    lo = lang_offsets.tolist()
    for lang_id in range(len(ro) - 1):
        yield lang_id, ro[lang_id], ro[lang_id + 1], lo[lang_id], lo[lang_id + 1]


def _as_read(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The factor as the kernels use it: float32 factors with 16-bit x (``spec.mixed_factors``)
    are rounded to x's dtype, as casting them before the call would."""
    return factor.to(x.dtype) if mixed_factors(x.dtype, factor.dtype) else factor


def lora_forward_reference(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    prune_mask: torch.Tensor,
    scales: torch.Tensor,
    rank_offsets: torch.Tensor,
    sorted_token_idx: torch.Tensor,
    lang_offsets: torch.Tensor,
    max_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the grouped op.

    Returns:
        y: (T, d), dtype of x: ``base_out`` plus each token's language LoRA term.
        h: (T, max_rank), fp32 (fp64 for fp64 x): ``A_l x_t`` in the first ``r_l`` columns,
            zero elsewhere and for tokens with id -1. Saved for the backward (dB).
    """
    acc = accum_dtype(x.dtype)
    y = base_out.to(acc).clone()
    h = x.new_zeros((x.shape[0], max_rank), dtype=acc)
    for lang_id, r0, r1, t0, t1 in _segments(rank_offsets, lang_offsets):
        if t1 == t0:
            continue  # a language absent from the batch costs nothing
        tokens = sorted_token_idx[t0:t1]
        a = _as_read(lora_a[r0:r1], x).to(acc)  # (r, k)
        b = (_as_read(lora_b[:, r0:r1], x) * prune_mask[:, r0:r1]).to(acc)  # (d, r)
        h_l = x[tokens].to(acc) @ a.t()  # (n, r)
        h[tokens, : r1 - r0] = h_l
        y[tokens] += scales[lang_id].to(acc) * (h_l @ b.t())
    return y.to(x.dtype), h


def lora_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    prune_mask: torch.Tensor,
    scales: torch.Tensor,
    rank_offsets: torch.Tensor,
    sorted_token_idx: torch.Tensor,
    lang_offsets: torch.Tensor,
    max_rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the LoRA term of the grouped op.

    Args:
        grad_out: (T, d) gradient of y.
        h: (T, max_rank) the intermediate saved by the forward.

    Returns:
        grad_x: (T, k) LoRA part of dL/dx (the base layer's part comes from its own autograd).
        grad_a: (R, k) dL/dA.
        grad_b: (d, R) dL/dB, zero where ``prune_mask`` is False.
        grad_scales: (L,) dtype of scales, dL/ds_l = sum_{t in l} <dy_t, (B_l * M_l) h_t>.
    """
    acc = accum_dtype(x.dtype)
    grad_scales = torch.zeros(scales.shape, dtype=acc, device=x.device)
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
    grad_a = torch.zeros(lora_a.shape, dtype=acc, device=x.device)
    grad_b = torch.zeros(lora_b.shape, dtype=acc, device=x.device)
    for lang_id, r0, r1, t0, t1 in _segments(rank_offsets, lang_offsets):
        if t1 == t0:
            continue
        tokens = sorted_token_idx[t0:t1]
        s = scales[lang_id].to(acc)
        a = _as_read(lora_a[r0:r1], x).to(acc)
        m = prune_mask[:, r0:r1].to(acc)
        b = _as_read(lora_b[:, r0:r1], x).to(acc) * m
        dy = grad_out[tokens].to(acc)  # (n, d)
        h_l = h[tokens, : r1 - r0].to(acc)  # (n, r)
        u = dy @ b  # (n, r): (B_l * M_l)^T dy_t
        g = s * u  # gradient of h
        grad_x[tokens] = g @ a
        grad_a[r0:r1] = g.t() @ x[tokens].to(acc)
        grad_b[:, r0:r1] = s * (dy.t() @ h_l) * m
        grad_scales[lang_id] = (u * h_l).sum()
    return grad_x.to(x.dtype), grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), grad_scales.to(scales.dtype)


def lora_add_reference(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    prune_mask: torch.Tensor,
    scales: torch.Tensor,
    rank_offsets: torch.Tensor,
    sorted_token_idx: torch.Tensor,
    lang_offsets: torch.Tensor,
    max_rank: int,
) -> None:
    """Inference: ``out_t += s_l (B_l * M_l) A_l x_t`` in place (no h kept).

    Args:
        out: (T, d) dtype of x, the base output; any row stride, unit column stride.
        Other arguments as :func:`lora_forward_reference`.
    """
    acc = accum_dtype(x.dtype)
    for lang_id, r0, r1, t0, t1 in _segments(rank_offsets, lang_offsets):
        if t1 == t0:
            continue
        tokens = sorted_token_idx[t0:t1]
        a = _as_read(lora_a[r0:r1], x).to(acc)
        b = (_as_read(lora_b[:, r0:r1], x) * prune_mask[:, r0:r1]).to(acc)
        delta = scales[lang_id].to(acc) * ((x[tokens].to(acc) @ a.t()) @ b.t())
        out[tokens] = (out[tokens].to(acc) + delta).to(out.dtype)
