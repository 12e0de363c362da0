"""Both routings in one layer: two chained grouped calls vs one pass, against one routing.

``LSLoDualLinear`` computes ``W x + w_src LSLo_src(x) + w_tgt LSLo_tgt(x)`` as two chained calls of
the grouped op (in place into the base output without autograd). A fused kernel would read x and
the output once instead of twice. Its cost is bounded here without writing it: one call of the
existing op over per-(source, target)-pair factors (each pair's A rows and weighted B columns
concatenated, built outside the timing) reads x and the output once with the ranks of both
routings, exactly the traffic of a one-pass kernel. Timed (medians of interleaved rounds, ms):

``base``      the nn.Linear alone
``single``    LSLoLinear, one routing
``dual``      LSLoDualLinear, two chained calls (what the layer does)
``one_pass``  the one-pass bound above (plus the same base Linear)

    python -m benchmarks.dual [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import lslo
import lslo_kernels
from benchmarks.suite import _cpu_snapshot, foreign_cpu_share, make_lang, ranks_for
from lslo.layer import LSLoDualLinear, LSLoMix

__all__ = ["measure"]


def _pair_factors(dual: LSLoDualLinear, src: torch.Tensor, tgt: torch.Tensor):
    """Factors of one 'language' per (src, tgt) pair present: A = [A_src; A_tgt], B = [w s B_src, w s B_tgt]."""
    w = dual.mix_weights_now().detach()
    pairs = sorted({(int(s), int(t)) for s, t in zip(src.tolist(), tgt.tolist())})
    a_rows, b_cols, ranks = [], [], []
    for s, t in pairs:
        a_s, b_s, m_s = dual.src.language_factors(s)
        a_t, b_t, m_t = dual.tgt.language_factors(t)
        a_rows += [a_s, a_t]
        b_cols += [w[0] * dual.src.scales[s] * b_s * m_s, w[1] * dual.tgt.scales[t] * b_t * m_t]
        ranks.append(a_s.shape[0] + a_t.shape[0])
    index = {p: i for i, p in enumerate(pairs)}
    pair_lang = torch.tensor([index[(int(s), int(t))] for s, t in zip(src.tolist(), tgt.tolist())])
    lora_a = torch.cat(a_rows).detach().contiguous()
    lora_b = torch.cat(b_cols, dim=1).detach().contiguous()
    offsets = torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()])
    return lora_a, lora_b, torch.ones_like(lora_b, dtype=torch.bool), torch.ones(len(pairs)), offsets, pair_lang


def measure(k: int, d: int, tokens: int, mode: str, rounds: int = 9, min_s: float = 0.02) -> dict:
    """Median ms per call of each variant; ``mode`` "fwd" (no_grad) or "fwd+bwd"."""
    ranks, _densities = ranks_for("lang30", 30)
    torch.manual_seed(0)
    base = nn.Linear(k, d).requires_grad_(False)
    single = lslo.LSLoLinear(base, ranks)
    dual = LSLoDualLinear(base, ranks, mix=LSLoMix((0.3, -0.2)))
    with torch.no_grad():
        for factors in (single, dual.src, dual.tgt):
            factors.lora_B.normal_()
            factors.set_prune_mask(keep=torch.rand_like(factors.lora_B) < 0.5)
    src = make_lang(tokens, ranks, "uniform", seed=1)
    tgt = make_lang(tokens, ranks, "uniform", seed=2)
    r_src, r_tgt = (lslo_kernels.route_tokens(ids, (tokens,), 30) for ids in (src, tgt))
    pa, pb, pm, ps, po, pair_lang = _pair_factors(dual, src, tgt)
    r_pair = lslo_kernels.route_tokens(pair_lang, (tokens,), po.shape[0] - 1)
    pair_rank = int((po[1:] - po[:-1]).max())
    x = torch.randn(tokens, k)
    training = mode != "fwd"
    if training:
        x.requires_grad_(True)
        pa.requires_grad_(True)
        pb.requires_grad_(True)
    grad = torch.randn(tokens, d)

    def one_pass():
        return lslo_kernels.grouped_lora(x, base(x), pa, pb, pm, ps, po, r_pair, pair_rank, validate=False)

    variants = {
        "base": lambda: base(x),
        "single": lambda: single(x, lang=r_src),
        "dual": lambda: dual(x, r_src, r_tgt),
        "one_pass": one_pass,
    }

    def step(fn):
        if training:
            fn().backward(grad)
        else:
            with torch.no_grad():
                fn()

    inner = {}
    for name, fn in variants.items():
        step(fn)
        t0 = time.perf_counter()
        step(fn)
        inner[name] = max(1, int(min_s / max(time.perf_counter() - t0, 1e-7)))
    times = {n: [] for n in variants}
    snap = _cpu_snapshot()
    for rnd in range(rounds):
        names = list(variants)
        names = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in names:
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                step(variants[name])
            times[name].append((time.perf_counter() - t0) / inner[name] * 1e3)
    out = {n: statistics.median(v) for n, v in times.items()}
    out["foreign"] = foreign_cpu_share(snap, _cpu_snapshot())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dual", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="1024x1024:5:fwd,1024x1024:160:fwd,1024x1024:2048:fwd+bwd,"
                                           "1024x4096:2048:fwd+bwd")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, lang30 ranks, src and tgt ids uniform and independent; ms, medians")
    print(f"{'case':>24} {'base':>8} {'single':>8} {'dual':>8} {'one_pass':>9} {'dual/single':>12} "
          f"{'one_pass/dual':>14} {'foreign':>8}")
    for spec in args.cases.split(","):
        shape, tokens, mode = spec.split(":")
        k, d = (int(v) for v in shape.split("x"))
        m = measure(k, d, int(tokens), mode)
        print(f"{shape + ' T=' + tokens + ' ' + mode:>24} {m['base']:>8.3f} {m['single']:>8.3f} {m['dual']:>8.3f} "
              f"{m['one_pass']:>9.3f} {m['dual'] / m['single']:>12.2f} {m['one_pass'] / m['dual']:>14.2f} "
              f"{m['foreign']:>8.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
