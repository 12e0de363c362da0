"""The contract of the grouped language-specific LoRA op, declared once.

Every layer of the op derives from, or is checked against, what is written here:

* the custom ops of ``ops.py`` take their schemas from :func:`OpSpec.schema` and their fake
  (meta) implementations from :func:`fake_forward` / :func:`fake_backward` / :func:`fake_add`;
* each backend's functions must take exactly the parameters of :data:`FORWARD` /
  :data:`BACKWARD` (``register_backend`` refuses a backend whose signature differs);
* the C++ schemas (``csrc/grouped_lora.cpp``) are compared with :func:`OpSpec.schema` by
  ``tests/test_contract.py``, so a drift in any copy fails a test.

Notation (every backend)::

    h_t = A_l x_t                          (r_l,)  fp32 (fp64 for fp64 inputs)
    y_t = base_out_t + s_l (B_l * M_l) h_t       l = language of token t (-1: y_t = base_out_t)
    d s_l = sum over tokens t of language l of <dy_t, (B_l * M_l) h_t>

Routing is passed as the sorted token order and the per-language offsets only: no backend reads
the raw per-token ids (they are checked once per batch where they enter, see ``routing.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "ADD",
    "ADD_STAGED",
    "BACKWARD",
    "FACTORS",
    "FORWARD",
    "LINEAR",
    "LINEAR_DECODE",
    "LINEAR_FORWARD",
    "LORA",
    "PARAMS",
    "ROUTING",
    "STAGE_FACTORS",
    "OpSpec",
    "accum_dtype",
    "check_signature",
    "fake_add",
    "fake_backward",
    "fake_forward",
    "mixed_factors",
]


@dataclass(frozen=True)
class Param:
    """One argument of the op: its schema type and what it holds (shape, dtype)."""

    name: str
    schema_type: str
    doc: str


PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("x", "Tensor", "(T, k) input rows, float32/bfloat16/float16/float64"),
    Param("base_out", "Tensor", "(T, d) dtype of x: output of the frozen base layer for x"),
    Param("weight", "Tensor", "(d, k) dtype of x: weight W of the frozen base Linear"),
    Param("bias", "Tensor?", "(d,) dtype of x, or None: bias of the frozen base Linear"),
    Param("out", "Tensor(a!)", "(T, d) dtype of x, unit column stride: base output, the LoRA term is added in place"),
    Param("grad_out", "Tensor", "(T, d) dtype of x: gradient of y"),
    Param("h", "Tensor", "(T, max_rank) fp32 (fp64 for fp64 x): A_l x_t saved by the forward, 0 past r_l"),
    Param("lora_a", "Tensor", "(R, k) dtype of x (or float32 for 16-bit x on a backend with mixed_factors): A "
          "factors of all languages stacked, R = sum of ranks"),
    Param("lora_b", "Tensor", "(d, R) dtype of lora_a: B factors, columns rank_offsets[l]:rank_offsets[l+1] are l's"),
    Param("prune_mask", "Tensor", "(d, R) bool: True = entry of B kept, False = pruned (zero, no gradient)"),
    Param("scales", "Tensor", "(L,) float32 (or float64): scale s_l of each language, differentiable"),
    Param("rank_offsets", "Tensor", "(L + 1,) int64: cumulative ranks, on x's device"),
    Param("sorted_token_idx", "Tensor", "(T,) int64: token indices grouped by language, id -1 tokens first"),
    Param("lang_offsets", "Tensor", "(L + 1,) int64: language l owns sorted positions lang_offsets[l]:[l+1]"),
    Param("max_rank", "int", "max_l r_l: width of h"),
    Param("staged", "Tensor", "the backend's decoding factors from stage_factors (s_l (B_l * M_l)^T rows, "
          "a layout of the backend's own)"),
)}

# The adapter storage of one layer and the per-batch routing, in the order every op takes them.
FACTORS = ("lora_a", "lora_b", "prune_mask", "scales", "rank_offsets")
ROUTING = ("sorted_token_idx", "lang_offsets")


@dataclass(frozen=True)
class OpSpec:
    """Inputs and outputs of one op of the contract."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    optional: tuple[str, ...] = ()  # inputs that may be None here ("Tensor?") though PARAMS says "Tensor"

    def schema(self, extra: tuple[tuple[str, str], ...] = (), *, with_name: bool = True) -> str:
        """The torch schema, e.g. ``"forward(Tensor x, ...) -> (Tensor, Tensor)"``.

        Args:
            extra: (schema type, name) pairs appended to the inputs (e.g. the Python op's backend name).
            with_name: prefix the op's name (``torch.library.custom_op`` wants the schema without it).
        """
        args = [f"{PARAMS[n].schema_type}{'?' if n in self.optional else ''} {n}" for n in self.inputs]
        args += [f"{t} {n}" for t, n in extra]
        if not self.outputs:
            ret = "()"
        elif len(self.outputs) == 1:
            ret = "Tensor"
        else:
            ret = "(" + ", ".join("Tensor" for _ in self.outputs) + ")"
        return f"{self.name if with_name else ''}({', '.join(args)}) -> {ret}"


