"""Triton kernels of the grouped language-specific LoRA op, and their host launchers.

Three kernels cover forward and backward (see ``reference.py`` for the notation):

``_shrink_kernel``   out_t = s? * W_l x_t, reduction over a wide feature dim, r-wide fp32 result.
                     Forward: h = A_l x_t.  Backward: g_t = s_l (B_l * M_l)^T dy_t (the same
                     kernel with B's strides swapped in; "expand-transpose").
``_expand_kernel``   out_t = base_t? + s? * W_l h_t, r-wide input, one feature tile per program.
                     Forward: y = base + s_l (B_l * M_l) h_t, the add fused into the only write
                     of y.  Backward: grad_x_t = A_l^T g_t ("shrink-transpose", A's strides
                     swapped in, no base, no scale).
``_weight_grad_kernel``  out_l = sum_t p_t q_t^T over the tokens of language l.
                     dA_l = sum_t g_t x_t^T and dB_l^T = s_l sum_t h_t dy_t^T (* M_l^T), with the
                     output strides choosing whether the rank is the row or the column.

Grouping: tokens are read through ``sorted_token_idx`` (rows of x / dy are gathered, never
moved). The token-parallel kernels run over "tiles" of ``BLOCK_T`` consecutive positions of
the sorted order that never straddle a language: segment 0 is the id -1 tokens (no adapter),
segment s >= 1 is language s - 1. A program finds its segment itself from ``lang_offsets``
(cumsum of per-segment tile counts, a vector op over L + 1 values), so the grid is static,
``cdiv(T, BLOCK_T) + L`` tiles (an upper bound on sum_s cdiv(n_s, BLOCK_T)); programs past the
last tile return at once, and an empty language owns no tile. Nothing here reads a device
value on the host, so the launches are CUDA-graph safe.

Ranks: factors stay packed and unpadded (``rank_offsets``). Each program loads its language's
rank at run time and masks a ``BLOCK_R`` tile, ``BLOCK_R = max(16, next_pow2(max_rank))``
(16 is the smallest ``tl.dot`` operand); the padding costs registers and tensor-core cycles,
never memory traffic.

Split-K: at decoding sizes (T=160 over 30 languages: ~40 token tiles for 132 multiprocessors) a
shrink program would walk all k features alone. The shrink then splits the features over
``num_splits`` programs per tile, each writing its own fp32 partial of h (or g); the expand
kernel, which reads h anyway, sums the partials in split order (deterministic, no atomics) and
the feature-block-0 programs store the sum as the h the backward keeps.

Precision: products accumulate in fp32. fp32 inputs use ``input_precision="ieee"`` (no TF32).
For fp16/bf16 inputs the fp32 intermediates (h, g) are rounded to the input dtype right before
entering a dot, so every dot runs on 16-bit tensor cores; that is the rounding a plain 16-bit
PyTorch LoRA applies to its intermediate too.

Launch configs (``_launch_config``, one :class:`KernelConfig` per kernel role) come from shapes
only, so a launch never reads the device and CUDA graphs can capture it. Their numbers are
tuned with ``benchmarks/bench_triton_gpu.py --sweep`` on the GPU named next to each choice.

Fused paths (``FUSED``: ``None`` = auto, the default; ``LSLO_TRITON_FUSED=0/1`` at import or
:func:`fused_kernels` force them off/on). They trade GPU time for launches. On an H100 (issue 12,
torch 2.11, triton 3.6) one launch of these ~30-argument kernels costs ~40 us of host time, while
the LoRA kernels of a whole M2M-124 layer at T=160 take ~8 us of GPU time: eager calls are
host-bound, and there the fused paths win (fwd at T=160 2.6-2.7x, fwd+bwd at T=8192 1.5-1.6x
faster per call, the three M2M-124 shapes). Replayed from a CUDA graph, launches cost nothing on the host and the unfused
kernels are as fast or faster (single-launch forward 1.0-3x slower, fused backward 0.7-1.2x). So
auto takes the fused paths except while a CUDA graph is being captured. With them:

``_fused_forward_kernel``  grid (token tiles, d-blocks): each program reduces h = A_l x over all k
                     for its tile in registers, then writes y = base + s_l (B_l * M_l) h for its
                     d-block; the d-block-0 program stores h. One launch, no h round trip; every
                     d-block re-reads the tile's x and A_l rows (from L2), so it is taken only at
                     small T (``_fused_forward_fits``), the shrink + expand pair otherwise. It also
                     adds in place into the base output for ``lora_add_triton`` (``spec.ADD``).
``_fused_backward_dy_kernel``  1-D grid, dB programs (language, d-block) then shrink programs
                     (tile, split): everything that needs only dy and h, in one launch.
``_fused_backward_x_kernel``   1-D grid, dA programs (language, k-block) then grad_x programs
                     (tile, k-block), both summing u's split partials themselves; the k-block-0
                     dA programs also store d s_l = sum_t <u_t, h_t> (no torch op, no atomics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections import Counter
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .spec import mixed_factors

__all__ = [
    "FUSED",
    "FUSED_FORWARD_MAX_REREAD_BYTES",
    "INTERPRETED",
    "LAUNCH_COUNTS",
    "FusedForwardConfig",
    "KernelConfig",
    "fused_kernels",
    "lora_add_triton",
    "lora_backward_triton",
    "lora_forward_triton",
]

# Whether the kernels below were built for the CPU interpreter: triton decides that when the
# @triton.jit decorator runs, i.e. when this module is imported.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Kernel launches per kernel name; tests read it to prove the Triton path ran.
LAUNCH_COUNTS: Counter = Counter()


def _env_switch(name: str) -> bool:
    value = os.environ.get(name, "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


# The fused paths (see "Fused paths" in the module docstring): None = auto (on for eager launches,
# off while a CUDA graph is captured), True/False = forced. LSLO_TRITON_FUSED=0/1 forces them when
# this module is imported; the launchers read FUSED on every call, so ``fused_kernels()`` (or
# assigning FUSED) switches a running process.
def _fused_from_env() -> bool | None:
    """LSLO_TRITON_FUSED: unset or empty = None (auto), 0 = False, 1 = True."""
    if os.environ.get("LSLO_TRITON_FUSED", "").strip() == "":
        return None
    return _env_switch("LSLO_TRITON_FUSED")


FUSED: bool | None = _fused_from_env()


def _fused_now(x: torch.Tensor) -> bool:
    """Whether this launch takes the fused paths: :data:`FUSED` when forced, else everywhere but
    inside a CUDA graph capture (where launches cost no host time and the unfused kernels are
    faster; module docstring)."""
    if FUSED is not None:
        return FUSED
    return not _graph_capturing(x)


def _graph_capturing(x: torch.Tensor) -> bool:
    """Whether x's CUDA stream is being captured into a graph (~1 us; never on CPU tensors)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()
# The single-launch forward recomputes h = A_l x_t in every output-feature block of a tile: it is
# taken while that re-read, (d-blocks - 1) * (T + R) * k * itemsize bytes (x rows and A rows, from
# L2), stays under this bound. Measured on an H100 (issue 12, `bench_triton_gpu.py --crossover`,
# graph-replayed): the fused forward is never faster in GPU time, so the bound only matters for
# eager launches, where the launch it saves (~41 us of host time) outweighs the extra GPU time at
# every size the bound admits (at most +11 us, 1024->4096 at T=320, 29.5 MB re-read).
FUSED_FORWARD_MAX_REREAD_BYTES: int = 32 << 20


