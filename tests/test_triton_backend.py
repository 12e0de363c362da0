"""Triton backend against the reference: forward, every gradient, odd sizes, mixed ranks, language
layouts, all three dtypes; launch-grid edge cases; the registration; GPU-only sweeps. The fused
paths (``triton_kernels.FUSED``) have their own section; every other test runs with them off,
whatever ``LSLO_TRITON_FUSED`` says.

Without CUDA the kernels run in Triton's CPU interpreter (slow: sizes here stay small).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lslo_kernels
from lslo_kernels import triton_backend
from tests.utils import assert_close, make_case, run_op

# Triton decides compiled vs interpreted when its @triton.jit decorators run. Importing
# lslo_kernels without CUDA does not import the kernels module, and register() (re)builds it
# under the interpreter when it was imported in the other mode first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton_ready = triton_backend.register()
pytestmark = pytest.mark.skipif(not triton_ready, reason="triton not importable")

if triton_ready:
    from lslo_kernels import triton_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MIXED_RANKS = [1, 64, 2, 17, 8, 33, 3, 16, 5, 2, 8, 1]  # 12 languages, ranks 1..64 in one layer
LANG30 = [2] * 16 + [8] * 14


@pytest.fixture(autouse=True)
def _unfused_unless_asked(monkeypatch):
    """The launchers' default path (fused off) for every test; fused tests switch it on themselves."""
    if triton_ready:
        monkeypatch.setattr(triton_kernels, "FUSED", False)


def gpu(test):
    """GPU-only test: marked ``gpu`` (``pytest -m gpu`` selects them) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))



def _to_device(case: dict) -> dict:
    out = dict(case)
    for name, value in case.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.to(DEVICE)
    r = case["routing"]
    out["routing"] = lslo_kernels.build_routing(r.lang.to(DEVICE), r.num_languages)
    return out


def _launches() -> int:
    return sum(triton_kernels.LAUNCH_COUNTS.values())


def _compare(case: dict, dtype: torch.dtype) -> None:
    """Public op (autograd included) with backend triton vs reference: y and all four gradients."""
    y_ref, grads_ref = run_op(case, "reference")
    before = _launches()
    y, grads = run_op(case, "triton")
    if case["x"].shape[0] and case["lora_a"].shape[0]:
        assert _launches() == before + 6, "triton kernels did not run"  # 2 forward + 4 backward
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "triton y")
    for name, g, g_ref in zip(("dx", "dbase", "dA", "dB", "dscales"), grads, grads_ref):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert_close(g, g_ref, dtype, f"triton {name}")
    assert torch.all(grads[3][~case["prune_mask"]] == 0), "pruned entries of B got a gradient"


def _direct_args(case: dict):
    r = case["routing"]
    return (case["lora_a"], case["lora_b"], case["prune_mask"], case["scales"], case["rank_offsets"],
            r.sorted_token_idx, r.lang_offsets, case["max_rank"])


# ------------------------------------------------------------------ registration
def test_backend_registered_for_this_device():
    assert lslo_kernels.resolve_backend("triton", DEVICE) == "triton"
    backend = lslo_kernels.get_backend("triton")
    assert backend.dtypes == (torch.float32, torch.float16, torch.bfloat16)
    assert backend.forward is triton_kernels.lora_forward_triton
    with pytest.raises(TypeError, match="does not support dtype"):
        lslo_kernels.resolve_backend("triton", DEVICE, torch.float64)


def test_register_is_idempotent():
    assert triton_backend.register()
    assert triton_backend.register()
    assert lslo_kernels.get_backend("triton").forward is triton_kernels.lora_forward_triton


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is for machines without CUDA")
def test_register_rebuilds_kernels_imported_before_interpret_mode(monkeypatch):
    # Another module imported the kernels (compiled mode) before TRITON_INTERPRET was set.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    importlib.reload(triton_kernels)
    assert not triton_kernels.INTERPRETED
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.register()
    assert triton_kernels.INTERPRETED
    monkeypatch.setattr(triton_kernels, "FUSED", False)  # the reload reset it to the default
    _compare(make_case(9, 5, 6, [2, 3], density=0.5, spread="with_none", seed=14), torch.float32)


# ------------------------------------------------------------------ correctness
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features, out_features", [(1, 123), (7, 64), (64, 7), (123, 1), (123, 123)])
def test_matches_reference_odd_sizes(dtype, in_features, out_features):
    case = make_case(29, in_features, out_features, MIXED_RANKS, density=0.5, spread="with_none",
                     dtype=dtype, seed=in_features * 1000 + out_features)
    _compare(_to_device(case), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ranks, spread", [
    ([3], "uniform"),                 # L = 1
    ([1, 64], "with_none"),           # L = 2, the extreme ranks
    (MIXED_RANKS, "sparse"),          # L = 12, empty languages
    (LANG30, "with_none"),            # L = 30
    (LANG30, "single"),               # one language owns every tile, 29 empty
])
def test_matches_reference_language_layouts(dtype, ranks, spread):
    case = make_case(70, 33, 40, ranks, density=1.0, spread=spread, dtype=dtype, seed=len(ranks))
    _compare(_to_device(case), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [1.0, 0.1, 0.0])
def test_matches_reference_mask_densities(dtype, density):
    case = make_case(40, 20, 24, [2, 8, 5], density=density, spread="with_none", dtype=dtype, seed=11)
    _compare(_to_device(case), dtype)


def test_many_tokens_per_language_span_several_tiles():
    # 300 tokens in 2 languages: 64-row tiles, the last one of each language partial.
    case = make_case(300, 16, 20, [4, 9], density=0.5, spread="with_none", dtype=torch.float32, seed=4)
    _compare(_to_device(case), torch.float32)


def test_256_languages():
    ranks = [1 + (i * 7) % 16 for i in range(256)]
    case = make_case(90, 8, 9, ranks, density=0.5, spread="with_none", dtype=torch.float32, seed=6)
    _compare(_to_device(case), torch.float32)


def test_only_no_adapter_tokens():
    case = make_case(20, 5, 6, [2, 3], spread="uniform", dtype=torch.float32, seed=8)
    case["routing"] = lslo_kernels.build_routing(torch.full((20,), -1, dtype=torch.int64), 2)
    case = _to_device(case)
    y, grads = run_op(case, "triton")
    assert torch.equal(y, case["base_out"])
    assert torch.count_nonzero(grads[0]) == 0
    assert torch.count_nonzero(grads[2]) == 0 and torch.count_nonzero(grads[3]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    case = _to_device(make_case(0, 7, 5, [2, 8], dtype=dtype))
    y, grads = run_op(case, "triton")
    assert y.shape == (0, 5) and y.dtype == dtype and grads[0].shape == (0, 7)
    assert torch.count_nonzero(grads[2]) == 0 and torch.count_nonzero(grads[3]) == 0


def test_h_and_untouched_rows_direct():
    """The launchers themselves: h has zeros past r_l and for id -1 rows; y rows of id -1 tokens
    are base_out bit for bit; the backward accepts the h it produced."""
    case = _to_device(make_case(45, 19, 21, [1, 6, 3], density=0.5, spread="with_none", seed=9))
    args = _direct_args(case)
    y, h = triton_kernels.lora_forward_triton(case["x"], case["base_out"], *args)
    y_ref, h_ref = lslo_kernels.lora_forward_reference(case["x"], case["base_out"], *args)
    assert h.dtype == torch.float32 and h.shape == (45, 6)
    assert_close(h, h_ref, torch.float32, "h")
    assert_close(y, y_ref, torch.float32, "y")
    none = case["routing"].lang < 0
    assert none.any()
    assert torch.equal(y[none], case["base_out"][none]) and torch.count_nonzero(h[none]) == 0
    grads = triton_kernels.lora_backward_triton(case["grad_out"], case["x"], h, *args)
    grads_ref = lslo_kernels.lora_backward_reference(case["grad_out"], case["x"], h_ref, *args)
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref):
        assert_close(g, g_ref, torch.float32, name)
    assert torch.count_nonzero(grads[0][none]) == 0


def _forced_config(monkeypatch, **kernel_overrides):
    """Make every launch use the given KernelConfig fields (e.g. num_splits=3) for all kernels."""
    original = triton_kernels._launch_config

    def forced(*args):
        cfg = original(*args)
        roles = ("fwd_shrink", "fwd_expand", "bwd_shrink", "bwd_expand", "grad_a", "grad_b")
        return dataclasses.replace(cfg, **{
            role: dataclasses.replace(getattr(cfg, role), **{
                k: v for k, v in kernel_overrides.items() if k != "num_splits" or role.endswith("shrink")
            })
            for role in roles
        })

    monkeypatch.setattr(triton_kernels, "_launch_config", forced)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_partials_match_reference(monkeypatch, dtype):
    """Split-K shrinks (3 feature splits of 16-wide steps, the last one short) give the reference's
    y, h and gradients; the expand kernels' sum of the partials lands in h and in dA's g."""
    _forced_config(monkeypatch, num_splits=3, block_f=16, block_t=16)
    case = _to_device(make_case(50, 70, 41, [2, 8, 5], density=0.5, spread="with_none", dtype=dtype, seed=21))
    args = _direct_args(case)
    y, h = triton_kernels.lora_forward_triton(case["x"], case["base_out"], *args)
    y_ref, h_ref = lslo_kernels.lora_forward_reference(case["x"], case["base_out"], *args)
    assert_close(h, h_ref, dtype, "split-K h")
    assert_close(y, y_ref, dtype, "split-K y")
    _compare(case, dtype)


def test_split_rule_targets_small_batches():
    # Decoding (T=160, 30 languages): ~40 token tiles for 132 multiprocessors, so the reduction
    # over features is split; a training batch (T=8192) already has enough tiles.
    small = triton_kernels._launch_config(160, 30, 1024, 4096, 8, torch.bfloat16, 132)
    big = triton_kernels._launch_config(8192, 30, 1024, 4096, 8, torch.bfloat16, 132)
    assert small.fwd_shrink.num_splits > 1 and small.bwd_shrink.num_splits > 1
    assert big.fwd_shrink.num_splits <= 2
    tiny_features = triton_kernels._launch_config(160, 30, 32, 32, 8, torch.bfloat16, 132)
    assert tiny_features.fwd_shrink.num_splits == 1


def _random_layouts_property(compare, *, examples: int, max_tokens: int, max_rank: int, k: int, d: int) -> None:
    """Tile bookkeeping under random language layouts (hypothesis, few examples: interpreter):
    ``compare(case, dtype)`` on random token counts, rank lists and spreads."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True)
    @hypothesis.given(
        num_tokens=st.integers(1, max_tokens),
        ranks=st.lists(st.integers(1, max_rank), min_size=1, max_size=9),
        spread=st.sampled_from(["uniform", "single", "with_none", "sparse"]),
        seed=st.integers(0, 2**16),
    )
    def check(num_tokens, ranks, spread, seed):
        case = make_case(num_tokens, k, d, ranks, density=0.7, spread=spread, dtype=torch.float32, seed=seed)
        compare(_to_device(case), torch.float32)

    check()


