"""The grouped op: reference vs an independent dense formulation, every backend vs the reference,
gradcheck in fp64, opcheck on the registered ops, routing metadata and input validation."""

from __future__ import annotations

import pytest
import torch

import lslo_kernels
from tests.utils import TOLERANCES, assert_close, dense_truth, make_case, run_op

RANK_SETS = {
    "one": [3],
    "two": [1, 64],
    "mixed12": [1, 2, 3, 8, 64, 2, 2, 8, 1, 3, 8, 2],
    "lang30": [2] * 16 + [8] * 14,
}
SIZES = [1, 7, 64, 123]
SPREADS = ["uniform", "single", "with_none", "sparse"]


def _cpu_backends():
    # triton registers a CPU device only under TRITON_INTERPRET=1; its own test module covers it.
    return [b for b in lslo_kernels.available_backends("cpu") if b != "triton"]


# ----------------------------------------------------------------- routing
def test_routing_groups_tokens_by_language_stably():
    lang = torch.tensor([2, 0, -1, 2, 0, 1, -1, 2])
    r = lslo_kernels.build_routing(lang, 4)
    assert r.lang_offsets.tolist() == [2, 4, 5, 8, 8]  # -1 tokens first, language 3 empty
    groups = [r.sorted_token_idx[r.lang_offsets[i] : r.lang_offsets[i + 1]].tolist() for i in range(4)]
    assert groups == [[1, 4], [5], [0, 3, 7], []]
    assert sorted(r.sorted_token_idx[: r.lang_offsets[0]].tolist()) == [2, 6]


def test_routing_empty_batch():
    r = lslo_kernels.build_routing(torch.empty(0, dtype=torch.int64), 3)
    assert r.lang_offsets.tolist() == [0, 0, 0, 0] and r.num_tokens == 0


@pytest.mark.parametrize("bad, msg", [(torch.tensor([0, 3]), "out of range"), (torch.tensor([-2, 0]), "< -1")])
def test_check_lang_ids_names_the_offending_value(bad, msg):
    with pytest.raises(ValueError, match=msg):
        lslo_kernels.check_lang_ids(bad, 3)


def test_check_lang_ids_rejects_float_ids():
    with pytest.raises(TypeError, match="integer"):
        lslo_kernels.check_lang_ids(torch.tensor([0.0, 1.0]), 3)


# ------------------------------------------------- reference vs dense truth
@pytest.mark.parametrize("ranks_name", list(RANK_SETS))
@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("density", [1.0, 0.1, 0.0])
def test_reference_matches_dense_formulation(ranks_name, spread, density):
    case = make_case(37, 7, 123, RANK_SETS[ranks_name], density=density, spread=spread, dtype=torch.float64, seed=1)
    y, grads = run_op(case, "reference")
    y_t, grads_t = dense_truth(case)
    assert_close(y, y_t, torch.float64, "y")
    for name, g, g_t in zip(("dx", "dbase", "dA", "dB"), grads, grads_t):
        assert_close(g, g_t, torch.float64, name)
    # pruned entries of B get exactly zero gradient
    assert torch.all(grads[3][~case["prune_mask"]] == 0)


def test_reference_gradcheck_fp64():
    case = make_case(11, 5, 6, [2, 3, 1], density=0.6, spread="with_none", dtype=torch.float64, seed=3)

    def f(x, base_out, a, b):
        return lslo_kernels.grouped_lora(x, base_out, a, b, case["prune_mask"], case["scales"],
                                         case["rank_offsets"], case["routing"], case["max_rank"], backend="reference")

    inputs = tuple(case[n].clone().requires_grad_(True) for n in ("x", "base_out", "lora_a", "lora_b"))
    assert torch.autograd.gradcheck(f, inputs)


# --------------------------------------------------- every backend vs reference
@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", SIZES)
@pytest.mark.parametrize("out_features", SIZES)
def test_backend_matches_reference_odd_sizes(backend, dtype, in_features, out_features):
    if dtype not in lslo_kernels.get_backend(backend).dtypes:
        pytest.skip(f"{backend} has no {dtype}")
    case = make_case(29, in_features, out_features, RANK_SETS["mixed12"], density=0.5, spread="with_none",
                     dtype=dtype, seed=in_features * 1000 + out_features)
    _compare_to_reference(case, backend, dtype)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("shape", [(1024, 4096), (4096, 1024), (1024, 1024)])
