"""How much does the language-specific LoRA cost on top of the base linear, on a GPU?

Question: with the paper's lang30 adapters (16 languages r=2 with 90% of B pruned, 14 languages
r=8) on a mixed, unsorted bf16 batch of an M2M-124 shape (1024->1024, 1024->4096, 4096->1024),
what do a training step (forward+backward, T=8192 tokens) and a decoding step (forward, T=160)
cost relative to the frozen base ``nn.Linear`` (cuBLAS) alone, and against the other ways of
computing the same thing? The providers are those of the benchmark suite
(:mod:`benchmarks.providers`: ``base``, ``naive``, ``peft``, ``padded_bmm``, ``grouped_mm``,
``triton``) plus ``padded_lang``: tokens gathered into a (L, n_max, k) zero-padded batch per
language, two ``bmm``, scattered back (the stronger padded baseline at large T).

Before anything is timed, every provider's output (and, for training, its gradients of x, A and
B in lslo's packed layout) is checked against lslo's reference backend run in float32 on the same
inputs; a provider that disagrees is reported and not timed.

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, p20/p50/p80), eager,
as a model calls the layer. Decoding is also timed replayed from a CUDA graph
(``do_bench_cudagraph``, mode ``fwd-graph``): there the Python launch overhead is gone and what is
left is GPU time, which is how a decoder running under CUDA graphs would see it. Per-batch
metadata (routing, sort, padded indices, PEFT's ``adapter_names``) is built once outside the timed
call, as every layer of a model shares it.

Default vs unfused: provider ``triton`` runs lslo's Triton kernels as users get them (fused
paths on auto: taken on eager launches, not while a CUDA graph is captured; see
``triton_kernels.FUSED``), ``triton_unfused`` the same layer with them forced off (the
single-launch forward at small T, in place into the base output when decoding, and the
two-launch backward with the scale gradient inside are the fused paths), so one run compares both
on the same inputs; graph-replayed, the two are the same kernels. ``triton_gemm`` is the base GEMM
and the LoRA term in one Triton kernel (``lslo_kernels.triton_gemm``, off by default, forced on by
``LSLO_TRITON_GEMM=1``): its rows against ``base`` and ``triton`` are the measurement its default
rule waits for.

``--sweep`` instead times each Triton kernel role (forward shrink/expand, backward
shrink/expand, dA, dB, the fused forward) under a list of block sizes, warps, stages and split-K
factors, replayed from CUDA graphs, and writes one row per candidate: the data the launch rules in
``lslo_kernels/triton_kernels.py`` are tuned from.

``--crossover`` times the launchers alone (graph-replayed) over a range of T: forward unfused vs
the single-launch forward forced on (what the small-T rule ``_fused_forward_fits`` should pick,
and what it does pick), the in-place add of decoding both ways, the backward unfused vs fused,
and the base GEMM for scale: the data ``FUSED_FORWARD_MAX_REREAD_BYTES`` is set from.

``--aot`` needs no GPU: it compiles every kernel launch of the forward, the in-place add and the
backward (fused paths off and on), and of the fused base GEMM + LoRA, for an sm_90 target with Triton's own compiler and ptxas, from
the launchers' real arguments at the M2M-124 shapes, and reports each kernel's shared memory,
registers and spills: compile errors the CPU interpreter cannot show (``tl.dot`` shapes, constexpr
paths) and resource limits, before any GPU time is spent.

Usage::

    python benchmarks/bench_triton_gpu.py --aot             # on a CPU machine with triton installed
    python benchmarks/bench_triton_gpu.py [--time-cap 120] [--csv out.csv] [--quick]
    python benchmarks/bench_triton_gpu.py --sweep [--time-cap 150] [--csv sweep.csv]
    python benchmarks/bench_triton_gpu.py --crossover [--time-cap 60] [--csv crossover.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import math
import platform
import signal
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import lslo_kernels
from benchmarks import providers as P
from benchmarks.suite import make_lang, ranks_for

RESULTS_CSV = Path(__file__).resolve().parent / "results" / "triton_gpu.csv"
CSV_FIELDS = ["op", "provider", "mode", "metric", "x", "shape", "dtype", "p20", "p50", "p80", "ratio_vs_base",
              "note", "device", "torch", "triton", "date", "host"]
SHAPES = [(1024, 1024), (1024, 4096), (4096, 1024)]
TRAIN_TOKENS = 8192
DECODE_TOKENS = 160
TRAIN_PROVIDERS = ("base", "naive", "padded_bmm", "padded_lang", "grouped_mm", "triton", "triton_unfused",
                   "triton_gemm")
DECODE_PROVIDERS = ("base", "naive", "peft", "padded_bmm", "padded_lang", "grouped_mm", "triton", "triton_unfused",
                    "triton_gemm")
# Providers whose layer call has no host synchronisation, so it can be captured in a CUDA graph.
GRAPHABLE = ("base", "padded_bmm", "padded_lang", "grouped_mm", "triton", "triton_gemm")
# Most telling first (T=160 is the decoding target): a time cap cuts the far ends of the range.
CROSSOVER_TOKENS = (160, 320, 64, 640, 16, 1280, 2560)
# Relative Frobenius error bound against the float32 reference: bf16 operands and outputs give
# ~4e-3 per rounding; the gradients of A sum over a few hundred tokens per language.
REL_TOL = 2e-2
DEVICE = "cuda"  # module-level so that the bookkeeping can be dry-run on CPU (TRITON_INTERPRET=1)


# ------------------------------------------------------------------------------------ problem
def make_layer_problem(in_features: int, out_features: int, num_tokens: int, dtype: torch.dtype, seed: int = 0):
    """The lang30 problem of one layer on the GPU (tokens uniform over 30 languages, unsorted)."""
    ranks, densities = ranks_for("lang30", 30)
    lang = make_lang(num_tokens, ranks, "uniform", seed=seed)
    return P.make_problem(in_features, out_features, ranks, lang, mask_density=densities, device=DEVICE,
                          dtype=dtype, seed=seed)


def _padded_lang_provider(problem: P.LayerProblem) -> P.PreparedProvider:
    """Tokens gathered per language into a (L, n_max, k) zero-padded batch, factors padded to the
    largest rank, two ``bmm``, the result scattered back; plain autograd."""
    p = problem
    num_languages, max_rank = p.num_languages, p.max_rank
    a = p.lora_a.clone()
    b = p.lora_b.clone()
    ranks = torch.tensor(p.ranks, device=p.device)
    slot = torch.arange(max_rank, device=p.device)
    # Row of A (or the appended zero row R) for each (language, padded rank slot).
    pad_rows = torch.where(slot[None, :] < ranks[:, None], p.rank_offsets[:-1, None] + slot[None, :],
                           torch.full_like(slot[None, :], a.shape[0]))

    def prepare(lang):
        routing = lslo_kernels.build_routing(lang, num_languages)
        offsets = routing.lang_offsets  # language l: sorted positions [offsets[l], offsets[l + 1])
        first = int(offsets[0])  # tokens of id -1 sort first and get no adapter
        n_max = max(1, int(torch.diff(offsets).max()))
        tok = routing.sorted_token_idx[first:]
        sorted_lang = lang[tok]
        pos = torch.arange(first, lang.shape[0], device=lang.device) - offsets[sorted_lang]
        return tok, sorted_lang, pos, n_max

    def run(x, meta):
        tok, lg, ps, n_max = meta
        y = p.base(x)
        x_pad = x.new_zeros((num_languages, n_max, x.shape[1])).index_put((lg, ps), x[tok])
        a_pad = torch.cat([a, a.new_zeros((1, a.shape[1]))])[pad_rows]  # (L, rp, k)
        b_eff = b * p.prune_mask
        b_pad = torch.cat([b_eff, b_eff.new_zeros((b_eff.shape[0], 1))], dim=1)[:, pad_rows]  # (d, L, rp)
        h = torch.bmm(x_pad, a_pad.transpose(1, 2))  # (L, n_max, rp)
        out = torch.bmm(h, b_pad.permute(1, 2, 0)) * p.scales.to(x.dtype)[:, None, None]  # (L, n_max, d)
        return y.index_add(0, tok, out[lg, ps])

    return P.PreparedProvider("padded_lang", [a, b], prepare=prepare, run=run)


def _triton_gemm_provider(problem: P.LayerProblem) -> P.PreparedProvider:
    """lslo's fused base GEMM + LoRA (``lslo_kernels.triton_gemm``, what ``LSLO_TRITON_GEMM=1``
    selects) called directly: y = x W^T + bias + LoRA term in one GEMM, grad_x's LoRA part inside the
    dgrad GEMM; the base weight frozen, as lslo's layers keep it."""
    # only here: triton may be missing on a machine that runs the other providers
    from lslo_kernels import triton_gemm

    p = problem
    a, b = p.lora_a.clone(), p.lora_b.clone()
    weight, bias = p.base.weight.detach(), p.base.bias.detach()

    def run(x, routing):
        args = (x, weight, bias, a, b, p.prune_mask, p.scales, p.rank_offsets, routing.sorted_token_idx,
                routing.lang_offsets, p.max_rank)
        if torch.is_grad_enabled():
            return triton_gemm.linear_lora_triton(*args)
        return triton_gemm.linear_decode_triton(*args, None)

    return P.PreparedProvider("triton_gemm", [a, b], prepare=lambda lang: lslo_kernels.build_routing(
        lang, p.num_languages), run=run)