def test_random_layouts_property():
    _random_layouts_property(_compare, examples=12, max_tokens=90, max_rank=20, k=5, d=6)


def test_compile_fullgraph_traces_the_op():
    case = _to_device(make_case(17, 6, 5, [2, 3], density=0.5, spread="with_none", seed=12))

    def f(x, base_out, a, b):
        return lslo_kernels.grouped_lora(x, base_out, a, b, case["prune_mask"], case["scales"],
                                         case["rank_offsets"], case["routing"], case["max_rank"],
                                         backend="triton")

    leaves = [case[n].clone().requires_grad_(True) for n in ("x", "base_out", "lora_a", "lora_b")]
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    y.backward(case["grad_out"])
    y_ref, grads_ref = run_op(case, "reference")
    assert_close(y.detach(), y_ref, torch.float32, "compiled y")
    for name, leaf, g_ref in zip(("dx", "dbase", "dA", "dB"), leaves, grads_ref):
        assert_close(leaf.grad, g_ref, torch.float32, f"compiled {name}")


def test_opcheck_registered_ops():
    case = _to_device(make_case(13, 6, 5, [2, 1, 4], density=0.5, spread="with_none", seed=2))
    r = case["routing"]
    leaves = [case[n].clone().requires_grad_(True) for n in ("x", "base_out", "lora_a", "lora_b")]
    fwd_args = (*leaves, case["prune_mask"], case["scales"], case["rank_offsets"],
                r.sorted_token_idx, r.lang_offsets, case["max_rank"], "triton")
    torch.library.opcheck(torch.ops.lslo.grouped_lora_fwd.default, fwd_args)
    _y, h = torch.ops.lslo.grouped_lora_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args))
    bwd_args = (case["grad_out"], case["x"], h, *_direct_args(case), "triton")
    torch.library.opcheck(torch.ops.lslo.grouped_lora_bwd.default, bwd_args)