FORWARD = OpSpec("forward", ("x", "base_out", *FACTORS, *ROUTING, "max_rank"), ("y", "h"))
BACKWARD = OpSpec("backward", ("grad_out", "x", "h", *FACTORS, *ROUTING, "max_rank"),
                  ("grad_x", "grad_a", "grad_b", "grad_scales"))
# Inference: add the LoRA term into the base output in place; no h is kept.
ADD = OpSpec("add_", ("out", "x", *FACTORS, *ROUTING, "max_rank"), ())
# Training entry with its autograd in C++ (cpp backend): y with the gradients of FORWARD's inputs.
LORA = OpSpec("lora", FORWARD.inputs, ("y",))
# The base Linear and the LoRA term in one op (cpp backend): y = x W^T + bias + LoRA term, h as FORWARD's.
# LINEAR is its training entry, autograd in C++: gradients of x, the factors and the scales, and of
# weight / bias where they require them.
LINEAR_FORWARD = OpSpec("linear_forward", ("x", "weight", "bias", *FACTORS, *ROUTING, "max_rank"), ("y", "h"))
LINEAR = OpSpec("linear_lora", LINEAR_FORWARD.inputs, ("y",))
# Decoding loops (cpp backend): the factors ADD stages on every call, staged once; ADD with them; and
# the base Linear plus the LoRA term in one no-grad call (no h), with staged factors or None.
STAGE_FACTORS = OpSpec("stage_factors", ("lora_b", "prune_mask", "scales", "rank_offsets"), ("staged",))
ADD_STAGED = OpSpec("add_staged_", (*ADD.inputs, "staged"), ())
LINEAR_DECODE = OpSpec("linear_decode", (*LINEAR_FORWARD.inputs, "staged"), ("y",), optional=("staged",))


def mixed_factors(x_dtype: torch.dtype, factor_dtype: torch.dtype) -> bool:
    """Whether factors of ``factor_dtype`` with activations of ``x_dtype`` are the mixed case:
    float32 factors (autocast's master weights) with fp16/bf16 x. A backend that declares
    ``mixed_factors`` rounds such factors to x's dtype as it reads them (the same numbers as
    casting them first) and returns their gradients in float32."""
    return factor_dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the rank-r intermediate and of accumulations: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_signature(fn: Callable, spec: OpSpec, what: str) -> None:
    """Raise TypeError unless ``fn`` takes exactly ``spec``'s inputs, in order, by those names.

    ``fn`` is a Python function or a registered op (``torch.ops.<ns>.<op>.default``, read from
    its schema).
    """
    schema = getattr(fn, "_schema", None)
    if schema is not None:
        names = tuple(a.name for a in schema.arguments)
    else:
        names = tuple(inspect.signature(fn).parameters)
    if names != spec.inputs:
        raise TypeError(f"{what} takes {names}, but the op's contract ({spec.name}) is {spec.inputs}")


# ------------------------------------------------------------------------- shape functions
def fake_forward(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets,
                 max_rank):
    """Outputs of :data:`FORWARD` without computing them: y (T, d) dtype of x, h (T, max_rank)."""
    y = torch.empty_like(base_out, memory_format=torch.contiguous_format)
    h = x.new_empty((x.shape[0], max_rank), dtype=accum_dtype(x.dtype))
    return y, h


def fake_backward(grad_out, x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                  lang_offsets, max_rank):
    """Outputs of :data:`BACKWARD`: grad_x like x, grad_a like lora_a, grad_b like lora_b, grad_scales like scales."""
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(lora_a, memory_format=torch.contiguous_format),
        torch.empty_like(lora_b, memory_format=torch.contiguous_format),
        torch.empty_like(scales, memory_format=torch.contiguous_format),
    )


def fake_add(out, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets, max_rank):
    """:data:`ADD` returns nothing (it mutates ``out``)."""
    return


def fake_lora(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets,
              max_rank):
    """Output of :data:`LORA`: y (T, d) dtype of x."""
    return torch.empty_like(base_out, memory_format=torch.contiguous_format)


def fake_linear_forward(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                        lang_offsets, max_rank):
    """Outputs of :data:`LINEAR_FORWARD`: y (T, d) dtype of x, h (T, max_rank)."""
    y = x.new_empty((x.shape[0], weight.shape[0]))
    h = x.new_empty((x.shape[0], max_rank), dtype=accum_dtype(x.dtype))
    return y, h


def fake_linear(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets,
                max_rank):
    """Output of :data:`LINEAR`: y (T, d) dtype of x."""
    return x.new_empty((x.shape[0], weight.shape[0]))


FAKES = {FORWARD.name: fake_forward, BACKWARD.name: fake_backward, ADD.name: fake_add, LORA.name: fake_lora,
         LINEAR_FORWARD.name: fake_linear_forward, LINEAR.name: fake_linear}
SPECS = {s.name: s for s in (FORWARD, BACKWARD, ADD, LORA, LINEAR_FORWARD, LINEAR, STAGE_FACTORS, ADD_STAGED,
                             LINEAR_DECODE)}
for _name, _fake in FAKES.items():
    check_signature(_fake, SPECS[_name], f"fake of {_name}")  # the shape functions follow the contract too