def prepare(name: str, problem: P.LayerProblem) -> P.PreparedProvider:
    if name == "padded_lang":
        return _padded_lang_provider(problem)
    if name == "triton_gemm":
        return _triton_gemm_provider(problem)
    if name == "triton_unfused":  # the same lslo layer; kernel_mode() switches the fused paths off
        return P.prepare_provider("triton", problem)
    return P.prepare_provider(name, problem)


def kernel_mode(name: str):
    """The fused paths on auto for ``triton``, off for ``triton_unfused`` (whatever LSLO_TRITON_FUSED
    says), around everything a provider runs: its check, eager calls, graph capture (the launchers
    read the switch when they launch, so a captured graph keeps the choice)."""
    if name not in ("triton", "triton_unfused"):
        return contextlib.nullcontext()
    from lslo_kernels import triton_kernels as K

    return K.fused_kernels(None if name == "triton" else False)


# ------------------------------------------------------------------------------ correctness
def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _truth(problem: P.LayerProblem, grad_out: torch.Tensor | None):
    """lslo's reference backend in float32 on the same inputs.

    Returns:
        {"lora": (y, (dx, dA, dB) or None), "base": (y_base, (dx_base,) or None)}: the layer with
        its LoRA term, and the base ``nn.Linear`` alone (what provider ``base`` computes).
    """
    training = grad_out is not None
    base32 = torch.nn.Linear(problem.base.in_features, problem.base.out_features, device=DEVICE)
    with torch.no_grad():
        base32.weight.copy_(problem.base.weight.float())
        base32.bias.copy_(problem.base.bias.float())
    x = problem.x.float().requires_grad_(training)
    a = problem.lora_a.float().requires_grad_(training)
    b = problem.lora_b.float().requires_grad_(training)
    routing = lslo_kernels.build_routing(problem.lang, problem.num_languages)
    with torch.enable_grad() if training else torch.no_grad():
        y_base = base32(x)
        y = lslo_kernels.grouped_lora(x, y_base, a, b, problem.prune_mask, problem.scales, problem.rank_offsets,
                                      routing, problem.max_rank, backend="reference")
    if not training:
        return {"lora": (y, None), "base": (y_base, None)}
    y.backward(grad_out.float())
    dx_base = grad_out.float() @ base32.weight.detach()
    return {"lora": (y.detach(), (x.grad, a.grad, b.grad)), "base": (y_base.detach(), (dx_base,))}


