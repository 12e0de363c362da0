"""The CPU targets of the layer, measured long enough to read a few percent: ``LSLoLinear`` on ``cpp``
against its frozen base ``nn.Linear``.

The suite (``python -m benchmarks --quick``) interleaves nine providers and gives each case 5-9
rounds, so on a shared 2-core machine its ratios move by +-5-10% from run to run. This check runs
only a few providers over many rounds, alternating their order round by round, and reports the
median of the per-round ratios to the base (each provider against the base measured in the same
round), the statistic the suite reports too:

* ``base``: the frozen ``nn.Linear`` (``F.linear``);
* ``lslo``: ``lslo.LSLoLinear`` on ``cpp``, the layer a model uses (one C++ op with its base:
  ``linear_decode`` in inference, ``linear_lora`` in training);
* ``lslo_two_ops``: the same layer with its base as a separate call, the LoRA term after it
  (``add_`` into the base output in inference, the ``lora`` autograd node in training): the
  composition before the one-op paths, kept to measure them (in inference both layers take their
  planned path after the first call, so the two differ by the op alone);
* ``naive``: the per-language Python loop (training only; it is slow).

Cases: the suite's headline (lang30 ranks, tokens uniform over 30 languages): training (forward +
backward, x and the factors requiring grad, the base frozen) at T=2048 at M2M-124's three shapes and
with mixed ranks 2/8/64 at 1024->1024, inference at T=160 (three shapes) and T=5; and the fixed cost
of a 32->32 layer at T=1 and 5 (microseconds above the base per call). Run::

    python -m benchmarks.cpp_quick [--threads 2] [--rounds 30] [--decode-rounds 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lslo_kernels
from benchmarks import providers as P
from benchmarks.suite import LANG30, make_lang, ranks_for

SHAPES = [(1024, 1024), (1024, 4096), (4096, 1024)]


def _layers(problem):
    """(lslo, lslo_two_ops): two LSLoLinear on cpp around the problem's base, the second with the one-op
    paths switched off."""
    one, two = P._lslo_layer(problem, "cpp"), P._lslo_layer(problem, "cpp")
    two._backend_for(problem.x)
    two._backend_linear = two._backend_decode = None  # cached per (backend, device, dtype): stays off
    return one, two


def _providers(problem, train: bool, routing):
    one, two = _layers(problem)
    weight, bias = problem.base.weight, problem.base.bias
    fns = {"base": lambda x: F.linear(x, weight, bias), "lslo": lambda x: one(x, routing),
           "lslo_two_ops": lambda x: two(x, routing)}
    if train:
        fns["naive"] = lambda x: P.naive_loop(x, problem.base, problem.lora_a, problem.lora_b, problem.prune_mask,
                                              problem.scales, problem.ranks, problem.lang)
    leaves = [one.lora_A, one.lora_B, two.lora_A, two.lora_B, problem.lora_a, problem.lora_b]
    return fns, leaves


def _time(fn, x, grad, leaves, train: bool, inner: int) -> float:
    if train:
        for t in (x, *leaves):
            t.grad = None
        start = time.perf_counter()
        fn(x).backward(grad)
        return time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(inner):
            fn(x)
        return (time.perf_counter() - start) / inner


def bench(num_tokens: int, shape: tuple[int, int], train: bool, rounds: int,
          ranks_label: str = LANG30) -> dict[str, tuple[float, float, float]]:
    """{provider: (median seconds, median per-round ratio to base, median per-round seconds above base)}
    for 30 languages of ``ranks_label`` (the suite's labels: lang30, mix2/8/64, r8, ...)."""
    ranks, densities = ranks_for(ranks_label, 30)
    densities = 1.0 if densities is None else densities
    lang = make_lang(num_tokens, ranks, "uniform")
    problem = P.make_problem(*shape, ranks, lang, mask_density=densities)
    if train:
        problem.lora_a.requires_grad_(True)
        problem.lora_b.requires_grad_(True)
    routing = lslo_kernels.build_routing(lang, len(ranks))  # once per batch, shared by a model's layers
    fns, leaves = _providers(problem, train, routing)
    x = problem.x.clone().requires_grad_(train)
    grad = torch.randn(num_tokens, shape[1], generator=torch.Generator().manual_seed(1))
    # Inference calls shorter than ~1 ms are repeated inside one measurement.
    inner = 1 if train else max(1, min(50, int(4e6 // (num_tokens * shape[0] * shape[1] + 1))))
    names = list(fns)
    for name in names:  # warm-up: first calls build caches (staged factors, allocator)
        for _ in range(2):
            _time(fns[name], x, grad, leaves, train, inner)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_time(fns[name], x, grad, leaves, train, inner))
    base = times["base"]
    return {name: (statistics.median(v), statistics.median(a / b for a, b in zip(v, base)),
                   statistics.median(a - b for a, b in zip(v, base))) for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpp_quick", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the training (T=2048) cases")
    parser.add_argument("--decode-rounds", type=int, default=300, help="rounds of the inference cases")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {lslo_kernels.cpp_backend.kernel_isa()} kernels, "
          f"{args.rounds} / {args.decode_rounds} rounds; cells: median ms (median of per-round ratios to base)")
    cases = [(2048, s, True, args.rounds, LANG30) for s in SHAPES]
    cases += [(2048, (1024, 1024), True, args.rounds, "mix2/8/64")]
    cases += [(160, s, False, args.decode_rounds, LANG30) for s in SHAPES]
    cases += [(5, (1024, 1024), False, args.decode_rounds, LANG30)]
    for num_tokens, shape, train, rounds, label in cases:
        res = bench(num_tokens, shape, train, rounds, label)
        cols = "  ".join(f"{n} {t * 1e3:8.3f} ({r:.3f}x)" for n, (t, r, _d) in res.items())
        mode = "fwd+bwd" if train else "fwd"
        print(f"T={num_tokens:5d} {shape[0]:5d}->{shape[1]:<5d} {label:9s} {mode:8s} {cols}", flush=True)
    for num_tokens in (1, 5):  # fixed cost: microseconds above the base per call
        res = bench(num_tokens, (32, 32), False, args.decode_rounds)
        cols = "  ".join(f"{n} {d * 1e6:+6.1f} us" for n, (_t, _r, d) in res.items() if n != "base")
        print(f"T={num_tokens:5d}    32->32    {LANG30:9s} fixed    base {res['base'][0] * 1e6:6.1f} us  {cols}",
              flush=True)


if __name__ == "__main__":
    main()
