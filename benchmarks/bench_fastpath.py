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
- the ratios grouped / separate (and compiled / eager) per round, p20/p50/p80;
- with ``--train``: ``lslo train`` tokens/s on the tests' tiny set-up, eager against ``--compile``
  (the same steps, read from each run's ``metrics.jsonl``; the compiled run's first steps include
  its compiles, so both rates are also given without the first ``--train-skip`` steps).

    PYTHONPATH=. python benchmarks/bench_fastpath.py                 # ~2 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/bench_fastpath.py --rounds 3      # smoke run
    PYTHONPATH=. python benchmarks/bench_fastpath.py --compile --train   # + compiled step, train tokens/s
    PYTHONPATH=. python benchmarks/bench_fastpath.py --device cuda --compile   # GPU (scripts/gpu_check.sh)

Results: a table on stdout and ``<out>/fastpath.csv`` (default ``runs/bench_fastpath/``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import M2M100Config, M2M100ForConditionalGeneration

import lslo
import lslo_kernels
from lslo.fast_step import compile_loss
from lslo.shared_inputs import shared_groups, ungroup_shared_inputs
from lslo.testing import RUN_LANGS, tiny_run_setup
from lslo.train import TrainArguments, train
from lslo_kernels import shared as shared_op

ADAPTED_615M = 156  # 12 x (q, k, v, fc1, fc2) + 12 x (q, k, v, cross q, k, v, fc1, fc2)


def structure_config(d_model: int = 32, vocab: int = 64) -> M2M100Config:
    """The 615M shape's layer structure (12 + 12 layers) at tiny widths."""
    return M2M100Config(vocab_size=vocab, d_model=d_model, encoder_layers=12, decoder_layers=12,
                        encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, encoder_attention_heads=4,
                        decoder_attention_heads=4, dropout=0.0, attention_dropout=0.0, encoder_layerdrop=0.0,
                        decoder_layerdrop=0.0, max_position_embeddings=256)


def build(backend: str, d_model: int = 32, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    base = M2M100ForConditionalGeneration(structure_config(d_model)).to(device).train()
    model = lslo.apply_lslo(base, lslo.LSLoConfig(languages="lang12", ranks="2;2;8", init="reference",
                                                  ffn="reference", backend=backend))
    for group in shared_groups(model):
        group.always = True  # measured on every backend, cpp included (which does not group by default)
    return model


def batch(tokens: int = 8, seqs: int = 4, seed: int = 1, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (seqs, tokens), generator=g).to(device)
    labels = torch.randint(3, 64, (seqs, tokens), generator=g).to(device)
    src = torch.randint(0, 12, (seqs,), generator=g).to(device)
    tgt = torch.randint(0, 12, (seqs,), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, src, tgt


def step(model, data, compiled=None):
    inputs, src, tgt = data
    if compiled is not None:  # lslo train --compile's function (decoder inputs: the labels, shapes only matter)
        loss, _nll = compiled(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], inputs["labels"],
                              src, tgt, 0.1)
        loss.backward()
    else:
        out = lslo.forward_with_langs(model, inputs, src, tgt) if lslo.get_lslo_config(model) else model(**inputs)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()


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
    """(LSLo op calls, kernel calls) of one training step: lslo_cpp ops on the CPU, every CUDA
    kernel launch (base GEMMs included) on CUDA."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = data[0]["input_ids"].is_cuda
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _Counter() as counter, torch.profiler.profile(activities=activities) as prof:
        step(model, data)
    if cuda:
        kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        kernels = sum(e.count for e in prof.key_averages() if e.key.startswith("lslo_cpp::"))
    return counter.calls, kernels


def train_rates(steps: int, skip: int) -> dict[str, tuple[float, float]]:
    """tokens/s of `lslo train` on the tests' tiny set-up, eager and --compile: (all steps, after ``skip``)."""
    rates = {}
    with tempfile.TemporaryDirectory() as root:
        setup = tiny_run_setup(Path(root) / "setup")
        common = {"model": setup["model"], "flores_dir": setup["flores"], "languages": ",".join(RUN_LANGS),
                  "ranks": "2;8", "epochs": 100, "max_steps": steps, "max_tokens": 160, "warmup_updates": 4,
                  "lr": 3e-3, "progress": False, "log_every": 1, "cpu": True, "seed": 3, "pad_to_multiple": 16}
        for name, compiled in (("eager", False), ("compiled", True)):
            out = Path(root) / name
            train(TrainArguments(**common, output_dir=str(out), compile=compiled))
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            train_steps = [r for r in records if r["type"] == "train"]
            rates[name] = (_late_rate(train_steps, 0), _late_rate(train_steps, skip))
    return rates


def _late_rate(records, skip: int) -> float:
    late = [r for r in records[skip:] if r.get("tokens_per_s")]
    if not late:
        return float("nan")
    return sum(r["tokens"] for r in late) / sum(r["tokens"] / r["tokens_per_s"] for r in late)


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


class _Rows:
    """Result rows: each printed and appended to the CSV as it comes (a run cut short keeps its rows)."""

    FIELDS = ("metric", "system", "p20", "p50", "p80", "backend", "threads", "device")

    def __init__(self, path: Path, common: dict):
        self.path, self.common = path, common
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writeheader()

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerow({**row, **self.common})
        print(f"{row['metric']:28s} {row['system']:18s} {row['p20']:10.3f} {row['p50']:10.3f} {row['p80']:10.3f}",
              flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3, help="steps timed per round and system")
    parser.add_argument("--backend", default="cpp" if "cpp" in lslo_kernels.available_backends() else "reference")
    parser.add_argument("--out", default="runs/bench_fastpath")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="add the compiled step (lslo train --compile's)")
    parser.add_argument("--train", action="store_true", help="lslo train tokens/s, eager vs --compile")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--train-skip", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device != "cpu" and args.backend == "cpp":
        args.backend = "auto"

    grouped = build(args.backend, device=args.device)
    separate = copy.deepcopy(grouped)
    ungroup_shared_inputs(separate)
    frozen = frozen_twin(grouped)
    data = batch(device=args.device)
    layers = len(lslo.lslo_modules(grouped))
    print(f"{layers} adapted layers, backend {args.backend}, {args.device}, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.repeat} steps; pid {os.getpid()}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _Rows(out / "fastpath.csv", {"backend": args.backend, "threads": args.threads, "device": args.device})
    for name, model in (("separate", separate), ("grouped", grouped)):
        calls, kernels = count_calls(model, data)
        rows.append({"metric": "op_calls_per_step", "system": name, "p20": calls, "p50": calls, "p80": calls})
        rows.append({"metric": "cpp_kernel_calls_per_step", "system": name, "p20": kernels, "p50": kernels,
                     "p80": kernels})
    systems = {"frozen": (frozen, None), "separate": (separate, None), "grouped": (grouped, None)}
    if args.compile:
        compiled_model, compiled_fn = copy.deepcopy(separate), compile_loss(torch.device(args.device))
        start = time.perf_counter()
        step(compiled_model, data, compiled_fn)  # the compile
        seconds = time.perf_counter() - start
        systems["compiled"] = (compiled_model, compiled_fn)
        rows.append({"metric": "first_step_seconds", "system": "compiled", "p20": seconds, "p50": seconds,
                     "p80": seconds})
    for model, fn in systems.values():
        step(model, data, fn)  # warm-up
    times = {name: [] for name in systems}
    names = list(systems)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            model, fn = systems[name]
            times[name].append(_time(lambda m=model, f=fn: step(m, data, f), args.repeat))
    per_layer = {name: [(t - f) / layers * 1e6 for t, f in zip(times[name], times["frozen"])]
                 for name in names if name != "frozen"}
    for name, values in per_layer.items():
        rows.append(dict(zip(("p20", "p50", "p80"), quantiles(values)), metric="host_us_per_layer_step", system=name))
    for name in names[2:]:
        ratio = [g / s for g, s in zip(times[name], times["separate"])]
        rows.append(dict(zip(("p20", "p50", "p80"), quantiles(ratio)), metric="step_time_ratio",
                         system=f"{name}/separate"))
    if args.train:
        rates = train_rates(args.train_steps, args.train_skip)
        for name, (total, late) in rates.items():
            rows.append({"metric": "train_tokens_per_s", "system": name, "p20": total, "p50": total, "p80": total})
            rows.append({"metric": f"train_tokens_per_s_after_{args.train_skip}", "system": name, "p20": late,
                         "p50": late, "p80": late})


if __name__ == "__main__":
    main()