# ------------------------------------------------------------------ fused paths (FUSED)
_OLD_KERNELS = ("shrink", "expand", "weight_grad")


def _launch_diff(before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in triton_kernels.LAUNCH_COUNTS.items() if v != before.get(k, 0)}


def _compare_fused(case: dict, dtype: torch.dtype, fused_forward: bool = True) -> None:
    """With FUSED on: the public op's y and all five gradients (dscales included) against the
    reference, and the launches taken: 1 forward (or the shrink + expand pair where the small-T
    rule says no) and 2 backward, none of the unfused backward kernels."""
    y_ref, grads_ref = run_op(case, "reference")
    before = dict(triton_kernels.LAUNCH_COUNTS)
    with triton_kernels.fused_kernels(True):
        y, grads = run_op(case, "triton")
    if case["x"].shape[0] and case["lora_a"].shape[0]:
        forward = {"fused_forward": 1} if fused_forward else {"shrink": 1, "expand": 1}
        assert _launch_diff(before) == {**forward, "fused_bwd_dy": 1, "fused_bwd_x": 1}
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "fused y")
    for name, g, g_ref in zip(("dx", "dbase", "dA", "dB", "dscales"), grads, grads_ref):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert_close(g, g_ref, dtype, f"fused {name}")
    assert torch.all(grads[3][~case["prune_mask"]] == 0), "pruned entries of B got a gradient"
    none = case["routing"].lang < 0
    assert torch.equal(y[none], case["base_out"][none]), "rows of id -1 tokens must be base_out exactly"
    assert torch.count_nonzero(grads[0][none]) == 0


def _small_blocks(monkeypatch, *, block_t=16, block_k=16, block_d=16, num_splits=3, block_f=16):
    """Force 16-wide tiles everywhere (several d-blocks, k-steps, token steps per language) and
    ``num_splits`` feature splits in the backward shrink, so every loop and the split sum run."""
    original = triton_kernels._launch_config

    def forced(*args):
        cfg = original(*args)
        small = {"block_t": block_t, "block_f": block_f}
        return dataclasses.replace(
            cfg,
            fused_fwd=triton_kernels.FusedForwardConfig(block_t, block_k, block_d, 4, 1),
            fwd_shrink=dataclasses.replace(cfg.fwd_shrink, **small),
            fwd_expand=dataclasses.replace(cfg.fwd_expand, **small),
            bwd_shrink=dataclasses.replace(cfg.bwd_shrink, num_splits=num_splits, **small),
            bwd_expand=dataclasses.replace(cfg.bwd_expand, **small),
            grad_a=dataclasses.replace(cfg.grad_a, **small),
            grad_b=dataclasses.replace(cfg.grad_b, **small),
        )

    monkeypatch.setattr(triton_kernels, "_launch_config", forced)


