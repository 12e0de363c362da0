"""How much does the language-specific LoRA cost on top of the base linear, on a GPU?

Question: with the paper's lang30 adapters (16 languages r=2 with 90% of B pruned, 14 languages
r=8) on a mixed, unsorted bf16 batch, what do forward and forward+backward cost, relative to the
frozen base ``F.linear`` alone, for:

- ``base``:    ``F.linear`` only (the floor; frozen weight, only x needs a gradient);
- ``naive``:   base + a Python loop over languages (boolean mask, gather, two matmuls, index_add);
- ``padded``:  base + tokens gathered into a (L, n_max, k) zero-padded batch, factors padded to
               max_rank, two ``bmm`` and a gather back;
- ``triton``:  base + ``lslo_kernels.grouped_lora(..., backend="triton")``.

Routing metadata (``build_routing``) is built once per batch and shared by every layer, so it is
outside the timed region of ``triton``; ``naive`` and ``padded`` build their own index work inside.

Prints a markdown table (ms at p50, ratio to base, speed-up of triton over naive) and appends one
row per (provider, mode, shape, T) to ``benchmarks/results/triton_gpu.csv``.

Usage: ``python benchmarks/bench_triton_gpu.py [--tokens 160 2048 8192] [--quick]``
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

RESULTS_CSV = Path(__file__).resolve().parent / "results" / "triton_gpu.csv"
CSV_FIELDS = ["op", "provider", "mode", "metric", "x", "shape", "dtype", "p20", "p50", "p80",
              "device", "torch", "triton", "date", "host"]
SHAPES = [(1024, 1024), (1024, 4096), (4096, 1024)]
TOKENS = [160, 2048, 8192]
# lang30: 16 languages of rank 2 whose B is 90% pruned, 14 languages of rank 8 unpruned.
RANKS = [2] * 16 + [8] * 14
DENSITY = [0.1] * 16 + [1.0] * 14
DEVICE = "cuda"  # module-level so the providers can be smoke-tested on CPU (TRITON_INTERPRET=1)


def _problem(num_tokens: int, in_features: int, out_features: int, dtype: torch.dtype, seed: int = 0):
    import lslo_kernels

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = DEVICE
    num_langs = len(RANKS)
    total_rank = sum(RANKS)
    rank_offsets = torch.tensor([0, *torch.tensor(RANKS).cumsum(0).tolist()], dtype=torch.int64, device=dev)
    weight = torch.randn(out_features, in_features, device=dev, generator=g).div_(in_features**0.5).to(dtype)
    bias = torch.zeros(out_features, device=dev, dtype=dtype)
    x = torch.randn(num_tokens, in_features, device=dev, generator=g).to(dtype)
    lora_a = torch.randn(total_rank, in_features, device=dev, generator=g).div_(in_features**0.5).to(dtype)
    lora_b = torch.randn(out_features, total_rank, device=dev, generator=g).mul_(0.1).to(dtype)
    # Column densities per language: 90% of a pruned language's B entries are masked.
    col_density = torch.tensor([p for p, r in zip(DENSITY, RANKS) for _ in range(r)], device=dev)
    prune_mask = torch.rand(out_features, total_rank, device=dev, generator=g) < col_density
    scales = torch.full((num_langs,), 2.0, device=dev)
    # Unsorted ids, uniform over the languages (a mixed batch as the data loader yields it).
    lang = torch.randint(0, num_langs, (num_tokens,), device=dev, generator=g)
    routing = lslo_kernels.build_routing(lang, num_langs)
    grad_out = torch.randn(num_tokens, out_features, device=dev, generator=g).to(dtype)
    return {"weight": weight, "bias": bias, "x": x, "lora_a": lora_a, "lora_b": lora_b,
            "prune_mask": prune_mask, "scales": scales, "rank_offsets": rank_offsets, "routing": routing,
            "max_rank": max(RANKS), "grad_out": grad_out}


def _naive(p, x, lora_a, lora_b):
    y = F.linear(x, p["weight"], p["bias"])
    lang = p["routing"].lang
    lora = torch.zeros_like(y)
    offsets = p["rank_offsets"].tolist()  # host loop: this provider syncs, by design
    for lang_id in range(len(RANKS)):
        rows = (lang == lang_id).nonzero().squeeze(1)
        r0, r1 = offsets[lang_id], offsets[lang_id + 1]
        b = lora_b[:, r0:r1] * p["prune_mask"][:, r0:r1]
        h = x.index_select(0, rows) @ lora_a[r0:r1].t()
        lora = lora.index_add(0, rows, (h @ b.t()) * p["scales"][lang_id].to(x.dtype))
    return y + lora


def _padded_indices(p):
    """Index tensors of the padded baseline (not timed: they depend only on ranks)."""
    ranks = torch.tensor(RANKS, device=DEVICE)
    max_rank = p["max_rank"]
    slot = torch.arange(max_rank, device=DEVICE)
    # Row of lora_a (or the appended zero row, index R) for each (language, padded rank slot).
    pad_rows = torch.where(slot[None, :] < ranks[:, None], p["rank_offsets"][:-1, None] + slot[None, :],
                           torch.full_like(slot[None, :], sum(RANKS)))
    return pad_rows


def _padded(p, x, lora_a, lora_b, pad_rows):
    y = F.linear(x, p["weight"], p["bias"])
    r = p["routing"]
    num_langs = len(RANKS)
    counts = r.lang_offsets[1:] - r.lang_offsets[:-1]
    n_max = int(counts.max())  # host sync: part of this approach's cost
    sorted_lang = r.lang[r.sorted_token_idx]
    pos = torch.arange(x.shape[0], device=x.device) - r.lang_offsets[sorted_lang.clamp_min(0)]
    keep = sorted_lang >= 0
    tok, lg, ps = r.sorted_token_idx[keep], sorted_lang[keep], pos[keep]
    x_pad = x.new_zeros((num_langs, n_max, x.shape[1]))
    x_pad = x_pad.index_put((lg, ps), x[tok])
    zero_row = lora_a.new_zeros((1, lora_a.shape[1]))
    a_pad = torch.cat([lora_a, zero_row])[pad_rows]  # (L, r_max, k)
    b_eff = lora_b * p["prune_mask"]
    b_pad = torch.cat([b_eff, b_eff.new_zeros((b_eff.shape[0], 1))], dim=1)[:, pad_rows]  # (d, L, r_max)
    h = torch.bmm(x_pad, a_pad.transpose(1, 2))  # (L, n_max, r_max)
    out = torch.bmm(h, b_pad.permute(1, 2, 0)) * p["scales"].to(x.dtype)[:, None, None]  # (L, n_max, d)
    lora = torch.zeros_like(y).index_put((tok,), out[lg, ps])
    return y + lora


def _triton(p, x, lora_a, lora_b):
    import lslo_kernels

    y = F.linear(x, p["weight"], p["bias"])
    return lslo_kernels.grouped_lora(x, y, lora_a, lora_b, p["prune_mask"], p["scales"], p["rank_offsets"],
                                     p["routing"], p["max_rank"], backend="triton")


def _providers(p, x, lora_a, lora_b, pad_rows):
    """Closures computing y for each provider on the given leaves."""
    return {
        "base": lambda: F.linear(x, p["weight"], p["bias"]),
        "naive": lambda: _naive(p, x, lora_a, lora_b),
        "padded": lambda: _padded(p, x, lora_a, lora_b, pad_rows),
        "triton": lambda: _triton(p, x, lora_a, lora_b),
    }


def _time(fn, mode, leaves, grad_out, quick):
    import triton.testing

    def step():
        y = fn()
        if mode == "fwd+bwd":
            y.backward(grad_out)

    rep, warmup = (20, 5) if quick else (100, 25)
    grad_to_none = leaves if mode == "fwd+bwd" else None
    return triton.testing.do_bench(step, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8],
                                   grad_to_none=grad_to_none)


def _check(p, pad_rows):
    """Every provider computes the same y before anything is timed."""
    with torch.no_grad():
        ref = _naive(p, p["x"], p["lora_a"], p["lora_b"]).float()
        for name, y in (("padded", _padded(p, p["x"], p["lora_a"], p["lora_b"], pad_rows)),
                        ("triton", _triton(p, p["x"], p["lora_a"], p["lora_b"]))):
            err = (y.float() - ref).abs().max().item()
            scale = max(1.0, ref.abs().max().item())
            if err > 3e-2 * scale:
                raise SystemExit(f"{name} disagrees with naive: max abs err {err:.3g} (scale {scale:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--csv", type=Path, default=RESULTS_CSV)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_triton_gpu.py times CUDA kernels and found no CUDA GPU; nothing was measured.")
    import triton

    import lslo_kernels

    if "triton" not in lslo_kernels.available_backends("cuda"):
        sys.exit("bench_triton_gpu.py: the triton backend is not registered on this machine "
                 "(is triton installed?); nothing was measured.")
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.bfloat16
    device_name = torch.cuda.get_device_name()
    providers = ("base", "naive", "padded", "triton")
    rows = []
    for in_features, out_features in SHAPES:
        for num_tokens in args.tokens:
            p = _problem(num_tokens, in_features, out_features, dtype)
            pad_rows = _padded_indices(p)
            _check(p, pad_rows)
            for mode in ("fwd", "fwd+bwd"):
                x = p["x"].detach().clone().requires_grad_(mode == "fwd+bwd")
                lora_a = p["lora_a"].detach().clone().requires_grad_(mode == "fwd+bwd")
                lora_b = p["lora_b"].detach().clone().requires_grad_(mode == "fwd+bwd")
                fns = _providers(p, x, lora_a, lora_b, pad_rows)
                for provider in providers:
                    leaves = [x] if provider == "base" else [x, lora_a, lora_b]
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        q20, q50, q80 = _time(fns[provider], mode, leaves, p["grad_out"], args.quick)
                    rows.append({
                        "op": "grouped_lora", "provider": provider, "mode": mode, "metric": "ms",
                        "x": num_tokens, "shape": f"{in_features}->{out_features}", "dtype": "bf16",
                        "p20": f"{q20:.5f}", "p50": f"{q50:.5f}", "p80": f"{q80:.5f}", "device": device_name,
                        "torch": torch.__version__, "triton": triton.__version__,
                        "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                    })
                    print(f"{in_features}->{out_features} T={num_tokens} {mode:8s} {provider:7s} "
                          f"p50={q50:.4f} ms", file=sys.stderr)

    _print_table(rows, device_name)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.csv.exists()
    with open(args.csv, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"\nappended {len(rows)} rows to {os.path.relpath(args.csv)}")


def _print_table(rows, device_name):
    by_key = {(r["shape"], r["x"], r["mode"], r["provider"]): float(r["p50"]) for r in rows}
    print(f"\nbf16, lang30 ranks, unsorted ids, p50 ms on {device_name} (ratio to base F.linear)\n")
    print("| shape | T | mode | base | naive | padded | triton | triton vs naive |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, tokens, mode in dict.fromkeys((r["shape"], r["x"], r["mode"]) for r in rows):
        base = by_key[(shape, tokens, mode, "base")]
        cells = [f"{base:.4f}"]
        for provider in ("naive", "padded", "triton"):
            ms = by_key[(shape, tokens, mode, provider)]
            cells.append(f"{ms:.4f} ({ms / base:.2f}x)")
        speedup = by_key[(shape, tokens, mode, "naive")] / by_key[(shape, tokens, mode, "triton")]
        print(f"| {shape} | {tokens} | {mode} | " + " | ".join(cells) + f" | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
