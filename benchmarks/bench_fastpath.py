"""The training step's fast path on the CPU (issue 25): op calls, kernel calls and host time per layer.

Three questions, one run, every ratio against a baseline measured in the same run:

- ``calls``: LSLo op calls and C++ kernel calls per training step of a model with the 615M shape's
  structure (12 + 12 layers, the paper's lang12 ``2;2;8`` on every target of ``all``: 156 adapted
  layers), with shared-input groups (q/k/v of one input in one call) and without. The counts depend
  on the structure only, so the widths are tiny. Op calls are counted at the op's entries
  (``Backend.linear``, ``ops.lora_call``, the shared-input op); kernel calls from the profiler's
  ``lslo_cpp::*`` events.
- ``host``: host time per adapted layer per step: (step time - the frozen model's step time) / 156,
  at widths where FLOPs do not matter, eager separate, eager grouped, and compiled when
  ``--compile`` is given.
- the ratios grouped / separate (and compiled / eager) per round, p20/p50/p80.

    PYTHONPATH=. python benchmarks/bench_fastpath.py                 # ~2 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/bench_fastpath.py --rounds 3      # smoke run

Results: a table on stdout and ``<out>/fastpath.csv`` (default ``runs/bench_fastpath/``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import M2M100Config, M2M100ForConditionalGeneration

import lslo
import lslo_kernels
from lslo.shared_inputs import ungroup_shared_inputs
from lslo_kernels import shared as shared_op

ADAPTED_615M = 156  # 12 x (q, k, v, fc1, fc2) + 12 x (q, k, v, cross q, k, v, fc1, fc2)


def structure_config(d_model: int = 32, vocab: int = 64) -> M2M100Config:
    """The 615M shape's layer structure (12 + 12 layers) at tiny widths."""
    return M2M100Config(vocab_size=vocab, d_model=d_model, encoder_layers=12, decoder_layers=12,
                        encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, encoder_attention_heads=4,
                        decoder_attention_heads=4, dropout=0.0, attention_dropout=0.0, encoder_layerdrop=0.0,
                        decoder_layerdrop=0.0, max_position_embeddings=256)


def build(backend: str, d_model: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    base = M2M100ForConditionalGeneration(structure_config(d_model)).train()
    model = lslo.apply_lslo(base, lslo.LSLoConfig(languages="lang12", ranks="2;2;8", init="reference",
                                                  ffn="reference", backend=backend))
    return model


def batch(tokens: int = 8, seqs: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (seqs, tokens), generator=g)
    labels = torch.randint(3, 64, (seqs, tokens), generator=g)
    src = torch.randint(0, 12, (seqs,), generator=g)
    tgt = torch.randint(0, 12, (seqs,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, src, tgt


def step(model, data):
    inputs, src, tgt = data
    out = lslo.forward_with_langs(model, inputs, src, tgt) if lslo.get_lslo_config(model) else model(**inputs)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


class _Counter:
    """Counts the op's entries while active (monkeypatched entry points, restored on exit)."""

    def __init__(self):
        self.calls = 0
        self._saved = []

    def _wrap(self, owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            out = real(*args, **kwargs)
            if out is not None:
                self.calls += 1
            return out

        self._saved.append((owner, name, real))
        setattr(owner, name, counted)

    def __enter__(self):
        self._wrap(lslo.layer.LSLoLinear, "_linear_forward")
        self._wrap(lslo.layer, "lora_call")
        self._wrap(shared_op._SharedLoRA, "apply")
        return self

    def __exit__(self, *exc):
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)


def count_calls(model, data) -> tuple[int, int]:
    """(LSLo op calls, lslo_cpp kernel calls) of one training step."""
    with _Counter() as counter, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(model, data)
    kernels = sum(e.count for e in prof.key_averages() if e.key.startswith("lslo_cpp::"))
    return counter.calls, kernels


def frozen_twin(model):
    twin = copy.deepcopy(model)
    lslo.remove_lslo(twin)
    twin.model.encoder.embed_tokens.weight.requires_grad_(True)  # a backward through every layer
    return twin


def _time(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def quantiles(values):
    if len(values) == 1:
        return values * 3
    q = statistics.quantiles(values, n=5)
    return [q[0], statistics.median(values), q[3]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3, help="steps timed per round and system")
    parser.add_argument("--backend", default="cpp" if "cpp" in lslo_kernels.available_backends() else "reference")
    parser.add_argument("--out", default="runs/bench_fastpath")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    grouped = build(args.backend)
    separate = copy.deepcopy(grouped)
    ungroup_shared_inputs(separate)
    frozen = frozen_twin(grouped)
    data = batch()
    layers = len(lslo.lslo_modules(grouped))
    rows = []
    for name, model in (("separate", separate), ("grouped", grouped)):
        calls, kernels = count_calls(model, data)
        rows.append({"metric": "op_calls_per_step", "system": name, "p20": calls, "p50": calls, "p80": calls})
        rows.append({"metric": "cpp_kernel_calls_per_step", "system": name, "p20": kernels, "p50": kernels,
                     "p80": kernels})
    systems = {"frozen": frozen, "separate": separate, "grouped": grouped}
    for model in systems.values():
        step(model, data)  # warm-up
    times = {name: [] for name in systems}
    for r in range(args.rounds):
        order = list(systems)[r % 3:] + list(systems)[:r % 3]
        for name in order:
            times[name].append(_time(lambda m=systems[name]: step(m, data), args.repeat))
    per_layer = {name: [(t - f) / layers * 1e6 for t, f in zip(times[name], times["frozen"])]
                 for name in ("separate", "grouped")}
    for name, values in per_layer.items():
        rows.append(dict(zip(("p20", "p50", "p80"), quantiles(values)), metric="host_us_per_layer_step", system=name))
    ratio = [g / s for g, s in zip(times["grouped"], times["separate"])]
    rows.append(dict(zip(("p20", "p50", "p80"), quantiles(ratio)), metric="step_time_ratio", system="grouped/separate"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fastpath.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["metric", "system", "p20", "p50", "p80", "backend", "threads"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "backend": args.backend, "threads": args.threads})
    print(f"{layers} adapted layers, backend {args.backend}, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.repeat} steps; pid {os.getpid()}")
    for row in rows:
        print(f"{row['metric']:28s} {row['system']:18s} {row['p20']:10.3f} {row['p50']:10.3f} {row['p80']:10.3f}")


if __name__ == "__main__":
    main()