def _lang_case(lang: torch.Tensor, ranks, in_features, out_features, dtype, seed, density=0.5) -> dict:
    """make_case with the given per-token language ids (e.g. every language present)."""
    case = make_case(lang.shape[0], in_features, out_features, ranks, density=density, dtype=dtype, seed=seed)
    case["routing"] = lslo_kernels.build_routing(lang, len(ranks))
    return _to_device(case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features, out_features", [(1, 123), (123, 1), (37, 45)])
def test_fused_matches_reference_odd_sizes(dtype, in_features, out_features):
    case = make_case(29, in_features, out_features, MIXED_RANKS, density=0.5, spread="with_none", dtype=dtype,
                     seed=in_features * 1000 + out_features)
    _compare_fused(_to_device(case), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_small_blocks_split_partials(monkeypatch, dtype):
    """Odd sizes over several 16-wide d-blocks and k-steps, 3 backward feature splits (the last one
    short), languages of ~19 tokens (two token steps, two tiles), ranks 1..64, id -1 tokens."""
    _small_blocks(monkeypatch)
    case = make_case(96, 53, 71, [1, 64, 17, 5], density=0.5, spread="with_none", dtype=dtype, seed=31)
    _compare_fused(_to_device(case), dtype)


@pytest.mark.parametrize("layout", ["single", "all", "sparse", "one_language", "only_none"])
def test_fused_language_layouts(monkeypatch, layout):
    """One language owning every token (the others empty), every language present, every third
    one present, L = 1, and a batch of id -1 tokens only (no adapter work at all)."""
    _small_blocks(monkeypatch, num_splits=2)
    gen = torch.Generator().manual_seed(5)
    ranks = [3] if layout == "one_language" else MIXED_RANKS
    num_langs = len(ranks)
    if layout == "single":
        lang = torch.full((40,), 4, dtype=torch.int64)
    elif layout == "all":
        lang = torch.arange(40) % num_langs
        lang = lang[torch.randperm(40, generator=gen)]
    elif layout == "sparse":
        lang = (torch.arange(40) % 4) * 3  # languages 0, 3, 6, 9
    elif layout == "one_language":
        lang = torch.randint(-1, 1, (40,), generator=gen)
    else:
        lang = torch.full((40,), -1, dtype=torch.int64)
    _compare_fused(_lang_case(lang, ranks, 21, 35, torch.float32, seed=7), torch.float32)


def test_fused_lang30_bf16():
    """The paper's lang30 ranks (2 with B 90% pruned, 8) at T=64, bf16: the dtype the GPU runs."""
    ranks = LANG30
    case = make_case(64, 48, 40, ranks, density=0.1, spread="with_none", dtype=torch.bfloat16, seed=8)
    _compare_fused(_to_device(case), torch.bfloat16)


def test_fused_forward_rule_falls_back_to_two_launches(monkeypatch):
    """Where the small-T rule says no, the forward is the shrink + expand pair; the backward stays
    fused (with 6 splits asked for: capped at _FUSED_MAX_SPLITS, 3 left after rounding to 16)."""
    _small_blocks(monkeypatch, num_splits=6)
    monkeypatch.setattr(triton_kernels, "FUSED_FORWARD_MAX_REREAD_BYTES", 0)
    case = make_case(50, 40, 36, [2, 8, 5], density=0.5, spread="with_none", dtype=torch.bfloat16, seed=12)
    _compare_fused(_to_device(case), torch.bfloat16, fused_forward=False)


def test_fused_forward_rule_picks_small_batches():
    """bf16 lang30 (R = 144) at the M2M-124 shapes: T=160 fused everywhere, T=512 at 1024->1024
    only, T=8192 nowhere; one d-block never re-reads anything."""
    def fits(tokens, k, d):
        cfg = triton_kernels._launch_config(tokens, 30, k, d, 8, torch.bfloat16, 132)
        return triton_kernels._fused_forward_fits(cfg.fused_fwd, tokens, 144, k, d, 2)

    shapes = [(1024, 1024), (1024, 4096), (4096, 1024)]
    assert [fits(160, k, d) for k, d in shapes] == [True, True, True]
    assert [fits(512, k, d) for k, d in shapes] == [True, False, False]
    assert [fits(8192, k, d) for k, d in shapes] == [False, False, False]
    assert fits(100_000, 4096, 64)


def test_fused_direct_h_and_scale_grad():
    """The launchers themselves: h of the single-launch forward (zeros past r_l and for id -1 rows)
    and the backward's d scales against the reference, fused and unfused outputs in agreement."""
    case = _to_device(make_case(45, 19, 21, [1, 6, 3], density=0.5, spread="with_none", seed=9))
    args = _direct_args(case)
    with triton_kernels.fused_kernels(True):
        y, h = triton_kernels.lora_forward_triton(case["x"], case["base_out"], *args)
        grads = triton_kernels.lora_backward_triton(case["grad_out"], case["x"], h, *args)
    y_ref, h_ref = lslo_kernels.lora_forward_reference(case["x"], case["base_out"], *args)
    grads_ref = lslo_kernels.lora_backward_reference(case["grad_out"], case["x"], h_ref, *args)
    assert h.dtype == torch.float32 and h.shape == (45, 6)
    assert_close(h, h_ref, torch.float32, "fused h")
    assert_close(y, y_ref, torch.float32, "fused y")
    for name, g, g_ref in zip(("dx", "dA", "dB", "dscales"), grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        assert_close(g, g_ref, torch.float32, f"fused {name}")
    unfused = triton_kernels.lora_backward_triton(case["grad_out"], case["x"], h, *args)
    assert_close(grads[3], unfused[3], torch.float32, "fused vs unfused dscales")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("single_launch", [True, False])
def test_fused_add_in_place_strided(monkeypatch, dtype, single_launch):
    """add_ (spec.ADD) into a column slice of a wider output from a column slice of x: the single
    launch or, past the small-T rule, shrink + expand adding into ``out``; other columns and rows
    of id -1 tokens untouched; same values as the reference's add."""
    _small_blocks(monkeypatch, num_splits=1)
    if not single_launch:
        monkeypatch.setattr(triton_kernels, "FUSED_FORWARD_MAX_REREAD_BYTES", 0)
    case = _to_device(make_case(33, 23, 27, [1, 17, 4], density=0.5, spread="with_none", dtype=dtype, seed=17))
    args = _direct_args(case)
    wide_x = torch.randn(33, 30, dtype=dtype, device=DEVICE)
    wide_x[:, 2:25] = case["x"]
    x = wide_x[:, 2:25]
    wide_out = torch.randn(33, 40, dtype=dtype, device=DEVICE)
    out = wide_out[:, 5:32]
    out.copy_(case["base_out"])
    expected_wide = wide_out.clone()
    lslo_kernels.lora_add_reference(expected_wide[:, 5:32], case["x"], *args)
    before = dict(triton_kernels.LAUNCH_COUNTS)
    with triton_kernels.fused_kernels(True):
        lslo_kernels.get_backend("triton").add_(out, x, *args)
    assert _launch_diff(before) == ({"fused_forward": 1} if single_launch else {"shrink": 1, "expand": 1})
    assert_close(out, expected_wide[:, 5:32], dtype, "add_ out")
    assert torch.equal(wide_out[:, :5], expected_wide[:, :5]) and torch.equal(wide_out[:, 32:], expected_wide[:, 32:])
    none = case["routing"].lang < 0
    assert torch.equal(out[none], case["base_out"][none])


def test_add_unfused_is_the_in_place_pair_and_equals_the_forward():
    """With FUSED off, add_ is the shrink + expand pair adding into ``out`` in place, bit for bit
    the forward's y."""
    case = _to_device(make_case(21, 9, 11, [2, 5], density=0.5, spread="with_none", seed=4))
    args = _direct_args(case)
    out = case["base_out"].clone()
    before = dict(triton_kernels.LAUNCH_COUNTS)
    lslo_kernels.get_backend("triton").add_(out, case["x"], *args)
    assert _launch_diff(before) == {"shrink": 1, "expand": 1}
    y, _h = triton_kernels.lora_forward_triton(case["x"], case["base_out"], *args)
    assert torch.equal(out, y)


def test_fused_layer_decoding_and_training():
    """An LSLoLinear on the triton backend with FUSED on: no_grad decoding (the in-place add_) and a
    training step give the reference backend's outputs and gradients."""
    import lslo

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20, device=DEVICE)
    layers = {name: lslo.LSLoLinear(base, [2, 7, 3], backend=name).to(DEVICE) for name in ("reference", "triton")}
    with torch.no_grad():
        init = {n: torch.randn_like(p) for n, p in layers["reference"].named_parameters() if n.startswith("lora")}
        for layer in layers.values():
            for n, p in layer.named_parameters():
                if n in init:
                    p.copy_(init[n])
    x = torch.randn(2, 9, 24, device=DEVICE)
    lang = torch.tensor([[0, 2, -1, 1, 1, 0, 2, 2, -1], [1, 1, 0, -1, 2, 0, 0, 1, 2]], device=DEVICE)
    with triton_kernels.fused_kernels(True), torch.no_grad():
        before = dict(triton_kernels.LAUNCH_COUNTS)
        y = layers["triton"](x, lang=lang)
        assert _launch_diff(before) == {"fused_forward": 1}
    with torch.no_grad():
        assert_close(y, layers["reference"](x, lang=lang), torch.float32, "decoding y")
    grads = {}
    for name, layer in layers.items():
        with triton_kernels.fused_kernels(name == "triton"):
            layer(x, lang=lang).square().sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in layer.named_parameters() if n.startswith("lora")}
        base.weight.grad = base.bias.grad = None
    assert grads["triton"].keys() == grads["reference"].keys() and grads["triton"]
    for n in grads["triton"]:
        assert_close(grads["triton"][n], grads["reference"][n], torch.float32, f"layer grad {n}")


@pytest.mark.parametrize("fused", [False, True])
def test_planned_layer_decoding_equals_the_reference(fused):
    """After its first no-grad call, an LSLoLinear on the triton backend decodes through its plan
    (F.linear, then triton's add_, without the layer's checks): the same outputs as the reference
    backend for ids from lslo.route on 3-D input, a Routing, and rows the kernel copies (a column
    stride); a wrong input width still gets the layer's ValueError."""
    import lslo

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20, device=DEVICE)
    layers = {name: lslo.LSLoLinear(base, [2, 7, 3], backend=name).to(DEVICE) for name in ("reference", "triton")}
    with torch.no_grad():
        init = torch.randn_like(layers["reference"].lora_B)
        for layer in layers.values():
            layer.lora_B.copy_(init)
            layer.lora_A.copy_(layers["reference"].lora_A)
    triton_layer = layers["triton"]
    x = torch.randn(2, 9, 24, device=DEVICE)
    flat_ids = torch.tensor([1] * 9 + [2] * 9, device=DEVICE)
    routing = lslo_kernels.build_routing(flat_ids, 3)
    strided = torch.randn(24, 18, device=DEVICE).t()
    with triton_kernels.fused_kernels(fused), torch.no_grad():
        with lslo.route(tgt=torch.tensor([1, 2], device=DEVICE)):
            for _ in range(2):  # the general path (which makes the plan), then the plan
                assert_close(triton_layer(x), layers["reference"](x), torch.float32, "context 3-D")
            assert triton_layer._decode_plan is not None
        flat = x.reshape(18, 24)
        assert_close(triton_layer(flat, lang=routing), layers["reference"](flat, lang=routing), torch.float32,
                     "routing")
        assert_close(triton_layer(strided, lang=routing), layers["reference"](strided, lang=routing), torch.float32,
                     "strided columns")
        assert triton_layer._decode_plan is not None
        with pytest.raises(ValueError, match="in_features=24"):
            triton_layer(torch.randn(18, 23, device=DEVICE), lang=routing)
        assert triton_layer._decode_plan is None  # dropped by the refused call; the next call makes it again
        assert_close(triton_layer(flat, lang=routing), layers["reference"](flat, lang=routing), torch.float32,
                     "after the error")
        assert triton_layer._decode_plan is not None


