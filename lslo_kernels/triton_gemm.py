"""The frozen base Linear and the LoRA term in one Triton GEMM (dense concatenated-rank form).

With the ranks of all languages concatenated (R = sum_l r_l, small against the layer's width), the
grouped op with its base layer is one GEMM with R extra K-steps::

    y = x W^T + bias + H (B * M)^T          H = (x A^T) * onehot(lang, rank) * s_lang     (T, R)
      = [x | H] @ [W | B * M]^T

``onehot(lang, rank)[t, c]`` is 1 where rank column c belongs to token t's language (0 for id -1
tokens), so each row only meets its own language's factors. :func:`_gemm_kernel` runs the K loop
over in_features for (x, W), then over R for (H, B * M), and writes y once: the LoRA term never
makes a separate pass over y. Its backward puts grad_x's LoRA part into the dgrad GEMM the same way::

    U = (dy (B * M)) * onehot            (T, R), the same kernel with the mask in its epilogue
    grad_x = [dy | U * s_lang] @ [W^T | A^T]^T
    grad_A = (U * s)^T x,  grad_B = (dy^T (H_m * s)) * M,  d s_l = sum_{t in l} <U_t, H_m,t>

where ``H_m`` is the masked, unscaled shrink output saved by the forward. The shrink (x A^T) is the
same kernel without its second operand pair, the language mask applied in its epilogue. The small
weight gradients are torch matmuls on (T, R) tensors.

Cost: the dense form multiplies every row with all R rank columns, L times the FLOPs of the grouped
gather; it pays where R stays small against in/out features (lang12 2;2;8: R = 48 against d = 1024).

Switch: :func:`enabled` reads ``LSLO_TRITON_GEMM`` (``1`` forces the fused GEMM on, ``0`` off);
unset, it follows :data:`MEASURED_RULE`, which stays ``False`` (off) until a GPU has measured the
fused GEMM against the base GEMM plus the separate LoRA kernels (``benchmarks/bench_triton_gpu.py``
and ``scripts/gpu_check.sh``). ``triton_backend.register`` reads it once, when it registers the
backend: the backend's ``linear`` / ``linear_decode`` entries are this module's functions only
when it is on.

Precision: products accumulate in fp32 (``input_precision="ieee"`` for fp32: no TF32). For 16-bit
x the fp32 intermediates H and U are rounded to x's dtype before they enter a dot, as the grouped
kernels do; float32 factors with 16-bit x (``spec.mixed_factors``) are rounded to x's dtype as
read, and their gradients are float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .spec import mixed_factors

__all__ = ["INTERPRETED", "LAUNCH_COUNTS", "MEASURED_RULE", "enabled", "linear_decode_triton",
           "linear_lora_triton"]

# Triton decides compiled vs interpreted when the @triton.jit decorator runs (module import).
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
# How the kernel was built; the tile sizes follow it. ``bench_triton_gpu.py --aot`` sets INTERPRETED
# on a GPU build afterwards so that its CPU tensors pass the device check, and keeps the GPU tiles.
_BUILT_INTERPRETED: bool = INTERPRETED
# Launches of _gemm_kernel per role; tests read it to prove the fused path ran.
LAUNCH_COUNTS: dict[str, int] = {}
# The default when LSLO_TRITON_GEMM is unset: off until a GPU measurement says where it wins.
MEASURED_RULE: bool = False

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def enabled() -> bool:
    """Whether the fused base+LoRA GEMM is on: ``LSLO_TRITON_GEMM=1`` on, ``=0`` off, unset or empty
    :data:`MEASURED_RULE`.

    Raises:
        ValueError: ``LSLO_TRITON_GEMM`` is set to anything else.
    """
    value = os.environ.get("LSLO_TRITON_GEMM", "").strip()
    if value == "":
        return MEASURED_RULE
    if value not in ("0", "1"):
        raise ValueError(f"LSLO_TRITON_GEMM must be 0 or 1, got {value!r}")
    return value == "1"


@triton.jit
def _dot(a, b, acc, BF16_AS_FP32: tl.constexpr):
    if BF16_AS_FP32:
        # The interpreter multiplies bf16 operands as raw bit patterns (triton-lang/triton#11584);
        # fp32 holds every bf16 exactly, so the products are the GPU's.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _k_loop(acc, a_ptr, b_ptr, rm, rn, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
            BF16_AS_FP32: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[rm, :K] @ B[rn, :K]^T, A and B addressed by their strides."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = _dot(a, b, acc, BF16_AS_FP32)
    return acc


@triton.jit(do_not_specialize=["K2"])
def _gemm_kernel(
    a1_ptr, b1_ptr,  # (M, K1) and (N, K1) by strides: the base pair (x, W) or (dy, W^T)
    a2_ptr, b2_ptr,  # (M, K2) and (N, K2): the rank pair (H, B * M) or (U * s, A^T); read when HAS_SECOND
    bias_ptr,  # (N,), read when HAS_BIAS
    row_lang_ptr, col_lang_ptr,  # (M,) / (N,) int64 languages, read when LANG_MASK (-1 rows: no column)
    out_ptr,  # (M, N), written once, in its own dtype
    M, N, K1, K2,
    stride_a1m, stride_a1k, stride_b1n, stride_b1k,
    stride_a2m, stride_a2k, stride_b2n, stride_b2k,
    stride_om, stride_on,
    HAS_SECOND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LANG_MASK: tl.constexpr,
    BF16_AS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = a1 @ b1^T (+ a2 @ b2^T) (+ bias), zeroed where row and column languages differ."""
    pid = tl.program_id(0)
    # Grouped tile order: GROUP_M row blocks share each column block while it is in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _k_loop(acc, a1_ptr, b1_ptr, rm, rn, M, N, K1, stride_a1m, stride_a1k, stride_b1n, stride_b1k,
                  BF16_AS_FP32, BLOCK_K)
    if HAS_SECOND:
        acc = _k_loop(acc, a2_ptr, b2_ptr, rm, rn, M, N, K2, stride_a2m, stride_a2k, stride_b2n, stride_b2k,
                      BF16_AS_FP32, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += bias[None, :]
    if LANG_MASK:
        row_lang = tl.load(row_lang_ptr + rm, mask=rm < M, other=-1)
        col_lang = tl.load(col_lang_ptr + rn, mask=rn < N, other=-2)
        acc = tl.where((row_lang[:, None] == col_lang[None, :]) & (row_lang[:, None] >= 0), acc, 0.0)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Not tuned yet: a common Hopper GEMM tile;
    16 (the smallest tl.dot operand) under the interpreter, where every block is Python work."""
    if _BUILT_INTERPRETED:
        return 16, 16, 16, 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 8, 3
    return 128, 128, 64, 8, 3


def _gemm(role: str, a1, b1_strides, b1, out, a2=None, b2=None, b2_strides=(0, 0), bias=None,
          row_lang=None, col_lang=None) -> torch.Tensor:
    """Launch :func:`_gemm_kernel`: out (M, N) = a1 @ b1^T (+ a2 @ b2^T) (+ bias), language-masked.

    ``b1_strides`` / ``b2_strides``: (stride along N, stride along K) of the right operands, so a
    transposed weight is read in place."""
    M, K1 = a1.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return out
    block_m, block_n, block_k, warps, stages = _blocks(a1.dtype)
    second = a2 is not None and a2.shape[1] > 0
    lang_mask = row_lang is not None
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _gemm_kernel[grid](
        a1, b1, a2 if second else a1, b2 if second else b1, bias if bias is not None else out,
        row_lang if lang_mask else out, col_lang if lang_mask else out, out,
        M, N, K1, a2.shape[1] if second else 0,
        a1.stride(0), a1.stride(1), b1_strides[0], b1_strides[1],
        a2.stride(0) if second else 0, a2.stride(1) if second else 0, b2_strides[0], b2_strides[1],
        out.stride(0), out.stride(1),
        HAS_SECOND=second, HAS_BIAS=bias is not None, LANG_MASK=lang_mask,
        BF16_AS_FP32=_BUILT_INTERPRETED and a1.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    LAUNCH_COUNTS[role] = LAUNCH_COUNTS.get(role, 0) + 1
    return out


def _languages(rank_offsets: torch.Tensor, sorted_token_idx: torch.Tensor, lang_offsets: torch.Tensor,
               total_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_lang (T,), col_lang (R,)) int64: each token's language (-1: no adapter) and each rank
    column's, from the routing's offsets on the device (no host read)."""
    num_tokens = sorted_token_idx.shape[0]
    positions = torch.arange(num_tokens, device=sorted_token_idx.device)
    # lang_offsets[l] is where language l starts; positions before lang_offsets[0] are id -1 tokens.
    sorted_lang = torch.searchsorted(lang_offsets, positions, right=True) - 1
    row_lang = torch.empty_like(sorted_lang).scatter_(0, sorted_token_idx, sorted_lang)
    columns = torch.arange(total_rank, device=rank_offsets.device)
    col_lang = torch.searchsorted(rank_offsets, columns, right=True) - 1
    return row_lang, col_lang


def _row_scales(scales: torch.Tensor, row_lang: torch.Tensor) -> torch.Tensor:
    """(T, 1) fp32: s of each token's language, 0 for id -1 tokens."""
    padded = torch.cat([scales.new_zeros(1), scales]).float()
    return padded[row_lang + 1].unsqueeze(1)


def _check(name: str, x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
           lang_offsets) -> None:
    """Metadata-only checks (no host sync) of the op's arguments against x and the routing."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: the fused triton GEMM supports {_SUPPORTED_DTYPES}, x has dtype {x.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"{name}: x must be (T, k), weight (d, k), lora_a (R, k), lora_b (d, R); got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    d, k = weight.shape
    if x.shape[1] != k or lora_a.shape[1] != k or lora_b.shape != (d, lora_a.shape[0]):
        raise ValueError(f"{name}: weight {tuple(weight.shape)}, lora_a {tuple(lora_a.shape)}, lora_b "
                         f"{tuple(lora_b.shape)} do not match x {tuple(x.shape)}")
    if weight.dtype != x.dtype or (bias is not None and (bias.dtype != x.dtype or bias.shape != (d,))):
        raise TypeError(f"{name}: weight {weight.dtype} and bias must have x's dtype {x.dtype} (bias shape ({d},))")
    if lora_b.dtype != lora_a.dtype or not (lora_a.dtype == x.dtype or mixed_factors(x.dtype, lora_a.dtype)):
        raise TypeError(f"{name}: lora_a {lora_a.dtype} / lora_b {lora_b.dtype} must have x's dtype {x.dtype} "
                        "(or both be float32 with float16/bfloat16 x)")
    if prune_mask.shape != lora_b.shape or prune_mask.dtype != torch.bool:
        raise ValueError(f"{name}: prune_mask must be bool of shape {tuple(lora_b.shape)}, "
                         f"got {prune_mask.dtype} {tuple(prune_mask.shape)}")
    num_langs = scales.shape[0]
    if scales.dim() != 1 or scales.dtype != torch.float32:
        raise TypeError(f"{name}: scales must be (L,) float32, got {scales.dtype} {tuple(scales.shape)}")
    for arg, t, n in (("rank_offsets", rank_offsets, num_langs + 1), ("lang_offsets", lang_offsets, num_langs + 1),
                      ("sorted_token_idx", sorted_token_idx, x.shape[0])):
        if t.dtype != torch.int64 or t.shape != (n,):
            raise ValueError(f"{name}: {arg} must be ({n},) int64, got {t.dtype} {tuple(t.shape)}")
    for arg, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b),
                   ("prune_mask", prune_mask), ("scales", scales), ("rank_offsets", rank_offsets),
                   ("sorted_token_idx", sorted_token_idx), ("lang_offsets", lang_offsets)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, x on {x.device}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{name}: tensors are on {x.device}; triton kernels need CUDA or TRITON_INTERPRET=1")


def _forward(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets):
    """(y (T, d) dtype of x, h_m (T, R) fp32 masked unscaled shrink, row_lang, col_lang, b_eff (d, R))."""
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with unit stride
    a_read = lora_a.to(x.dtype).contiguous()
    b_eff = (lora_b.to(x.dtype) * prune_mask).contiguous()  # B * M as the kernels read it
    total_rank = lora_a.shape[0]
    row_lang, col_lang = _languages(rank_offsets, sorted_token_idx, lang_offsets, total_rank)
    # h_m = (x A^T) * onehot: the shrink, masked in its epilogue.
    h_m = torch.empty((x.shape[0], total_rank), dtype=torch.float32, device=x.device)
    if x.shape[1] == 0:
        h_m.zero_()
    else:
        _gemm("shrink", x, (a_read.stride(0), a_read.stride(1)), a_read, h_m, row_lang=row_lang, col_lang=col_lang)
    h_scaled = (h_m * _row_scales(scales, row_lang)).to(x.dtype)
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    # y = [x | H] @ [W | B * M]^T + bias: W's row n, feature f at weight[n, f].
    _gemm("forward", x, (weight.stride(0), weight.stride(1)), weight, y, a2=h_scaled, b2=b_eff,
          b2_strides=(b_eff.stride(0), b_eff.stride(1)), bias=bias)
    return y, h_m, row_lang, col_lang, b_eff


class _FusedLinearLoRA(torch.autograd.Function):
    """y = x W^T + bias + LoRA term through :func:`_gemm_kernel`; ``apply`` takes ``spec.LINEAR``'s
    arguments and returns y (T, d)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                lang_offsets, max_rank):
        y, h_m, row_lang, col_lang, b_eff = _forward(x, weight, bias, lora_a, lora_b, prune_mask, scales,
                                                     rank_offsets, sorted_token_idx, lang_offsets)
        ctx.save_for_backward(x, weight, lora_a, prune_mask, scales, sorted_token_idx, lang_offsets, h_m,
                              row_lang, col_lang, b_eff)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return (None,) * 11
        (x, weight, lora_a, prune_mask, scales, sorted_token_idx, lang_offsets, h_m, row_lang, col_lang,
         b_eff) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dy = grad_y.contiguous()
        s_row = _row_scales(scales, row_lang)
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_scales = None
        if needs[0] or needs[3] or needs[6]:
            # U = (dy (B * M)) * onehot, fp32: B*M's rank column n, feature f at b_eff[f, n].
            u_m = torch.empty(h_m.shape, dtype=torch.float32, device=x.device)
            _gemm("dgrad_shrink", dy, (b_eff.stride(1), b_eff.stride(0)), b_eff, u_m, row_lang=row_lang,
                  col_lang=col_lang)
            g = (u_m * s_row).to(x.dtype)  # gradient of x A^T, zero outside each row's language
        if needs[0]:
            a_read = lora_a.to(x.dtype).contiguous()
            grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
            # grad_x = [dy | g] @ [W^T | A^T]^T: W^T's row f, feature n at weight[n, f]; A^T's row f,
            # rank j at lora_a[j, f].
            _gemm("dgrad", dy, (weight.stride(1), weight.stride(0)), weight, grad_x, a2=g, b2=a_read,
                  b2_strides=(a_read.stride(1), a_read.stride(0)))
        # The small gradients are GEMMs in x's dtype (fp32 accumulation inside, no fp32 copies of x
        # or dy): for float32 factors with 16-bit x the same rounding as autograd through the cast.
        if needs[1]:
            grad_w = dy.t() @ x
        if needs[2] and ctx.has_bias:
            grad_bias = dy.sum(0, dtype=torch.float32).to(weight.dtype)
        if needs[3]:
            grad_a = (g.t() @ x).to(lora_a.dtype)
        if needs[4]:
            grad_b = ((dy.t() @ (h_m * s_row).to(x.dtype)) * prune_mask).to(lora_a.dtype)
        if needs[6]:
            rowdot = (u_m * h_m).sum(dim=1)[sorted_token_idx]
            bounds = torch.cat([lang_offsets.new_zeros(1), lang_offsets])
            # segment 0 (id -1 rows, all zero) dropped; segment_reduce: no atomics, deterministic
            grad_scales = torch.segment_reduce(rowdot, "sum", offsets=bounds, axis=0)[1:].to(scales.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_scales, None, None, None, None


def linear_lora_triton(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                       lang_offsets, max_rank):
    """The base Linear plus the grouped LoRA term as one fused GEMM, with its autograd (``spec.LINEAR``).

    Args:
        x: (T, k) fp32/fp16/bf16 rows. weight: (d, k) and bias: (d,) or None, dtype of x.
        lora_a: (R, k), lora_b: (d, R): dtype of x, or float32 with 16-bit x (``spec.mixed_factors``).
        prune_mask: (d, R) bool. scales: (L,) float32. rank_offsets: (L + 1,) int64.
        sorted_token_idx: (T,) int64, lang_offsets: (L + 1,) int64 (``routing.py``).
        max_rank: max_l r_l (unused by the dense form; part of the contract).

    Returns:
        y: (T, d) dtype of x, ``x W^T + bias + s_l (B_l * M_l) A_l x_t`` per row (base only for id -1 rows);
        differentiable in x, weight, bias, lora_a, lora_b and scales.
    """
    _check("linear_lora_triton", x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets,
           sorted_token_idx, lang_offsets)
    return _FusedLinearLoRA.apply(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets,
                                  sorted_token_idx, lang_offsets, max_rank)


def linear_decode_triton(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                         lang_offsets, max_rank, staged):
    """No-grad ``spec.LINEAR_DECODE``: y = x W^T + bias + LoRA term, the expand inside the base GEMM.

    Args:
        As :func:`linear_lora_triton`; ``staged`` must be None (this backend stages nothing).

    Returns:
        y: (T, d) dtype of x (no h, no autograd).
    """
    _check("linear_decode_triton", x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets,
           sorted_token_idx, lang_offsets)
    if staged is not None:
        raise ValueError("linear_decode_triton: staged factors are not used by the fused GEMM; pass None")
    with torch.no_grad():
        return _forward(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                        lang_offsets)[0]
