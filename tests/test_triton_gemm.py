"""The fused base GEMM + LoRA Triton kernel (``lslo_kernels.triton_gemm``) against the reference.

Forward output and every gradient (x, weight, bias, A, B, scales) of ``linear_lora_triton``
against ``F.linear`` plus the reference backend run in float64, at odd sizes, with pruning masks,
id -1 rows, empty language groups, a single language, 1 and 256 languages, fp32/fp16/bf16 and
float32 factors with bf16 x; the decoding entry; the ``LSLO_TRITON_GEMM`` switch and its
registration; an ``LSLoLinear`` training step taking the fused path. Without CUDA the kernel runs
in Triton's CPU interpreter, so sizes stay tiny.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lslo
import lslo_kernels
from lslo_kernels import triton_backend
from tests.test_graph_safe import _reads
from tests.utils import TOLERANCES, assert_close, make_case

# Triton picks compiled vs interpreted kernels when their @triton.jit decorators run; register()
# (re)builds the kernel modules under the interpreter when they were first imported otherwise.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton_ready = triton_backend.register()
pytestmark = pytest.mark.skipif(not triton_ready, reason="triton not importable")

if triton_ready:
    from lslo_kernels import triton_gemm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRADS = ("x", "weight", "bias", "lora_a", "lora_b", "scales")


def _problem(num_tokens, in_features, out_features, ranks, *, spread="with_none", dtype=torch.float32,
             density=0.7, bias=True, factor_dtype=None, seed=0):
    case = make_case(num_tokens, in_features, out_features, ranks, density=density, spread=spread, dtype=dtype,
                     seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    case["weight"] = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
    case["bias"] = torch.randn(out_features, generator=g).to(dtype) if bias else None
    if factor_dtype is not None:  # float32 master factors with 16-bit x (spec.mixed_factors)
        case["lora_a"], case["lora_b"] = case["lora_a"].to(factor_dtype), case["lora_b"].to(factor_dtype)
    for name, value in list(case.items()):
        if isinstance(value, torch.Tensor):
            case[name] = value.to(DEVICE)
    r = case["routing"]
    case["routing"] = lslo_kernels.build_routing(r.lang.to(DEVICE), r.num_languages)
    return case


def _leaves(case, dtype_of, frozen=()):
    out = {}
    for name in GRADS:
        value = case[name]
        if value is None:
            out[name] = None
            continue
        out[name] = dtype_of(value).detach().clone().requires_grad_(name not in frozen)
    return out


def _fused(case, frozen=()):
    leaves = _leaves(case, lambda t: t, frozen)
    r = case["routing"]
    y = triton_gemm.linear_lora_triton(
        leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], case["prune_mask"],
        leaves["scales"], case["rank_offsets"], r.sorted_token_idx, r.lang_offsets, case["max_rank"])
    y.backward(case["grad_out"])
    return y.detach(), {n: (t.grad if t is not None else None) for n, t in leaves.items()}


def _truth(case, x_dtype, frozen=()):
    """F.linear + the reference backend in float64 on the values the kernel reads (16-bit x rounds
    float32 factors to its dtype as it reads them); gradients from autograd."""
    leaves = _leaves(case, lambda t: (t.to(x_dtype) if t.is_floating_point() and t.dim() == 2 else t).double(),
                     frozen)
    base = F.linear(leaves["x"], leaves["weight"], leaves["bias"])
    y = lslo_kernels.grouped_lora(leaves["x"], base, leaves["lora_a"], leaves["lora_b"], case["prune_mask"],
                                  leaves["scales"], case["rank_offsets"], case["routing"], case["max_rank"],
                                  backend="reference")
    y.backward(case["grad_out"].double())
    return y.detach(), {n: (t.grad if t is not None else None) for n, t in leaves.items()}


def _compare(case, frozen=()):
    x_dtype = case["x"].dtype
    launches = dict(triton_gemm.LAUNCH_COUNTS)
    y, grads = _fused(case, frozen)
    y_ref, grads_ref = _truth(case, x_dtype, frozen)
    assert y.dtype == x_dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, x_dtype, "y")
    for name in GRADS:
        if case[name] is None or name in frozen:
            assert grads[name] is None, name
            continue
        assert grads[name].dtype == case[name].dtype, name
        assert_close(grads[name], grads_ref[name], x_dtype, f"grad of {name}")
    # the fused kernel ran, forward and dgrad (not a torch fallback)
    for role in ("forward", "dgrad"):
        assert triton_gemm.LAUNCH_COUNTS.get(role, 0) > launches.get(role, 0), role


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_odd_sizes_with_masks_and_no_adapter_rows(dtype):
    """in=33, out=17, T=13, lang12-like ranks 2;2;8 over 3 languages, pruned B, id -1 rows."""
    _compare(_problem(13, 33, 17, [2, 2, 8], dtype=dtype, seed=1))


def test_empty_groups_mixed_ranks():
    """Only every third of 7 languages present (empty groups), ranks 1..17."""
    _compare(_problem(13, 20, 19, [3, 17, 1, 5, 2, 8, 4], spread="sparse", seed=2))


def test_single_language():
    _compare(_problem(9, 16, 33, [5], spread="single", seed=3))


def test_256_languages():
    """256 languages of rank 1 (R = 256 extra K-steps), some rows without adapter."""
    _compare(_problem(13, 17, 18, [1] * 256, spread="with_none", seed=4))


def test_all_rows_without_adapter():
    """Every id -1: y is the base Linear, the LoRA gradients are zero."""
    case = _problem(7, 17, 18, [2, 3], seed=5)
    case["routing"] = lslo_kernels.build_routing(torch.full((7,), -1, device=DEVICE), 2)
    _compare(case)
    _y, grads = _fused(case)
    assert not grads["lora_a"].any() and not grads["lora_b"].any() and not grads["scales"].any()


def test_mixed_factors_bf16_and_frozen_base_without_bias():
    """float32 factors with bf16 x: rounded as read, float32 gradients; a frozen weight and no bias
    get no gradient."""
    case = _problem(13, 33, 17, [2, 2, 8], dtype=torch.bfloat16, factor_dtype=torch.float32, bias=False, seed=6)
    _compare(case, frozen=("weight",))


def test_rank_zero_language_and_strided_bias():
    """A language of rank 0 (no rank column: its rows get the base only) and a bias read with a
    stride (a slice of a wider tensor)."""
    case = _problem(13, 17, 18, [2, 0, 3], seed=11)
    case["bias"] = torch.randn(36, device=DEVICE)[::2]
    _compare(case)


def test_no_tokens():
    """T = 0: an empty y and zero gradients of the factors and scales."""
    case = _problem(1, 17, 18, [2, 3], seed=12)
    for name in ("x", "grad_out"):
        case[name] = case[name][:0]
    case["routing"] = lslo_kernels.build_routing(torch.zeros(0, dtype=torch.int64, device=DEVICE), 2)
    y, grads = _fused(case)
    assert y.shape == (0, 18)
    for name in ("lora_a", "lora_b", "scales", "weight", "bias"):
        assert grads[name].shape == case[name].shape and not grads[name].any(), name


def test_decode_entry_matches_training_forward():
    case = _problem(11, 33, 17, [2, 2, 8], seed=7)
    r = case["routing"]
    with torch.no_grad():
        y = triton_gemm.linear_decode_triton(
            case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], case["prune_mask"],
            case["scales"], case["rank_offsets"], r.sorted_token_idx, r.lang_offsets, case["max_rank"], None)
    y_ref, _grads = _truth(case, torch.float32)
    assert_close(y, y_ref, torch.float32, "decode y")


def test_bad_arguments_are_named():
    case = _problem(5, 16, 8, [2, 2], seed=8)
    r = case["routing"]
    args = {name: case[name] for name in ("x", "weight", "bias", "lora_a", "lora_b", "prune_mask", "scales",
                                          "rank_offsets")}
    args.update(sorted_token_idx=r.sorted_token_idx, lang_offsets=r.lang_offsets, max_rank=2)
    with pytest.raises(ValueError, match="weight"):
        triton_gemm.linear_lora_triton(**{**args, "weight": case["weight"][:, :15]})
    with pytest.raises(TypeError, match="scales"):
        triton_gemm.linear_lora_triton(**{**args, "scales": case["scales"].double()})
    with pytest.raises(ValueError, match="sorted_token_idx"):
        triton_gemm.linear_lora_triton(**{**args, "sorted_token_idx": r.sorted_token_idx[:4]})


# ------------------------------------------------------------------------------ the switch
@pytest.fixture
def _reregister(monkeypatch):
    """Whatever a test sets LSLO_TRITON_GEMM to, the backend is registered from the real
    environment again afterwards."""
    yield monkeypatch
    monkeypatch.undo()
    triton_backend.register()


@pytest.mark.parametrize(("value", "on"), [("1", True), ("0", False), ("", triton_gemm.MEASURED_RULE
                                                                        if triton_ready else False)])
def test_switch_registers_the_fused_entries(_reregister, value, on):
    _reregister.setenv("LSLO_TRITON_GEMM", value)
    assert triton_backend.register()
    impl = lslo_kernels.get_backend("triton")
    assert (impl.linear is triton_gemm.linear_lora_triton) is on
    assert (impl.linear_decode is triton_gemm.linear_decode_triton) is on
    if not on:
        assert impl.linear is None and impl.linear_decode is None


def test_default_rule_is_off_until_measured(_reregister):
    _reregister.delenv("LSLO_TRITON_GEMM", raising=False)
    assert triton_gemm.MEASURED_RULE is False and triton_gemm.enabled() is False


def test_bad_switch_value_is_named(_reregister):
    _reregister.setenv("LSLO_TRITON_GEMM", "yes")
    with pytest.raises(ValueError, match="LSLO_TRITON_GEMM"):
        triton_gemm.enabled()


def test_layer_training_step_takes_the_fused_gemm(_reregister):
    """LSLoLinear on backend triton with LSLO_TRITON_GEMM=1: its training forward runs the fused
    kernel, and output and adapter gradients equal the same layer on the reference backend."""
    _reregister.setenv("LSLO_TRITON_GEMM", "1")
    assert triton_backend.register()
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20).to(DEVICE)
    layers = {name: lslo.LSLoLinear(base, [2, 4, 3], backend=name, init="reference") for name in ("triton", "reference")}
    layers["reference"].load_state_dict(layers["triton"].state_dict())
    x = torch.randn(3, 5, 24, device=DEVICE)
    lang = torch.tensor([0, 2, -1], device=DEVICE)
    before = triton_gemm.LAUNCH_COUNTS.get("forward", 0)
    out = {}
    for name, layer in layers.items():
        y = layer(x, lang=lang)
        y.square().sum().backward()
        out[name] = (y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    assert triton_gemm.LAUNCH_COUNTS.get("forward", 0) == before + 1
    for got, want, what in zip(out["triton"], out["reference"], ("y", "grad A", "grad B")):
        torch.testing.assert_close(got, want, atol=TOLERANCES[torch.float32][0] * 10, rtol=TOLERANCES[torch.float32][1],
                                   msg=lambda m, what=what: f"{what}: {m}")


def test_layer_no_grad_calls_take_the_fused_gemm(_reregister):
    """With the switch on, no-grad calls of LSLoLinear (the first through _decode_forward, then the
    planned call) run the fused kernel once each, 2-D and 3-D input, and equal the reference layer."""
    _reregister.setenv("LSLO_TRITON_GEMM", "1")
    assert triton_backend.register()
    torch.manual_seed(1)
    base = torch.nn.Linear(24, 20).to(DEVICE)
    layer = lslo.LSLoLinear(base, [2, 4, 3], backend="triton", init="reference")
    reference = lslo.LSLoLinear(base, [2, 4, 3], backend="reference", init="reference")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(6, 24, device=DEVICE)
    routing = lslo_kernels.build_routing(torch.tensor([0, 2, -1, 1, 1, 0], device=DEVICE), 3)
    before = triton_gemm.LAUNCH_COUNTS.get("forward", 0)
    with torch.no_grad():
        want = reference(x, lang=routing)
        for _ in range(2):
            torch.testing.assert_close(layer(x, lang=routing), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x.view(2, 3, 24), lang=routing), want.view(2, 3, 20), atol=1e-5, rtol=1e-5)
    assert layer._decode_plan is not None and layer._decode_plan[2] is triton_gemm.linear_decode_triton
    assert triton_gemm.LAUNCH_COUNTS.get("forward", 0) == before + 3


# ------------------------------------------------------------------ sm_90 compile, no GPU needed
def _ptxas_available() -> bool:
    try:
        import triton
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this triton build
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the tests above compile the kernel for real")
@pytest.mark.skipif(not (triton_ready and _ptxas_available()), reason="triton's NVIDIA backend / ptxas not present")
def test_fused_gemm_compiles_for_sm90(tmp_path):
    """Every launch of the fused GEMM (shrink, forward, dgrad shrink, dgrad; decoding) compiles for
    sm_90 with Triton's compiler and ptxas (``bench_triton_gpu.py --aot``), bf16 and fp32: no error,
    no register spill, shared memory within an H100's 227 KB."""
    # A process of its own: interpreted kernels (this module's) patch triton.language for good.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    csv_path = tmp_path / "aot.csv"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_triton_gpu.py"), "--aot", "--aot-quick", "--aot-only",
         "_gemm_kernel", "--shapes", "1024x4096", "--csv", str(csv_path)],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["provider"] for r in rows} == {"aot:_gemm_kernel"} and {r["metric"] for r in rows} == {"compiled"}
    # the shrink (masked), the forward (second operand pair and bias) and the dgrad, bf16 and fp32
    variants = {(r["mode"].split("]")[0], r["mode"].split()[1]) for r in rows}
    for flags in ("HAS_SECOND=False,HAS_BIAS=False,LANG_MASK=True", "HAS_SECOND=True,HAS_BIAS=True,LANG_MASK=False",
                  "HAS_SECOND=True,HAS_BIAS=False,LANG_MASK=False"):
        for dtype in ("bfloat16", "float32"):
            assert any(flags in v and d == dtype for v, d in variants), (flags, dtype)
    for r in rows:
        fields = dict(kv.split("=") for kv in r["note"].split(";") if "=" in kv)
        assert int(fields["spill"]) == 0 and int(fields["shared"]) <= 232448, r