def test_fused_random_layouts_property(monkeypatch):
    """The same for the fused kernels, with small blocks and split-K so that tiles and splits vary."""
    _small_blocks(monkeypatch, num_splits=2)
    _random_layouts_property(_compare_fused, examples=8, max_tokens=70, max_rank=64, k=17, d=18)


def test_fused_opcheck_registered_ops():
    case = _to_device(make_case(13, 6, 5, [2, 1, 4], density=0.5, spread="with_none", seed=2))
    r = case["routing"]
    leaves = [case[n].clone().requires_grad_(True) for n in ("x", "base_out", "lora_a", "lora_b")]
    fwd_args = (*leaves, case["prune_mask"], case["scales"], case["rank_offsets"],
                r.sorted_token_idx, r.lang_offsets, case["max_rank"], "triton")
    with triton_kernels.fused_kernels(True):
        torch.library.opcheck(torch.ops.lslo.grouped_lora_fwd.default, fwd_args)
        _y, h = torch.ops.lslo.grouped_lora_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a
                                                  for a in fwd_args))
        bwd_args = (case["grad_out"], case["x"], h, *_direct_args(case), "triton")
        torch.library.opcheck(torch.ops.lslo.grouped_lora_bwd.default, bwd_args)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_factors_equal_casting_them_first(fused, dtype):
    """fp32 factors with 16-bit x (what LSLoLinear passes under autocast): the kernels round them as
    they read them, so y, h, grad_x, d scales and the in-place add equal the call with the factors
    cast first, and the fp32 dA / dB round to that call's 16-bit ones."""
    case = _to_device(make_case(37, 24, 20, MIXED_RANKS, density=0.5, spread="with_none", seed=21))
    x16 = {**case, "x": case["x"].to(dtype), "base_out": case["base_out"].to(dtype),
           "grad_out": case["grad_out"].to(dtype)}
    cast = {**x16, "lora_a": case["lora_a"].to(dtype), "lora_b": case["lora_b"].to(dtype)}
    with triton_kernels.fused_kernels(fused):
        y_mixed, h_mixed = triton_kernels.lora_forward_triton(x16["x"], x16["base_out"], *_direct_args(x16))
        y_cast, h_cast = triton_kernels.lora_forward_triton(cast["x"], cast["base_out"], *_direct_args(cast))
        g_mixed = triton_kernels.lora_backward_triton(x16["grad_out"], x16["x"], h_mixed, *_direct_args(x16))
        g_cast = triton_kernels.lora_backward_triton(cast["grad_out"], cast["x"], h_cast, *_direct_args(cast))
        out_mixed, out_cast = x16["base_out"].clone(), x16["base_out"].clone()
        triton_kernels.lora_add_triton(out_mixed, x16["x"], *_direct_args(x16))
        triton_kernels.lora_add_triton(out_cast, cast["x"], *_direct_args(cast))
    # Bit for bit where the conversion rounds to nearest even as torch's cast does: on a GPU, and for
    # fp16 in the interpreter. The interpreter truncates fp32 -> bf16 (even with
    # fp_downcast_rounding="rtne", triton 3.9): there, the bf16 tolerance.
    exact = not triton_kernels.INTERPRETED or dtype == torch.float16

    def same(got, want, name):
        if exact:
            assert torch.equal(got, want), name
        else:
            assert_close(got, want, dtype, name)

    same(y_mixed, y_cast, "y")
    same(h_mixed, h_cast, "h")
    same(out_mixed, out_cast, "add_ out")
    assert g_mixed[1].dtype == torch.float32 and g_mixed[2].dtype == torch.float32
    for name, gm, gc in zip(("dx", "dA", "dB", "dscales"), g_mixed, g_cast):
        same(gm.to(gc.dtype), gc, name)
    # and against the reference on the mixed inputs
    y_ref, h_ref = lslo_kernels.lora_forward_reference(x16["x"], x16["base_out"], *_direct_args(x16))
    assert_close(y_mixed, y_ref, dtype, "mixed y")
    with pytest.raises(TypeError, match="must have x's dtype"):  # fp16 factors with bf16 x: refused
        other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
        bad = {**x16, "lora_a": case["lora_a"].to(other), "lora_b": case["lora_b"].to(other)}
        triton_kernels.lora_forward_triton(x16["x"], x16["base_out"], *_direct_args(bad))


