"""Where the C++ kernels should stop forking OpenMP threads: one thread vs all, per batch size.

The cpp backend runs a call on the calling thread when its estimated work (streamed elements,
``T * (k + 2 d) + present ranks * (k + d)``) is below ``lslo_kernels.cpp_backend.set_min_parallel_work``'s threshold.
This script times the in-place inference kernel (``torch.ops.lslo_cpp.add_``, lang30 ranks, tokens
uniform over 30 languages) with the threshold at 0 (always fork) and at infinity (never), the
two interleaved round by round, and prints the ratio and the work estimate at each T. On a shared
machine a busy second core makes forking look worse than it is: read ``foreign`` (the share of the
CPU other processes used) beside each row.

    python -m benchmarks.crossover [--shapes 32x32,1024x1024,1024x4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lslo_kernels
from benchmarks.suite import _cpu_snapshot, foreign_cpu_share, make_lang, ranks_for
from lslo_kernels.cpp_backend import set_min_parallel_work

__all__ = ["measure"]


def _work(k: int, d: int, tokens: int, ranks: list[int], lang: torch.Tensor) -> int:
    present = sum(ranks[i] for i in set(lang.tolist()) if i >= 0)
    return tokens * (k + 2 * d) + present * (k + d)


def measure(k: int, d: int, tokens: int, rounds: int = 15, min_s: float = 0.004) -> dict:
    """Median times (us) of one add_ call with and without the fork, and the work estimate."""
    ranks, _densities = ranks_for("lang30", 30)
    lang = make_lang(tokens, ranks, "uniform")
    g = torch.Generator().manual_seed(0)
    total = sum(ranks)
    x = torch.randn(tokens, k, generator=g)
    out = torch.randn(tokens, d, generator=g)
    a = torch.randn(total, k, generator=g) / k**0.5
    b = torch.randn(d, total, generator=g)
    mask = torch.rand(d, total, generator=g) < 0.5
    scales = torch.ones(30)
    offsets = torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()])
    r = lslo_kernels.route_tokens(lang, (tokens,), 30)
    args = (x, a, b, mask, scales, offsets, r.sorted_token_idx, r.lang_offsets, max(ranks))
    add = torch.ops.lslo_cpp.add_.default

    def call():
        add(out, *args)

    inner = 1
    t0 = time.perf_counter()
    call()
    inner = max(1, int(min_s / max(time.perf_counter() - t0, 1e-7)))
    times = {"fork": [], "no_fork": []}
    before = set_min_parallel_work(0)
    snap = _cpu_snapshot()
    try:
        for rnd in range(rounds):
            order = ("fork", "no_fork") if rnd % 2 == 0 else ("no_fork", "fork")
            for mode in order:
                set_min_parallel_work(0 if mode == "fork" else 2**62)
                call()
                t0 = time.perf_counter()
                for _ in range(inner):
                    call()
                times[mode].append((time.perf_counter() - t0) / inner * 1e6)
    finally:
        set_min_parallel_work(before)
    return {
        "fork_us": statistics.median(times["fork"]),
        "no_fork_us": statistics.median(times["no_fork"]),
        "work": _work(k, d, tokens, ranks, lang),
        "foreign": foreign_cpu_share(snap, _cpu_snapshot()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crossover", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x32,1024x1024,1024x4096,4096x1024")
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64,160")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if "cpp" not in lslo_kernels.available_backends("cpu"):
        parser.error("the cpp backend is not built")
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; times are medians of interleaved rounds (us); "
          "ratio = with fork / without (> 1: the fork costs more than it gains)")
    print(f"{'shape':>10} {'T':>5} {'work':>9} {'no fork':>9} {'fork':>9} {'ratio':>6} {'foreign':>8}")
    for shape in args.shapes.split(","):
        k, d = (int(v) for v in shape.split("x"))
        for tokens in (int(t) for t in args.tokens.split(",")):
            m = measure(k, d, tokens)
            print(f"{shape:>10} {tokens:>5} {m['work']:>9} {m['no_fork_us']:>9.1f} {m['fork_us']:>9.1f} "
                  f"{m['fork_us'] / m['no_fork_us']:>6.2f} {m['foreign']:>8.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
