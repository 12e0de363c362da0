"""The benchmark suite: cases, the timing and memory harness, and the CSV it appends to.

Every case is one linear layer of an M2M-124 shape with per-language LoRA factors and one mixed
batch. All providers (see :mod:`benchmarks.providers`) run on the same inputs in the same process,
their repetitions interleaved (provider order rotated each round) so that a drift of the machine
hits them all alike.

What is timed, per mode (``time.perf_counter``; CUDA synchronised around the timed part):

``fwd``      one layer forward under ``torch.no_grad()``: inference, e.g. decoding. The only mode
             PEFT's mixed batch supports.
``bwd``      ``y.backward(g)`` alone, after an untimed forward with autograd.
``fwd+bwd``  forward with autograd + ``y.backward(g)``: a training step of the layer. x requires
             grad, the base weight is frozen, the LoRA factors require grad.

Per-batch metadata (lslo's routing, the padded providers' indices, the block mask, PEFT's
``adapter_names``) is built once per batch and shared by every layer of a model, so it is not in
``time_ms``; it is timed on its own and reported as ``prep_ms``.

Metrics written for each (case, mode, provider):

``time_ms``           p20/p50/p80 over the repetitions (after warm-up).
``ratio_vs_base``     quantiles of the per-round ratio provider / base (same round, paired).
``speedup_vs_naive``  quantiles of the per-round ratio naive / provider.
``peak_mb``           peak of the bytes held by torch's allocator during one timed step, above
                      what was allocated before it (inputs and weights excluded): the output,
                      what autograd saves, gradients and every transient. CPU: summed from the
                      allocation events of ``torch.profiler(profile_memory=True)`` (allocations
                      made outside torch's allocator, e.g. ``std::vector`` scratch in a C++
                      kernel, are not seen); CUDA: ``torch.cuda.max_memory_allocated`` delta.
``saved_mb``          training modes: bytes of the tensors autograd keeps for the backward
                      (``saved_tensors_hooks``; inputs, weights and factors, which exist anyway,
                      are not counted).
``prep_ms``           the per-batch metadata build described above.
``max_abs_err``       max |y - y_ref| of the provider's forward against lslo's reference backend
                      on the case's inputs (a provider computing the wrong thing shows here).
``above_base_us``     (sweep ``fixed_cost``) quantiles of the per-round difference provider - base, in
                      microseconds: the fixed cost a layer call adds to its base ``nn.Linear``.
``ratio_vs_single``   (provider ``dual``) quantiles of the per-round ratio dual / ``cpp``: a layer
                      with both routings (Weight Learning) against one routing, same step.
``skipped``           the provider could not run the case; ``note`` says why.
``foreign_cpu``       (provider ``-``) share of the machine's CPU that other processes used while
                      the case ran (from /proc/stat): on a shared machine, the trust to give it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import providers as P

__all__ = [
    "CSV_FIELDS",
    "Case",
    "Options",
    "append_rows",
    "foreign_cpu_share",
    "full_cases",
    "make_lang",
    "measure_case",
    "quick_cases",
    "ranks_for",
    "read_rows",
    "run_info",
    "run_suite",
]

SHAPES = ((1024, 1024), (1024, 4096), (4096, 1024))  # M2M-124 615M: attention, fc1, fc2
LANG30 = "lang30"  # the paper's lang30: 16 languages r=2 with 90% of B pruned, 14 languages r=8
SPREADS = ("uniform", "zipf", "single", "tiny")
TINY_GROUP = 2  # tokens per language in the "tiny" spread

CSV_FIELDS = [
    "run_id", "timestamp", "op", "provider", "mode", "metric", "unit", "sweep", "case",
    "x_name", "x_value", "in_features", "out_features", "tokens", "languages", "ranks", "spread",
    "density", "dtype", "p20", "p50", "p80", "reps", "device", "device_name", "threads",
    "torch_version", "lslo_version", "git_rev", "note",
]

UNITS = {
    "time_ms": "ms", "ratio_vs_base": "x", "speedup_vs_naive": "x", "peak_mb": "MiB",
    "saved_mb": "MiB", "prep_ms": "ms", "max_abs_err": "abs", "skipped": "", "above_base_us": "us",
    "ratio_vs_single": "x",
}


# ------------------------------------------------------------------------------------- cases
def ranks_for(label: str, num_languages: int) -> tuple[list[int], list[float] | None]:
    """Ranks (and per-language mask density, when the label fixes it) for a rank label.

    ``lang30``: 16 x r=2 (B 90% pruned) + 14 x r=8 (unpruned), L must be 30; ``r8``: r=8 for
    every language; ``mix2/8/64``: 2, 8, 64, 2, 8, 64, ...
    """
    if label == LANG30:
        if num_languages != 30:
            raise ValueError(f"ranks {LANG30!r} need 30 languages, got {num_languages}")
        return [2] * 16 + [8] * 14, [0.1] * 16 + [1.0] * 14
    if label.startswith("mix"):
        cycle = [int(r) for r in label[3:].split("/")]
        return [cycle[i % len(cycle)] for i in range(num_languages)], None
    if label.startswith("r") and label[1:].isdigit():
        return [int(label[1:])] * num_languages, None
    raise ValueError(f"unknown ranks label {label!r}; use {LANG30!r}, 'r<N>' or 'mix<a>/<b>/...'")


def make_lang(num_tokens: int, ranks: Sequence[int], spread: str, seed: int = 0) -> torch.Tensor:
    """Language id per token, positions shuffled (a real batch is not sorted by language).

    Spreads: ``uniform`` (iid uniform over languages); ``zipf`` (P(l) ~ 1/rank_l, over a random
    order of the languages); ``single`` (every token in the language of largest rank, so a padded
    provider is not favoured); ``tiny`` (every language but one gets ``TINY_GROUP`` tokens, the
    rest go to language 0: many tiny groups next to one big one).

    Returns:
        (num_tokens,) int64.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    num_languages = len(ranks)
    if spread == "uniform":
        lang = torch.randint(0, num_languages, (num_tokens,), generator=gen)
    elif spread == "zipf":
        order = torch.randperm(num_languages, generator=gen)
        probs = 1.0 / torch.arange(1, num_languages + 1, dtype=torch.float64)
        lang = order[torch.multinomial(probs, num_tokens, replacement=True, generator=gen)]
    elif spread == "single":
        lang = torch.full((num_tokens,), max(range(num_languages), key=lambda i: ranks[i]))
    elif spread == "tiny":
        small = [lang_id for lang_id in range(1, num_languages) for _ in range(TINY_GROUP)][:num_tokens]
        lang = torch.tensor(small + [0] * (num_tokens - len(small)), dtype=torch.int64)
    else:
        raise ValueError(f"unknown spread {spread!r}; known: {SPREADS}")
    return lang[torch.randperm(num_tokens, generator=gen)].to(torch.int64)