def test_fused_auto_mode_fuses_except_under_graph_capture(monkeypatch):
    """FUSED=None (the default): eager launches take the fused paths (single-launch forward at small
    T, two-launch backward), launches being captured into a CUDA graph the unfused ones; either way
    y and every gradient equal the reference's."""
    monkeypatch.setattr(triton_kernels, "FUSED", None)
    case = _to_device(make_case(19, 12, 10, [2, 5, 1], density=0.5, spread="with_none", seed=8))
    y_ref, grads_ref = run_op(case, "reference")
    for capturing, expected in (
        (False, {"fused_forward": 1, "fused_bwd_dy": 1, "fused_bwd_x": 1}),
        (True, {"shrink": 2, "expand": 2, "weight_grad": 2}),
    ):
        monkeypatch.setattr(triton_kernels, "_graph_capturing", lambda x, c=capturing: c)
        before = dict(triton_kernels.LAUNCH_COUNTS)
        y, grads = run_op(case, "triton")
        assert _launch_diff(before) == expected, capturing
        assert_close(y, y_ref, torch.float32, f"y capturing={capturing}")
        for name, g, g_ref in zip(("dx", "dbase", "dA", "dB", "dscales"), grads, grads_ref):
            assert_close(g, g_ref, torch.float32, f"{name} capturing={capturing}")


def test_fused_switch(monkeypatch):
    """LSLO_TRITON_FUSED: 0/1 (unset or empty = auto, None), anything else a ValueError naming the
    variable; fused_kernels() restores the previous value."""
    for unset in ("", " "):
        monkeypatch.setenv("LSLO_TRITON_FUSED", unset)
        assert triton_kernels._fused_from_env() is None
    monkeypatch.delenv("LSLO_TRITON_FUSED")
    assert triton_kernels._fused_from_env() is None
    monkeypatch.setenv("LSLO_TRITON_FUSED", "0")
    assert triton_kernels._fused_from_env() is False
    monkeypatch.setenv("LSLO_TRITON_FUSED", "1")
    assert triton_kernels._fused_from_env() is True
    with pytest.raises(TypeError, match="True, False or None"):
        with triton_kernels.fused_kernels("yes"):
            pass
    with triton_kernels.fused_kernels(None):
        assert triton_kernels.FUSED is None
    assert triton_kernels.FUSED is False  # this module's tests run forced-unfused (fixture)
    monkeypatch.setenv("LSLO_TRITON_FUSED", "yes")
    with pytest.raises(ValueError, match="LSLO_TRITON_FUSED must be 0 or 1, got 'yes'"):
        triton_kernels._fused_from_env()
    assert triton_kernels.FUSED is False
    with triton_kernels.fused_kernels():
        assert triton_kernels.FUSED is True
        with triton_kernels.fused_kernels(False):
            assert triton_kernels.FUSED is False
        assert triton_kernels.FUSED is True
    assert triton_kernels.FUSED is False


# ------------------------------------------------------------------ input checks
def test_launcher_rejects_bad_input():
    case = _to_device(make_case(6, 4, 5, [2, 3], seed=13))
    x, base = case["x"], case["base_out"]
    args = list(_direct_args(case))
    with pytest.raises(TypeError, match="float64"):
        triton_kernels.lora_forward_triton(x.double(), base.double(), *_direct_args(
            {**case, "lora_a": case["lora_a"].double(), "lora_b": case["lora_b"].double()}))
    if args[4].device.type == "cpu":  # on CUDA the check would cost a host sync: the kernels clamp instead
        with pytest.raises(ValueError, match="max_rank=2"):
            triton_kernels.lora_forward_triton(x, base, *args[:-1], 2)
    with pytest.raises(ValueError, match="rank_offsets"):
        triton_kernels.lora_forward_triton(x, base, *args[:4], args[4].int(), *args[5:])
    with pytest.raises(ValueError, match="prune_mask"):
        triton_kernels.lora_forward_triton(x, base, args[0], args[1], args[2].float(), *args[3:])
    with pytest.raises(ValueError, match="base_out"):
        triton_kernels.lora_forward_triton(x, base[:, :3], *args)
    for fused in (False, True):
        with triton_kernels.fused_kernels(fused):
            with pytest.raises(ValueError, match="out must be"):
                triton_kernels.lora_add_triton(base[:, :3].clone(), x, *args)
            with pytest.raises(ValueError, match="rank_offsets"):
                triton_kernels.lora_add_triton(base.clone(), x, *args[:4], args[4].int(), *args[5:])


