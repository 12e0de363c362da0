"""The op's one contract (lslo_kernels/spec.py): every copy of the argument list is checked against it.

A backend whose functions, a C++ schema or a custom op's schema drift from the spec fails here; so do
fake implementations that disagree with the kernels' real outputs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lslo_kernels
from lslo_kernels import spec
from lslo_kernels.backends import Backend, check_backend, register_backend
from tests.utils import make_case

needs_cpp = pytest.mark.skipif("cpp" not in lslo_kernels.available_backends(), reason="lslo_kernels._C not built")


@pytest.mark.parametrize("name", lslo_kernels.available_backends())
def test_every_registered_backend_follows_the_contract(name):
    check_backend(lslo_kernels.get_backend(name))  # raises TypeError on drift


def test_a_drifting_backend_is_refused():
    def forward_with_raw_ids(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, lang, sorted_token_idx,
                             lang_offsets, max_rank):
        raise AssertionError("never called")

    ref = lslo_kernels.get_backend("reference")
    with pytest.raises(TypeError, match=r"forward takes .*'lang'.* contract \(forward\)"):
        register_backend(Backend("drifted", forward_with_raw_ids, ref.backward, lambda d: True))
    with pytest.raises(TypeError, match="backward"):
        register_backend(Backend("drifted", ref.forward, ref.forward, lambda d: True))
    with pytest.raises(TypeError, match="add_"):
        register_backend(Backend("drifted", ref.forward, ref.backward, lambda d: True, add_=ref.forward))
    assert "drifted" not in lslo_kernels.available_backends()


def test_python_custom_ops_take_their_schemas_from_the_spec():
    extra = (("str", "backend"),)
    for op, op_spec in ((torch.ops.lslo.grouped_lora_fwd, spec.FORWARD), (torch.ops.lslo.grouped_lora_bwd, spec.BACKWARD)):
        want = "lslo::" + op_spec.schema(extra).replace(op_spec.name + "(", op._qualified_op_name.split("::")[1] + "(", 1)
        assert str(op.default._schema) == want


@needs_cpp
@pytest.mark.parametrize("op_spec", list(spec.SPECS.values()), ids=lambda s: s.name)
def test_cpp_schemas_equal_the_spec(op_spec):
    assert str(getattr(torch.ops.lslo_cpp, op_spec.name).default._schema) == "lslo_cpp::" + op_spec.schema()


@needs_cpp
def test_every_cpp_op_has_a_spec():
    ops = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("lslo_cpp::")}
    assert {"forward", "stage_factors", "add_staged_", "linear_decode"} <= ops
    assert ops == set(spec.SPECS)


@needs_cpp
def test_fake_implementations_match_real_outputs():
    case = make_case(11, 6, 5, [2, 1, 4], density=0.5, spread="with_none", seed=4)
    r = case["routing"]
    fwd = (case["x"], case["base_out"], case["lora_a"], case["lora_b"], case["prune_mask"], case["scales"],
           case["rank_offsets"], r.sorted_token_idx, r.lang_offsets, case["max_rank"])
    _y, h = torch.ops.lslo_cpp.forward(*fwd)
    bwd = (case["grad_out"], case["x"], h, *fwd[2:])
    weight = torch.randn(5, 6)
    linear = {"with bias": (case["x"], weight, torch.randn(5), *fwd[2:]), "without": (case["x"], weight, None, *fwd[2:])}
    ops = torch.ops.lslo_cpp
    calls = {"forward": (ops.forward, fwd, False), "backward": (ops.backward, bwd, False), "lora": (ops.lora, fwd, True)}
    for label, args in linear.items():
        calls[f"linear_forward {label}"] = (ops.linear_forward, args, False)
        calls[f"linear_lora {label}"] = (ops.linear_lora, args, True)
    real = {name: (fn(*args),) if single else fn(*args) for name, (fn, args, single) in calls.items()}
    mode = FakeTensorMode()
    with mode:
        fakes = {}
        for name, (fn, args, single) in calls.items():
            out = fn(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
            fakes[name] = (out,) if single else out
    for name, outs in real.items():
        assert len(fakes[name]) == len(outs), name
        for fake, out in zip(fakes[name], outs):
            assert (tuple(fake.shape), fake.dtype) == (tuple(out.shape), out.dtype), name


def test_reference_and_backend_argument_names_are_the_spec_names():
    import inspect

    for fn, op_spec in ((lslo_kernels.lora_forward_reference, spec.FORWARD),
                        (lslo_kernels.lora_backward_reference, spec.BACKWARD),
                        (lslo_kernels.lora_add_reference, spec.ADD)):
        assert tuple(inspect.signature(fn).parameters) == op_spec.inputs
    # no kernel reads the raw per-token ids: they stop at the routing
    for op_spec in spec.SPECS.values():
        assert "lang" not in op_spec.inputs


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_launchers_follow_the_contract():
    # Importing the kernels module compiles nothing; the signatures are checked without a GPU.
    from lslo_kernels import triton_kernels

    spec.check_signature(triton_kernels.lora_forward_triton, spec.FORWARD, "triton forward")
    spec.check_signature(triton_kernels.lora_backward_triton, spec.BACKWARD, "triton backward")


def test_auto_follows_the_backends_declared_priorities():
    """``auto`` is ranked from each backend's ``auto_priority`` (no list of names in the registry)."""
    from lslo_kernels import backends

    fast = backends.Backend(name="test_fast", forward=lslo_kernels.lora_forward_reference,
                            backward=lslo_kernels.lora_backward_reference, supports_device=lambda d: d.type == "cpu",
                            dtypes=(torch.float64,), auto_priority=(("cpu", 99),))
    backends.register_backend(fast)
    try:
        assert lslo_kernels.resolve_backend("auto", torch.device("cpu"), torch.float64) == "test_fast"
        assert lslo_kernels.resolve_backend("auto", torch.device("cpu"), torch.float32) != "test_fast"  # its dtypes
        assert lslo_kernels.resolve_backend("auto", torch.device("meta"), torch.float64) == "reference"  # "*"
    finally:
        del backends._BACKENDS["test_fast"]
