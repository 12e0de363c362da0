"""The grouped language-specific LoRA op: custom op registration, autograd and the public entries.

Layers: backend kernels (reference.py, csrc/ via cpp_backend.py, triton_kernels.py) -> custom ops
``lslo::grouped_lora_fwd`` / ``lslo::grouped_lora_bwd`` (schemas and fake implementations from
``spec.py``, so ``torch.compile(fullgraph=True)`` traces through them) -> autograd registered on
the forward op -> :func:`grouped_lora` / :func:`grouped_lora_`, which validate their inputs where
they enter.

Eager calls do not always go through the custom op: a Python custom op costs ~25-30 us per call
(measured on the project's 2-core EPYC, 32->32 at T=1: 44 us through it, 12 us for the C++ op
alone), which dominated small layers. So, outside ``torch.compile``:

* nothing needs a gradient (``no_grad``, ``inference_mode``, frozen adapters): the backend's kernel
  is called directly (``add_`` in place into the base output where the backend has one);
* training on a backend with compiled autograd (``cpp``: ``torch.ops.lslo_cpp.lora``, whose
  backward node is C++): that op is called directly;
* otherwise (``triton``, ``reference``) a plain ``torch.autograd.Function`` around the backend's
  forward and backward (:class:`_EagerLoRA`). The custom op's eager dispatch is far dearer than
  its kernels on a GPU: on an H100 (issue 12, torch 2.11) its Python wrappers took ~0.5 ms of host
  time per call each way (argument defaults, aliasing checks, autograd wrapper, zero-filled
  gradients for the non-differentiable h), 1.85 ms per fwd+bwd of a 1024->1024 layer whose
  kernels take 0.16 ms.

Under ``torch.compile`` the custom op is always used: it is what the compiler traces.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import get_backend, resolve_backend
from .routing import Routing
from .spec import BACKWARD, FORWARD, fake_backward, fake_forward, mixed_factors

__all__ = ["grouped_lora", "grouped_lora_", "lora_add_call", "lora_call", "validate_factors"]

_BACKEND_ARG = (("str", "backend"),)
_FWD_INDEX = {name: i for i, name in enumerate(FORWARD.inputs)}
_SCALES = _FWD_INDEX["scales"]


def _forward_impl(*args):
    *inputs, backend = args
    return get_backend(backend).forward(*inputs)


def _backward_impl(*args):
    *inputs, backend = args
    return get_backend(backend).backward(*inputs)


_grouped_lora_fwd = torch.library.custom_op(
    "lslo::grouped_lora_fwd", _forward_impl, mutates_args=(),
    schema=FORWARD.schema(_BACKEND_ARG, with_name=False),
)
_grouped_lora_fwd.register_fake(lambda *args: fake_forward(*args[:-1]))

_grouped_lora_bwd = torch.library.custom_op(
    "lslo::grouped_lora_bwd", _backward_impl, mutates_args=(),
    schema=BACKWARD.schema(_BACKEND_ARG, with_name=False),
)
_grouped_lora_bwd.register_fake(lambda *args: fake_backward(*args[:-1]))


def _setup_context(ctx, inputs, output):
    (x, _base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets, max_rank,
     backend) = inputs
    _y, h = output
    # h is an output only so that backward can reuse it: without this, autograd materialises a zero
    # (T, max_rank) gradient for it on every backward (seen in the GPU profiles of issue 12).
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets)
    ctx.max_rank = max_rank
    ctx.backend = backend


def _input_grads(ctx, grad_y, backward_op):
    """The gradients of FORWARD's inputs plus the backend name, from the saved tensors; shared by
    the custom op's autograd (``backward_op`` = the backward custom op) and :class:`_EagerLoRA`
    (the backend's backward called directly)."""
    x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_x, needs_base, needs_a, needs_b = needs[0], needs[1], needs[2], needs[3]
    needs_scales = needs[_SCALES]
    grad_x = grad_a = grad_b = grad_scales = None
    if needs_x or needs_a or needs_b or needs_scales:
        grad_x, grad_a, grad_b, grad_scales = backward_op(
            grad_y.contiguous(), x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
            lang_offsets, ctx.max_rank, ctx.backend,
        )
    grads = [None] * (len(FORWARD.inputs) + 1)
    grads[0] = grad_x if needs_x else None
    grads[1] = grad_y if needs_base else None  # y = base_out + LoRA term: identity for base_out
    grads[2] = grad_a if needs_a else None
    grads[3] = grad_b if needs_b else None
    grads[_SCALES] = grad_scales if needs_scales else None
    return tuple(grads)


def _backward(ctx, grad_y, _grad_h):
    return _input_grads(ctx, grad_y, _grouped_lora_bwd)


_grouped_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoRA(torch.autograd.Function):
    """Eager autograd of the op for backends without compiled autograd: the backend's forward and
    backward called directly, the same saved tensors and gradients as the custom op's autograd
    (``_setup_context`` / ``_input_grads``), none of its dispatch cost (module docstring).
    ``apply`` takes ``spec.FORWARD``'s arguments plus the backend name and returns y (T, d)."""

    @staticmethod
    def forward(ctx, *args):
        *inputs, backend = args
        y, h = get_backend(backend).forward(*inputs)
        (x, _base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets,
         max_rank) = inputs
        ctx.save_for_backward(x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                              lang_offsets)
        ctx.max_rank = max_rank
        ctx.backend = backend
        # A gradient that never arrives (y unused by the loss) stays None: no zero (T, d) filled.
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return (None,) * (len(FORWARD.inputs) + 1)
        return _input_grads(ctx, grad_y, _backward_impl)  # the backend's backward, no dispatch


# ----------------------------------------------------------------------------- dispatch
def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def lora_call(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets,
              max_rank, backend):
    """y = base_out + LoRA term on a resolved ``backend``: no validation, inputs contiguous.

    The cheapest differentiable path for the situation (see the module docstring); the layers
    call it after checking their own inputs. Arguments: ``spec.FORWARD`` plus the backend name.

    Returns:
        y: (T, d) dtype of x.
    """
    if torch.compiler.is_compiling():
        return _grouped_lora_fwd(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                                 lang_offsets, max_rank, backend)[0]
    impl = get_backend(backend)
    if not _needs_grad(x, base_out, lora_a, lora_b, scales):
        return impl.forward(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                            lang_offsets, max_rank)[0]
    if impl.autograd is not None:
        return impl.autograd(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                             lang_offsets, max_rank)
    return _EagerLoRA.apply(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                            lang_offsets, max_rank, backend)


def lora_add_call(out, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets,
                  max_rank, backend) -> None:
    """``out += LoRA term`` in place, no autograd, on a resolved ``backend``; no validation.

    Arguments: ``spec.ADD`` plus the backend name; ``out`` may have a row stride (a column slice
    of the base output).
    """
    impl = get_backend(backend)
    if impl.add_ is not None:
        impl.add_(out, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets,
                  max_rank)
        return
    y, _h = impl.forward(x, out.contiguous(), lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                         lang_offsets, max_rank)
    out.copy_(y)


# ------------------------------------------------------------------------- validation
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
    if prune_mask.dtype != torch.bool:
        raise TypeError(f"prune_mask must be bool (True = kept), got {prune_mask.dtype}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_a dtype {lora_a.dtype} != lora_b dtype {lora_b.dtype}")
    if rank_offsets.dim() != 1 or rank_offsets.dtype != torch.int64:
        raise TypeError(f"rank_offsets must be a 1-D int64 tensor, got {rank_offsets.dtype} {tuple(rank_offsets.shape)}")
    if scales.shape != (rank_offsets.shape[0] - 1,):
        raise ValueError(f"scales must have one entry per language ({rank_offsets.shape[0] - 1}), got {tuple(scales.shape)}")
    if scales.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"scales must be float32 (or float64), got {scales.dtype}")