def check_provider(prov: P.PreparedProvider, problem: P.LayerProblem, meta, truth, grad_out) -> str:
    """Empty string when the provider's y (and gradients, when training) match the truth, else why not."""
    y_ref, grads_ref = truth
    training = grads_ref is not None
    x = problem.x.detach().clone().requires_grad_(training)
    for param in prov.params:
        param.grad = None
        param.requires_grad_(training)
    with torch.enable_grad() if training else torch.no_grad():
        y = prov.run(x, meta)
    errs = {"y": _rel_err(y.detach(), y_ref)}
    if training:
        y.backward(grad_out)
        errs["dx"] = _rel_err(x.grad, grads_ref[0])
        if prov.params and len(grads_ref) == 3:
            grad_a, grad_b = prov.packed_grads()
            errs["dA"] = _rel_err(grad_a, grads_ref[1])
            errs["dB"] = _rel_err(grad_b, grads_ref[2])
        for param in prov.params:
            param.grad = None
    bad = {k: v for k, v in errs.items() if not v <= REL_TOL}
    return "" if not bad else "disagrees with the reference: " + ", ".join(f"{k} rel err {v:.3g}" for k, v in bad.items())


# ----------------------------------------------------------------------------------- timing
def time_eager(fn, leaves, quick: bool):
    import triton.testing

    rep, warmup = (30, 10) if quick else (100, 25)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8],
                                   grad_to_none=leaves or None)


def time_graph(fn, quick: bool, leaves=()):
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 60, quantiles=[0.2, 0.5, 0.8],
                                             grad_to_none=list(leaves) or None)


class Deadline:
    """Stops starting new measurements once ``cap_s`` seconds have passed."""

    def __init__(self, cap_s: float | None):
        self.t0 = time.monotonic()
        self.cap_s = cap_s

    def passed(self) -> bool:
        return self.cap_s is not None and time.monotonic() - self.t0 > self.cap_s


def _row(provider, mode, metric, tokens, shape, q, note="", ratio=""):
    import triton

    q20, q50, q80 = q if q is not None else ("", "", "")
    fmt = (lambda v: f"{v:.5f}") if q is not None else (lambda v: v)
    return {
        "op": "grouped_lora", "provider": provider, "mode": mode, "metric": metric, "x": tokens,
        "shape": f"{shape[0]}->{shape[1]}", "dtype": "bf16", "p20": fmt(q20), "p50": fmt(q50), "p80": fmt(q80),
        "ratio_vs_base": ratio, "note": note, "device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
        "torch": torch.__version__,
        "triton": triton.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
    }


def _time_mode(prov, x, meta, mode, leaves, grad_out, quick):
    """p20/p50/p80 ms of one provider call in ``mode``: ``fwd``/``fwd+bwd`` eager, ``-graph``
    suffixed ones replayed from a CUDA graph."""
    train = mode.startswith("fwd+bwd")

    def call():
        if train:
            prov.run(x, meta).backward(grad_out)
        else:
            with torch.no_grad():
                prov.run(x, meta)

    if mode.endswith("-graph"):
        return time_graph(call, quick, leaves)
    return time_eager(call, leaves, quick)