def test_dual_layer_training_step_takes_the_fused_gemm(_reregister):
    """Weight Learning's LSLoDualLinear with the switch on: the base and the source set's term in the
    fused GEMM (scales times a learned mixing weight), the target set's term after it; output and
    every parameter's gradient, mixing logits included, equal the reference backend's."""
    _reregister.setenv("LSLO_TRITON_GEMM", "1")
    assert triton_backend.register()
    torch.manual_seed(2)
    base = torch.nn.Linear(24, 20).to(DEVICE)
    layers = {name: lslo.LSLoDualLinear(base, [2, 4, 3], backend=name, init="reference")
              for name in ("triton", "reference")}
    layers["reference"].load_state_dict(layers["triton"].state_dict())
    x = torch.randn(3, 5, 24, device=DEVICE)
    src, tgt = torch.tensor([0, 2, -1], device=DEVICE), torch.tensor([1, 1, 0], device=DEVICE)
    before = triton_gemm.LAUNCH_COUNTS.get("forward", 0)
    outputs = {}
    for name, layer in layers.items():
        y = layer(x, src=src, tgt=tgt)
        y.square().sum().backward()
        outputs[name] = y.detach()
    assert triton_gemm.LAUNCH_COUNTS.get("forward", 0) == before + 1
    torch.testing.assert_close(outputs["triton"], outputs["reference"], atol=1e-4, rtol=1e-4)
    want = dict(layers["reference"].named_parameters())
    grads = 0
    for name, param in layers["triton"].named_parameters():
        if param.grad is None:
            assert want[name].grad is None, name
            continue
        grads += 1
        torch.testing.assert_close(param.grad, want[name].grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert grads >= 5  # A and B of both sets and the mixing logits


# ------------------------------------------------------------------ graph safety
def test_host_glue_reads_no_device_value(monkeypatch):
    """Everything around the kernel launches (each row's language from the offsets, the scale fold,
    the small gradients, d s by segment) reads no tensor value into Python, so the CUDA path is
    capturable: the launches are stubbed out (the interpreter itself reads its arguments on the
    host) and the project's host-read detector (tests/test_graph_safe.py) watches the rest."""
    monkeypatch.setattr(triton_gemm, "_gemm", lambda role, a1, b1_strides, b1, out, **kwargs: out.zero_())
    case = _problem(13, 33, 17, [2, 2, 8], seed=9)
    leaves = _leaves(case, lambda t: t)
    r = case["routing"]

    def step():
        y = triton_gemm.linear_lora_triton(
            leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], case["prune_mask"],
            leaves["scales"], case["rank_offsets"], r.sorted_token_idx, r.lang_offsets, case["max_rank"])
        y.backward(case["grad_out"])

    assert _reads(step) == []
    assert leaves["scales"].grad is not None and leaves["lora_a"].grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_cuda():
    """The fused GEMM's training step and decoding call make no host synchronisation on CUDA."""
    case = _problem(64, 96, 80, [2, 2, 8], seed=10)
    _fused(case)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _fused(case)
        r = case["routing"]
        with torch.no_grad():
            triton_gemm.linear_decode_triton(
                case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], case["prune_mask"],
                case["scales"], case["rank_offsets"], r.sorted_token_idx, r.lang_offsets, case["max_rank"], None)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_benchmark_provider_agrees_with_the_reference(monkeypatch):
    """bench_triton_gpu.py's ``triton_gemm`` provider passes the benchmark's own correctness check
    (y, dx, dA, dB against the reference, lang30 ranks, bf16), training and decoding, so the GPU
    run times it instead of reporting it failed."""
    from benchmarks import bench_triton_gpu as bench  # the benchmark module, only for this test

    monkeypatch.setattr(bench, "DEVICE", str(DEVICE))
    problem = bench.make_layer_problem(40, 24, 20, torch.bfloat16)
    grad_out = torch.randn(20, 24, device=DEVICE).to(torch.bfloat16)
    prov = bench.prepare("triton_gemm", problem)
    meta = prov.prepare(problem.lang)
    assert bench.check_provider(prov, problem, meta, bench._truth(problem, grad_out)["lora"], grad_out) == ""
    assert bench.check_provider(prov, problem, meta, bench._truth(problem, None)["lora"], grad_out) == ""
