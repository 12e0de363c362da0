"""The C++ CPU backend ``cpp`` (lslo_kernels._C, csrc/) against the reference backend.

Every comparison runs on each kernel variant the CPU supports (baseline ISA and AVX2+FMA), on one
and on several threads (a language split across threads goes through scratch buffers), and with
normal and non-temporal output stores. Skipped when _C is not built, unless LSLO_REQUIRE_CPP=1
(as on CI), which turns a missing extension into a failure.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lslo_kernels
from lslo_kernels.reference import lora_backward_reference, lora_forward_reference
from tests.utils import make_case

try:
    from lslo_kernels import _C
except ImportError as exc:  # built by `pip install --no-build-isolation -e .`
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""
    from lslo_kernels.cpp_backend import lora_add_cpp, lora_backward_cpp, lora_forward_cpp

needs_cpp = pytest.mark.skipif(
    _C is None, reason=f"lslo_kernels._C is not built ({_IMPORT_ERROR}); set LSLO_REQUIRE_CPP=1 to fail instead"
)

# (atol, rtol) of cpp against reference in the same dtype; atol is relative to the largest
# |expected| (sums over tokens make dA/dB large). Both accumulate in fp32 (fp64) and round once
# to the output dtype, so they differ by summation order only: a few fp32 ulps, at most one
# rounding step of bf16/fp16.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-5),
    torch.bfloat16: (8e-3, 8e-3),
    torch.float16: (1e-3, 1e-3),
}
ISAS = _C.supported_isas() if _C is not None else ["baseline"]
SIZES = [1, 7, 64, 123, 1024]
MIXED_RANKS = [1, 2, 3, 8, 64, 2, 8, 1, 3, 2, 8, 64]  # L = 12, every kernel path (1..8, > 8)


@contextlib.contextmanager
def kernel_config(isa: str = "baseline", threads: int = 1, stream_min_bytes: int | None = None):
    """Run with one kernel variant, a thread count and a non-temporal-store threshold."""
    old_threads = torch.get_num_threads()
    old_isa = _C.set_isa(isa)
    old_stream = _C.set_streaming_min_bytes(8 << 20 if stream_min_bytes is None else stream_min_bytes)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        _C.set_isa(old_isa)
        _C.set_streaming_min_bytes(old_stream)


def _op_args(case):
    r = case["routing"]
    return (case["prune_mask"], case["scales"], case["rank_offsets"], r.sorted_token_idx, r.lang_offsets,
            case["max_rank"])


def _assert_close(actual, expected, dtype, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def _check_against_reference(case, dtype):
    """Forward (y, h), backward (dx, dA, dB, d scales) and the in-place add_ of the cpp kernels against the
    reference's."""
    x, base_out, a, b, grad_out = (case[n] for n in ("x", "base_out", "lora_a", "lora_b", "grad_out"))
    rest = _op_args(case)
    y_ref, h_ref = lora_forward_reference(x, base_out, a, b, *rest)
    y, h = lora_forward_cpp(x, base_out, a, b, *rest)
    _assert_close(y, y_ref, dtype, "y")
    _assert_close(h, h_ref, dtype, "h")
    out = base_out.clone()
    lora_add_cpp(out, x, a, b, *rest)  # inference, in place: same y
    _assert_close(out, y_ref, dtype, "add_")
    # decoding with the factors staged once: the same bits as add_, which stages them per call
    staged = torch.ops.lslo_cpp.stage_factors(b, case["prune_mask"], case["scales"], case["rank_offsets"])
    d = b.shape[0]
    assert staged.shape[0] == b.shape[1] and staged.shape[1] >= d and torch.all(staged[:, d:] == 0)
    out_staged = base_out.clone()
    torch.ops.lslo_cpp.add_staged_(out_staged, x, a, b, *rest, staged)
    assert torch.equal(out_staged, out), "add_staged_ differs from add_"
    # the backward gets the same h, so that its own error is measured
    grads_ref = lora_backward_reference(grad_out, x, h_ref, a, b, *rest)
    grads = lora_backward_cpp(grad_out, x, h_ref, a, b, *rest)
    assert len(grads) == 4
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref):
        _assert_close(g, g_ref, dtype, name)
    # d s_l sums <dy_t, (B_l * M_l) h_t> over every token and output of a language: a sum with
    # cancellation, whose rounding error scales with the sum of its terms' magnitudes, not with the
    # result (hypothesis found T=80, k=1, d=60, one language: |result| 0.07, error 1.1e-5 in fp32 on
    # terms whose magnitudes sum to 1027, i.e. 1e-8 of it). That sum is the reference's d s on
    # absolute values; a lost term would be ~0.2 there.
    magnitude = lora_backward_reference(grad_out.abs(), x, h_ref.abs(), a, b.abs(), *rest)[3]
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grads[3].double(), grads_ref[3].double(), rtol=rtol,
                               atol=atol * max(1.0, float(magnitude.max()) if magnitude.numel() else 1.0),
                               msg=lambda m: f"dscales: {m}")
    # exact zeros: pruned entries of B, tokens without adapter, languages without tokens
    assert torch.all(grads[2][~case["prune_mask"]] == 0)
    none = case["routing"].lang < 0
    assert torch.equal(y[none], base_out[none]) and torch.all(h[none] == 0) and torch.all(grads[0][none] == 0)
    counts = (case["routing"].lang_offsets[1:] - case["routing"].lang_offsets[:-1]).tolist()
    ro = case["rank_offsets"].tolist()
    for lang_id, n in enumerate(counts):
        if n == 0:
            assert torch.all(grads[1][ro[lang_id]:ro[lang_id + 1]] == 0)
            assert torch.all(grads[2][:, ro[lang_id]:ro[lang_id + 1]] == 0)
    return y, h, grads