@dataclass(frozen=True)
class Case:
    """One layer + batch configuration, measured in each of ``modes``."""

    sweep: str
    x_name: str
    in_features: int
    out_features: int
    tokens: int
    languages: int = 30
    ranks: str = LANG30
    spread: str = "uniform"
    density: float = 1.0  # ignored when the ranks label fixes the mask (lang30)
    modes: tuple[str, ...] = ("fwd+bwd",)
    extra_providers: tuple[str, ...] = ()  # measured in this case only (e.g. "dual")

    @property
    def x_value(self):
        return {
            "T": self.tokens, "L": self.languages, "ranks": self.ranks, "spread": self.spread,
            "density": self.density_label, "shape": f"{self.in_features}->{self.out_features}",
        }[self.x_name]

    @property
    def density_label(self) -> str:
        return "lang30" if self.ranks == LANG30 else f"{self.density:g}"

    @property
    def name(self) -> str:
        return (f"{self.in_features}->{self.out_features} T={self.tokens} L={self.languages} "
                f"{self.ranks} {self.spread}" + ("" if self.ranks == LANG30 else f" d={self.density:g}"))


def quick_cases() -> list[Case]:
    """A small meaningful subset: lang30 at the three shapes (T=2048 fwd+bwd, T=160 fwd), a few
    decoding sizes, languages, spreads and heterogeneous ranks. ~5 min on 2 CPU cores."""
    cases = [Case("headline", "shape", k, d, 2048, modes=("fwd+bwd",) if (k, d) != (1024, 1024)
                  else ("fwd+bwd", "bwd")) for k, d in SHAPES]
    cases += [Case("headline", "shape", k, d, 160, modes=("fwd",)) for k, d in SHAPES]
    cases += [Case("T_decode", "T", 1024, 1024, t, modes=("fwd",)) for t in (5, 40, 640)]
    cases += [Case("L", "L", 1024, 1024, 160, languages=n, ranks="r8", modes=("fwd",)) for n in (1, 12, 30, 100)]
    cases += [Case("L", "L", 1024, 1024, 2048, languages=n, ranks="r8") for n in (1, 100)]
    cases += [Case("spread", "spread", 1024, 1024, 2048, spread=s) for s in ("zipf", "single", "tiny")]
    cases += [Case("ranks", "ranks", 1024, 1024, 2048, ranks="mix2/8/64")]
    cases += [Case("fixed_cost", "T", 32, 32, t, modes=("fwd",)) for t in (1, 5)]
    cases += [Case("weight_learning", "shape", 1024, 1024, 2048, extra_providers=("dual",))]
    return cases