def _validate(x, out, lora_a, lora_b, prune_mask, scales, rank_offsets, routing, out_name):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a lslo_kernels.Routing (build_routing), got {type(routing).__name__}")
    if x.dim() != 2 or out.dim() != 2:
        raise ValueError(f"x must be (T, k) and {out_name} (T, d); got {tuple(x.shape)} and {tuple(out.shape)}")
    validate_factors(lora_a, lora_b, prune_mask, scales, rank_offsets)
    if x.shape[1] != lora_a.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but lora_a expects in_features={lora_a.shape[1]}")
    if out.shape != (x.shape[0], lora_b.shape[0]):
        raise ValueError(f"{out_name} shape {tuple(out.shape)} != (T, d) = {(x.shape[0], lora_b.shape[0])}")
    if (x.dtype != lora_a.dtype and not mixed_factors(x.dtype, lora_a.dtype)) or out.dtype != x.dtype:
        raise TypeError(f"dtype mismatch: x {x.dtype}, {out_name} {out.dtype}, lora factors {lora_a.dtype}")
    for name, t in ((out_name, out), ("lora_a", lora_a), ("lora_b", lora_b), ("prune_mask", prune_mask),
                    ("scales", scales), ("rank_offsets", rank_offsets), ("routing", routing.sorted_token_idx)):
        if t.device != x.device:
            raise ValueError(f"device mismatch: x on {x.device}, {name} on {t.device}")
    if routing.num_tokens != x.shape[0]:
        raise ValueError(f"routing covers {routing.num_tokens} tokens but x has {x.shape[0]} rows")
    if routing.num_languages != scales.shape[0]:
        raise ValueError(f"routing was built for {routing.num_languages} languages, layer has {scales.shape[0]}")