def test_add_staged_rejects_a_staged_tensor_of_another_layout():
    case = make_case(6, 8, 20, [2, 3], density=0.5, seed=3)
    x, base_out, a, b = (case[n] for n in ("x", "base_out", "lora_a", "lora_b"))
    staged = torch.ops.lslo_cpp.stage_factors(b, case["prune_mask"], case["scales"], case["rank_offsets"])
    for bad, match in ((staged[:, :20].contiguous(), "d padded"), (staged.double(), "staged must be"),
                       (staged[:1].contiguous(), "staged must be")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.lslo_cpp.add_staged_(base_out.clone(), x, a, b, *_op_args(case), bad)
    with pytest.raises(RuntimeError, match="scales must have one entry per language"):
        torch.ops.lslo_cpp.stage_factors(b, case["prune_mask"], case["scales"][:1], case["rank_offsets"])


# ------------------------------------------------------------------------------ the extension
def test_extension_is_built_when_required():
    if os.environ.get("LSLO_REQUIRE_CPP") != "1":
        pytest.skip("LSLO_REQUIRE_CPP is not 1 (CI sets it)")
    assert _C is not None, f"lslo_kernels._C failed to import: {_IMPORT_ERROR}"
    assert "cpp" in lslo_kernels.available_backends("cpu")
    assert lslo_kernels.resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpp"


@needs_cpp
def test_backend_registration_and_isa_controls():
    backend = lslo_kernels.get_backend("cpp")
    assert backend.supports_device(torch.device("cpu")) and not backend.supports_device(torch.device("meta"))
    assert set(backend.dtypes) == {torch.float32, torch.bfloat16, torch.float16, torch.float64}
    assert "baseline" in _C.supported_isas() and _C.get_isa() in _C.supported_isas()
    with pytest.raises(RuntimeError, match="unknown ISA 'sse9'"):
        _C.set_isa("sse9")
    with pytest.raises(RuntimeError, match="bytes >= 0"):
        _C.set_streaming_min_bytes(-1)
    with pytest.raises(RuntimeError, match="1 <= chunk <= 128"):
        _C.set_token_chunks(0, 1)
    with pytest.raises(RuntimeError, match="1 <= update <= chunk"):
        _C.set_token_chunks(8, 9)
    assert _C.set_token_chunks(*_C.set_token_chunks(64, 16)) == (64, 16)
    assert _C.openmp_threads() >= 1


# --------------------------------------------------------------------------- vs the reference
@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("in_features", SIZES)
@pytest.mark.parametrize("out_features", SIZES)
def test_matches_reference_odd_sizes(isa, dtype, in_features, out_features):
    case = make_case(37, in_features, out_features, MIXED_RANKS, density=0.5, spread="with_none", dtype=dtype,
                     seed=in_features * 7919 + out_features)
    with kernel_config(isa):
        _check_against_reference(case, dtype)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("num_languages", [1, 2, 12, 30])
@pytest.mark.parametrize("spread", ["uniform", "single", "with_none", "sparse"])
@pytest.mark.parametrize("density", [1.0, 0.1, 0.0])
def test_matches_reference_language_layouts(isa, num_languages, spread, density):
    ranks = [[1, 2, 3, 8, 64][i % 5] for i in range(num_languages)]
    case = make_case(61, 40, 33, ranks, density=density, spread=spread, seed=num_languages)
    with kernel_config(isa):
        _check_against_reference(case, torch.float32)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("spread", ["uniform", "single", "with_none", "sparse"])
@pytest.mark.parametrize("stream_min_bytes", [0, None])
def test_matches_reference_on_several_threads(isa, threads, spread, stream_min_bytes):
    # Big enough to be split across threads; "single" splits one language over every thread, so
    # its dA/dB go through the scratch of several parts. stream_min_bytes=0: non-temporal stores.
    case = make_case(700, 64, 96, [2] * 5 + [8] * 4 + [64], density=0.3, spread=spread, seed=threads)
    with kernel_config(isa, threads, stream_min_bytes):
        y, h, grads = _check_against_reference(case, torch.float32)
        y2, h2, grads2 = _check_against_reference(case, torch.float32)
    # the split depends on the thread count only: repeated calls agree bit for bit
    assert torch.equal(y, y2) and torch.equal(h, h2) and all(map(torch.equal, grads, grads2))


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_model_size_with_streaming_stores(isa, dtype):
    # the paper's lang30 layer, 1024 -> 1024, with outputs written by non-temporal stores
    case = make_case(160, 1024, 1024, [2] * 16 + [8] * 14, density=0.1, spread="uniform", dtype=dtype, seed=4)
    with kernel_config(isa, 2, stream_min_bytes=0):
        _check_against_reference(case, dtype)


@needs_cpp
@pytest.mark.parametrize("in_features, out_features", [(7, 64), (123, 1)])
def test_matches_reference_fp16(in_features, out_features):
    case = make_case(45, in_features, out_features, MIXED_RANKS, density=0.5, spread="with_none",
                     dtype=torch.float16, seed=5)
    with kernel_config(_C.get_isa()):
        _check_against_reference(case, torch.float16)


@needs_cpp
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_tokens=st.integers(0, 90),
    in_features=st.integers(1, 80),
    out_features=st.integers(1, 80),
    ranks=st.lists(st.integers(0, 12), min_size=1, max_size=9),
    spread=st.sampled_from(["uniform", "single", "with_none", "sparse"]),
    density=st.sampled_from([0.0, 0.3, 1.0]),
    threads=st.integers(1, 3),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_random_problems(num_tokens, in_features, out_features, ranks, spread, density, threads,
                                           isa, seed):
    if max(ranks) == 0:
        ranks = [*ranks[:-1], 1]
    case = make_case(num_tokens, in_features, out_features, ranks, density=density, spread=spread, seed=seed)
    with kernel_config(isa, threads, stream_min_bytes=0 if seed % 2 else None):
        _check_against_reference(case, torch.float32)


# Tokens per language that leave every remainder of the kernels' blocking: token blocks of 4 (1, 3,
# 5, 7 tokens), chunks of 64 (63, 65, 129) and the update sub-chunks set below.
BLOCK_COUNTS = [1, 3, 5, 7, 4, 63, 64, 65, 129, 2, 0, 6]
# Ranks 9..70 with odd sizes (blocks of 2 and 4 rank rows with remainders), next to the small ones.
BLOCK_RANKS = [9, 17, 33, 70, 1, 2, 3, 5, 64, 11, 13, 4]


def _block_case(dtype, in_features=123, out_features=77, seed=3):
    counts, ranks = BLOCK_COUNTS, BLOCK_RANKS
    g = torch.Generator().manual_seed(seed)
    lang = torch.cat([torch.full((n,), lang_id, dtype=torch.int64) for lang_id, n in enumerate(counts)]
                     + [torch.full((9,), -1, dtype=torch.int64)])
    lang = lang[torch.randperm(len(lang), generator=g)]
    case = make_case(len(lang), in_features, out_features, ranks, density=0.5, dtype=dtype, seed=seed)
    case["routing"] = lslo_kernels.build_routing(lang, len(ranks))
    return case


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunks", [(64, 64), (1, 1), (5, 3), (128, 16)])
def test_matches_reference_token_blocks_and_large_ranks(isa, threads, chunks):
    """Every token-block / chunk remainder, ranks 9..70, each chunking of the kernels."""
    old = _C.set_token_chunks(*chunks)
    try:
        for dtype in (torch.float32, torch.float64):
            with kernel_config(isa, threads, stream_min_bytes=0 if threads == 2 else None):
                _check_against_reference(_block_case(dtype), dtype)
    finally:
        _C.set_token_chunks(*old)


@needs_cpp
def test_large_outputs_on_huge_page_allocator():
    """Outputs of >= 32 MiB come from the op's huge-page allocator: same values, and the tensors behave like
    any other (resizable, freed, seen by the profiler's memory events)."""
    case = make_case(2048, 16, 4096, [2, 8, 3], seed=5)  # y and grad_out: 2048 x 4096 fp32 = 32 MiB
    y, _, _ = _check_against_reference(case, torch.float32)
    assert y.untyped_storage().nbytes() == 32 << 20
    y.resize_(2049, 4096)  # grows through the allocator
    torch.testing.assert_close(y[:2048], lora_forward_reference(
        case["x"], case["base_out"], case["lora_a"], case["lora_b"], *_op_args(case))[0], atol=1e-4, rtol=1e-5)
    with torch.profiler.profile(profile_memory=True, activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        lora_forward_cpp(case["x"], case["base_out"], case["lora_a"], case["lora_b"], *_op_args(case))
    # the allocation is counted in the op's event, the free (after it) in a "[memory]" event
    assert any(e.cpu_memory_usage >= (32 << 20) for e in prof.events() if "lslo_cpp" in e.name), \
        "the profiler did not see the 32 MiB output allocated"
    assert any(e.name == "[memory]" and e.cpu_memory_usage <= -(32 << 20) for e in prof.events())


# ------------------------------------------------------------------ through the public entry
def _grouped_lora(case, **leaves):
    return lslo_kernels.grouped_lora(
        leaves.get("x", case["x"]), leaves.get("base_out", case["base_out"]), leaves.get("lora_a", case["lora_a"]),
        leaves.get("lora_b", case["lora_b"]), case["prune_mask"], leaves.get("scales", case["scales"]),
        case["rank_offsets"], case["routing"], case["max_rank"], backend="cpp",
    )


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_end_to_end_autograd_matches_reference(dtype):
    case = make_case(83, 48, 40, MIXED_RANKS, density=0.4, spread="with_none", dtype=dtype, seed=11)
    results = {}
    names = ("x", "base_out", "lora_a", "lora_b", "scales")
    for backend in ("reference", "cpp"):
        leaves = {n: case[n].clone().requires_grad_(True) for n in names}
        y = lslo_kernels.grouped_lora(leaves["x"], leaves["base_out"], leaves["lora_a"], leaves["lora_b"],
                                      case["prune_mask"], leaves["scales"], case["rank_offsets"], case["routing"],
                                      case["max_rank"], backend=backend)
        y.backward(case["grad_out"])
        results[backend] = (y.detach(), *(leaves[n].grad for n in names))
    for name, got, want in zip(("y", "dx", "dbase", "dA", "dB", "dscales"), results["cpp"], results["reference"]):
        _assert_close(got, want, dtype, name)


@needs_cpp
def test_empty_batch():
    case = make_case(0, 16, 8, [2, 8], dtype=torch.float32)
    y, h = lora_forward_cpp(case["x"], case["base_out"], case["lora_a"], case["lora_b"], *_op_args(case))
    assert y.shape == (0, 8) and h.shape == (0, 8) and h.dtype == torch.float32
    leaves = {n: case[n].clone().requires_grad_(True) for n in ("x", "base_out", "lora_a", "lora_b")}
    _grouped_lora(case, **leaves).backward(case["grad_out"])
    assert leaves["x"].grad.shape == (0, 16)
    assert torch.all(leaves["lora_a"].grad == 0) and torch.all(leaves["lora_b"].grad == 0)


@needs_cpp
def test_tokens_without_adapter_pass_base_out_through():
    case = make_case(50, 33, 21, [3, 8], dtype=torch.bfloat16)
    lang = torch.full((50,), -1, dtype=torch.int64)
    case["routing"] = lslo_kernels.build_routing(lang, 2)
    y, h, (dx, da, db, ds) = _check_against_reference(case, torch.bfloat16)
    assert torch.equal(y, case["base_out"]) and torch.all(h == 0)
    assert torch.all(dx == 0) and torch.all(da == 0) and torch.all(db == 0) and torch.all(ds == 0)


@needs_cpp
def test_gradcheck_fp64():
    # through the C++ autograd node (torch.ops.lslo_cpp.lora), every differentiable input, scales in fp64
    case = make_case(13, 6, 5, [2, 3, 1, 9], density=0.6, spread="with_none", dtype=torch.float64, seed=3)
    case["scales"] = case["scales"].double()

    def f(x, base_out, a, b, scales):
        return _grouped_lora(case, x=x, base_out=base_out, lora_a=a, lora_b=b, scales=scales)

    inputs = tuple(case[n].clone().requires_grad_(True) for n in ("x", "base_out", "lora_a", "lora_b", "scales"))
    assert torch.autograd.gradcheck(f, inputs)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_registered_ops(dtype):
    case = make_case(17, 6, 5, [2, 1, 4], density=0.5, spread="with_none", dtype=dtype, seed=2)
    rest = _op_args(case)
    fwd_args = (case["x"], case["base_out"], case["lora_a"], case["lora_b"], *rest)
    torch.library.opcheck(torch.ops.lslo_cpp.forward.default, fwd_args)
    _y, h = torch.ops.lslo_cpp.forward(*fwd_args)
    bwd_args = (case["grad_out"], case["x"], h, case["lora_a"], case["lora_b"], *rest)
    torch.library.opcheck(torch.ops.lslo_cpp.backward.default, bwd_args)
    torch.library.opcheck(torch.ops.lslo_cpp.add_.default, (case["base_out"].clone(), *fwd_args[:1], *fwd_args[2:]))
    # the training entry, with its C++ autograd node
    leaves = [t.clone().requires_grad_(True) for t in fwd_args[:4]]
    scales = case["scales"].clone().requires_grad_(True)
    lora_args = (*leaves, rest[0], scales, *rest[2:])
    torch.library.opcheck(torch.ops.lslo_cpp.lora.default, lora_args)


@needs_cpp
def test_compiles_with_fullgraph():
    case = make_case(29, 12, 10, [2, 3, 8], density=0.5, spread="with_none", seed=6)
    fn = torch.compile(lambda x, base_out: _grouped_lora(case, x=x, base_out=base_out), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(case["x"], case["base_out"]), _grouped_lora(case))


# ------------------------------------------------------------------------------ bad input
def _forward_args(case, **overrides):
    names = lslo_kernels.spec.FORWARD.inputs
    values = dict(zip(names, (case["x"], case["base_out"], case["lora_a"], case["lora_b"], *_op_args(case))))
    values.update(overrides)
    return tuple(values[n] for n in names)


@needs_cpp
@pytest.mark.parametrize("overrides, message", [
    (lambda c: {"x": c["x"].double()}, "lora_a and lora_b must have x's dtype"),
    (lambda c: {"base_out": c["base_out"].double()}, "base_out dtype"),
    (lambda c: {"x": c["x"].t().contiguous().t()}, "x must be contiguous"),
    (lambda c: {"x": c["x"][:, :5]}, "x must be contiguous|lora_a must be"),
    (lambda c: {"x": c["x"][None]}, "x must be 2-D"),
    (lambda c: {"base_out": c["base_out"][:, :3].contiguous()}, r"base_out must be \(T, d\)"),
    (lambda c: {"lora_b": c["lora_b"][:, :4].contiguous()}, "lora_b must be"),
    (lambda c: {"prune_mask": c["prune_mask"].float()}, "prune_mask must be bool"),
    (lambda c: {"prune_mask": c["prune_mask"][:3].contiguous()}, "prune_mask shape"),
    (lambda c: {"scales": c["scales"][:1]}, "scales must be"),
    (lambda c: {"rank_offsets": c["rank_offsets"].int()}, "rank_offsets must be int64"),
    (lambda c: {"rank_offsets": torch.tensor([0, -1, 5])}, "non-decreasing"),
    (lambda c: {"rank_offsets": torch.tensor([0, 2, 6])}, "rank_offsets must run from 0 to R"),
    (lambda c: {"max_rank": 2}, "has rank 3 > max_rank = 2"),
    (lambda c: {"scales": c["scales"].half()}, "scales must be float32 or float64"),
    (lambda c: {"sorted_token_idx": c["routing"].sorted_token_idx[:4]}, "sorted_token_idx must have 9 entries"),
    (lambda c: {"sorted_token_idx": torch.zeros(9, dtype=torch.int64)}, "not a permutation"),
    (lambda c: {"sorted_token_idx": torch.full((9,), 99, dtype=torch.int64)}, "out of range"),
    (lambda c: {"lang_offsets": torch.tensor([0, 4, 8])}, "lang_offsets\\[L\\] must equal the number of tokens"),
])
def test_forward_rejects_bad_input(overrides, message):
    case = make_case(9, 6, 4, [2, 3], spread="uniform", seed=1)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lslo_cpp.forward(*_forward_args(case, **overrides(case)))


@needs_cpp
def test_backward_rejects_bad_input():
    case = make_case(9, 6, 4, [2, 3], seed=1)
    fwd = _forward_args(case)
    _y, h = torch.ops.lslo_cpp.forward(*fwd)
    rest = fwd[2:]
    with pytest.raises(RuntimeError, match="h must be Float"):
        torch.ops.lslo_cpp.backward(case["grad_out"], case["x"], h.double(), *rest)
    with pytest.raises(RuntimeError, match=r"h must be \(T, max_rank\)"):
        torch.ops.lslo_cpp.backward(case["grad_out"], case["x"], h[:, :2].contiguous(), *rest)
    with pytest.raises(RuntimeError, match=r"grad_out must be \(T, d\)"):
        torch.ops.lslo_cpp.backward(case["grad_out"][:, :2].contiguous(), case["x"], h, *rest)
    with pytest.raises(RuntimeError, match="grad_out dtype"):
        torch.ops.lslo_cpp.backward(case["grad_out"].double(), case["x"], h, *rest)


@needs_cpp
def test_public_entry_without_validation_still_raises():
    # The kernels never read the raw ids, but a routing that would make them write out of bounds or
    # race (not a permutation) is refused whatever the caller checked.
    case = make_case(9, 6, 4, [2, 3], seed=1)
    bad = lslo_kernels.build_routing(torch.zeros(9, dtype=torch.int64), 2)
    bad = type(bad)(bad.lang, torch.zeros(9, dtype=torch.int64), bad.lang_offsets, 2)
    with pytest.raises(RuntimeError, match="not a permutation"):
        lslo_kernels.grouped_lora(case["x"], case["base_out"], case["lora_a"], case["lora_b"], case["prune_mask"],
                                  case["scales"], case["rank_offsets"], bad, case["max_rank"], backend="cpp",
                                  validate=False)


# ------------------------------------------------------- linear_lora: base Linear + LoRA term in one op
LINEAR_LEAVES = ("x", "weight", "bias", "lora_a", "lora_b", "scales")


def _linear_case(num_tokens, in_features, out_features, ranks, *, dtype, spread="with_none", bias=True, seed=0):
    case = make_case(num_tokens, in_features, out_features, ranks, density=0.5, spread=spread, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    case["weight"] = (torch.randn(out_features, in_features, generator=g) / max(in_features, 1) ** 0.5).to(dtype)
    case["bias"] = torch.randn(out_features, generator=g).to(dtype) if bias else None
    return case


def _factor_args(case):
    """The factors, routing and max_rank of a case, in the order the ops take them after x (and the base)."""
    r = case["routing"]
    return (case["lora_a"], case["lora_b"], case["prune_mask"], case["scales"], case["rank_offsets"],
            r.sorted_token_idx, r.lang_offsets, case["max_rank"])


def _linear_run(case, use_op: bool, needs=LINEAR_LEAVES):
    """y and the gradients of ``needs`` (None for the others), through linear_lora or through the truth:
    F.linear followed by the reference op, autograd summing the two gradients of x."""
    leaves = {n: (case[n].clone().requires_grad_(n in needs) if case[n] is not None else None)
              for n in LINEAR_LEAVES}
    r = case["routing"]
    if use_op:
        y = torch.ops.lslo_cpp.linear_lora(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"],
                                           leaves["lora_b"], case["prune_mask"], leaves["scales"],
                                           case["rank_offsets"], r.sorted_token_idx, r.lang_offsets, case["max_rank"])
    else:
        base_out = torch.nn.functional.linear(leaves["x"], leaves["weight"], leaves["bias"])
        y = lslo_kernels.grouped_lora(leaves["x"], base_out, leaves["lora_a"], leaves["lora_b"], case["prune_mask"],
                                      leaves["scales"], case["rank_offsets"], r, case["max_rank"],
                                      backend="reference")
    y.backward(case["grad_out"])
    return y.detach(), {n: (leaves[n].grad if leaves[n] is not None else None) for n in LINEAR_LEAVES}


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("num_tokens, in_features, out_features, ranks, spread", [
    (83, 48, 40, MIXED_RANKS, "with_none"),   # odd sizes, ranks 1..64, tokens without a language
    (7, 1, 5, [3], "single"),                  # one language, k = 1
    (64, 123, 7, [2, 8, 1], "sparse"),         # empty language groups
    (0, 16, 8, [2, 8], "uniform"),             # empty batch
])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_lora_matches_base_linear_then_reference(dtype, num_tokens, in_features, out_features, ranks, spread,
                                                        bias):
    case = _linear_case(num_tokens, in_features, out_features, ranks, dtype=dtype, spread=spread, bias=bias, seed=5)
    y, grads = _linear_run(case, use_op=True)
    y_ref, grads_ref = _linear_run(case, use_op=False)
    _assert_close(y, y_ref, dtype, "y")
    for name in LINEAR_LEAVES:
        if case[name] is None:
            assert grads[name] is None
            continue
        _assert_close(grads[name], grads_ref[name], dtype, f"d{name}")


@needs_cpp
@pytest.mark.parametrize("needs", [("x",), ("lora_a", "lora_b"), ("scales",), ("weight",), ("bias",), ("x", "bias")])
def test_linear_lora_gives_only_the_gradients_asked_for(needs):
    case = _linear_case(21, 9, 6, [2, 3, 1], dtype=torch.float32, seed=2)
    _y, grads = _linear_run(case, use_op=True, needs=needs)
    _y, grads_ref = _linear_run(case, use_op=False, needs=needs)
    for name in LINEAR_LEAVES:
        assert (grads[name] is None) == (name not in needs), name
        if name in needs:
            _assert_close(grads[name], grads_ref[name], torch.float32, f"d{name}")


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
def test_linear_lora_gradcheck_fp64(bias):
    case = _linear_case(13, 6, 5, [2, 3, 1, 9], dtype=torch.float64, bias=bias, seed=3)
    case["scales"] = case["scales"].double()
    r = case["routing"]
    names = [n for n in LINEAR_LEAVES if case[n] is not None]

    def f(*tensors):
        t = dict(zip(names, tensors), bias=None) if not bias else dict(zip(names, tensors))
        return torch.ops.lslo_cpp.linear_lora(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                                              case["prune_mask"], t["scales"], case["rank_offsets"],
                                              r.sorted_token_idx, r.lang_offsets, case["max_rank"])

    assert torch.autograd.gradcheck(f, tuple(case[n].clone().requires_grad_(True) for n in names))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_lora_opcheck(dtype):
    case = _linear_case(17, 6, 5, [2, 1, 4], dtype=dtype, seed=2)
    r = case["routing"]
    rest = (case["prune_mask"], case["scales"], case["rank_offsets"], r.sorted_token_idx, r.lang_offsets,
            case["max_rank"])
    for bias in (case["bias"], None):
        args = (case["x"], case["weight"], bias, case["lora_a"], case["lora_b"], *rest)
        torch.library.opcheck(torch.ops.lslo_cpp.linear_forward.default, args)
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in args[:5]]
        torch.library.opcheck(torch.ops.lslo_cpp.linear_lora.default, (*leaves, *rest))


@needs_cpp
def test_linear_lora_rejects_a_mismatched_base():
    case = _linear_case(9, 6, 4, [2, 3], dtype=torch.float32, seed=1)
    rest = _factor_args(case)
    for weight, bias, message in (
        (case["weight"].t().contiguous(), case["bias"], r"weight must be a \(d, k\) = \(4, 6\)"),
        (case["weight"].double(), case["bias"], "weight dtype Double != x dtype Float"),
        (case["weight"], case["bias"][:3], r"bias must be a \(d,\) = \(4,\)"),
        (case["weight"], case["bias"].half(), "bias dtype Half"),
    ):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.lslo_cpp.linear_lora(case["x"], weight, bias, *rest)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("spread", ["uniform", "single"])
def test_linear_lora_on_every_kernel_variant_and_thread_split(isa, threads, spread):
    # Big enough to be split across threads (the bias row is read with row stride 0 by every part).
    case = _linear_case(700, 64, 96, [2] * 5 + [8] * 4 + [64], dtype=torch.float32, spread=spread, seed=threads)
    with kernel_config(isa, threads, stream_min_bytes=0):
        y, grads = _linear_run(case, use_op=True)
    y_ref, grads_ref = _linear_run(case, use_op=False)
    _assert_close(y, y_ref, torch.float32, "y")
    for name in LINEAR_LEAVES:
        _assert_close(grads[name], grads_ref[name], torch.float32, f"d{name}")


# ------------------------------------------------- linear_decode: decoding, base Linear + LoRA term, one call
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("num_tokens, in_features, out_features, ranks, spread", [
    (83, 48, 40, MIXED_RANKS, "with_none"), (5, 1, 7, [3], "single"), (64, 123, 7, [2, 8, 1], "sparse"),
    (0, 16, 8, [2, 8], "uniform"),
])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided_x", [False, True])
@pytest.mark.parametrize("use_staged", [True, False])
def test_linear_decode_equals_bias_rows_add_then_gemm(dtype, num_tokens, in_features, out_features, ranks, spread, bias,
                                                      strided_x, use_staged):
    """linear_decode is, bit for bit, the bias rows + add_staged_ (or add_) + the base GEMM accumulating into
    them, and equals F.linear followed by the reference op to the dtype's tolerance."""
    case = _linear_case(num_tokens, in_features, out_features, ranks, dtype=dtype, spread=spread, bias=bias, seed=9)
    x = case["x"]
    if strided_x:  # a column slice of a wider tensor: rows with a stride
        x = torch.cat([x, torch.ones(num_tokens, 3, dtype=dtype)], dim=1)[:, :in_features]
    r = case["routing"]
    factors = _factor_args(case)
    staged = torch.ops.lslo_cpp.stage_factors(case["lora_b"], case["prune_mask"], case["scales"],
                                              case["rank_offsets"])
    y = torch.ops.lslo_cpp.linear_decode(x, case["weight"], case["bias"], *factors, staged if use_staged else None)
    rows = (case["bias"].expand(num_tokens, out_features).contiguous() if bias
            else torch.zeros(num_tokens, out_features, dtype=dtype))
    if use_staged:
        torch.ops.lslo_cpp.add_staged_(rows, x, *factors, staged)
    else:
        torch.ops.lslo_cpp.add_(rows, x, *factors)
    rows.addmm_(x, case["weight"].t())
    assert torch.equal(y, rows)
    truth = lslo_kernels.grouped_lora(x.contiguous(), torch.nn.functional.linear(x, case["weight"], case["bias"]),
                                      case["lora_a"], case["lora_b"], case["prune_mask"], case["scales"],
                                      case["rank_offsets"], r, case["max_rank"], backend="reference")
    _assert_close(y, truth, dtype, "y")


@needs_cpp
def test_linear_decode_rejects_bad_input():
    case = _linear_case(9, 6, 20, [2, 3], dtype=torch.float32, seed=1)
    factors = _factor_args(case)
    staged = torch.ops.lslo_cpp.stage_factors(case["lora_b"], case["prune_mask"], case["scales"],
                                              case["rank_offsets"])
    for weight, bias, bad_staged, match in (
        (case["weight"], case["bias"], staged[:, :20].contiguous(), "d padded"),
        (case["weight"], case["bias"], staged.double(), "staged must be"),
        (case["weight"][:, :5], case["bias"], staged, r"weight must be a \(d, k\)"),
        (case["weight"], case["bias"].double(), staged, "bias dtype Double"),
    ):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.lslo_cpp.linear_decode(case["x"], weight, bias, *factors, bad_staged)


@needs_cpp
def test_public_kernel_settings_reach_the_extension():
    # benchmarks/ use these instead of lslo_kernels._C: the ISA in use and the single-thread threshold.
    from lslo_kernels import cpp_backend

    assert cpp_backend.kernel_isa() in ("avx2", "baseline")
    before = cpp_backend.set_min_parallel_work(12345)
    try:
        assert cpp_backend.set_min_parallel_work(before) == 12345
    finally:
        cpp_backend.set_min_parallel_work(before)
    with pytest.raises(RuntimeError, match="expected work >= 0"):
        cpp_backend.set_min_parallel_work(-1)