def full_cases() -> list[Case]:
    """Every axis of the study, one at a time around the lang30 / uniform / 30-language point."""
    both = ("fwd+bwd", "fwd")
    cases = [Case("headline", "shape", k, d, 2048, modes=("fwd+bwd", "bwd", "fwd")) for k, d in SHAPES]
    cases += [Case("headline", "shape", k, d, 160, modes=("fwd", "fwd+bwd")) for k, d in SHAPES]
    cases += [Case("T_train", "T", k, d, t, modes=both) for k, d in SHAPES for t in (4096, 8192, 16384)]
    cases += [Case("T_decode", "T", k, d, t, modes=("fwd",)) for k, d in SHAPES for t in (5, 20, 80, 320, 640)]
    for ranks in ("r8", "mix2/8/64"):
        cases += [Case("L", "L", 1024, 1024, t, languages=n, ranks=ranks, modes=(m,))
                  for n in (1, 12, 30, 100) for t, m in ((2048, "fwd+bwd"), (160, "fwd"))]
    cases += [Case("ranks", "ranks", 1024, 4096, t, ranks=r, modes=(m,))
              for r in ("r2", "r8", "r64", "mix2/8/64") for t, m in ((2048, "fwd+bwd"), (160, "fwd"))]
    cases += [Case("spread", "spread", 1024, 1024, t, spread=s, modes=(m,))
              for s in ("zipf", "single", "tiny") for t, m in ((2048, "fwd+bwd"), (160, "fwd"))]
    cases += [Case("spread_L100", "spread", 1024, 1024, t, languages=100, ranks="r8", spread=s, modes=(m,))
              for s in SPREADS for t, m in ((2048, "fwd+bwd"), (160, "fwd"))]
    cases += [Case("density", "density", 1024, 1024, t, ranks="r8", density=dens, modes=(m,))
              for dens in (1.0, 0.1) for t, m in ((2048, "fwd+bwd"), (160, "fwd"))]
    cases += [Case("fixed_cost", "T", 32, 32, t, modes=("fwd",)) for t in (1, 5, 160)]
    cases += [Case("weight_learning", "shape", k, d, 2048, extra_providers=("dual",)) for k, d in SHAPES]
    return cases