def _check_mixed(backend: str, x: Tensor, lora_a: Tensor) -> None:
    if lora_a.dtype != x.dtype and not get_backend(backend).mixed_factors:
        raise TypeError(f"backend {backend!r} needs lora factors in x's dtype {x.dtype}, got {lora_a.dtype} "
                        "(float32 factors with 16-bit x are for backends with mixed_factors: triton, reference)")


# ------------------------------------------------------------------------- public entries
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

    ``y_t = base_out_t + s_l * (B_l * M_l) @ A_l @ x_t`` with ``l`` the token's language;
    tokens with id -1 get ``y_t = base_out_t``. Differentiable in x, base_out, lora_a, lora_b and
    scales (``d s_l = sum over tokens t of language l of <dy_t, (B_l * M_l) h_t>``).

    Args:
        x: (T, k) float32/bfloat16/float16/float64 input rows.
        base_out: (T, d) same dtype, output of the frozen base layer for x.
        lora_a: (R, k) A factors of all languages stacked (R = sum of ranks), dtype of x; or float32
            with fp16/bf16 x on a backend with ``mixed_factors`` (rounded to x's dtype as read,
            gradients in float32).
        lora_b: (d, R) B factors, columns ``rank_offsets[l]:rank_offsets[l+1]`` are language l's.
        prune_mask: (d, R) bool, True = entry of B kept, False = pruned (gets zero gradient).
        scales: (L,) float32 (float64 allowed) scale per language.
        rank_offsets: (L + 1,) int64 cumulative ranks, on x's device.
        routing: :class:`Routing` of the T tokens (see :func:`build_routing`).
        max_rank: max rank over languages (width of the intermediate saved for backward).
        backend: "auto", "reference", "cpp" or "triton".
        validate: check shapes/dtypes/devices (cheap, no host sync).

    Returns:
        y: (T, d), dtype of x.
    """
    if validate:
        _validate(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, routing, "base_out")
    backend = resolve_backend(backend, x.device, x.dtype)
    _check_mixed(backend, x, lora_a)
    return lora_call(
        x.contiguous(), base_out.contiguous(), lora_a.contiguous(), lora_b.contiguous(), prune_mask.contiguous(),
        scales, rank_offsets, routing.sorted_token_idx, routing.lang_offsets, int(max_rank), backend,
    )


def grouped_lora_(
    out: Tensor,
    x: Tensor,
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
    """Inference: add each token's LoRA term into the base output ``out`` in place.

    Same math as :func:`grouped_lora` with ``base_out = out``, without a copy of the output and
    without keeping the intermediate h. Not differentiable: call it under ``torch.no_grad()`` /
    ``inference_mode`` or with tensors that do not require grad.

    Args:
        out: (T, d) dtype of x; rows may be strided (e.g. a column slice), columns contiguous.
        Other arguments as :func:`grouped_lora` (x may be a column slice too).

    Returns:
        ``out``.
    """
    if validate:
        _validate(x, out, lora_a, lora_b, prune_mask, scales, rank_offsets, routing, "out")
        if _needs_grad(out, x, lora_a, lora_b, scales):
            raise ValueError("grouped_lora_ is for inference (no autograd): call it under torch.no_grad(), "
                             "or use grouped_lora")
    backend = resolve_backend(backend, x.device, x.dtype)
    _check_mixed(backend, x, lora_a)
    lora_add_call(out, x, lora_a.contiguous(), lora_b.contiguous(), prune_mask.contiguous(), scales, rank_offsets,
                  routing.sorted_token_idx, routing.lang_offsets, int(max_rank), backend)
    return out
