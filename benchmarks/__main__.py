"""``python -m benchmarks``: run the benchmark suite into an output folder: CSV, plots, table.

Each run writes ``results.csv``, the PNG plots and ``README.md`` (the tables) into ``--out``
(default ``runs/benchmarks/<UTC time>`` under the current directory) and ends its terminal output
with the summary table. Files of the checkout are written only on request: ``--readme`` regenerates
the committed table of ``benchmarks/README.md`` from this run and appends its rows to the committed
``benchmarks/results/results.csv``.

Examples::

    python -m benchmarks --quick                  # ~5 min on 2 CPU cores
    python -m benchmarks                          # every sweep + end to end (long)
    python -m benchmarks --quick --providers naive,reference,cpp --only headline
    python -m benchmarks --quick --readme         # ... and publish it as the committed table
    python -m benchmarks --list                   # the cases, without running them

``lslo bench`` forwards its arguments to :func:`main`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

import torch

__all__ = ["main"]

_HERE = Path(__file__).resolve().parent
HISTORY_CSV = _HERE / "results" / "results.csv"  # committed: rows of the runs published with --readme
DEFAULT_README = _HERE / "README.md"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Language-specific LoRA layer benchmarks: lslo's backends against every baseline, "
                    "same inputs, same run.",
    )
    parser.add_argument("--quick", action="store_true", help="a small meaningful subset (~5 min on 2 CPU cores)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers (default: all available on the device); 'base' is "
                             "always added. Known: base, naive, peft, padded_bmm, grouped_mm, dense_blockmask, "
                             "reference, cpp, triton")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of this run's results.csv, PNG plots and README.md table "
                             "(default runs/benchmarks/<UTC time>)")
    parser.add_argument("--readme", type=Path, nargs="?", const=DEFAULT_README, default=None,
                        help="also regenerate the results block of this markdown file (default when given "
                             "without a path: the committed benchmarks/README.md) and append the run's rows to "
                             "benchmarks/results/results.csv")
    parser.add_argument("--only", action="append", default=[],
                        help="run only cases whose sweep or name contains this text (repeatable)")
    parser.add_argument("--reps", type=int, default=None, help="maximum repetitions per case and mode")
    parser.add_argument("--budget", type=float, default=None, help="seconds one case+mode may take (sets the repetitions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak/saved memory pass")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-e2e", action="store_true", help="full mode: skip the end-to-end model runs")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the suite with command-line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)

    from . import providers as P
    from .suite import Options, full_cases, quick_cases, run_suite

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch build/machine")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    providers = None
    if args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
        known = set(P.BASELINES) | {"reference", "cpp", "triton"}
        unknown = [p for p in providers if p not in known]
        if unknown:
            parser.error(f"--providers: unknown {unknown}; known: {', '.join(sorted(known))}")

    cases = quick_cases() if args.quick else full_cases()
    if args.only:
        cases = [c for c in cases if any(s in c.sweep or s in c.name for s in args.only)]
    if args.list:
        for c in cases:
            print(f"{c.sweep:12s} {c.name:55s} {', '.join(c.modes)}")
        return 0
    if not cases:
        parser.error(f"--only {args.only} matches no case")

    opts = Options(device=str(device), dtype=_DTYPES[args.dtype], threads=args.threads, seed=args.seed,
                   measure_memory=not args.no_memory, providers=providers)
    if args.quick:  # keeps --quick within 10 min on a busy 2-core machine
        opts.retry_until_s, opts.deadline_s, opts.quiet_wait_s, opts.hard_stop_s = 360.0, 420.0, 30.0, 540.0
    else:
        opts.warmup, opts.min_reps, opts.max_reps, opts.budget_s = 1, 5, 15, 45.0
    if args.reps is not None:
        opts.max_reps = max(1, args.reps)
        opts.min_reps = min(opts.min_reps, opts.max_reps)
    if args.budget is not None:
        opts.budget_s = args.budget

    out = args.out or Path("runs") / "benchmarks" / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_suite(cases, opts, out, args.readme, history_csv=HISTORY_CSV if args.readme else None,
              mode_name="quick" if args.quick else "full", plots=not args.no_plots,
              e2e=not args.quick and not args.no_e2e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