@pytest.mark.parametrize("ranks_name", ["lang30", "two"])
def test_backend_matches_reference_model_sizes(backend, shape, ranks_name):
    case = make_case(67, shape[0], shape[1], RANK_SETS[ranks_name], density=0.1, spread="sparse",
                     dtype=torch.float32, seed=7)
    _compare_to_reference(case, backend, torch.float32)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("num_languages", [1, 2, 12, 30])
def test_backend_matches_reference_language_layouts(backend, spread, num_languages):
    ranks = [[1, 2, 3, 8, 64][i % 5] for i in range(num_languages)]
    case = make_case(50, 64, 33, ranks, density=1.0, spread=spread, dtype=torch.float32, seed=num_languages)
    _compare_to_reference(case, backend, torch.float32)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_backend_empty_batch(backend):
    case = make_case(0, 16, 8, [2, 8], dtype=torch.float32)
    y, grads = run_op(case, backend)
    assert y.shape == (0, 8) and grads[0].shape == (0, 16)
    assert torch.all(grads[2] == 0) and torch.all(grads[3] == 0)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_backend_gradcheck_fp64(backend):
    if torch.float64 not in lslo_kernels.get_backend(backend).dtypes:
        pytest.skip(f"{backend} has no fp64")
    case = make_case(9, 4, 3, [1, 3, 2], density=0.7, spread="with_none", dtype=torch.float64, seed=5)

    def f(x, base_out, a, b):
        return lslo_kernels.grouped_lora(x, base_out, a, b, case["prune_mask"], case["scales"],
                                         case["rank_offsets"], case["routing"], case["max_rank"], backend=backend)

    inputs = tuple(case[n].clone().requires_grad_(True) for n in ("x", "base_out", "lora_a", "lora_b"))
    assert torch.autograd.gradcheck(f, inputs)


def _compare_to_reference(case, backend, dtype):
    y_ref, grads_ref = run_op(case, "reference")
    y, grads = run_op(case, backend)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, f"{backend} y")
    for name, g, g_ref in zip(("dx", "dbase", "dA", "dB"), grads, grads_ref):
        assert g.dtype == g_ref.dtype, name
        assert_close(g, g_ref, dtype, f"{backend} {name}")
    assert torch.all(grads[3][~case["prune_mask"]] == 0)


# ------------------------------------------------- eager autograd vs the custom op
@pytest.mark.parametrize("needs", ["all", "x_only", "factors_only"])
def test_eager_autograd_skips_the_custom_op_and_matches_it(monkeypatch, needs):
    """Eager training on a backend without compiled autograd runs ops._EagerLoRA (no custom-op
    dispatch); its y and every requested gradient equal the custom op's autograd bit for bit."""
    from lslo_kernels import ops

    case = make_case(31, 12, 9, [2, 5, 1], density=0.6, spread="with_none", dtype=torch.float32, seed=4)
    r = case["routing"]
    wanted = {"all": {"x", "base_out", "lora_a", "lora_b", "scales"}, "x_only": {"x"},
              "factors_only": {"lora_a", "lora_b", "scales"}}[needs]

    def leaves():
        return {k: case[k].detach().clone().requires_grad_(k in wanted)
                for k in ("x", "base_out", "lora_a", "lora_b", "scales")}

    def args(t):
        return (t["x"], t["base_out"], t["lora_a"], t["lora_b"], case["prune_mask"], t["scales"],
                case["rank_offsets"], r.sorted_token_idx, r.lang_offsets, case["max_rank"], "reference")

    through_op = leaves()
    y_op = ops._grouped_lora_fwd(*args(through_op))[0]
    y_op.backward(case["grad_out"])

    calls = []
    real = ops._grouped_lora_fwd
    monkeypatch.setattr(ops, "_grouped_lora_fwd", lambda *a: calls.append(a) or real(*a))
    eager = leaves()
    y = ops.lora_call(*args(eager))
    assert y.grad_fn is not None and "EagerLoRA" in type(y.grad_fn).__name__
    y.backward(case["grad_out"])
    assert calls == []  # the custom op was not dispatched
    assert torch.equal(y.detach(), y_op.detach())
    for name in ("x", "base_out", "lora_a", "lora_b", "scales"):
        if name in wanted:
            assert eager[name].grad is not None, name
            assert torch.equal(eager[name].grad, through_op[name].grad), name
        else:
            assert eager[name].grad is None, name