# ----------------------------------------------------------------------------------- harness
@dataclass
class Options:
    """How to measure. ``budget_s`` is the time one (case, mode) may take; the number of
    repetitions is fitted into it, between ``min_reps`` and ``max_reps``."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    threads: int = 2
    warmup: int = 0  # untimed steps beyond the correctness forward and the memory step (>= 1 without it)
    # Quick mode: 5-9 rounds per case (2.6 min in all with 3-7 rounds and one more warm-up step on
    # an idle 2-core EPYC; 5-9 rounds buy steadier medians for about a minute more).
    min_reps: int = 5
    max_reps: int = 9
    budget_s: float = 12.0
    min_measure_s: float = 0.005  # a fast call is repeated inside one measurement up to this
    seed: int = 0
    measure_memory: bool = True
    providers: Sequence[str] | None = None  # None = every available one
    # On a shared machine: a (case, mode) during which other processes used more than this share
    # of the CPU is measured again (up to ``retries`` times) after waiting up to ``quiet_wait_s``
    # for the machine to calm down; the attempt with the least foreign load is kept.
    max_foreign_cpu: float = 0.15
    retries: int = 1
    quiet_wait_s: float = 60.0
    retry_until_s: float | None = None  # no retry once the suite has run this long (quick: 6 min)
    # Behind this schedule (seconds for all cases), the remaining cases get 3 rounds and a smaller
    # budget: keeps --quick under 10 min when other processes slow everything down.
    deadline_s: float | None = None
    # Cases not started by then are recorded as not measured (quick: 9 min, so the run ends < 10).
    hard_stop_s: float | None = None
    excluded: dict[str, str] = field(default_factory=dict)  # provider -> why it is not run (crash)
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))


@dataclass
class _Timed:
    provider: P.PreparedProvider
    meta: object
    check_s: float = 0.0  # duration of the first (correctness) forward: sizes ``inner``
    inner: int = 1
    times: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(x: torch.Tensor, params: Iterable[torch.Tensor]) -> None:
    x.grad = None
    for p in params:
        p.grad = None


def _timed_step(entry: _Timed, x: torch.Tensor, grad: torch.Tensor, mode: str, device) -> float:
    """Seconds of the timed part of one step of ``mode`` (the untimed part is excluded)."""
    pp, meta = entry.provider, entry.meta
    if mode == "fwd":
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            pp.run(x, meta)
            _sync(device)
            return time.perf_counter() - t0
    _clear_grads(x, pp.params)
    if mode == "bwd":
        y = pp.run(x, meta)
        _sync(device)
        t0 = time.perf_counter()
        y.backward(grad)
        _sync(device)
        return time.perf_counter() - t0
    _sync(device)
    t0 = time.perf_counter()
    pp.run(x, meta).backward(grad)
    _sync(device)
    return time.perf_counter() - t0


def _measure(entry: _Timed, x, grad, mode, device) -> float:
    return sum(_timed_step(entry, x, grad, mode, device) for _ in range(entry.inner)) / entry.inner


@contextlib.contextmanager
def _quiet_fd2():
    """Silence the profiler's native start/stop lines on stderr (fd 2) while it runs."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _storage_key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def _memory(entry: _Timed, x, grad, mode, device, existing: set) -> tuple[float, float | None]:
    """(peak MiB of one step above the bytes live before it, MiB saved for backward or None)."""
    pp, meta = entry.provider, entry.meta
    saved: dict[int, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key is not None and key[0] not in existing:
            saved[key[0]] = key[1]
        return t

    def step():
        if mode == "fwd":
            with torch.no_grad():
                pp.run(x, meta)
            return
        y = pp.run(x, meta)
        y.backward(grad)

    _clear_grads(x, pp.params)
    y_pre = None
    if mode == "bwd":  # forward outside the measured window
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y_pre = pp.run(x, meta)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y_pre.backward(grad) if y_pre is not None else step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with (_quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
              torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)):
            y_pre.backward(grad) if y_pre is not None else step()
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
    saved_mb = sum(saved.values()) / 2**20 if mode != "fwd" else None
    return peak / 2**20, saved_mb


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def measure_case(case: Case, mode: str, opts: Options) -> list[dict]:
    """Time every provider on one case in one mode; returns CSV rows (without run metadata)."""
    device = torch.device(opts.device)
    torch.manual_seed(opts.seed)
    ranks, densities = ranks_for(case.ranks, case.languages)
    lang = make_lang(case.tokens, ranks, case.spread, seed=opts.seed)
    problem = P.make_problem(case.in_features, case.out_features, ranks, lang,
                             mask_density=densities if densities is not None else case.density,
                             device=device, dtype=opts.dtype, seed=opts.seed)
    names = list(opts.providers) if opts.providers else P.available_providers(device)
    for required in ("base",):  # every ratio is against it
        if required not in names:
            names.insert(0, required)
    names += [p for p in case.extra_providers if p not in names]
    training = mode != "fwd"
    rows: list[dict] = []

    def row(provider, metric, values=(None, None, None), reps=None, note=""):
        p20, p50, p80 = values
        rows.append({"op": "lslo_linear", "provider": provider, "mode": mode, "metric": metric,
                     "unit": UNITS.get(metric, ""), "p20": p20, "p50": p50, "p80": p80,
                     "reps": reps, "note": note})

    # Relative to the output's scale: summation order differs between providers; half precision
    # rounds the output itself at ~4e-3.
    tolerance = 1e-3 if opts.dtype in (torch.float32, torch.float64) else 5e-2
    with torch.no_grad():
        ref = P.prepare_provider("reference", problem)
        reference_out = ref.run(problem.x, ref.prepare(problem.lang))

    x = problem.x.detach().clone().requires_grad_(training)
    grad = torch.randn(case.tokens, case.out_features, device=device, dtype=opts.dtype) if training else None
    entries: dict[str, _Timed] = {}
    for name in names:
        if name in opts.excluded:
            row(name, "skipped", note=opts.excluded[name])
            continue
        try:
            pp = P.prepare_provider(name, problem)
            if training and not pp.training:
                raise P.Skip(pp.skip_training_reason)
            for t in pp.params:
                t.requires_grad_(training)
            prep_times = []
            for _ in range(3):
                _sync(device)
                t0 = time.perf_counter()
                meta = pp.prepare(problem.lang)
                _sync(device)
                prep_times.append(time.perf_counter() - t0)
            if pp.has_prep:
                row(name, "prep_ms", tuple(1e3 * v for v in _quantiles(prep_times)), reps=3)
            with torch.no_grad():
                _sync(device)
                t0 = time.perf_counter()
                y = pp.run(problem.x, meta)  # also the warm-up of the forward
                _sync(device)
                check_s = time.perf_counter() - t0
            if name != "base":
                expected = pp.expected(problem.x, meta) if pp.expected is not None else reference_out
                err = float((y.float() - expected.float()).abs().max())
                row(name, "max_abs_err", (err, err, err), reps=1,
                    note="" if err <= tolerance * max(1.0, float(expected.abs().max())) else "WRONG OUTPUT")
            entries[name] = _Timed(pp, meta, check_s=check_s)
        except P.Skip as exc:
            row(name, "skipped", note=str(exc))
            opts.log(f"    {name:16s} skipped: {exc}")
        except Exception as exc:  # noqa: BLE001 - a provider that crashes is recorded, not fatal
            row(name, "skipped", note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            opts.log(f"    {name:16s} FAILED: {type(exc).__name__}: {exc}")

    # The memory pass (one full step per provider) doubles as the warm-up of the backward; the
    # check above warmed up the forward. Then the timed rounds; the first one sizes the rest.
    existing = {k[0] for k in map(_storage_key, [x, problem.x, *problem.base.parameters(), problem.lora_a,
                                                   problem.lora_b, problem.prune_mask, problem.scales,
                                                   problem.rank_offsets, problem.lang]) if k}
    steps_per_call = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
    warmup = opts.warmup if opts.measure_memory else max(1, opts.warmup)
    for name, entry in list(entries.items()):
        try:
            if opts.measure_memory:
                meta_keys = {k[0] for k in map(_storage_key, _tensors_in(entry.meta)) if k}
                param_keys = {k[0] for k in map(_storage_key, entry.provider.params) if k}
                peak_mb, saved_mb = _memory(entry, x, grad, mode, device, existing | meta_keys | param_keys)
                row(name, "peak_mb", (peak_mb, peak_mb, peak_mb), reps=1)
                if saved_mb is not None:
                    row(name, "saved_mb", (saved_mb, saved_mb, saved_mb), reps=1)
            for _ in range(warmup):
                _timed_step(entry, x, grad, mode, device)
        except Exception as exc:  # noqa: BLE001
            row(name, "skipped", note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            opts.log(f"    {name:16s} FAILED: {type(exc).__name__}: {exc}")
            del entries[name]
            continue
        est = entry.check_s * steps_per_call
        entry.inner = max(1, min(1000, math.ceil(opts.min_measure_s / max(est, 1e-7))))

    order = list(entries)
    reps, rep = max(1, opts.max_reps), 0
    while rep < reps:
        shift = rep % len(order)
        round_start = time.perf_counter()
        for name in order[shift:] + order[:shift]:
            entries[name].times.append(_measure(entries[name], x, grad, mode, device))
        if rep == 0:  # wall time of a round, untimed parts included: what the budget pays
            per_round = time.perf_counter() - round_start
            reps = int(max(opts.min_reps, min(opts.max_reps, opts.budget_s // max(per_round, 1e-9))))
        rep += 1

    base_times = entries["base"].times if "base" in entries else None
    naive_times = entries["naive"].times if "naive" in entries else None
    single_times = entries["cpp"].times if "cpp" in entries else None
    for name, entry in entries.items():
        ms = [1e3 * t for t in entry.times]
        row(name, "time_ms", _quantiles(ms), reps=reps)
        if base_times and name != "base":
            row(name, "ratio_vs_base", _quantiles([t / b for t, b in zip(entry.times, base_times)]), reps=reps)
            if case.sweep == "fixed_cost":
                row(name, "above_base_us", _quantiles([1e6 * (t - b) for t, b in zip(entry.times, base_times)]),
                    reps=reps)
        if single_times and name == "dual":
            row(name, "ratio_vs_single", _quantiles([t / s for t, s in zip(entry.times, single_times)]), reps=reps)
        if naive_times and name not in ("naive", "base"):
            row(name, "speedup_vs_naive", _quantiles([n / t for t, n in zip(entry.times, naive_times)]), reps=reps)
        _clear_grads(x, entry.provider.params)
    summary = "  ".join(
        f"{n}={_p50(rows, n, 'time_ms'):.2f}ms" + (f"({_p50(rows, n, 'ratio_vs_base'):.2f}x)" if n != "base" else "")
        for n in entries
    )
    opts.log(f"    reps={reps}  {summary}")
    return rows


def _p50(rows, provider, metric) -> float:
    for r in rows:
        if r["provider"] == provider and r["metric"] == metric:
            return r["p50"]
    return float("nan")


def _tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in obj.__dataclass_fields__ for t in _tensors_in(getattr(obj, f))]
    return []


# ---------------------------------------------------------------------- crash isolation
def canary(name: str, device: str) -> None:
    """Run provider ``name`` on a few small cases (fwd, fwd+bwd); meant for a subprocess.

    Python errors are swallowed: the suite records them case by case. Only a crash (a signal
    from a compiled kernel) or a hang makes the subprocess fail, which would otherwise take the
    whole suite down with it.
    """
    ranks30, dens30 = ranks_for(LANG30, 30)
    checks = [
        (24, 40, [2, 8, 3, 5], None, make_lang(37, [2, 8, 3, 5], "uniform")),
        (1024, 1024, ranks30, dens30, torch.tensor([3] * 8 + [17] * 8)),  # two sentences
        (1024, 4096, ranks30, dens30, make_lang(160, ranks30, "tiny")),
        (4096, 1024, ranks30, dens30, make_lang(160, ranks30, "uniform")),
    ]
    for in_features, out_features, ranks, densities, lang in checks:
        try:
            problem = P.make_problem(in_features, out_features, ranks, lang, device=device,
                                     mask_density=densities if densities is not None else 1.0)
            pp = P.prepare_provider(name, problem)
            meta = pp.prepare(problem.lang)
            with torch.no_grad():
                pp.run(problem.x, meta)
            for t in pp.params:
                t.requires_grad_(True)
            x = problem.x.clone().requires_grad_(True)
            pp.run(x, meta).backward(torch.ones(x.shape[0], out_features, device=device))
            _sync(torch.device(device))
        except Exception:  # noqa: BLE001, S112 - see the docstring
            continue


def crashing_providers(names: Sequence[str], device: str, timeout_s: float = 300.0) -> dict[str, str]:
    """Compiled lslo backends among ``names`` that crash or hang on :func:`canary`, with why."""
    import signal

    root = Path(__file__).resolve().parent.parent
    bad = {}
    for name in names:
        if name in P.BASELINES or name == "reference":
            continue  # pure PyTorch: an error there is an exception, recorded case by case
        code = f"from benchmarks.suite import canary; canary({name!r}, {device!r})"
        try:
            done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            bad[name] = f"hung (> {timeout_s:.0f} s) on small cases in a canary subprocess: not run"
            continue
        if done.returncode < 0:
            try:
                sig = signal.Signals(-done.returncode).name
            except ValueError:
                sig = f"signal {-done.returncode}"
            bad[name] = f"crashed ({sig}) on small cases in a canary subprocess: not run"
        elif done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
            bad[name] = f"canary subprocess failed ({tail}): not run"
    return bad


# ------------------------------------------------------------------------- machine load
def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(CPU-seconds busy on the whole machine, CPU-seconds of this process, wall seconds), or
    None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    return busy, own.user + own.system, time.perf_counter()


def foreign_cpu_share(start, end) -> float:
    """Share of the machine's CPU time used by *other* processes between two snapshots (0..1)."""
    if start is None or end is None or end[2] <= start[2]:
        return float("nan")
    foreign = (end[0] - start[0]) - (end[1] - start[1])
    return min(1.0, max(0.0, foreign / ((end[2] - start[2]) * (os.cpu_count() or 1))))


def wait_for_quiet(max_share: float, timeout_s: float, window_s: float = 2.0) -> float:
    """Wait (up to ``timeout_s``) for a ``window_s`` window in which other processes use less than
    ``max_share`` of the CPU; returns the share of the last window."""
    deadline = time.perf_counter() + timeout_s
    share = float("nan")
    while True:
        start = _cpu_snapshot()
        time.sleep(window_s)
        share = foreign_cpu_share(start, _cpu_snapshot())
        if not share > max_share or time.perf_counter() >= deadline:  # also stops on nan
            return share


# ------------------------------------------------------------------------------- run metadata
def _git_rev() -> str:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never refresh the index
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               env=env, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("-dirty" if dirty else "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_info(opts: Options) -> dict:
    """Columns shared by every row of one run."""
    try:
        import lslo

        lslo_version = lslo.__version__
    except Exception:  # noqa: BLE001 - the suite measures lslo_kernels even if lslo is broken
        lslo_version = "unknown"
    now = _dt.datetime.now(_dt.timezone.utc)
    device = torch.device(opts.device)
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": _device_name(device),
        "threads": opts.threads,
        "torch_version": torch.__version__,
        "lslo_version": lslo_version,
        "git_rev": _git_rev(),
        "dtype": str(opts.dtype).replace("torch.", ""),
    }


def case_columns(case: Case) -> dict:
    return {
        "sweep": case.sweep, "case": case.name, "x_name": case.x_name, "x_value": case.x_value,
        "in_features": case.in_features, "out_features": case.out_features, "tokens": case.tokens,
        "languages": case.languages, "ranks": case.ranks, "spread": case.spread,
        "density": case.density_label,
    }


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def append_rows(csv_path: Path, rows: Iterable[dict]) -> None:
    """Append rows to the results CSV, writing the header when the file is new."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k)) for k in CSV_FIELDS})


def read_rows(csv_path: Path) -> list[dict]:
    with Path(csv_path).open(newline="") as f:
        return list(csv.DictReader(f))


def run_suite(cases: Sequence[Case], opts: Options, out_dir: Path, readme: Path | None = None, *,
              history_csv: Path | None = None, mode_name: str = "quick", plots: bool = True,
              e2e: bool = False) -> str:
    """Measure ``cases``; write ``out_dir/results.csv``, the plots and ``out_dir/README.md`` (the table).

    Rows are appended case by case, so an interrupted run keeps what it measured. Nothing outside
    ``out_dir`` is written unless asked: ``readme`` (a markdown file whose results block is
    regenerated from this run, e.g. the committed ``benchmarks/README.md``) and ``history_csv``
    (a CSV this run's rows are appended to, e.g. the committed ``benchmarks/results/results.csv``).
    The log ends with the summary table (see :func:`benchmarks.report.terminal_summary`).

    Returns:
        The run id of this run (the ``run_id`` column of its rows).
    """
    from . import plots as plotting
    from . import report

    out_dir = Path(out_dir)
    csv_path = out_dir / "results.csv"
    info = run_info(opts)
    names = list(opts.providers) if opts.providers else P.available_providers(opts.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log = opts.log
    log(f"lslo benchmarks ({mode_name}): {len(cases)} cases on {info['device_name']}, {opts.threads} threads, "
        f"torch {info['torch_version']}, git {info['git_rev']}; providers: {', '.join(names)}")
    for name, why in crashing_providers(names, opts.device).items():
        log(f"WARNING: {name}: {why}")
        opts.excluded.setdefault(name, why)
    snapshot = _cpu_snapshot()
    time.sleep(1.0)
    busy = foreign_cpu_share(snapshot, _cpu_snapshot())
    if busy > opts.max_foreign_cpu:
        log(f"WARNING: other processes use {busy:.0%} of the CPU: timings will be noisy "
            "(cases measured under load are retried or flagged)")
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    todo = sum(len(c.modes) for c in cases)
    try:
        for i, case in enumerate(cases, 1):
            for mode in case.modes:
                if opts.hard_stop_s is not None and time.perf_counter() - started > opts.hard_stop_s:
                    why = (f"not measured: the run reached its {opts.hard_stop_s / 60:.0f}-minute cap "
                           "(other processes slowed the machine down)")
                    log(f"[{i}/{len(cases)}] {case.sweep}: {case.name} {mode}: {why}")
                    append_rows(csv_path, [{**info, **case_columns(case), "op": "lslo_linear", "provider": "-",
                                            "mode": mode, "metric": "skipped", "note": why}])
                    todo -= 1
                    continue
                log(f"[{i}/{len(cases)}] {case.sweep}: {case.name} {mode}")
                case_opts = opts
                if opts.deadline_s is not None:
                    share = (opts.deadline_s - (time.perf_counter() - started)) / todo
                    if share < 1.5 * opts.budget_s:
                        case_opts = replace(opts, min_reps=min(3, opts.min_reps), budget_s=max(0.0, share / 2))
                todo -= 1
                best = None
                for attempt in range(opts.retries + 1):
                    start = _cpu_snapshot()
                    rows = measure_case(case, mode, case_opts)
                    foreign = foreign_cpu_share(start, _cpu_snapshot())
                    if best is None or foreign < best[0]:
                        best = (foreign, rows)
                    late = opts.retry_until_s is not None and time.perf_counter() - started > opts.retry_until_s
                    if not foreign > opts.max_foreign_cpu or attempt == opts.retries or late:
                        break
                    log(f"    other processes took {foreign:.0%} of the CPU: waiting for quiet")
                    if wait_for_quiet(opts.max_foreign_cpu / 2, opts.quiet_wait_s) > opts.max_foreign_cpu:
                        log("    still busy: keeping this measurement")
                        break
                    log("    measuring again")
                foreign, rows = best
                rows.append({"op": "lslo_linear", "provider": "-", "mode": mode, "metric": "foreign_cpu",
                             "unit": "share", "p20": foreign, "p50": foreign, "p80": foreign, "reps": 1,
                             "note": "share of the CPU used by other processes while this case ran"})
                append_rows(csv_path, [{**info, **case_columns(case), **r} for r in rows])
    finally:
        torch.set_num_threads(threads_before)
    if e2e:
        from .e2e import run_e2e

        log("end to end (M2M-124 615M configuration, random weights)")
        append_rows(csv_path, [{**info, **r} for r in run_e2e(quick=mode_name == "quick", seed=opts.seed, log=log)])
    wall = time.perf_counter() - started
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    append_rows(csv_path, [{**info, "op": "suite", "provider": "-", "mode": mode_name, "metric": "wall_s",
                            "unit": "s", "p20": wall, "p50": wall, "p80": wall,
                            "note": f"1-min load average {load:.2f} at start, {load_end:.2f} at end; "
                                    f"providers {' '.join(names)}"}])
    rows = read_rows(csv_path)
    run_rows = [r for r in rows if r.get("run_id") == info["run_id"]]
    if plots:
        for path in plotting.plot_all(csv_path, out_dir, info["run_id"]):
            log(f"plot: {path}")
    markdown = report.render(rows, info["run_id"])
    table = out_dir / "README.md"
    report.update_readme(table, markdown)
    log(f"done in {wall / 60:.1f} min; results: {csv_path}; table: {table}")
    if history_csv is not None:
        append_rows(history_csv, run_rows)
        log(f"rows appended to {history_csv}")
    if readme is not None and Path(readme).resolve() != table.resolve():
        report.update_readme(readme, markdown)
        log(f"table regenerated in {readme}")
    log("")
    log(report.terminal_summary(run_rows, info["run_id"]))
    return info["run_id"]