@contextlib.contextmanager
def fused_kernels(enabled: bool | None = True):
    """Within the block, the launchers take (``enabled=True``) or avoid (``False``) the fused
    paths, or choose by themselves (``None``, auto).

    Args:
        enabled: value of :data:`FUSED` inside the block; the previous value is restored after.
    """
    global FUSED
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"fused_kernels(enabled) takes True, False or None, got {enabled!r}")
    previous = FUSED
    FUSED = enabled
    try:
        yield
    finally:
        FUSED = previous

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _find_tile(lang_offsets_ptr, num_langs, pid, BLOCK_T: tl.constexpr, BLOCK_SEG: tl.constexpr):
    """Map a tile index to (segment, first sorted position, end of the segment).

    Segment 0 holds the id -1 tokens, positions [0, lang_offsets[0]); segment s >= 1 is language
    s - 1, positions [lang_offsets[s - 1], lang_offsets[s]). Returns segment > num_langs when
    ``pid`` is past the last tile.
    """
    seg = tl.arange(0, BLOCK_SEG)
    valid = seg <= num_langs
    seg_end = tl.load(lang_offsets_ptr + seg, mask=valid, other=0)
    seg_start = tl.load(lang_offsets_ptr + seg - 1, mask=valid & (seg > 0), other=0)
    seg_tiles = tl.where(valid, (seg_end - seg_start + BLOCK_T - 1) // BLOCK_T, 0)
    tiles_end = tl.cumsum(seg_tiles, 0)
    # Segments whose tiles all end at or before pid come before ours (empty ones included).
    my_seg = tl.sum((tiles_end <= pid).to(tl.int32), 0)
    is_mine = seg == my_seg
    first_tile = tl.sum(tl.where(is_mine, tiles_end - seg_tiles, 0), 0)
    start = tl.sum(tl.where(is_mine, seg_start, 0), 0)
    end = tl.sum(tl.where(is_mine, seg_end, 0), 0)
    return my_seg, start + (pid - first_tile) * BLOCK_T, end


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, BF16_AS_FP32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; a and b already in the input dtype (rounded)."""
    if BF16_AS_FP32:
        # Triton's interpreter multiplies bf16 operands as their raw uint16 bit patterns
        # (triton-lang/triton#11584, unsupported upstream); fp32 holds every bf16 exactly, so the
        # products are the same ones the GPU's bf16 dot makes.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


# Language counts, split counts and rank widths vary per call and gain nothing from Triton's
# specialisation of ints (== 1, divisible by 16): each would only add a compiled variant.
@triton.jit(do_not_specialize=["num_langs", "out_cols"])
def _shrink_kernel(
    src_ptr,  # (T, F) rows read through sorted_token_idx
    w_ptr,  # weight: rank j of language l, feature f at w_ptr + (r0 + j) * stride_wr + f * stride_wf
    keep_ptr,  # uint8 prune mask addressed like w (read only when HAS_MASK)
    scales_ptr,
    rank_offsets_ptr,
    sorted_token_idx_ptr,
    lang_offsets_ptr,
    out_ptr,  # (num_splits, T, out_cols) fp32: one partial sum per feature split
    num_langs,
    num_features,
    split_features,  # features per split, a multiple of BLOCK_F
    out_cols,
    stride_src_t,
    stride_wr,
    stride_wf,
    stride_out_split,
    stride_out_t,
    HAS_MASK: tl.constexpr,
    APPLY_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_AS_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
):
    seg, row0, row_end = _find_tile(lang_offsets_ptr, num_langs, tl.program_id(0), BLOCK_T, BLOCK_SEG)
    if seg > num_langs:
        return
    lang_id = seg - 1
    has_adapter = lang_id >= 0
    rows = row0 + tl.arange(0, BLOCK_T)
    row_ok = rows < row_end
    tokens = tl.load(sorted_token_idx_ptr + rows, mask=row_ok, other=0)
    r0 = tl.load(rank_offsets_ptr + lang_id, mask=has_adapter, other=0)
    rank = tl.load(rank_offsets_ptr + lang_id + 1, mask=has_adapter, other=0) - r0
    cols = tl.arange(0, BLOCK_R)
    col_ok = cols < rank

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    # Split-K: program (tile, s) reduces features [s * split_features, (s + 1) * split_features)
    # and writes its own partial; the consumer (_expand_kernel) sums the partials in a fixed
    # order, so the result stays deterministic (no atomics). Tokens without an adapter skip the
    # reduction and get zero rows.
    split = tl.program_id(1)
    f_begin = split * split_features
    f_end = tl.minimum(f_begin + split_features, num_features)
    f_stop = tl.where(has_adapter, f_end, f_begin)
    for f0 in range(f_begin, f_stop, BLOCK_F):
        feats = f0 + tl.arange(0, BLOCK_F)
        f_ok = feats < f_end
        src = tl.load(
            src_ptr + tokens[:, None] * stride_src_t + feats[None, :],
            mask=row_ok[:, None] & f_ok[None, :],
            other=0.0,
        )
        w_off = (r0 + cols)[None, :] * stride_wr + feats[:, None] * stride_wf  # (BLOCK_F, BLOCK_R)
        w_ok = f_ok[:, None] & col_ok[None, :]
        # fp32 factors with 16-bit activations (mixed, autocast): rounded as they are read.
        w = tl.load(w_ptr + w_off, mask=w_ok, other=0.0).to(src.dtype)
        if HAS_MASK:
            keep = tl.load(keep_ptr + w_off, mask=w_ok, other=0)
            w = tl.where(keep != 0, w, tl.zeros_like(w))
        acc = _dot(src, w, acc, INPUT_PRECISION, BF16_AS_FP32)
    if APPLY_SCALE:
        acc = acc * tl.load(scales_ptr + lang_id, mask=has_adapter, other=0.0)
    # Columns rank..out_cols are written as zeros (w was masked), as the reference's h has.
    tl.store(
        out_ptr + split * stride_out_split + tokens[:, None] * stride_out_t + cols[None, :],
        acc,
        mask=row_ok[:, None] & (cols < out_cols)[None, :],
    )


@triton.jit(do_not_specialize=["num_langs", "num_splits", "h_cols"])
def _expand_kernel(
    h_ptr,  # (num_splits, T, h_cols) fp32 partial sums, rows read through sorted_token_idx
    w_ptr,  # weight: feature f, rank j of language l at w_ptr + f * stride_wf + (r0 + j) * stride_wr
    keep_ptr,  # uint8 prune mask addressed like w (read only when HAS_MASK)
    base_ptr,  # (T, F) added to the result (read only when HAS_BASE)
    scales_ptr,
    rank_offsets_ptr,
    sorted_token_idx_ptr,
    lang_offsets_ptr,
    out_ptr,  # (T, F)
    h_out_ptr,  # (T, h_cols) fp32: the summed partials (written only when WRITE_H)
    num_langs,
    num_features,
    num_splits,
    h_cols,
    stride_h_split,
    stride_h_t,
    stride_wf,
    stride_wr,
    stride_base_t,
    stride_out_t,
    stride_h_out_t,
    HAS_MASK: tl.constexpr,
    HAS_BASE: tl.constexpr,
    APPLY_SCALE: tl.constexpr,
    WRITE_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_AS_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
):
    seg, row0, row_end = _find_tile(lang_offsets_ptr, num_langs, tl.program_id(0), BLOCK_T, BLOCK_SEG)
    if seg > num_langs:
        return
    lang_id = seg - 1
    has_adapter = lang_id >= 0
    rows = row0 + tl.arange(0, BLOCK_T)
    row_ok = rows < row_end
    tokens = tl.load(sorted_token_idx_ptr + rows, mask=row_ok, other=0)
    feats = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = feats < num_features
    io_ok = row_ok[:, None] & f_ok[None, :]
    cols = tl.arange(0, BLOCK_R)

    if WRITE_H:
        # Split-K reduction of the shrink's partials, in split order (deterministic). Rows of id -1
        # tokens and columns past r_l hold zeros in every partial, so their sum is the zero the
        # contract asks for.
        h_ok = row_ok[:, None] & (cols < h_cols)[None, :]
        h = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for s in range(num_splits):
            h += tl.load(h_ptr + s * stride_h_split + tokens[:, None] * stride_h_t + cols[None, :],
                         mask=h_ok, other=0.0)
        if tl.program_id(1) == 0:
            tl.store(h_out_ptr + tokens[:, None] * stride_h_out_t + cols[None, :], h, mask=h_ok)

    acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    if has_adapter:
        r0 = tl.load(rank_offsets_ptr + lang_id)
        rank = tl.load(rank_offsets_ptr + lang_id + 1) - r0
        col_ok = cols < rank
        w_off = feats[None, :] * stride_wf + (r0 + cols)[:, None] * stride_wr  # (BLOCK_R, BLOCK_F)
        w_ok = col_ok[:, None] & f_ok[None, :]
        # The dot runs in the activations' dtype (out's): fp32 factors (mixed) are rounded on read.
        w = tl.load(w_ptr + w_off, mask=w_ok, other=0.0).to(out_ptr.dtype.element_ty)
        if HAS_MASK:
            keep = tl.load(keep_ptr + w_off, mask=w_ok, other=0)
            w = tl.where(keep != 0, w, tl.zeros_like(w))
        if not WRITE_H:
            # h_cols bounds the read even if a caller's max_rank is below a rank (checked on the
            # host only where that costs no sync): no read past the row, never out of bounds.
            h = tl.load(
                h_ptr + tokens[:, None] * stride_h_t + cols[None, :],
                mask=row_ok[:, None] & (col_ok & (cols < h_cols))[None, :],
                other=0.0,
            )
        acc = _dot(h.to(w.dtype), w, acc, INPUT_PRECISION, BF16_AS_FP32)
        if APPLY_SCALE:
            acc = acc * tl.load(scales_ptr + lang_id)
    if HAS_BASE:
        base = tl.load(base_ptr + tokens[:, None] * stride_base_t + feats[None, :], mask=io_ok, other=0.0)
        acc = acc + base.to(tl.float32)
    tl.store(
        out_ptr + tokens[:, None] * stride_out_t + feats[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=io_ok,
    )


@triton.jit(do_not_specialize=["rank_src_cols"])
def _weight_grad_kernel(
    rank_src_ptr,  # (T, >= rank) fp32 rows: g (for dA) or h (for dB)
    feat_src_ptr,  # (T, F) rows: x (for dA) or dy (for dB)
    keep_ptr,  # uint8 prune mask addressed like out (read only when HAS_MASK)
    scales_ptr,
    rank_offsets_ptr,
    sorted_token_idx_ptr,
    lang_offsets_ptr,
    out_ptr,  # rank j of language l, feature f at out_ptr + (r0 + j) * stride_or + f * stride_of
    num_features,
    rank_src_cols,
    stride_rank_src_t,
    stride_feat_src_t,
    stride_or,
    stride_of,
    HAS_MASK: tl.constexpr,
    APPLY_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_AS_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    lang_id = tl.program_id(0)
    feats = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = feats < num_features
    t_start = tl.load(lang_offsets_ptr + lang_id)
    t_end = tl.load(lang_offsets_ptr + lang_id + 1)
    r0 = tl.load(rank_offsets_ptr + lang_id)
    rank = tl.load(rank_offsets_ptr + lang_id + 1) - r0
    cols = tl.arange(0, BLOCK_R)
    col_ok = cols < rank

    acc = tl.zeros((BLOCK_R, BLOCK_F), dtype=tl.float32)
    # An absent language runs no iteration and stores its (required) zero gradient.
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < t_end
        tokens = tl.load(sorted_token_idx_ptr + rows, mask=row_ok, other=0)
        q = tl.load(
            feat_src_ptr + tokens[:, None] * stride_feat_src_t + feats[None, :],
            mask=row_ok[:, None] & f_ok[None, :],
            other=0.0,
        )
        p = tl.load(
            rank_src_ptr + tokens[:, None] * stride_rank_src_t + cols[None, :],
            mask=row_ok[:, None] & (col_ok & (cols < rank_src_cols))[None, :],
            other=0.0,
        )
        acc = _dot(tl.trans(p.to(q.dtype)), q, acc, INPUT_PRECISION, BF16_AS_FP32)
    if APPLY_SCALE:
        acc = acc * tl.load(scales_ptr + lang_id)
    out_off = (r0 + cols)[:, None] * stride_or + feats[None, :] * stride_of
    out_ok = col_ok[:, None] & f_ok[None, :]
    if HAS_MASK:
        keep = tl.load(keep_ptr + out_off, mask=out_ok, other=0)
        acc = tl.where(keep != 0, acc, 0.0)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


# --------------------------------------------------------------------------------------------
# Fused paths (switch FUSED, default auto): one forward launch for small T, two backward launches
# --------------------------------------------------------------------------------------------
# The bodies below are the work of one program of each role, called by the fused kernels with
# the role's own program index: a launch may hold programs of two roles that do not depend on
# each other (1-D grid, the first ``num_wgrad_programs`` programs of one role, the rest of the
# other), which saves a launch (~3-5 us of GPU idle in a graph, ~80-100 us of Python launch path
# eagerly, issue 12). The bodies never return early (a nested ``return`` is not portable across
# Triton versions); they guard their work with an ``if`` instead.


@triton.jit
def _shrink_body(
    tile, split, src_ptr, w_ptr, keep_ptr, rank_offsets_ptr, sorted_token_idx_ptr, lang_offsets_ptr, out_ptr,
    num_langs, num_features, split_features, out_cols,
    stride_src_t, stride_wr, stride_wf, stride_out_split, stride_out_t,
    HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_AS_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SEG: tl.constexpr,
):
    """out[split, t, :] = (W_l * M_l?) src_t over feature split ``split``, for the tokens of one
    tile of a language. Tiles of id -1 tokens write nothing: no fused consumer reads those rows."""
    seg, row0, row_end = _find_tile(lang_offsets_ptr, num_langs, tile, BLOCK_T, BLOCK_SEG)
    if (seg >= 1) & (seg <= num_langs):
        lang_id = seg - 1
        rows = row0 + tl.arange(0, BLOCK_T)
        row_ok = rows < row_end
        tokens = tl.load(sorted_token_idx_ptr + rows, mask=row_ok, other=0)
        r0 = tl.load(rank_offsets_ptr + lang_id)
        rank = tl.load(rank_offsets_ptr + lang_id + 1) - r0
        cols = tl.arange(0, BLOCK_R)
        col_ok = (cols < rank) & (cols < out_cols)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        f_begin = split * split_features
        f_end = tl.minimum(f_begin + split_features, num_features)
        for f0 in range(f_begin, f_end, BLOCK_F):
            feats = f0 + tl.arange(0, BLOCK_F)
            f_ok = feats < f_end
            src = tl.load(src_ptr + tokens[:, None] * stride_src_t + feats[None, :],
                          mask=row_ok[:, None] & f_ok[None, :], other=0.0)
            w_off = (r0 + cols)[None, :] * stride_wr + feats[:, None] * stride_wf  # (BLOCK_F, BLOCK_R)
            w_ok = f_ok[:, None] & col_ok[None, :]
            w = tl.load(w_ptr + w_off, mask=w_ok, other=0.0).to(src.dtype)  # mixed: rounded on read
            if HAS_MASK:
                keep = tl.load(keep_ptr + w_off, mask=w_ok, other=0)
                w = tl.where(keep != 0, w, tl.zeros_like(w))
            acc = _dot(src, w, acc, INPUT_PRECISION, BF16_AS_FP32)
        tl.store(out_ptr + split * stride_out_split + tokens[:, None] * stride_out_t + cols[None, :], acc,
                 mask=row_ok[:, None] & (cols < out_cols)[None, :])


@triton.jit
def _expand_body(
    tile, fblock, partial_ptr, w_ptr, scales_ptr, rank_offsets_ptr, sorted_token_idx_ptr, lang_offsets_ptr,
    out_ptr, num_langs, num_features, rank_cols,
    stride_partial_split, stride_partial_t, stride_wf, stride_wr, stride_out_t,
    NUM_SPLITS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_AS_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SEG: tl.constexpr,
):
    """out_t[f-block] = s_l W_l sum_s partial[s, t] for the tokens of one tile (no base); rows of id
    -1 tokens get zeros. The split count is a compile-time constant: the unrolled sum keeps the
    body loop-free (nothing for the pipeliner to trip over)."""
    seg, row0, row_end = _find_tile(lang_offsets_ptr, num_langs, tile, BLOCK_T, BLOCK_SEG)
    if seg <= num_langs:
        lang_id = seg - 1
        rows = row0 + tl.arange(0, BLOCK_T)
        row_ok = rows < row_end
        tokens = tl.load(sorted_token_idx_ptr + rows, mask=row_ok, other=0)
        feats = fblock * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = feats < num_features
        acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        if lang_id >= 0:
            r0 = tl.load(rank_offsets_ptr + lang_id)
            rank = tl.load(rank_offsets_ptr + lang_id + 1) - r0
            cols = tl.arange(0, BLOCK_R)
            col_ok = (cols < rank) & (cols < rank_cols)
            w_off = feats[None, :] * stride_wf + (r0 + cols)[:, None] * stride_wr  # (BLOCK_R, BLOCK_F)
            w = tl.load(w_ptr + w_off, mask=col_ok[:, None] & f_ok[None, :], other=0.0).to(
                out_ptr.dtype.element_ty)  # mixed: rounded on read
            p_ok = row_ok[:, None] & col_ok[None, :]
            p = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for s in tl.static_range(NUM_SPLITS):  # split order: deterministic
                p += tl.load(partial_ptr + s * stride_partial_split + tokens[:, None] * stride_partial_t
                             + cols[None, :], mask=p_ok, other=0.0)
            acc = _dot(p.to(w.dtype), w, acc, INPUT_PRECISION, BF16_AS_FP32)
            acc = acc * tl.load(scales_ptr + lang_id)
        tl.store(out_ptr + tokens[:, None] * stride_out_t + feats[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & f_ok[None, :])


@triton.jit
def _weight_grad_body(
    lang_id, fblock, rank_src_ptr, feat_src_ptr, keep_ptr, scales_ptr, rank_offsets_ptr, sorted_token_idx_ptr,
    lang_offsets_ptr, out_ptr, h_ptr, grad_scales_ptr,
    num_features, rank_cols, stride_rank_split, stride_rank_t, stride_feat_t, stride_h_t, stride_or, stride_of,
    NUM_SPLITS: tl.constexpr, HAS_MASK: tl.constexpr, WITH_SCALE_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_AS_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out_l[:, f-block] = s_l sum_t p_t q_t^T (* M_l), p_t = sum_s rank_src[s, t], over the tokens
    of language l. With WITH_SCALE_GRAD the f-block-0 program also stores
    d s_l = sum_t <p_t, h_t> (p = u unscaled): the scale gradient costs one masked (T, r) read of h
    in a loop that already holds p, no launch and no torch op."""
    feats = fblock * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = feats < num_features
    t_start = tl.load(lang_offsets_ptr + lang_id)
    t_end = tl.load(lang_offsets_ptr + lang_id + 1)
    r0 = tl.load(rank_offsets_ptr + lang_id)
    rank = tl.load(rank_offsets_ptr + lang_id + 1) - r0
    cols = tl.arange(0, BLOCK_R)
    col_ok = (cols < rank) & (cols < rank_cols)
    first = fblock == 0
    # Only the f-block-0 program reads h: the others' row bound is t_start, so their h loads are
    # masked off and move no memory.
    ds_end = tl.where(first, t_end, t_start)
    acc = tl.zeros((BLOCK_R, BLOCK_F), dtype=tl.float32)
    ds = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < t_end
        tokens = tl.load(sorted_token_idx_ptr + rows, mask=row_ok, other=0)
        q = tl.load(feat_src_ptr + tokens[:, None] * stride_feat_t + feats[None, :],
                    mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        p_ok = row_ok[:, None] & col_ok[None, :]
        p = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            p += tl.load(rank_src_ptr + s * stride_rank_split + tokens[:, None] * stride_rank_t + cols[None, :],
                         mask=p_ok, other=0.0)
        if WITH_SCALE_GRAD:
            h = tl.load(h_ptr + tokens[:, None] * stride_h_t + cols[None, :],
                        mask=(rows < ds_end)[:, None] & col_ok[None, :], other=0.0)
            ds += p * h
        acc = _dot(tl.trans(p.to(q.dtype)), q, acc, INPUT_PRECISION, BF16_AS_FP32)
    acc = acc * tl.load(scales_ptr + lang_id)
    out_off = (r0 + cols)[:, None] * stride_or + feats[None, :] * stride_of
    out_ok = col_ok[:, None] & f_ok[None, :]
    if HAS_MASK:
        keep = tl.load(keep_ptr + out_off, mask=out_ok, other=0)
        acc = tl.where(keep != 0, acc, 0.0)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    if WITH_SCALE_GRAD:
        # An absent language ran no iteration: its (required) zero is stored too.
        tl.store(grad_scales_ptr + lang_id, tl.sum(tl.sum(ds, 1), 0), mask=first)


@triton.jit(do_not_specialize=["num_langs", "h_cols"])
def _fused_forward_kernel(
    x_ptr,  # (T, k) rows read through sorted_token_idx, unit column stride
    a_ptr,  # (R, k) packed A
    b_ptr,  # (d, R) packed B
    keep_ptr,  # (d, R) uint8 prune mask
    base_ptr,  # (T, d) base output (== out_ptr when IN_PLACE)
    scales_ptr,
    rank_offsets_ptr,
    sorted_token_idx_ptr,
    lang_offsets_ptr,
    out_ptr,  # (T, d)
    h_ptr,  # (T, h_cols) fp32, written only when WRITE_H
    num_langs,
    in_features,
    out_features,
    h_cols,
    stride_x_t,
    stride_a_r,
    stride_b_f,
    stride_base_t,
    stride_out_t,
    stride_h_t,
    IN_PLACE: tl.constexpr,
    WRITE_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_AS_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
):
    """y[tile, d-block] = base + s_l (B_l * M_l)[d-block] (A_l x_t): the whole LoRA term of one
    token tile and one block of output features in one program, h kept in registers. Every
    d-block program of a tile recomputes the same h (the launcher takes this kernel only while
    that re-read is small, see ``_fused_forward_fits``); the d-block-0 program stores it."""
    seg, row0, row_end = _find_tile(lang_offsets_ptr, num_langs, tl.program_id(0), BLOCK_T, BLOCK_SEG)
    done = seg > num_langs
    if IN_PLACE:
        done = done | (seg == 0)  # out already holds the base output of id -1 tokens
    if done:
        return
    lang_id = seg - 1
    has_adapter = lang_id >= 0
    rows = row0 + tl.arange(0, BLOCK_T)
    row_ok = rows < row_end
    tokens = tl.load(sorted_token_idx_ptr + rows, mask=row_ok, other=0)
    r0 = tl.load(rank_offsets_ptr + lang_id, mask=has_adapter, other=0)
    rank = tl.load(rank_offsets_ptr + lang_id + 1, mask=has_adapter, other=0) - r0
    cols = tl.arange(0, BLOCK_R)
    # h_cols bounds the rank as in _expand_kernel: y and the stored h use the same columns.
    col_ok = (cols < rank) & (cols < h_cols)

    h = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    k_stop = tl.where(has_adapter, in_features, 0)  # id -1 tiles skip the reduction: h = 0
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < in_features
        xs = tl.load(x_ptr + tokens[:, None] * stride_x_t + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        a = tl.load(a_ptr + (r0 + cols)[None, :] * stride_a_r + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0).to(xs.dtype)  # (BLOCK_K, BLOCK_R); mixed: rounded on read
        h = _dot(xs, a, h, INPUT_PRECISION, BF16_AS_FP32)
    if WRITE_H:
        # By the d-block-0 program only: the others' row bound is row0, so their mask is empty. (A
        # scalar bool and-ed into a block mask breaks the interpreter's store, hence the bound.)
        h_rows_end = tl.where(tl.program_id(1) == 0, row_end, row0)
        tl.store(h_ptr + tokens[:, None] * stride_h_t + cols[None, :], h,
                 mask=(rows < h_rows_end)[:, None] & (cols < h_cols)[None, :])

    feats = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    f_ok = feats < out_features
    io_ok = row_ok[:, None] & f_ok[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if has_adapter:
        w_off = feats[None, :] * stride_b_f + (r0 + cols)[:, None]  # (BLOCK_R, BLOCK_D), B's rank stride is 1
        w_ok = col_ok[:, None] & f_ok[None, :]
        w = tl.load(b_ptr + w_off, mask=w_ok, other=0.0).to(out_ptr.dtype.element_ty)  # mixed: rounded on read
        keep = tl.load(keep_ptr + w_off, mask=w_ok, other=0)
        w = tl.where(keep != 0, w, tl.zeros_like(w))
        acc = _dot(h.to(w.dtype), w, acc, INPUT_PRECISION, BF16_AS_FP32)
        acc = acc * tl.load(scales_ptr + lang_id)
    base = tl.load(base_ptr + tokens[:, None] * stride_base_t + feats[None, :], mask=io_ok, other=0.0)
    acc = acc + base.to(tl.float32)
    tl.store(out_ptr + tokens[:, None] * stride_out_t + feats[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=io_ok)


@triton.jit(do_not_specialize=["num_langs", "h_cols", "num_tiles", "num_wgrad_programs"])
def _fused_backward_dy_kernel(
    dy_ptr, h_ptr, b_ptr, keep_ptr, scales_ptr, rank_offsets_ptr, sorted_token_idx_ptr, lang_offsets_ptr,
    partial_ptr,  # (NUM_SPLITS, T, h_cols) fp32: u = (B_l * M_l)^T dy_t per feature split
    grad_b_ptr,  # (d, R)
    num_langs, out_features, split_features, h_cols, num_tiles, num_wgrad_programs,
    stride_dy_t, stride_h_t, stride_b_f, stride_b_r, stride_gb_f, stride_gb_r, stride_partial_split,
    stride_partial_t,
    INPUT_PRECISION: tl.constexpr, BF16_AS_FP32: tl.constexpr,
    SHRINK_BLOCK_T: tl.constexpr, SHRINK_BLOCK_F: tl.constexpr, WGRAD_BLOCK_T: tl.constexpr,
    WGRAD_BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SEG: tl.constexpr,
):
    """Backward launch 1, what needs only dy and the forward's h: programs [0, num_wgrad_programs)
    compute dB (language, d-block; the long per-language loops go first), the rest the shrink
    u = (B_l * M_l)^T dy (tile, split)."""
    pid = tl.program_id(0)
    if pid < num_wgrad_programs:
        # dB_l^T = s_l sum_t h_t dy_t^T (* M_l^T): rank j, feature f at grad_b[f, r0 + j].
        _weight_grad_body(
            pid % num_langs, pid // num_langs, h_ptr, dy_ptr, keep_ptr, scales_ptr, rank_offsets_ptr,
            sorted_token_idx_ptr, lang_offsets_ptr, grad_b_ptr, h_ptr, scales_ptr,
            out_features, h_cols, 0, stride_h_t, stride_dy_t, stride_h_t, stride_gb_r, stride_gb_f,
            NUM_SPLITS=1, HAS_MASK=True, WITH_SCALE_GRAD=False, INPUT_PRECISION=INPUT_PRECISION,
            BF16_AS_FP32=BF16_AS_FP32, BLOCK_T=WGRAD_BLOCK_T, BLOCK_F=WGRAD_BLOCK_F, BLOCK_R=BLOCK_R,
        )
    else:
        local = pid - num_wgrad_programs
        # B read transposed: rank j, feature f at lora_b[f, r0 + j].
        _shrink_body(
            local % num_tiles, local // num_tiles, dy_ptr, b_ptr, keep_ptr, rank_offsets_ptr, sorted_token_idx_ptr,
            lang_offsets_ptr, partial_ptr, num_langs, out_features, split_features, h_cols,
            stride_dy_t, stride_b_r, stride_b_f, stride_partial_split, stride_partial_t,
            HAS_MASK=True, INPUT_PRECISION=INPUT_PRECISION, BF16_AS_FP32=BF16_AS_FP32,
            BLOCK_T=SHRINK_BLOCK_T, BLOCK_F=SHRINK_BLOCK_F, BLOCK_R=BLOCK_R, BLOCK_SEG=BLOCK_SEG,
        )


@triton.jit(do_not_specialize=["num_langs", "h_cols", "num_tiles", "num_wgrad_programs"])
def _fused_backward_x_kernel(
    x_ptr, h_ptr, a_ptr, scales_ptr, rank_offsets_ptr, sorted_token_idx_ptr, lang_offsets_ptr,
    partial_ptr,  # (NUM_SPLITS, T, h_cols) fp32 from _fused_backward_dy_kernel
    grad_x_ptr, grad_a_ptr, grad_scales_ptr,
    num_langs, in_features, h_cols, num_tiles, num_wgrad_programs,
    stride_x_t, stride_h_t, stride_a_r, stride_a_f, stride_ga_r, stride_ga_f, stride_partial_split,
    stride_partial_t, stride_gx_t,
    NUM_SPLITS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BF16_AS_FP32: tl.constexpr,
    EXPAND_BLOCK_T: tl.constexpr, EXPAND_BLOCK_F: tl.constexpr, WGRAD_BLOCK_T: tl.constexpr,
    WGRAD_BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SEG: tl.constexpr,
):
    """Backward launch 2, what needs u: programs [0, num_wgrad_programs) compute dA (language,
    k-block) and, in the k-block-0 programs, d s_l; the rest grad_x = s_l A_l^T u (tile, k-block).
    Both sum the split partials of u themselves (same order, so the same u)."""
    pid = tl.program_id(0)
    if pid < num_wgrad_programs:
        # dA_l = s_l sum_t u_t x_t^T: rank j, feature f at grad_a[r0 + j, f].
        _weight_grad_body(  # keep_ptr unused (HAS_MASK=False): any pointer
            pid % num_langs, pid // num_langs, partial_ptr, x_ptr, grad_a_ptr, scales_ptr, rank_offsets_ptr,
            sorted_token_idx_ptr, lang_offsets_ptr, grad_a_ptr, h_ptr, grad_scales_ptr,
            in_features, h_cols, stride_partial_split, stride_partial_t, stride_x_t, stride_h_t, stride_ga_r,
            stride_ga_f,
            NUM_SPLITS=NUM_SPLITS, HAS_MASK=False, WITH_SCALE_GRAD=True, INPUT_PRECISION=INPUT_PRECISION,
            BF16_AS_FP32=BF16_AS_FP32, BLOCK_T=WGRAD_BLOCK_T, BLOCK_F=WGRAD_BLOCK_F, BLOCK_R=BLOCK_R,
        )
    else:
        local = pid - num_wgrad_programs
        # A read transposed: feature f, rank j at lora_a[r0 + j, f].
        _expand_body(
            local % num_tiles, local // num_tiles, partial_ptr, a_ptr, scales_ptr, rank_offsets_ptr,
            sorted_token_idx_ptr, lang_offsets_ptr, grad_x_ptr, num_langs, in_features, h_cols,
            stride_partial_split, stride_partial_t, stride_a_f, stride_a_r, stride_gx_t,
            NUM_SPLITS=NUM_SPLITS, INPUT_PRECISION=INPUT_PRECISION, BF16_AS_FP32=BF16_AS_FP32,
            BLOCK_T=EXPAND_BLOCK_T, BLOCK_F=EXPAND_BLOCK_F, BLOCK_R=BLOCK_R, BLOCK_SEG=BLOCK_SEG,
        )


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and compile options of one kernel launch.

    Attributes:
        block_t: token rows per program (shrink, expand) or per loop step (weight grad).
        block_f: features per loop step (shrink, weight grad) or per program (expand; weight grad
            programs also own ``block_f`` features each).
        num_warps, num_stages: Triton's warps per program and software-pipelining depth.
        num_splits: shrink only: programs that share one token tile's feature reduction (split-K);
            each writes a partial sum that the expand kernel adds up in a fixed order.
    """

    block_t: int
    block_f: int
    num_warps: int
    num_stages: int
    num_splits: int = 1


@dataclass(frozen=True)
class FusedForwardConfig:
    """Tile sizes of the single-launch forward (``_fused_forward_kernel``).

    Attributes:
        block_t: token rows per program (one language's tile).
        block_k: input features per step of the h = A_l x reduction.
        block_d: output features per program (the grid's second axis).
        num_warps, num_stages: as :class:`KernelConfig`.
    """

    block_t: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class _LaunchConfig:
    """Every launch of one forward/backward, derived from shapes only (no device reads)."""

    block_r: int  # rank bucket, shared by all kernels
    block_seg: int  # next_pow2(L + 1): the segment vector of _find_tile
    precision: str
    bf16_as_fp32: bool
    fwd_shrink: KernelConfig  # h = A_l x_t, reduction over in_features
    fwd_expand: KernelConfig  # y = base + s_l (B_l * M_l) h, out_features per program
    bwd_shrink: KernelConfig  # g = s_l (B_l * M_l)^T dy, reduction over out_features
    bwd_expand: KernelConfig  # grad_x = A_l^T g, in_features per program
    grad_a: KernelConfig  # dA over in_features: (L, cdiv(k, block_f)) programs
    grad_b: KernelConfig  # dB over out_features: (L, cdiv(d, block_f)) programs
    # Fused paths (FUSED): the single-launch forward; the two backward launches reuse the roles
    # above (bwd_shrink + grad_b, then bwd_expand + grad_a), with the larger warps/stages of each pair.
    fused_fwd: FusedForwardConfig


# Host-side integer helpers: triton.cdiv / next_power_of_2 are ConstexprFunctions whose host calls
# cost ~3 us each (triton 3.9 on this project's CPU machine), paid on every launch.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _num_tiles(num_tokens: int, num_langs: int, block_t: int) -> int:
    """Grid size over token tiles: cdiv(T, block_t) + L bounds sum_s cdiv(n_s, block_t)."""
    return _cdiv(num_tokens, block_t) + num_langs


def _num_splits(num_tiles: int, num_features: int, block_f: int, num_sms: int) -> int:
    """Split-K factor of a shrink: enough programs for two per multiprocessor, each split at least
    two loop steps long (shorter ones pay more in partial traffic than they gain)."""
    wanted = _cdiv(2 * num_sms, max(1, num_tiles))
    return max(1, min(wanted, num_features // (2 * block_f)))


@functools.lru_cache(maxsize=256)
def _launch_config(
    num_tokens: int, num_langs: int, in_features: int, out_features: int, max_rank: int, dtype: torch.dtype,
    num_sms: int,
) -> _LaunchConfig:
    # tl.dot needs every operand dim >= 16, so lang30's ranks (2 and 8) share the 16 bucket;
    # the masked padding costs registers and MMA cycles, never memory traffic.
    block_r = max(16, _next_pow2(max(int(max_rank), 1)))
    # Tiles never straddle a language, so a tile much larger than a language's share of the
    # batch is mostly masked rows: at decoding sizes (T=160, 30 languages: ~5 tokens each) 16
    # rows waste least, big batches want 64 rows. Wide rank buckets shrink the tile so the
    # (block_t, block_r) fp32 accumulator stays in registers.
    per_lang = max(1, num_tokens // max(1, num_langs))
    tile_t = min(64, max(16, _next_pow2(per_lang)), max(16, 2048 // block_r))
    is_fp32 = dtype == torch.float32
    wide = 2 if block_r >= 256 else 1

    def shrink(block_t: int, block_f: int, num_warps: int, num_stages: int, num_features: int) -> KernelConfig:
        tiles = _num_tiles(num_tokens, num_langs, block_t)
        return KernelConfig(block_t, block_f, num_warps, num_stages,
                            _num_splits(tiles, num_features, block_f, num_sms))

    if is_fp32 or block_r > 16:
        # fp32 dots run on FMA under "ieee" and wide rank buckets hold big accumulators: register
        # counts from compiling for sm_90 offline (ptxas -res-usage) chose these, no spills (the
        # bf16 shrink at 64 x 64 with 4 warps spilled 200 B, fp32 with a 64-wide chunk 6 KB).
        # Untuned on a GPU: the sweep below covered bf16 at lang30 ranks only.
        tile_warps = 8 if tile_t * block_r >= 1024 else 4
        shrink_f = (16 if is_fp32 else 64) // wide
        expand = KernelConfig(tile_t, 64 // wide, tile_warps, 2)
        wgrad = KernelConfig(32, 32 // wide, 8 if block_r >= 128 else 4, 3)
        # Untuned (no GPU run yet): the shrink's reduction step and the expand's feature block.
        fused_fwd = FusedForwardConfig(tile_t, shrink_f, 64 // wide, tile_warps, 2)
        return _LaunchConfig(
            block_r=block_r, block_seg=_next_pow2(num_langs + 1),
            # "ieee" keeps fp32 dots in true fp32 (TF32 off, as the reference computes); for
            # 16-bit operands the setting has no effect.
            precision="ieee" if is_fp32 else "tf32", bf16_as_fp32=INTERPRETED and dtype == torch.bfloat16,
            fwd_shrink=shrink(tile_t, shrink_f, tile_warps, 3, in_features), fwd_expand=expand,
            bwd_shrink=shrink(tile_t, shrink_f, tile_warps, 3, out_features), bwd_expand=expand,
            grad_a=wgrad, grad_b=wgrad, fused_fwd=fused_fwd,
        )
    # 16-bit inputs, ranks <= 16: the best of `bench_triton_gpu.py --sweep` on an H100 80GB HBM3
    # (triton 3.6, bf16, lang30 ranks, the three M2M-124 shapes; graph-replayed launcher times,
    # default -> chosen, T=8192 unless said):
    #   fwd shrink  (64,64,8w,3st) -> (32,128,4w,3st): 88.0 -> 84.0 us at 1024->4096, same elsewhere
    #   fwd expand  (64,64,8w) -> (64,128,8w): 87.0 -> 80.2 us at 1024->4096; T=160: 16 rows best
    #   bwd shrink  (64,64,8w,3st,s2) -> (64,64,4w,4st,s2): 146.2 -> 131.1 us at 1024->4096
    #   bwd expand  (64,64,8w) -> (32,128,4w): 144.3 -> 123.8 us at 4096->1024
    #   dA / dB     (32,32,4w,3st) -> (64,128,8w,3st): 144.2 -> 124.1 / 146.1 -> 123.4 us
    # Split-K at T=160 (~40 tiles): s2-s4 beat s1 by up to 2x (9.1 vs 19.8 us at 4096->1024).
    return _LaunchConfig(
        block_r=block_r, block_seg=_next_pow2(num_langs + 1), precision="tf32",
        bf16_as_fp32=INTERPRETED and dtype == torch.bfloat16,
        fwd_shrink=shrink(min(32, tile_t), 128, 4, 3, in_features),
        fwd_expand=KernelConfig(tile_t, 128, 8 if tile_t >= 64 else 4, 2),
        bwd_shrink=shrink(tile_t, 64, 4, 4, out_features),
        bwd_expand=KernelConfig(min(32, tile_t), 128, 4, 2),
        grad_a=KernelConfig(64, 128, 8, 3),
        grad_b=KernelConfig(64, 128, 8, 3),
        # Untuned (no GPU run yet; `bench_triton_gpu.py --sweep` has its candidates): the shrink's
        # 128-wide reduction step and the expand's 128-wide feature block. A (64, 128) fp32
        # accumulator wants 8 warps, as the expand's does, and a 64-wide step: with 128 ptxas
        # gave 255 registers and 8 B of spills for sm_90 (`bench_triton_gpu.py --aot`, triton 3.9).
        fused_fwd=FusedForwardConfig(tile_t, 128 if tile_t < 64 else 64, 128, 8 if tile_t >= 64 else 4, 3),
    )


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (132 on an H100 SXM, assumed for the interpreter)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config_for(x: torch.Tensor, num_langs: int, in_features: int, out_features: int, max_rank: int):
    return _launch_config(x.shape[0], num_langs, in_features, out_features, max_rank, x.dtype,
                          _sm_count(x.device))


def _split_features(num_features: int, cfg: KernelConfig) -> tuple[int, int]:
    """(features per split, rounded up to block_f; number of non-empty splits)."""
    per_split = _cdiv(_cdiv(num_features, cfg.num_splits), cfg.block_f) * cfg.block_f
    return per_split, _cdiv(num_features, per_split)


def _check_common(
    name: str,
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
    """Shape/dtype/device checks that read metadata only (no host synchronisation)."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: triton backend supports {_SUPPORTED_DTYPES}, x has dtype {x.dtype}")
    if x.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(
            f"{name}: x must be (T, k), lora_a (R, k), lora_b (d, R); got {tuple(x.shape)}, "
            f"{tuple(lora_a.shape)}, {tuple(lora_b.shape)}"
        )
    if lora_a.shape[1] != x.shape[1] or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"{name}: lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not match "
            f"x {tuple(x.shape)}"
        )
    if lora_b.dtype != lora_a.dtype or not (lora_a.dtype == x.dtype or mixed_factors(x.dtype, lora_a.dtype)):
        raise TypeError(f"{name}: lora_a {lora_a.dtype} / lora_b {lora_b.dtype} must have x's dtype {x.dtype} "
                        "(or both be float32 with float16/bfloat16 x)")
    if prune_mask.shape != lora_b.shape or prune_mask.dtype != torch.bool:
        raise ValueError(
            f"{name}: prune_mask must be bool of shape {tuple(lora_b.shape)}, "
            f"got {prune_mask.dtype} {tuple(prune_mask.shape)}"
        )
    num_langs = scales.shape[0]
    if scales.dim() != 1 or scales.dtype != torch.float32:
        raise TypeError(f"{name}: scales must be (L,) float32, got {scales.dtype} {tuple(scales.shape)}")
    for arg, t, n in (
        ("rank_offsets", rank_offsets, num_langs + 1),
        ("lang_offsets", lang_offsets, num_langs + 1),
        ("sorted_token_idx", sorted_token_idx, x.shape[0]),
    ):
        if t.dtype != torch.int64 or t.shape != (n,):
            raise ValueError(f"{name}: {arg} must be ({n},) int64, got {t.dtype} {tuple(t.shape)}")
    for arg, t in (
        ("lora_a", lora_a), ("lora_b", lora_b), ("prune_mask", prune_mask), ("scales", scales),
        ("rank_offsets", rank_offsets), ("sorted_token_idx", sorted_token_idx),
        ("lang_offsets", lang_offsets),
    ):
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, x on {x.device}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{name}: tensors are on {x.device}; triton kernels need CUDA or TRITON_INTERPRET=1")
    if max_rank < 0:
        raise ValueError(f"{name}: max_rank must be >= 0, got {max_rank}")
    # Ranks above max_rank would be silently cut; check only when it costs no device sync.
    if rank_offsets.device.type == "cpu" and num_langs > 0:
        widest = int((rank_offsets[1:] - rank_offsets[:-1]).max())
        if widest > max_rank:
            raise ValueError(f"{name}: a language has rank {widest} > max_rank={max_rank}")


def lora_forward_triton(
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
    """Forward of the grouped op with Triton kernels (same contract as the reference).

    Args:
        x: (T, k) fp32/fp16/bf16 input rows.
        base_out: (T, d) dtype of x, frozen base layer output.
        lora_a: (R, k) packed A factors; lora_b: (d, R) packed B factors; dtype of x.
        prune_mask: (d, R) bool. scales: (L,) float32. rank_offsets: (L + 1,) int64.
        sorted_token_idx: (T,) int64, tokens grouped by language (id -1 first);
            lang_offsets: (L + 1,) int64 (see ``routing.py``).
        max_rank: int >= every language's rank.

    Returns:
        y: (T, d) dtype of x, ``base_out`` plus each token's LoRA term.
        h: (T, max_rank) float32, ``A_l x_t`` in the first ``r_l`` columns, zero elsewhere.
    """
    _check_common("lora_forward_triton", x, lora_a, lora_b, prune_mask, scales, rank_offsets,
                  sorted_token_idx, lang_offsets, max_rank)
    if base_out.shape != (x.shape[0], lora_b.shape[0]) or base_out.dtype != x.dtype:
        raise ValueError(
            f"lora_forward_triton: base_out must be {x.dtype} {(x.shape[0], lora_b.shape[0])}, "
            f"got {base_out.dtype} {tuple(base_out.shape)}"
        )
    x, base_out, lora_a, lora_b = x.contiguous(), base_out.contiguous(), lora_a.contiguous(), lora_b.contiguous()
    keep = prune_mask.contiguous().view(torch.uint8)
    num_tokens, in_features = x.shape
    out_features = base_out.shape[1]
    num_langs = scales.shape[0]
    total_rank = lora_a.shape[0]

    if num_tokens == 0 or out_features == 0 or in_features == 0 or total_rank == 0 or max_rank == 0:
        # The LoRA term is identically zero: nothing to launch.
        return base_out.clone(), x.new_zeros((num_tokens, max_rank), dtype=torch.float32)

    cfg = _config_for(x, num_langs, in_features, out_features, max_rank)
    y = torch.empty((num_tokens, out_features), dtype=x.dtype, device=x.device)
    h = torch.empty((num_tokens, max_rank), dtype=torch.float32, device=x.device)
    if _fused_now(x) and _fused_forward_fits(cfg.fused_fwd, num_tokens, total_rank, in_features, out_features,
                                     x.element_size()):
        # One launch writes y (every row: id -1 rows copied from base_out) and h (every row).
        _launch_fused_forward(cfg, x, base_out, lora_a, lora_b, keep, scales, rank_offsets, sorted_token_idx,
                              lang_offsets, y, h, max_rank)
        return y, h
    # h_t = A_l x_t: A's rank j, feature f at lora_a[r0 + j, f]; every row of h (or of each
    # partial) is written, zeros for id -1 rows and past r_l, so it needs no zero fill.
    partial = _rank_partials(h, cfg.fwd_shrink, in_features)
    _launch_shrink(cfg, cfg.fwd_shrink, x, lora_a, (lora_a.stride(0), lora_a.stride(1)), keep, scales,
                   rank_offsets, sorted_token_idx, lang_offsets, partial, in_features, has_mask=False,
                   apply_scale=False)
    # y_t = base_t + s_l (B_l * M_l) h_t: B's feature f, rank j at lora_b[f, r0 + j]; id -1
    # rows are copied from base_out by the same pass, which also sums split-K partials into h.
    _launch_expand(cfg, cfg.fwd_expand, partial, lora_b, (lora_b.stride(0), lora_b.stride(1)), keep, base_out,
                   scales, rank_offsets, sorted_token_idx, lang_offsets, y, h, has_mask=True, apply_scale=True)
    return y, h


def _fused_forward_fits(fcfg: FusedForwardConfig, num_tokens: int, total_rank: int, in_features: int,
                        out_features: int, itemsize: int) -> bool:
    """The small-T rule of the single-launch forward: every d-block program past the first re-reads
    its tile's x rows and A_l rows, (d-blocks - 1) * (T + R) * k * itemsize bytes in all (R bounds
    the A rows when each language has one tile, as at decoding sizes); fused while that is at most
    :data:`FUSED_FORWARD_MAX_REREAD_BYTES`. bf16, lang30 (R = 144), 128-wide d-blocks, the three
    M2M-124 shapes 1024->1024 / 1024->4096 / 4096->1024: T=160 re-reads 4.4 / 19.3 / 17.4 MB (fused
    everywhere), T=512 9.4 / 41.6 / 37.6 MB (fused at 1024->1024 only), T=8192 never."""
    d_blocks = _cdiv(out_features, fcfg.block_d)
    return (d_blocks - 1) * (num_tokens + total_rank) * in_features * itemsize <= FUSED_FORWARD_MAX_REREAD_BYTES


def _launch_fused_forward(cfg, x, base, lora_a, lora_b, keep, scales, rank_offsets, sorted_token_idx,
                          lang_offsets, out, h, max_rank):
    """out = base + LoRA term in one launch; h (T, max_rank) written when given. ``base`` may be
    ``out`` (in place: then rows of id -1 tokens are not touched). x, out and base: unit column
    stride; factors contiguous."""
    fcfg = cfg.fused_fwd
    num_tokens, in_features = x.shape
    out_features = out.shape[1]
    num_langs = scales.shape[0]
    write_h = h is not None
    _fused_forward_kernel[(_num_tiles(num_tokens, num_langs, fcfg.block_t), _cdiv(out_features, fcfg.block_d))](
        x, lora_a, lora_b, keep, base, scales, rank_offsets, sorted_token_idx, lang_offsets, out,
        h if write_h else out,
        num_langs, in_features, out_features, max_rank,
        x.stride(0), lora_a.stride(0), lora_b.stride(0), base.stride(0), out.stride(0), h.stride(0) if write_h else 0,
        IN_PLACE=base is out, WRITE_H=write_h, INPUT_PRECISION=cfg.precision, BF16_AS_FP32=cfg.bf16_as_fp32,
        BLOCK_T=fcfg.block_t, BLOCK_K=fcfg.block_k, BLOCK_D=fcfg.block_d, BLOCK_R=cfg.block_r,
        BLOCK_SEG=cfg.block_seg, num_warps=fcfg.num_warps, num_stages=fcfg.num_stages,
    )
    LAUNCH_COUNTS["fused_forward"] += 1


def _rank_partials(rank_rows: torch.Tensor, shrink: KernelConfig, num_features: int) -> torch.Tensor:
    """Where a shrink writes: ``rank_rows`` (T, max_rank) itself, or (splits, T, max_rank) partials."""
    _per_split, splits = _split_features(num_features, shrink)
    if splits == 1:
        return rank_rows.unsqueeze(0)
    return rank_rows.new_empty((splits, *rank_rows.shape))


def _launch_shrink(cfg, kcfg, src, weight, weight_rank_feature_strides, keep, scales, rank_offsets,
                   sorted_token_idx, lang_offsets, partial, num_features, *, has_mask, apply_scale):
    """partial[s, t, :r_l] = s_l? * (W_l * M_l?) src_t over split s of the features."""
    num_tokens = src.shape[0]
    num_langs = scales.shape[0]
    per_split, splits = _split_features(num_features, kcfg)
    _shrink_kernel[(_num_tiles(num_tokens, num_langs, kcfg.block_t), splits)](
        src, weight, keep, scales, rank_offsets, sorted_token_idx, lang_offsets, partial,
        num_langs, num_features, per_split, partial.shape[2],
        src.stride(0), *weight_rank_feature_strides, partial.stride(0), partial.stride(1),
        HAS_MASK=has_mask, APPLY_SCALE=apply_scale, INPUT_PRECISION=cfg.precision,
        BF16_AS_FP32=cfg.bf16_as_fp32, BLOCK_T=kcfg.block_t, BLOCK_F=kcfg.block_f, BLOCK_R=cfg.block_r,
        BLOCK_SEG=cfg.block_seg, num_warps=kcfg.num_warps, num_stages=kcfg.num_stages,
    )
    LAUNCH_COUNTS["shrink"] += 1


def _launch_expand(cfg, kcfg, partial, weight, weight_feature_rank_strides, keep, base, scales, rank_offsets,
                   sorted_token_idx, lang_offsets, out, rank_rows, *, has_mask, apply_scale):
    """out_t = base_t? + s_l? * (W_l * M_l?) sum_s partial[s, t]; the sum goes to ``rank_rows``
    when there is more than one partial."""
    num_tokens, num_features = out.shape
    num_langs = scales.shape[0]
    splits = partial.shape[0]
    has_base = base is not None
    _expand_kernel[(_num_tiles(num_tokens, num_langs, kcfg.block_t), _cdiv(num_features, kcfg.block_f))](
        partial, weight, keep, base if has_base else out, scales, rank_offsets, sorted_token_idx, lang_offsets,
        out, rank_rows,
        num_langs, num_features, splits, partial.shape[2],
        partial.stride(0), partial.stride(1), *weight_feature_rank_strides,
        base.stride(0) if has_base else 0, out.stride(0), rank_rows.stride(0),
        HAS_MASK=has_mask, HAS_BASE=has_base, APPLY_SCALE=apply_scale, WRITE_H=splits > 1,
        INPUT_PRECISION=cfg.precision, BF16_AS_FP32=cfg.bf16_as_fp32,
        BLOCK_T=kcfg.block_t, BLOCK_F=kcfg.block_f, BLOCK_R=cfg.block_r, BLOCK_SEG=cfg.block_seg,
        num_warps=kcfg.num_warps, num_stages=kcfg.num_stages,
    )
    LAUNCH_COUNTS["expand"] += 1


def _launch_weight_grad(cfg, kcfg, rank_src, feat_src, keep, scales, rank_offsets, sorted_token_idx,
                        lang_offsets, out, out_rank_feature_strides, num_features, *, has_mask, apply_scale):
    """out_l[j, f] = s_l? * sum_t rank_src[t, j] feat_src[t, f] (* M?) over language l's tokens."""
    num_langs = scales.shape[0]
    _weight_grad_kernel[(num_langs, _cdiv(num_features, kcfg.block_f))](
        rank_src, feat_src, keep, scales, rank_offsets, sorted_token_idx, lang_offsets, out,
        num_features, rank_src.shape[1], rank_src.stride(0), feat_src.stride(0), *out_rank_feature_strides,
        HAS_MASK=has_mask, APPLY_SCALE=apply_scale, INPUT_PRECISION=cfg.precision,
        BF16_AS_FP32=cfg.bf16_as_fp32, BLOCK_T=kcfg.block_t, BLOCK_F=kcfg.block_f, BLOCK_R=cfg.block_r,
        num_warps=kcfg.num_warps, num_stages=kcfg.num_stages,
    )
    LAUNCH_COUNTS["weight_grad"] += 1


def lora_backward_triton(
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
    """Backward of the LoRA term with Triton kernels (same contract as the reference).

    Args:
        grad_out: (T, d) dtype of x, gradient of y.
        h: (T, max_rank) float32, saved by :func:`lora_forward_triton`.
        Other arguments as :func:`lora_forward_triton`.

    Returns:
        grad_x: (T, k) dtype of x, the LoRA part of dL/dx (zero rows for id -1 tokens).
        grad_a: (R, k) dtype of lora_a.
        grad_b: (d, R) dtype of lora_b, zero where ``prune_mask`` is False.
        grad_scales: (L,) dtype of scales, d s_l = sum over tokens of l of <dy_t, (B_l * M_l) h_t>.
    """
    _check_common("lora_backward_triton", x, lora_a, lora_b, prune_mask, scales, rank_offsets,
                  sorted_token_idx, lang_offsets, max_rank)
    if grad_out.shape != (x.shape[0], lora_b.shape[0]) or grad_out.dtype != x.dtype:
        raise ValueError(
            f"lora_backward_triton: grad_out must be {x.dtype} {(x.shape[0], lora_b.shape[0])}, "
            f"got {grad_out.dtype} {tuple(grad_out.shape)}"
        )
    if h.shape != (x.shape[0], max_rank) or h.dtype != torch.float32:
        raise ValueError(
            f"lora_backward_triton: h must be float32 {(x.shape[0], max_rank)}, got {h.dtype} {tuple(h.shape)}"
        )
    grad_out, x, h = grad_out.contiguous(), x.contiguous(), h.contiguous()
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    keep = prune_mask.contiguous().view(torch.uint8)
    num_tokens, in_features = x.shape
    out_features = grad_out.shape[1]
    num_langs = scales.shape[0]
    total_rank = lora_a.shape[0]

    if num_tokens == 0 or out_features == 0 or in_features == 0 or total_rank == 0 or max_rank == 0:
        return torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b), torch.zeros_like(scales)

    cfg = _config_for(x, num_langs, in_features, out_features, max_rank)
    if _fused_now(x):
        return _backward_fused(cfg, grad_out, x, h, lora_a, lora_b, keep, scales, rank_offsets, sorted_token_idx,
                               lang_offsets)
    # u_t = (B_l * M_l)^T dy_t, unscaled (d s_l needs it): the forward's shrink kernel with B read
    # transposed (rank j, feature f at lora_b[f, r0 + j]). The gradient of h is g_t = s_l u_t: the
    # scale is applied by the two kernels that consume it (APPLY_SCALE), never to u itself.
    grad_h = torch.empty((num_tokens, max_rank), dtype=torch.float32, device=x.device)
    partial = _rank_partials(grad_h, cfg.bwd_shrink, out_features)
    _launch_shrink(cfg, cfg.bwd_shrink, grad_out, lora_b, (lora_b.stride(1), lora_b.stride(0)), keep, scales,
                   rank_offsets, sorted_token_idx, lang_offsets, partial, out_features, has_mask=True,
                   apply_scale=False)
    # grad_x_t = s_l A_l^T u_t: the forward's expand kernel with A read transposed (feature f, rank j
    # at lora_a[r0 + j, f]); every row is written (zeros for id -1); split-K partials of u are
    # summed into grad_h on the way.
    grad_x = torch.empty_like(x)
    _launch_expand(cfg, cfg.bwd_expand, partial, lora_a, (lora_a.stride(1), lora_a.stride(0)), keep, None,
                   scales, rank_offsets, sorted_token_idx, lang_offsets, grad_x, grad_h, has_mask=False,
                   apply_scale=True)
    # Every language writes all of its rank rows/columns (zeros when absent from the batch),
    # and the languages' ranges tile [0, R), so the outputs need no zero fill.
    grad_a = torch.empty_like(lora_a)
    grad_b = torch.empty_like(lora_b)
    # dA_l = s_l sum_t u_t x_t^T: rank j, feature f at grad_a[r0 + j, f].
    _launch_weight_grad(cfg, cfg.grad_a, grad_h, x, keep, scales, rank_offsets, sorted_token_idx, lang_offsets,
                        grad_a, (grad_a.stride(0), grad_a.stride(1)), in_features, has_mask=False,
                        apply_scale=True)
    # dB_l^T = s_l sum_t h_t dy_t^T (* M_l^T): rank j, feature f at grad_b[f, r0 + j].
    _launch_weight_grad(cfg, cfg.grad_b, h, grad_out, keep, scales, rank_offsets, sorted_token_idx, lang_offsets,
                        grad_b, (grad_b.stride(1), grad_b.stride(0)), out_features, has_mask=True,
                        apply_scale=True)
    return grad_x, grad_a, grad_b, _scale_grad(grad_h, h, scales, sorted_token_idx, lang_offsets)


def _scale_grad(u: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, sorted_token_idx: torch.Tensor,
                lang_offsets: torch.Tensor) -> torch.Tensor:
    """d s_l = sum over tokens t of language l of <u_t, h_t>, from the backward's u (T, max_rank)
    and the forward's h: a row dot and per-language sums in sorted order (segment_reduce: no
    atomics, deterministic; no host sync). Rows of id -1 tokens fall in the dropped segment 0."""
    rowdot = (u * h).sum(dim=1)[sorted_token_idx]
    bounds = torch.cat([lang_offsets.new_zeros(1), lang_offsets])
    # a fresh tensor (not a view at offset 1): outputs of a custom op must not alias
    return torch.segment_reduce(rowdot, "sum", offsets=bounds, axis=0)[1:].to(scales.dtype, copy=True)


# Launch 2 unrolls one (block_t, block_r) fp32 load of u per split in the dA loop, and the
# pipeliner keeps num_stages copies of each in shared memory: 4 splits x 3 stages x 4 KB at
# 64 x 16 stays far below an H100's 228 KB, the 9 splits the decoding rule gives at T=1 might not.
# Split-K pays most at T=160 with s2-s4 (issue 12's sweep), so the cap costs little.
_FUSED_MAX_SPLITS = 4


def _backward_fused(cfg, grad_out, x, h, lora_a, lora_b, keep, scales, rank_offsets, sorted_token_idx,
                    lang_offsets):
    """The backward in two launches, the scale gradient inside the second (see the two kernels).

    Launch 1 (needs dy and h): dB programs + the shrink u = (B_l * M_l)^T dy into split partials.
    Launch 2 (needs u): dA programs (+ d s_l in their k-block-0 programs) + grad_x programs.
    Every output element is written (zeros for absent languages and id -1 rows): no zero fills.
    """
    num_tokens, in_features = x.shape
    out_features = grad_out.shape[1]
    num_langs = scales.shape[0]
    max_rank = h.shape[1]
    shrink, wgrad_b = cfg.bwd_shrink, cfg.grad_b
    if shrink.num_splits > _FUSED_MAX_SPLITS:
        shrink = dataclasses.replace(shrink, num_splits=_FUSED_MAX_SPLITS)
    per_split, splits = _split_features(out_features, shrink)
    # Rows of id -1 tokens stay unwritten: no program of launch 2 reads them.
    partial = torch.empty((splits, num_tokens, max_rank), dtype=torch.float32, device=x.device)
    grad_b = torch.empty_like(lora_b)
    shrink_tiles = _num_tiles(num_tokens, num_langs, shrink.block_t)
    db_programs = num_langs * _cdiv(out_features, wgrad_b.block_f)
    _fused_backward_dy_kernel[(db_programs + shrink_tiles * splits,)](
        grad_out, h, lora_b, keep, scales, rank_offsets, sorted_token_idx, lang_offsets, partial, grad_b,
        num_langs, out_features, per_split, max_rank, shrink_tiles, db_programs,
        grad_out.stride(0), h.stride(0), lora_b.stride(0), lora_b.stride(1), grad_b.stride(0), grad_b.stride(1),
        partial.stride(0), partial.stride(1),
        INPUT_PRECISION=cfg.precision, BF16_AS_FP32=cfg.bf16_as_fp32,
        SHRINK_BLOCK_T=shrink.block_t, SHRINK_BLOCK_F=shrink.block_f,
        WGRAD_BLOCK_T=wgrad_b.block_t, WGRAD_BLOCK_F=wgrad_b.block_f, BLOCK_R=cfg.block_r, BLOCK_SEG=cfg.block_seg,
        num_warps=max(shrink.num_warps, wgrad_b.num_warps), num_stages=max(shrink.num_stages, wgrad_b.num_stages),
    )
    LAUNCH_COUNTS["fused_bwd_dy"] += 1

    expand, wgrad_a = cfg.bwd_expand, cfg.grad_a
    grad_x = torch.empty_like(x)
    grad_a = torch.empty_like(lora_a)
    grad_scales = torch.empty_like(scales)
    expand_tiles = _num_tiles(num_tokens, num_langs, expand.block_t)
    da_programs = num_langs * _cdiv(in_features, wgrad_a.block_f)
    _fused_backward_x_kernel[(da_programs + expand_tiles * _cdiv(in_features, expand.block_f),)](
        x, h, lora_a, scales, rank_offsets, sorted_token_idx, lang_offsets, partial, grad_x, grad_a, grad_scales,
        num_langs, in_features, max_rank, expand_tiles, da_programs,
        x.stride(0), h.stride(0), lora_a.stride(0), lora_a.stride(1), grad_a.stride(0), grad_a.stride(1),
        partial.stride(0), partial.stride(1), grad_x.stride(0),
        NUM_SPLITS=splits, INPUT_PRECISION=cfg.precision, BF16_AS_FP32=cfg.bf16_as_fp32,
        EXPAND_BLOCK_T=expand.block_t, EXPAND_BLOCK_F=expand.block_f,
        WGRAD_BLOCK_T=wgrad_a.block_t, WGRAD_BLOCK_F=wgrad_a.block_f, BLOCK_R=cfg.block_r, BLOCK_SEG=cfg.block_seg,
        num_warps=max(expand.num_warps, wgrad_a.num_warps), num_stages=max(expand.num_stages, wgrad_a.num_stages),
    )
    LAUNCH_COUNTS["fused_bwd_x"] += 1
    return grad_x, grad_a, grad_b, grad_scales


def lora_add_triton(
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
    """Inference: ``out_t += s_l (B_l * M_l) A_l x_t`` in place (``spec.ADD``), no h kept.

    One launch of the single-launch forward at small T when the fused paths are taken (the rule of
    ``_fused_forward_fits``), else the shrink + expand pair with the expand adding into ``out``;
    no copy of the output either way, and rows of id -1 tokens keep their values. Only an ``out``
    without unit column stride goes through the forward into a new tensor, copied back.

    Args:
        out: (T, d) dtype of x, the base output; any row stride, unit column stride.
        x: (T, k) fp32/fp16/bf16; any row stride (a column slice), unit column stride.
        Other arguments as :func:`lora_forward_triton`.
    """
    if out.shape != (x.shape[0], lora_b.shape[0]) or out.dtype != x.dtype:
        raise ValueError(
            f"lora_add_triton: out must be {x.dtype} {(x.shape[0], lora_b.shape[0])}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    if out.device != x.device:
        raise ValueError(f"lora_add_triton: out is on {out.device}, x on {x.device}")
    if out.shape[1] > 1 and out.stride(1) != 1:
        # The forward checks the rest (once: this is every decoding step's path).
        y, _h = lora_forward_triton(x.contiguous(), out.contiguous(), lora_a, lora_b, prune_mask, scales,
                                    rank_offsets, sorted_token_idx, lang_offsets, max_rank)
        out.copy_(y)
        return
    _check_common("lora_add_triton", x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                  lang_offsets, max_rank)
    num_tokens, in_features = x.shape
    out_features = out.shape[1]
    total_rank = lora_a.shape[0]
    if num_tokens == 0 or out_features == 0 or in_features == 0 or total_rank == 0 or max_rank == 0:
        return
    if in_features > 1 and x.stride(1) != 1:
        x = x.contiguous()
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    keep = prune_mask.contiguous().view(torch.uint8)
    num_langs = scales.shape[0]
    cfg = _config_for(x, num_langs, in_features, out_features, max_rank)
    if _fused_now(x) and _fused_forward_fits(cfg.fused_fwd, num_tokens, total_rank, in_features, out_features,
                                             x.element_size()):
        _launch_fused_forward(cfg, x, out, lora_a, lora_b, keep, scales, rank_offsets, sorted_token_idx,
                              lang_offsets, out, None, max_rank)
        return
    h = torch.empty((num_tokens, max_rank), dtype=torch.float32, device=x.device)
    partial = _rank_partials(h, cfg.fwd_shrink, in_features)
    _launch_shrink(cfg, cfg.fwd_shrink, x, lora_a, (lora_a.stride(0), lora_a.stride(1)), keep, scales,
                   rank_offsets, sorted_token_idx, lang_offsets, partial, in_features, has_mask=False,
                   apply_scale=False)
    # base = out: each program reads its rows of out before it writes them, nothing else does.
    _launch_expand(cfg, cfg.fwd_expand, partial, lora_b, (lora_b.stride(0), lora_b.stride(1)), keep, out,
                   scales, rank_offsets, sorted_token_idx, lang_offsets, out, h, has_mask=True, apply_scale=True)