# ------------------------------------------ mixed factors (fp32 factors, 16-bit x)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_mixed_factors_equal_casting_them_first(dtype):
    """fp32 factors with 16-bit x (a backend with mixed_factors, as a layer under autocast passes
    them): y equals the call with the factors cast to x's dtype first, bit for bit, and the fp32
    gradients of A and B round to that call's 16-bit ones; x's and the scales' gradients are equal."""
    case = make_case(23, 10, 7, [2, 5, 1], density=0.6, spread="with_none", dtype=torch.float32, seed=9)
    x16 = {**case, "x": case["x"].to(dtype), "base_out": case["base_out"].to(dtype),
           "grad_out": case["grad_out"].to(dtype)}
    cast = {**x16, "lora_a": case["lora_a"].to(dtype), "lora_b": case["lora_b"].to(dtype)}
    y_mixed, g_mixed = run_op(x16, "reference")
    y_cast, g_cast = run_op(cast, "reference")
    assert torch.equal(y_mixed, y_cast)
    assert g_mixed[2].dtype == torch.float32 and g_mixed[3].dtype == torch.float32
    for name, gm, gc in zip(("dx", "dbase", "dA", "dB", "dscales"), g_mixed, g_cast):
        assert torch.equal(gm.to(gc.dtype), gc), name


def test_mixed_factors_need_a_backend_that_takes_them():
    case = make_case(5, 6, 4, [2, 3], dtype=torch.float32)
    x16 = case["x"].bfloat16()
    with pytest.raises(TypeError, match="dtype mismatch"):  # fp16 factors with bf16 x: never
        _call({**case, "x": x16, "base_out": case["base_out"].bfloat16(), "lora_a": case["lora_a"].half(),
               "lora_b": case["lora_b"].half()})
    if "cpp" in lslo_kernels.available_backends("cpu"):
        r = case["routing"]
        with pytest.raises(TypeError, match="backend 'cpp' needs lora factors in x's dtype"):
            lslo_kernels.grouped_lora(x16, case["base_out"].bfloat16(), case["lora_a"], case["lora_b"],
                                      case["prune_mask"], case["scales"], case["rank_offsets"], r,
                                      case["max_rank"], backend="cpp")


# ---------------------------------------------------------------- opcheck
@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_registered_ops(backend, dtype):
    if dtype not in lslo_kernels.get_backend(backend).dtypes:
        pytest.skip(f"{backend} has no {dtype}")
    case = make_case(13, 6, 5, [2, 1, 4], density=0.5, spread="with_none", dtype=dtype, seed=2)
    r = case["routing"]
    fwd_args = (case["x"].requires_grad_(True), case["base_out"].requires_grad_(True),
                case["lora_a"].requires_grad_(True), case["lora_b"].requires_grad_(True),
                case["prune_mask"], case["scales"].requires_grad_(True), case["rank_offsets"], r.sorted_token_idx,
                r.lang_offsets, case["max_rank"], backend)
    torch.library.opcheck(torch.ops.lslo.grouped_lora_fwd.default, fwd_args)
    _y, h = torch.ops.lslo.grouped_lora_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args))
    bwd_args = (case["grad_out"], case["x"].detach(), h, case["lora_a"].detach(), case["lora_b"].detach(),
                case["prune_mask"], case["scales"].detach(), case["rank_offsets"], r.sorted_token_idx,
                r.lang_offsets, case["max_rank"], backend)
    torch.library.opcheck(torch.ops.lslo.grouped_lora_bwd.default, bwd_args)


# ------------------------------------------------------------- bad input
def _call(case, **overrides):
    args = dict(case)
    args.pop("grad_out")
    args.update(overrides)
    return lslo_kernels.grouped_lora(args["x"], args["base_out"], args["lora_a"], args["lora_b"],
                                     args["prune_mask"], args["scales"], args["rank_offsets"],
                                     args["routing"], args["max_rank"], backend="reference")


def test_op_rejects_bad_input_with_clear_errors():
    case = make_case(5, 6, 4, [2, 3])
    with pytest.raises(ValueError, match="features"):
        _call(case, x=torch.randn(5, 7))
    with pytest.raises(TypeError, match="dtype mismatch"):
        _call(case, x=case["x"].double())
    with pytest.raises(ValueError, match="base_out shape"):
        _call(case, base_out=torch.randn(5, 3))
    with pytest.raises(ValueError, match="prune_mask shape"):
        _call(case, prune_mask=case["prune_mask"][:, :2])
    with pytest.raises(ValueError, match="routing covers"):
        _call(case, routing=lslo_kernels.build_routing(torch.zeros(4, dtype=torch.int64), 2))
    with pytest.raises(ValueError, match="unknown backend"):
        lslo_kernels.resolve_backend("cuda-magic", torch.device("cpu"))


def test_tolerance_table_covers_supported_dtypes():
    for backend in lslo_kernels.available_backends():
        for dtype in lslo_kernels.get_backend(backend).dtypes:
            assert dtype in TOLERANCES
