"""The ``@triton.jit`` kernels of the grouped language-specific LoRA op and the per-role bodies the
fused kernels are made of; :mod:`lslo_kernels.triton_kernels` describes them and holds their launchers.

Triton builds them compiled or for its CPU interpreter when this module is imported
(``TRITON_INTERPRET``); :data:`INTERPRETED` records which, so that a launcher module reloaded in the
other mode rebuilds them too.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Whether the kernels below were built for the CPU interpreter (see the module docstring).
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
