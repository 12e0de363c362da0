"""Quick CPU check of the ``cpp`` backend against the frozen base ``nn.Linear`` and a naive loop.

Setting of the performance target (lang30 ranks: 16 languages r=2 with 90% of B pruned, 14
languages r=8; tokens spread uniformly over the 30 languages, unsorted):

* training: forward + backward of ``F.linear(x, W) + op`` with x, A, B requiring grad and W frozen,
  T=2048, against ``F.linear(x, W)`` alone (target: at most 1.15x);
* decoding: forward only under ``torch.no_grad()``, T=160 (target: at most 1.10x).

Measurements alternate between providers round by round, so a slow phase of the machine hits all
of them; the median and the minimum of the rounds are reported (on a shared machine the minimum
is the less disturbed estimate). Run:

    python -m benchmarks.cpp_quick [--threads 2] [--rounds 15] [--decode-rounds 150]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lslo_kernels

SHAPES = [(1024, 4096), (1024, 1024), (4096, 1024)]
RANKS = [2] * 16 + [8] * 14


def make_problem(num_tokens: int, in_features: int, out_features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    num_languages = len(RANKS)
    total = sum(RANKS)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    lora_a = (torch.randn(total, in_features, generator=g) / in_features**0.5).requires_grad_(True)
    lora_b = torch.randn(out_features, total, generator=g).requires_grad_(True)
    rank_offsets = torch.tensor([0, *torch.tensor(RANKS).cumsum(0).tolist()], dtype=torch.int64)
    # r=2 languages keep 10% of B, r=8 languages all of it
    keep = torch.tensor([0.1 if r == 2 else 1.0 for r in RANKS]).repeat_interleave(torch.tensor(RANKS))
    prune_mask = torch.rand(out_features, total, generator=g) < keep
    scales = torch.full((num_languages,), 2.0)
    lang = torch.randint(0, num_languages, (num_tokens,), generator=g)
    x = torch.randn(num_tokens, in_features, generator=g)
    grad_y = torch.randn(num_tokens, out_features, generator=g)
    return {"weight": weight, "lora_a": lora_a, "lora_b": lora_b, "rank_offsets": rank_offsets,
            "prune_mask": prune_mask, "scales": scales, "lang": lang, "x": x, "grad_y": grad_y, "max_rank": max(RANKS)}


def naive_loop(x, base_out, p):
    """The per-language loop of a mixed-adapter batch: mask, gather, two matmuls, scatter-add."""
    y = base_out.clone()
    ro = p["rank_offsets"].tolist()
    for lang_id in range(len(RANKS)):
        rows = (p["lang"] == lang_id).nonzero().squeeze(1)
        a = p["lora_a"][ro[lang_id]:ro[lang_id + 1]]
        b = p["lora_b"][:, ro[lang_id]:ro[lang_id + 1]] * p["prune_mask"][:, ro[lang_id]:ro[lang_id + 1]]
        y.index_add_(0, rows, p["scales"][lang_id] * ((x.index_select(0, rows) @ a.t()) @ b.t()))
    return y


def providers(p, train: bool):
    weight = p["weight"]

    def base(x):
        return F.linear(x, weight)

    def naive(x):
        return naive_loop(x, F.linear(x, weight), p)

    # Built once per batch and shared by every layer routed by the same ids, as in the model.
    routing = lslo_kernels.build_routing(p["lang"], len(RANKS))

    def backend(name):
        def run(x):
            return lslo_kernels.grouped_lora(x, F.linear(x, weight), p["lora_a"], p["lora_b"], p["prune_mask"],
                                             p["scales"], p["rank_offsets"], routing, p["max_rank"], backend=name)
        return run

    out = {"base": base, "naive": naive, "cpp": backend("cpp")}
    if train:
        out["reference"] = backend("reference")
    return out


def time_once(fn, p, train: bool) -> float:
    if train:
        x = p["x"].clone().requires_grad_(True)
        for t in (p["lora_a"], p["lora_b"]):
            t.grad = None
        start = time.perf_counter()
        fn(x).backward(p["grad_y"])
        return time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        fn(p["x"])
        return time.perf_counter() - start


def bench(num_tokens: int, shape, train: bool, rounds: int):
    p = make_problem(num_tokens, *shape)
    fns = providers(p, train)
    samples = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        for _ in range(2):
            time_once(fn, p, train)
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_once(fn, p, train))
    return ({name: statistics.median(v) * 1e3 for name, v in samples.items()},
            {name: min(v) * 1e3 for name, v in samples.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the training (T=2048) cases")
    parser.add_argument("--decode-rounds", type=int, default=150, help="rounds of the decoding (T=160) cases")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {lslo_kernels._C.get_isa()} kernels, "
          f"{args.rounds} / {args.decode_rounds} rounds, times in ms")
    for num_tokens, train, rounds in ((2048, True, args.rounds), (160, False, args.decode_rounds)):
        mode = "fwd+bwd" if train else "fwd"
        for shape in SHAPES:
            for stat, ms in zip(("median", "min"), bench(num_tokens, shape, train, rounds)):
                cols = "  ".join(f"{n} {v:8.2f} ({v / ms['base']:.3f}x)" for n, v in ms.items())
                print(f"T={num_tokens:5d} {shape[0]:5d}->{shape[1]:<5d} {mode:8s} {stat:6s} {cols}", flush=True)


if __name__ == "__main__":
    main()