def bench_case(shape, num_tokens, modes, names, deadline, quick, rows):
    """Check then time every provider of one (shape, T) for the given modes; appends CSV rows.

    Modes run one after the other over all providers, graph modes last: a provider whose capture
    fails cannot then disturb an eager measurement.
    """
    problem = make_layer_problem(*shape, num_tokens, torch.bfloat16)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    grad_out = torch.randn(num_tokens, shape[1], device=DEVICE, generator=gen).to(torch.bfloat16)
    training = any(m.startswith("fwd+bwd") for m in modes)
    truths = _truth(problem, grad_out if training else None)
    prepared = {}
    for name in names:
        try:
            prov = prepare(name, problem)
        except P.Skip as exc:
            rows.append(_row(name, "/".join(modes), "skipped", num_tokens, shape, None, str(exc)))
            continue
        prepared[name] = (prov, prov.prepare(problem.lang))
    checked: dict[tuple[str, bool], str] = {}
    base_p50 = {}
    for mode in sorted(modes, key=lambda m: m.endswith("-graph")):
        train = mode.startswith("fwd+bwd")
        for name, (prov, meta) in prepared.items():
            if deadline.passed():
                rows.append(_row(name, mode, "skipped", num_tokens, shape, None, "time cap reached"))
                continue
            if train and not prov.training:
                rows.append(_row(name, mode, "skipped", num_tokens, shape, None, prov.skip_training_reason))
                continue
            if mode.endswith("-graph") and name not in GRAPHABLE:
                continue
            if (name, train) not in checked:
                y_ref, grads_ref = truths["base" if name == "base" else "lora"]
                try:
                    with kernel_mode(name):
                        checked[name, train] = check_provider(prov, problem, meta,
                                                              (y_ref, grads_ref if train else None), grad_out)
                except Exception as exc:  # noqa: BLE001 - a provider that crashes is reported, not fatal
                    checked[name, train] = f"{type(exc).__name__}: {exc}"
            why = checked[name, train]
            if why:
                rows.append(_row(name, mode, "failed", num_tokens, shape, None, why))
                print(f"  {shape} T={num_tokens} {mode} {name}: {why}", file=sys.stderr)
                continue
            x = problem.x.detach().clone().requires_grad_(train)
            for param in prov.params:
                param.requires_grad_(train)
            leaves = [x, *prov.params] if train else []
            try:
                with kernel_mode(name):
                    q = _time_mode(prov, x, meta, mode, leaves, grad_out, quick)
            except Exception as exc:  # noqa: BLE001 - e.g. a graph capture the provider does not allow
                rows.append(_row(name, mode, "failed", num_tokens, shape, None, f"{type(exc).__name__}: {exc}"))
                print(f"  {shape} T={num_tokens} {mode} {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            if name == "base":
                base_p50[mode] = q[1]
            ratio = f"{q[1] / base_p50[mode]:.3f}" if mode in base_p50 else ""
            rows.append(_row(name, mode, "ms", num_tokens, shape, q, ratio=ratio))
            print(f"  {shape[0]}->{shape[1]} T={num_tokens} {mode:13s} {name:11s} p50={q[1]:.4f} ms "
                  f"({ratio}x base)", file=sys.stderr, flush=True)
    del prepared
    torch.cuda.empty_cache()


def print_table(rows):
    device = rows[0]["device"] if rows else "?"
    timed = {(r["shape"], r["x"], r["mode"], r["provider"]): r for r in rows if r["metric"] == "ms"}
    names = list(dict.fromkeys(r["provider"] for r in rows))
    print(f"\nbf16, lang30 ranks (16 x r=2 with B 90% pruned, 14 x r=8), tokens uniform over 30 languages, "
          f"unsorted; p50 ms on {device} (ratio to base in the same run)\n")
    print("| shape | T | mode | " + " | ".join(f"`{n}`" for n in names) + " | triton vs naive | triton vs unfused |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|")
    for shape, tokens, mode in dict.fromkeys((r["shape"], r["x"], r["mode"]) for r in rows if r["metric"] == "ms"):
        cells = []
        for n in names:
            r = timed.get((shape, tokens, mode, n))
            if r is None:
                cells.append("")
            elif n == "base":
                cells.append(f"{float(r['p50']):.4g}")
            else:
                cells.append(f"{float(r['p50']):.4g} ({float(r['ratio_vs_base']):.2f}x)" if r["ratio_vs_base"]
                             else f"{float(r['p50']):.4g}")
        tri, nai = timed.get((shape, tokens, mode, "triton")), timed.get((shape, tokens, mode, "naive"))
        unf = timed.get((shape, tokens, mode, "triton_unfused"))
        speed = f"{float(nai['p50']) / float(tri['p50']):.1f}x" if tri and nai else ""
        # > 1: the default (auto) is faster than the forced-unfused kernels in the same run
        fused_gain = f"{float(unf['p50']) / float(tri['p50']):.2f}x" if tri and unf else ""
        print(f"| {shape} | {tokens} | {mode} | " + " | ".join(cells) + f" | {speed} | {fused_gain} |")
    notes = [r for r in rows if r["metric"] in ("failed", "skipped")]
    for r in notes:
        print(f"- {r['provider']} {r['shape']} T={r['x']} {r['mode']}: {r['metric']}: {r['note']}")


# ------------------------------------------------------------------------------------ sweep
SWEEP_CANDIDATES = {
    # (block_t, block_f, num_warps, num_stages); shrinks are also swept over split-K factors.
    "shrink": [(16, 64, 4, 3), (16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3),
               (64, 64, 4, 4), (128, 64, 8, 3), (32, 256, 4, 3), (64, 128, 4, 4), (32, 128, 4, 4), (64, 64, 4, 3),
               (128, 128, 8, 3)],
    "expand": [(16, 64, 4, 2), (16, 128, 4, 2), (16, 256, 4, 2), (32, 128, 4, 2), (64, 64, 8, 2), (64, 128, 4, 2),
               (64, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 256, 8, 2), (64, 256, 4, 2), (128, 256, 8, 2),
               (32, 256, 4, 2)],
    "wgrad": [(32, 32, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3), (128, 32, 4, 3),
              (128, 64, 8, 3), (64, 128, 8, 3), (32, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 3),
              (64, 256, 8, 3), (128, 64, 4, 3)],
    # fused forward: (block_t, block_k, block_d, num_warps, num_stages)
    "fused_fwd": [(16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (16, 128, 128, 4, 3), (16, 64, 128, 4, 4),
                  (16, 256, 128, 4, 3), (16, 128, 256, 4, 3), (16, 128, 256, 8, 3), (16, 64, 256, 8, 4),
                  (32, 128, 128, 4, 3), (32, 64, 128, 4, 4)],
}
ROLE_KIND = {"fwd_shrink": "shrink", "fwd_expand": "expand", "bwd_shrink": "shrink", "bwd_expand": "expand",
             "grad_a": "wgrad", "grad_b": "wgrad", "fused_fwd": "fused_fwd"}
SPLITS = (1, 2, 4, 8)


def sweep(shapes, tokens_list, deadline, quick, rows, roles=tuple(ROLE_KIND)):
    """Time each kernel role under each candidate config (the other roles at their defaults).

    The unfused roles run with the fused paths off; ``fused_fwd`` with them on and the small-T rule
    lifted, at decoding sizes only (T < 1024)."""
    from lslo_kernels import triton_kernels as K

    original = K._launch_config
    for shape in shapes:
        for num_tokens in tokens_list:
            problem = make_layer_problem(*shape, num_tokens, torch.bfloat16)
            routing = lslo_kernels.build_routing(problem.lang, problem.num_languages)
            gen = torch.Generator(device=DEVICE).manual_seed(2)
            grad_out = torch.randn(num_tokens, shape[1], device=DEVICE, generator=gen).to(torch.bfloat16)
            base_out = problem.base(problem.x)
            args = (problem.lora_a, problem.lora_b, problem.prune_mask, problem.scales, problem.rank_offsets,
                    routing.sorted_token_idx, routing.lang_offsets, problem.max_rank)
            with K.fused_kernels(False):
                y_ref, h_ref = K.lora_forward_triton(problem.x, base_out, *args)
                grads_ref = K.lora_backward_triton(grad_out, problem.x, h_ref, *args)
            default = original(num_tokens, problem.num_languages, shape[0], shape[1], problem.max_rank,
                               torch.bfloat16, K._sm_count(problem.x.device))
            for role, kind in ROLE_KIND.items():
                if role not in roles:
                    continue
                fwd_role = role.startswith("fwd") or role == "fused_fwd"
                if num_tokens < 1024 and not fwd_role:
                    continue  # decoding runs forward only
                if role == "fused_fwd" and num_tokens >= 1024:
                    continue  # the single-launch forward is for small T
                num_features = shape[0] if role in ("fwd_shrink", "bwd_expand", "grad_a") else shape[1]
                variants = [("default", getattr(default, role))]
                for cand in SWEEP_CANDIDATES[kind]:
                    if kind == "fused_fwd":
                        variants.append((str(cand), K.FusedForwardConfig(*cand)))
                        continue
                    kc = K.KernelConfig(*cand)
                    if kind == "shrink":
                        # Split-K only pays where token tiles are fewer than multiprocessors.
                        splits = SPLITS if num_tokens < 1024 else SPLITS[:3]
                        variants += [(f"{cand}+s{s}", dataclasses.replace(kc, num_splits=s))
                                     for s in splits if s == 1 or num_features // (s * kc.block_f) >= 1]
                    else:
                        variants.append((str(cand), kc))
                for label, kc in variants:
                    if deadline.passed():
                        rows.append(_row(f"sweep:{role}", label, "skipped", num_tokens, shape, None, "time cap"))
                        continue
                    K._launch_config = lambda *a, _role=role, _kc=kc: dataclasses.replace(original(*a), **{_role: _kc})
                    fused = role == "fused_fwd"
                    mode = contextlib.ExitStack()
                    mode.enter_context(K.fused_kernels(fused))
                    if fused:
                        mode.enter_context(_rule_bound(K, 1 << 62))
                    try:
                        if fwd_role:
                            y, h = K.lora_forward_triton(problem.x, base_out, *args)
                            ok = _rel_err(y, y_ref) < 1e-2 and _rel_err(h, h_ref) < 1e-2
                            fn = functools.partial(K.lora_forward_triton, problem.x, base_out, *args)
                        else:
                            got = K.lora_backward_triton(grad_out, problem.x, h_ref, *args)
                            ok = all(_rel_err(g, r) < 1e-2 for g, r in zip(got, grads_ref))
                            fn = functools.partial(K.lora_backward_triton, grad_out, problem.x, h_ref, *args)
                        if not ok:
                            rows.append(_row(f"sweep:{role}", label, "failed", num_tokens, shape, None, "wrong result"))
                            continue
                        q = time_graph(fn, quick)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                        rows.append(_row(f"sweep:{role}", label, "failed", num_tokens, shape, None,
                                         f"{type(exc).__name__}: {str(exc)[:200]}"))
                        continue
                    finally:
                        K._launch_config = original
                        mode.close()
                    rows.append(_row(f"sweep:{role}", label, "ms", num_tokens, shape, q,
                                     note="fwd launcher" if fwd_role else "bwd launcher"))
                best = min((r for r in rows if r["provider"] == f"sweep:{role}" and r["metric"] == "ms"
                            and r["x"] == num_tokens and r["shape"] == f"{shape[0]}->{shape[1]}"),
                           key=lambda r: float(r["p50"]), default=None)
                dflt = next((r for r in rows if r["provider"] == f"sweep:{role}" and r["mode"] == "default"
                             and r["metric"] == "ms" and r["x"] == num_tokens
                             and r["shape"] == f"{shape[0]}->{shape[1]}"), None)
                if best is not None:
                    print(f"{shape[0]}->{shape[1]} T={num_tokens} {role:10s} default "
                          f"{float(dflt['p50']) * 1e3 if dflt else float('nan'):8.1f} us  best {best['mode']:24s} "
                          f"{float(best['p50']) * 1e3:8.1f} us", flush=True)
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _rule_bound(K, max_reread_bytes: int):
    """Set the small-T rule's bound (``1 << 62``: always the single-launch forward; -1: never)."""
    previous = K.FUSED_FORWARD_MAX_REREAD_BYTES
    K.FUSED_FORWARD_MAX_REREAD_BYTES = max_reread_bytes
    try:
        yield
    finally:
        K.FUSED_FORWARD_MAX_REREAD_BYTES = previous


# -------------------------------------------------------------------------------- crossover
def crossover(shapes, tokens_list, deadline, quick, rows):
    """The launchers alone, graph-replayed, unfused vs fused, over T: where should the small-T
    rule switch? One row per (shape, T, what): ``fwd`` (y and h, training's forward), ``add`` (in
    place into the base output, decoding), ``bwd``; plus the base GEMM. Outputs are checked
    against the unfused launchers before timing."""
    from lslo_kernels import triton_kernels as K

    for num_tokens in tokens_list:
        for shape in shapes:
            if deadline.passed():
                rows.append(_row("crossover", "all", "skipped", num_tokens, shape, None, "time cap"))
                continue
            problem = make_layer_problem(*shape, num_tokens, torch.bfloat16)
            routing = lslo_kernels.build_routing(problem.lang, problem.num_languages)
            gen = torch.Generator(device=DEVICE).manual_seed(3)
            grad_out = torch.randn(num_tokens, shape[1], device=DEVICE, generator=gen).to(torch.bfloat16)
            x = problem.x.detach()
            with torch.no_grad():
                base_out = problem.base(x)
            args = (problem.lora_a.detach(), problem.lora_b.detach(), problem.prune_mask, problem.scales,
                    problem.rank_offsets, routing.sorted_token_idx, routing.lang_offsets, problem.max_rank)
            cfg = K._config_for(x, problem.num_languages, shape[0], shape[1], problem.max_rank)
            reread = K._fused_forward_fits(cfg.fused_fwd, num_tokens, problem.lora_a.shape[0], shape[0], shape[1], 2)
            d_blocks = -(-shape[1] // cfg.fused_fwd.block_d)
            reread_mb = (d_blocks - 1) * (num_tokens + problem.lora_a.shape[0]) * shape[0] * 2 / 1e6
            note = f"rule picks {'fused' if reread else 'unfused'}; re-read {reread_mb:.1f} MB"
            out = base_out.clone()
            with K.fused_kernels(False):
                y_ref, h_ref = K.lora_forward_triton(x, base_out, *args)
                grads_ref = K.lora_backward_triton(grad_out, x, h_ref, *args)
            calls = {
                "base": functools.partial(problem.base, x),
                "fwd": functools.partial(K.lora_forward_triton, x, base_out, *args),
                "add": functools.partial(K.lora_add_triton, out, x, *args),
                "bwd": functools.partial(K.lora_backward_triton, grad_out, x, h_ref, *args),
            }
            base_us = None
            for what, fn in calls.items():
                for fused in ((None,) if what == "base" else (False, True)):
                    label = "base" if fused is None else ("fused" if fused else "unfused")
                    if deadline.passed():
                        rows.append(_row(f"crossover:{label}", what, "skipped", num_tokens, shape, None, "time cap"))
                        continue
                    try:
                        # 1 << 62: the single-launch forward whatever the rule says, to time both sides
                        with torch.no_grad(), K.fused_kernels(bool(fused)), _rule_bound(K, 1 << 62):
                            if what in ("fwd", "add", "bwd"):
                                out.copy_(base_out)
                                got = fn()
                                if what == "fwd":
                                    ok = _rel_err(got[0], y_ref) < 1e-2 and _rel_err(got[1], h_ref) < 1e-2
                                elif what == "add":
                                    ok = _rel_err(out, y_ref) < 1e-2
                                else:
                                    ok = all(_rel_err(g, r) < 1e-2 for g, r in zip(got, grads_ref))
                                if not ok:
                                    rows.append(_row(f"crossover:{label}", what, "failed", num_tokens, shape, None,
                                                     "disagrees with the unfused launchers"))
                                    print(f"  crossover {shape} T={num_tokens} {what} {label}: wrong result",
                                          file=sys.stderr)
                                    continue
                            q = time_graph(fn, quick)
                    except Exception as exc:  # noqa: BLE001 - e.g. a GPU compile error of a fused kernel
                        rows.append(_row(f"crossover:{label}", what, "failed", num_tokens, shape, None,
                                         f"{type(exc).__name__}: {str(exc)[:200]}"))
                        print(f"  crossover {shape} T={num_tokens} {what} {label}: {type(exc).__name__}: {exc}",
                              file=sys.stderr)
                        continue
                    if what == "base":
                        base_us = q[1]
                    ratio = f"{q[1] / base_us:.3f}" if base_us else ""
                    rows.append(_row(f"crossover:{label}", what, "ms", num_tokens, shape, q, note=note, ratio=ratio))
            torch.cuda.empty_cache()


def print_crossover(rows):
    """One line per (shape, T): us of base, fwd / add / bwd unfused -> fused, and the rule's pick."""
    timed = {(r["shape"], r["x"], r["mode"], r["provider"]): r for r in rows
             if r["provider"].startswith("crossover") and r["metric"] == "ms"}
    keys = sorted(dict.fromkeys((r["shape"], r["x"]) for r in rows if r["provider"].startswith("crossover")),
                  key=lambda key: (key[0], int(key[1])))
    print("\nlaunchers alone, graph-replayed, bf16 lang30, p50 us (unfused -> fused; * = faster side)\n")
    print("| shape | T | base | fwd | add (decoding) | bwd | small-T rule |")
    print("|---|---|---|---|---|---|---|")
    def us(shape, tokens, what, label):
        r = timed.get((shape, tokens, what, f"crossover:{label}"))
        return float(r["p50"]) * 1e3 if r else None

    for shape, tokens in keys:
        cells = []
        for what in ("fwd", "add", "bwd"):
            old, new = us(shape, tokens, what, "unfused"), us(shape, tokens, what, "fused")
            if old is None or new is None:
                cells.append("")
            else:
                cells.append(f"{old:.1f}{'*' if old < new else ''} -> {new:.1f}{'*' if new <= old else ''}")
        base = us(shape, tokens, "base", "base")
        note = next((r["note"] for k, r in timed.items() if k[0] == shape and k[1] == tokens and r["note"]), "")
        print(f"| {shape} | {tokens} | {'' if base is None else f'{base:.1f}'} | " + " | ".join(cells) + f" | {note} |")
    for r in rows:
        if r["provider"].startswith("crossover") and r["metric"] in ("failed", "skipped") and r["note"] != "time cap":
            print(f"- {r['provider']} {r['shape']} T={r['x']} {r['mode']}: {r['metric']}: {r['note']}")


# ------------------------------------------------------------------------------ aot compile
# An H100 (sm_90) gives one block at most 227 KB of shared memory and 255 registers per thread.
SM90_MAX_SHARED = 232448
AOT_CASES = [  # (dtype, T, ranks name): the decoding and training sizes, 16-bit and fp32, ranks to 64
    (torch.bfloat16, 1, "lang30"), (torch.bfloat16, 160, "lang30"), (torch.bfloat16, 960, "lang30"),
    (torch.bfloat16, 8192, "lang30"),
    (torch.float16, 160, "lang30"), (torch.float32, 160, "lang30"), (torch.float32, 2048, "lang30"),
    (torch.bfloat16, 160, "mixed64"), (torch.bfloat16, 2048, "mixed64"),
]
AOT_QUICK_CASES = [(torch.bfloat16, 160, "lang30"), (torch.bfloat16, 8192, "lang30"), (torch.float32, 160, "lang30"),
                   (torch.bfloat16, 160, "mixed64")]


def _load_compiled_kernels(module_name: str = "triton_kernels"):
    """A private copy of ``lslo_kernels.<module_name>`` built for a GPU (not the interpreter),
    whose kernels record their launches instead of running them. Run it in a process where no
    kernel ran under the interpreter: that patches ``triton.language`` for good."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        f"lslo_kernels._{module_name}_aot", REPO_ROOT / "lslo_kernels" / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec.loader.exec_module(module)  # @triton.jit decides compiled vs interpreted here
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, args, kwargs))

    for name in dir(module):
        obj = getattr(module, name)
        if name.endswith("_kernel") and hasattr(obj, "arg_names"):
            setattr(module, name, Recorder(obj))
    # CPU tensors pass the launchers' device check as they do under the interpreter; the
    # interpreter's bf16 workaround is dropped again at compile time.
    module.INTERPRETED = True
    return module, launches


def aot_compile(kernel, args, kwargs, arch: int = 90):
    """Compile one recorded launch for ``sm_<arch>`` as Triton's JIT would (same specialisation of
    ints and pointer alignment), without a GPU. Returns the CompiledKernel (metadata, asm)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, spill bytes) of a compiled kernel's cubin, from cuobjdump."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(fh.name)
    regs = re.search(r"REG:(\d+)", out)
    spill = re.findall(r"(?:STACK|LOCAL):(\d+)", out)
    return (int(regs.group(1)) if regs else -1), sum(int(v) for v in spill)


def _record_gemm(gemm, x, shape, factors) -> None:
    """Run ``triton_gemm``'s training entry (forward and backward) and its decoding entry once on CPU
    tensors, so that its recording kernels see every launch."""
    weight = torch.zeros(shape[1], shape[0], dtype=x.dtype)
    bias = torch.zeros(shape[1], dtype=x.dtype)
    leaf = x.clone().requires_grad_(True)
    gemm.linear_lora_triton(leaf, weight, bias, *factors).sum().backward()
    with torch.no_grad():
        gemm.linear_decode_triton(x, weight, bias, *factors, None)


def aot_check(shapes, rows, cases=AOT_CASES, only: str = "") -> int:
    """Compile every distinct launch of the forward, add_ and backward (fused off and on) and of the
    fused base GEMM + LoRA (``triton_gemm``) for sm_90; one CSV row per kernel variant.

    Args:
        shapes: (in, out) features; the odd (123, 777) is added (the only shape where mixed ranks
            up to 64 take the single-launch forward).
        rows: CSV rows are appended here.
        cases: (dtype, T, "lang30" or "mixed64") to run the launchers with.
        only: compile only kernels whose name contains this.

    Returns:
        The number of failures: compile errors, shared memory over the limit, register spills.
    """
    import triton

    module, launches = _load_compiled_kernels()
    gemm, gemm_launches = _load_compiled_kernels("triton_gemm")
    seen, failures = set(), 0
    shapes = list(dict.fromkeys([*shapes, (123, 777)]))
    for dtype, num_tokens, ranks_name in cases:
        for shape in shapes:
            ranks = [1 + (i * 7) % 64 for i in range(12)] if ranks_name == "mixed64" else ranks_for("lang30", 30)[0]
            lang = make_lang(num_tokens, ranks, "uniform", seed=0)
            problem = P.make_problem(*shape, ranks, lang, device="cpu", dtype=dtype, seed=0)
            routing = lslo_kernels.build_routing(problem.lang, problem.num_languages)
            args = (problem.lora_a.detach(), problem.lora_b.detach(), problem.prune_mask, problem.scales,
                    problem.rank_offsets, routing.sorted_token_idx, routing.lang_offsets, problem.max_rank)
            x = problem.x.detach()
            base_out = torch.zeros(num_tokens, shape[1], dtype=dtype)
            h = torch.zeros(num_tokens, problem.max_rank)
            for fused in (False, True, "gemm"):
                launches.clear()
                gemm_launches.clear()
                if fused == "gemm":  # the fused base GEMM + LoRA (LSLO_TRITON_GEMM): training step, decoding
                    _record_gemm(gemm, x, shape, args)
                else:
                    with module.fused_kernels(fused):
                        module.lora_forward_triton(x, base_out, *args)
                        module.lora_add_triton(base_out, x, *args)
                        module.lora_backward_triton(base_out, x, h, *args)
                for kernel, _grid, kargs, kwargs in launches + gemm_launches:
                    if only not in kernel.__name__:
                        continue
                    kwargs = {**kwargs, "BF16_AS_FP32": False}
                    key = (kernel.__name__, tuple(sorted((k, v) for k, v in kwargs.items())),
                           tuple(str(a.dtype) for a in kargs if isinstance(a, torch.Tensor)))
                    if key in seen:
                        continue
                    seen.add(key)
                    consts = ",".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper() and k != "BF16_AS_FP32")
                    label = (f"{kernel.__name__}[{consts},w{kwargs.get('num_warps')},s{kwargs.get('num_stages')}] "
                             f"{str(dtype).removeprefix('torch.')} T={num_tokens} {ranks_name}")
                    try:
                        compiled = aot_compile(kernel, kargs, kwargs)
                        shared = compiled.metadata.shared
                        regs, spill = _resource_usage(compiled)
                    except Exception as exc:  # noqa: BLE001 - a compile error is the finding
                        failures += 1
                        print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                        rows.append(_row(f"aot:{kernel.__name__}", label, "failed", num_tokens, shape, None,
                                         f"{type(exc).__name__}: {str(exc)[:200]}"))
                        continue
                    bad = shared > SM90_MAX_SHARED or spill > 0
                    failures += bad
                    print(f"{'OVER' if bad else 'ok  '} {label}: shared {shared / 1024:.1f} KB, {regs} regs, "
                          f"spill {spill} B", flush=True)
                    note = f"shared={shared};regs={regs};spill={spill};triton={triton.__version__};sm_90 offline"
                    rows.append(_row(f"aot:{kernel.__name__}", label, "over" if bad else "compiled", num_tokens,
                                     shape, None, note))
    print(f"\n{len(seen)} kernel variants compiled for sm_90, {failures} failed or over a limit", flush=True)
    return failures


# ---------------------------------------------------------------------------------- profile
def profile(shape, train_tokens, decode_tokens, calls: int = 50):
    """Where an eager call's time goes: host time per call (enqueue only, and with the GPU's work
    waited for), then a cProfile of lslo's path and torch.profiler tables (CPU and GPU)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for num_tokens, train in ((train_tokens, True), (decode_tokens, False)):
        problem = make_layer_problem(*shape, num_tokens, torch.bfloat16)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        grad_out = torch.randn(num_tokens, shape[1], device=DEVICE, generator=gen).to(torch.bfloat16)
        label = f"{shape[0]}->{shape[1]} T={num_tokens} {'fwd+bwd' if train else 'fwd'}"
        for name in ("base", "grouped_mm", "triton", "triton_unfused"):
            prov = prepare(name, problem)
            meta = prov.prepare(problem.lang)
            x = problem.x.detach().clone().requires_grad_(train)
            leaves = [x, *prov.params]
            for param in prov.params:
                param.requires_grad_(train)

            def call(prov=prov, meta=meta, x=x, leaves=leaves, train=train, grad_out=grad_out, name=name):
                for leaf in leaves:
                    leaf.grad = None
                with kernel_mode(name):
                    if train:
                        prov.run(x, meta).backward(grad_out)
                    else:
                        with torch.no_grad():
                            prov.run(x, meta)

            for _ in range(5):
                call()
            torch.cuda.synchronize()
            n = calls
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            enqueue = (time.perf_counter() - t0) / n
            torch.cuda.synchronize()
            total = (time.perf_counter() - t0) / n
            print(f"{label} {name:10s} host enqueue {enqueue * 1e6:7.1f} us/call, with GPU work waited for "
                  f"{total * 1e6:7.1f} us/call", flush=True)
            if name not in ("triton", "triton_unfused"):
                continue
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                call()
            prof.disable()
            torch.cuda.synchronize()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
            print(f"\n--- cProfile, {n} calls of {name}, {label} ---\n{out.getvalue()}")
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
                for _ in range(10):
                    call()
                torch.cuda.synchronize()
            averages = tprof.key_averages()
            print(f"--- torch.profiler, 10 calls of {name}, {label}: by self CPU time ---")
            print(averages.table(sort_by="self_cpu_time_total", row_limit=18))
            print(f"--- torch.profiler, 10 calls of {name}, {label}: by self GPU time ---")
            try:
                print(averages.table(sort_by="self_device_time_total", row_limit=14))
            except Exception:  # noqa: BLE001 - older torch names it after CUDA
                print(averages.table(sort_by="self_cuda_time_total", row_limit=14))


# ------------------------------------------------------------------------------------- main
def _append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"\nappended {len(rows)} rows to {path}", file=sys.stderr)



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{d}" for k, d in SHAPES],
                        help="in x out features, e.g. 1024x4096 (default: the three M2M-124 shapes)")
    parser.add_argument("--train-tokens", type=int, default=TRAIN_TOKENS)
    parser.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS, help="0: no decoding case (sweep)")
    parser.add_argument("--time-cap", type=float, default=None,
                        help="seconds after which no new measurement starts (the table and CSV are still written)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--sweep", action="store_true", help="time the Triton kernels' launch-config candidates")
    parser.add_argument("--roles", nargs="+", default=list(ROLE_KIND), choices=list(ROLE_KIND),
                        help="--sweep: the kernel roles to sweep (e.g. fused_fwd)")
    parser.add_argument("--aot", action="store_true",
                        help="no GPU needed: compile every launch for sm_90 and report shared memory, registers, "
                             "spills (exit 1 on a failure)")
    parser.add_argument("--aot-quick", action="store_true", help="--aot over 4 cases instead of 9")
    parser.add_argument("--aot-only", default="", help="--aot: only kernels whose name contains this")
    parser.add_argument("--crossover", action="store_true",
                        help="launchers alone over --crossover-tokens: unfused vs fused forward, add and backward")
    parser.add_argument("--crossover-tokens", type=int, nargs="+", default=list(CROSSOVER_TOKENS))
    parser.add_argument("--profile", action="store_true",
                        help="host time per call and profiler tables of the triton path (first shape)")
    parser.add_argument("--csv", type=Path, default=RESULTS_CSV)
    args = parser.parse_args(argv)

    if args.aot:
        global DEVICE
        DEVICE = "cpu"
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        except ValueError:
            parser.error(f"--shapes: expected IN x OUT like 1024x4096, got {args.shapes}")
        rows: list[dict] = []
        failures = aot_check(shapes, rows, cases=AOT_QUICK_CASES if args.aot_quick else AOT_CASES,
                             only=args.aot_only)
        _append_csv(args.csv, rows)
        return 1 if failures else 0
    if not torch.cuda.is_available():
        print("bench_triton_gpu.py times CUDA kernels and found no CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    if "triton" not in lslo_kernels.available_backends("cuda"):
        print("bench_triton_gpu.py: the triton backend is not registered on this machine (is triton installed?); "
              "nothing was measured.", file=sys.stderr)
        return 2
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        parser.error(f"--shapes: expected IN x OUT like 1024x4096, got {args.shapes}")
    torch.backends.cuda.matmul.allow_tf32 = False
    # A `timeout` kill (SIGTERM) unwinds through the `finally` below, so the rows measured so far
    # are written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = Deadline(args.time_cap)
    rows: list[dict] = []
    try:
        if args.profile:
            profile(shapes[0], args.train_tokens, args.decode_tokens)
        elif args.crossover:
            crossover(shapes, args.crossover_tokens, deadline, args.quick, rows)
        elif args.sweep:
            sweep(shapes, [t for t in (args.train_tokens, args.decode_tokens) if t > 0], deadline, args.quick, rows,
                  roles=tuple(args.roles))
        else:
            for shape in shapes:
                bench_case(shape, args.train_tokens, ("fwd+bwd", "fwd+bwd-graph"), TRAIN_PROVIDERS, deadline,
                           args.quick, rows)
                bench_case(shape, args.decode_tokens, ("fwd", "fwd-graph"), DECODE_PROVIDERS, deadline, args.quick,
                           rows)
    finally:  # what was measured before a failure or a kill still reaches the CSV
        _append_csv(args.csv, rows)
    if args.crossover:
        print_crossover(rows)
    elif not (args.sweep or args.profile):
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