# ------------------------------------------------------------------ GPU only
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 160, 2048])
@pytest.mark.parametrize("shape", [(1024, 1024), (1024, 4096), (4096, 1024), (123, 777)])
@pytest.mark.parametrize("ranks_name", ["lang30", "mixed12"])
def test_gpu_matches_reference_model_sizes(dtype, num_tokens, shape, ranks_name):
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be true fp32
    ranks = LANG30 if ranks_name == "lang30" else MIXED_RANKS
    case = make_case(num_tokens, shape[0], shape[1], ranks, density=0.1, spread="with_none", dtype=dtype,
                     seed=num_tokens)
    _compare(_to_device(case), dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spread", ["uniform", "single", "with_none", "sparse"])
def test_gpu_256_languages(dtype, spread):
    torch.backends.cuda.matmul.allow_tf32 = False
    ranks = [1 + (i * 7) % 64 for i in range(256)]
    case = make_case(4096, 256, 384, ranks, density=0.5, spread=spread, dtype=dtype, seed=3)
    _compare(_to_device(case), dtype)


@gpu
def test_gpu_cuda_graph_replay_with_new_routing():
    """No host sync in the launchers: capture once, replay with other language ids."""
    torch.backends.cuda.matmul.allow_tf32 = False
    case = _to_device(make_case(512, 256, 256, LANG30, density=0.1, spread="with_none", dtype=torch.bfloat16))
    r = case["routing"]
    static = {"sorted": r.sorted_token_idx.clone(), "offsets": r.lang_offsets.clone()}

    def args():
        return (case["lora_a"], case["lora_b"], case["prune_mask"], case["scales"], case["rank_offsets"],
                static["sorted"], static["offsets"], case["max_rank"])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        triton_kernels.lora_forward_triton(case["x"], case["base_out"], *args())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, h = triton_kernels.lora_forward_triton(case["x"], case["base_out"], *args())
    new_lang = torch.randint(-1, 30, (512,), device=DEVICE)
    new = lslo_kernels.build_routing(new_lang, 30)
    static["sorted"].copy_(new.sorted_token_idx)
    static["offsets"].copy_(new.lang_offsets)
    graph.replay()
    y_ref, h_ref = lslo_kernels.lora_forward_reference(case["x"], case["base_out"], *args())
    assert_close(y, y_ref, torch.bfloat16, "graph y")
    assert_close(h, h_ref, torch.bfloat16, "graph h")


@gpu
def test_gpu_cuda_graph_replay_backward():
    """The backward launchers (split-K partials included) replay from a CUDA graph too."""
    torch.backends.cuda.matmul.allow_tf32 = False
    case = _to_device(make_case(160, 1024, 512, LANG30, density=0.1, spread="with_none", dtype=torch.bfloat16))
    args = _direct_args(case)
    _y, h = triton_kernels.lora_forward_triton(case["x"], case["base_out"], *args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_kernels.lora_backward_triton(case["grad_out"], case["x"], h, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = triton_kernels.lora_backward_triton(case["grad_out"], case["x"], h, *args)
    fresh = torch.randn_like(case["grad_out"])
    case["grad_out"].copy_(fresh)
    graph.replay()
    grads_ref = lslo_kernels.lora_backward_reference(case["grad_out"], case["x"], h, *args)
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref):
        assert_close(g, g_ref, torch.bfloat16, f"graph {name}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compile_inductor_fullgraph(dtype):
    """torch.compile with the default (inductor) backend, fullgraph, forward and backward."""
    torch.backends.cuda.matmul.allow_tf32 = False
    case = _to_device(make_case(300, 256, 384, LANG30, density=0.1, spread="with_none", dtype=dtype, seed=5))

    def f(x, base_out, a, b):
        return lslo_kernels.grouped_lora(x, base_out, a, b, case["prune_mask"], case["scales"],
                                         case["rank_offsets"], case["routing"], case["max_rank"],
                                         backend="triton")

    leaves = [case[n].clone().requires_grad_(True) for n in ("x", "base_out", "lora_a", "lora_b")]
    y = torch.compile(f, fullgraph=True)(*leaves)
    y.backward(case["grad_out"])
    y_ref, grads_ref = run_op(case, "reference")
    assert_close(y.detach(), y_ref, dtype, "inductor y")
    for name, leaf, g_ref in zip(("dx", "dbase", "dA", "dB"), leaves, grads_ref):
        assert_close(leaf.grad, g_ref, dtype, f"inductor {name}")


# ------------------------------------------------------------------ GPU only, fused paths
def _single_launch(case: dict) -> bool:
    """Whether the small-T rule takes the single-launch forward for this case."""
    x = case["x"]
    num_langs, (total_rank, in_features), out_features = case["scales"].shape[0], case["lora_a"].shape, \
        case["lora_b"].shape[0]
    cfg = triton_kernels._config_for(x, num_langs, in_features, out_features, case["max_rank"])
    return triton_kernels._fused_forward_fits(cfg.fused_fwd, x.shape[0], total_rank, in_features, out_features,
                                              x.element_size())


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 160, 2048])
@pytest.mark.parametrize("shape", [(1024, 4096), (4096, 1024), (123, 777)])
def test_gpu_fused_matches_reference_model_sizes(dtype, num_tokens, shape):
    """The fused kernels compiled for the GPU (tl.dot shapes, constexpr splits, the 1-D mixed
    grids): y and every gradient, lang30 at the model shapes, ranks 1..64 at the odd one; the
    forward is the single launch exactly where the small-T rule says so."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ranks = MIXED_RANKS if shape == (123, 777) else LANG30
    case = _to_device(make_case(num_tokens, shape[0], shape[1], ranks, density=0.1, spread="with_none", dtype=dtype,
                                seed=num_tokens))
    _compare_fused(case, dtype, fused_forward=_single_launch(case))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [160, 4096])
def test_gpu_fused_256_languages(dtype, num_tokens):
    torch.backends.cuda.matmul.allow_tf32 = False
    ranks = [1 + (i * 7) % 64 for i in range(256)]
    case = _to_device(make_case(num_tokens, 256, 384, ranks, density=0.5, spread="with_none", dtype=dtype, seed=3))
    _compare_fused(case, dtype, fused_forward=_single_launch(case))


@gpu
def test_gpu_fused_cuda_graph_replay():
    """Fused forward (single launch) and backward captured once, replayed with new routing and dy."""
    torch.backends.cuda.matmul.allow_tf32 = False
    case = _to_device(make_case(160, 1024, 512, LANG30, density=0.1, spread="with_none", dtype=torch.bfloat16))
    r = case["routing"]
    static = {"sorted": r.sorted_token_idx.clone(), "offsets": r.lang_offsets.clone()}
    args = (case["lora_a"], case["lora_b"], case["prune_mask"], case["scales"], case["rank_offsets"],
            static["sorted"], static["offsets"], case["max_rank"])

    def step():
        y, h = triton_kernels.lora_forward_triton(case["x"], case["base_out"], *args)
        return y, h, triton_kernels.lora_backward_triton(case["grad_out"], case["x"], h, *args)

    with triton_kernels.fused_kernels(True):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compiles outside the capture
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        before = dict(triton_kernels.LAUNCH_COUNTS)
        with torch.cuda.graph(graph):
            y, h, grads = step()
        assert _launch_diff(before) == {"fused_forward": 1, "fused_bwd_dy": 1, "fused_bwd_x": 1}
    new = lslo_kernels.build_routing(torch.randint(-1, 30, (160,), device=DEVICE), 30)
    static["sorted"].copy_(new.sorted_token_idx)
    static["offsets"].copy_(new.lang_offsets)
    case["grad_out"].copy_(torch.randn_like(case["grad_out"]))
    graph.replay()
    y_ref, h_ref = lslo_kernels.lora_forward_reference(case["x"], case["base_out"], *args)
    grads_ref = lslo_kernels.lora_backward_reference(case["grad_out"], case["x"], h_ref, *args)
    assert_close(y, y_ref, torch.bfloat16, "graph y")
    assert_close(h, h_ref, torch.bfloat16, "graph h")
    for name, g, g_ref in zip(("dx", "dA", "dB", "dscales"), grads, grads_ref):
        assert_close(g, g_ref, torch.bfloat16, f"graph {name}")


@gpu
def test_gpu_auto_mode_unfused_in_capture_fused_in_eager():
    """FUSED=None (the default): an LSLoLinear training step and a no_grad decoding call launch the
    fused kernels eagerly and the unfused ones while captured; the replayed graph and the eager
    calls give the same outputs and gradients (bf16 tolerance)."""
    import lslo

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(3)
    base = torch.nn.Linear(1024, 512, device=DEVICE, dtype=torch.bfloat16)
    layer = lslo.LSLoLinear(base, LANG30, backend="triton", validate=False).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(160, 1024, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    routing = lslo_kernels.route_tokens(torch.randint(-1, 30, (160,), device=DEVICE), (160,), 30, validate=False)
    grad_out = torch.randn(160, 512, device=DEVICE, dtype=torch.bfloat16)

    def step():
        for t in (x, layer.lora_A, layer.lora_B):
            t.grad = None
        layer(x, lang=routing).backward(grad_out)
        with torch.no_grad():
            y_dec = layer(x.detach(), lang=routing)
        return y_dec, x.grad, layer.lora_A.grad, layer.lora_B.grad

    with triton_kernels.fused_kernels(None):
        before = dict(triton_kernels.LAUNCH_COUNTS)
        eager = [t.clone() for t in step()]
        assert _launch_diff(before) == {"fused_forward": 2, "fused_bwd_dy": 1, "fused_bwd_x": 1}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compiles the unfused kernels outside the capture
            with triton_kernels.fused_kernels(False):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        before = dict(triton_kernels.LAUNCH_COUNTS)
        with torch.cuda.graph(graph):
            captured = step()
        assert _launch_diff(before) == {"shrink": 3, "expand": 3, "weight_grad": 2}
    graph.replay()
    for name, got, want in zip(("decode y", "dx", "dA", "dB"), captured, eager):
        assert_close(got, want, torch.bfloat16, f"auto mode {name}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 160, 8192])
def test_gpu_fused_add_in_place(dtype, num_tokens):
    """Decoding's add_ with FUSED on, into a column slice, at the single-launch sizes and past them."""
    torch.backends.cuda.matmul.allow_tf32 = False
    case = _to_device(make_case(num_tokens, 1024, 1024, LANG30, density=0.1, spread="with_none", dtype=dtype,
                                seed=num_tokens))
    args = _direct_args(case)
    wide = torch.randn(num_tokens, 1100, dtype=dtype, device=DEVICE)
    out = wide[:, 30:1054]
    out.copy_(case["base_out"])
    expected = case["base_out"].clone()
    lslo_kernels.lora_add_reference(expected, case["x"], *args)
    before = dict(triton_kernels.LAUNCH_COUNTS)
    with triton_kernels.fused_kernels(True):
        lslo_kernels.get_backend("triton").add_(out, case["x"], *args)
    assert _launch_diff(before) == ({"fused_forward": 1} if _single_launch(case) else {"shrink": 1, "expand": 1})
    assert _single_launch(case) == (num_tokens != 8192)  # 1024->1024: 4.4 MB re-read at T=160 (bf16)
    assert_close(out, expected, dtype, "add_ out")
    none = case["routing"].lang < 0
    assert torch.equal(out[none], case["base_out"][none])


@gpu
def test_gpu_fused_compile_inductor_fullgraph():
    torch.backends.cuda.matmul.allow_tf32 = False
    case = _to_device(make_case(300, 256, 384, LANG30, density=0.1, spread="with_none", dtype=torch.bfloat16, seed=5))

    def f(x, base_out, a, b, scales):
        return lslo_kernels.grouped_lora(x, base_out, a, b, case["prune_mask"], scales, case["rank_offsets"],
                                         case["routing"], case["max_rank"], backend="triton")

    leaves = [case[n].clone().requires_grad_(True) for n in ("x", "base_out", "lora_a", "lora_b", "scales")]
    with triton_kernels.fused_kernels(True):
        y = torch.compile(f, fullgraph=True)(*leaves)
        y.backward(case["grad_out"])
    y_ref, grads_ref = run_op(case, "reference")
    assert_close(y.detach(), y_ref, torch.bfloat16, "inductor y")
    for name, leaf, g_ref in zip(("dx", "dbase", "dA", "dB", "dscales"), leaves, grads_ref):
        assert_close(leaf.grad, g_ref, torch.bfloat16, f"inductor {name}")


# ------------------------------------------------------------------ sm_90 compile, no GPU needed
def _ptxas_available() -> bool:
    try:
        import triton
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this triton build
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the gpu tests compile the kernels for real")
@pytest.mark.skipif(not (triton_ready and _ptxas_available()), reason="triton's NVIDIA backend / ptxas not present")
def test_fused_kernels_compile_for_sm90(tmp_path):
    """The interpreter cannot show GPU compile errors (tl.dot operand shapes, constexpr branches,
    the mixed 1-D grids) or resources: compile every fused launch of the forward, add_ and
    backward for sm_90 with Triton's compiler and ptxas (``bench_triton_gpu.py --aot``), at the
    decoding and training sizes, 16-bit and fp32, ranks up to 64; no error, no spill, shared
    memory within an H100's 227 KB."""
    # A process of its own: interpreted kernels (this module's) patch triton.language for good.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    csv_path = tmp_path / "aot.csv"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_triton_gpu.py"), "--aot", "--aot-quick", "--aot-only",
         "_fused_", "--shapes", "1024x4096", "--csv", str(csv_path)],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["metric"] for r in rows} == {"compiled"}
    assert {r["provider"] for r in rows} == {
        "aot:_fused_forward_kernel", "aot:_fused_backward_dy_kernel", "aot:_fused_backward_x_kernel"}
    for r in rows:
        fields = dict(kv.split("=") for kv in r["note"].split(";") if "=" in kv)
        assert int(fields["spill"]) == 0 and int(fields["shared"]) <= 232448, r
