#!/usr/bin/env bash
# The GPU check of the Triton backend, in one call, for a machine with a CUDA GPU (issue 12):
# versions and the card, the CUDA tests, the benchmark against cuBLAS and the peers (lslo's
# kernels twice: `triton` = the default, fused paths on auto, `triton_unfused` = off; and
# `triton_gemm`, the base GEMM and the LoRA term in one kernel), the unfused-vs-fused crossover over
# T, each stage under its own time cap, everything written to $OUT. Stages run in the order
# env, tests, fastpath, bench, crossover, profile, sweep, train, whatever order STAGES names them in.
#
#   OUT=/tmp/gpu_out scripts/gpu_check.sh                  # env tests fastpath bench crossover (~6 min)
#   DRY_RUN=1 scripts/gpu_check.sh                         # print each stage's command, run nothing (CPU)
#   STAGES="tests bench" BENCH_CAP=90 scripts/gpu_check.sh  # a subset
#   STAGES="profile" scripts/gpu_check.sh                  # where an eager call's time goes
#   STAGES="sweep" SWEEP_ARGS="--train-tokens 0 --roles fused_fwd" scripts/gpu_check.sh  # tune the fused forward
#
# Files in $OUT: env.txt, tests.log, junit.xml, bench.log (progress, then the markdown table with
# a "triton vs unfused" column), bench.csv, crossover.log (the unfused -> fused table), crossover.csv,
# sweep.csv, sweep.log, profile.log, train.log + train/{results.md,steps.csv}, fastpath.log (the GPU
# tests of issue 25: no host sync in a training step, shared-input groups on triton; then
# benchmarks/bench_fastpath.py --device cuda --compile: op calls, kernel launches, host time per
# layer eager / grouped / compiled) + fastpath.csv (the device tool
# brings back 8 files: pick STAGES accordingly, or move junit.xml / crossover.csv elsewhere with
# JUNIT_XML=/tmp/j.xml CROSS_CSV=/tmp/c.csv). Exit status: the last failing stage's.
# Needs torch with CUDA, triton, pytest (pytest-xdist and pytest-timeout are used when present)
# and, for the peft row, peft. Nothing is built: the Triton backend compiles its kernels at run time.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
STAGES=${STAGES:-"env tests fastpath bench crossover"}
BENCH_CAP=${BENCH_CAP:-100}   # seconds after which no new measurement starts
CROSS_CAP=${CROSS_CAP:-60}
SWEEP_CAP=${SWEEP_CAP:-110}
TEST_CAP=${TEST_CAP:-150}     # hard limit of the pytest run
FAST_CAP=${FAST_CAP:-75}      # hard limit of each half of the fastpath stage (tests, benchmark)
TEST_WORKERS=${TEST_WORKERS:-8}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
status=0
stamp() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
# DRY_RUN=1: each stage prints its command (on fd 3, the terminal, whatever the stage redirects) instead of running it.
exec 3>&1
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "[dry] $*" >&3; return 0; fi
  "$@"
}

if want env; then
  stamp "env -> $OUT/env.txt"
  {
    run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    run "$PY" - <<'PY' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:  # noqa: BLE001
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
import lslo_kernels
print("lslo backends on cuda:", lslo_kernels.available_backends("cuda"))
try:
    from lslo_kernels import triton_kernels
    print("triton fused paths by default (LSLO_TRITON_FUSED):", triton_kernels.FUSED,
          "| single-launch forward bound:", triton_kernels.FUSED_FORWARD_MAX_REREAD_BYTES, "bytes")
except Exception as exc:  # noqa: BLE001
    print("triton_kernels: not importable:", exc)
try:
    from lslo_kernels import triton_gemm
    print("fused base GEMM + LoRA (LSLO_TRITON_GEMM) on:", triton_gemm.enabled())
except Exception as exc:  # noqa: BLE001
    print("triton_gemm: not importable:", exc)
for mod in ("peft", "transformers", "xdist", "pytest_timeout"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "present"))
    except Exception as exc:  # noqa: BLE001
        print(mod, "missing:", exc)
PY
    git log -1 --format='git %h %s' 2>/dev/null || true
  } > "$OUT/env.txt"
  cat "$OUT/env.txt"
fi

if want tests; then
  stamp "tests (cap ${TEST_CAP}s) -> $OUT/tests.log, junit.xml"
  extra=()
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n "$TEST_WORKERS")
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
  # Every test of the files runs on the GPU there (the interpreter-only ones skip), the fused base
  # GEMM + LoRA (LSLO_TRITON_GEMM) included; -x is off so one failure does not hide the others.
  run timeout -k 10 "$TEST_CAP" "$PY" -m pytest -q -rfEs -p no:cacheprovider "${extra[@]}" \
      tests/test_triton_backend.py tests/test_triton_gemm.py --junitxml="${JUNIT_XML:-$OUT/junit.xml}" > "$OUT/tests.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && { stamp "tests exit $rc"; status=$rc; }
  grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/tests.log" | tail -30
fi

if want fastpath; then
  stamp "fastpath (cap 2 x ${FAST_CAP}s) -> $OUT/fastpath.log, fastpath.csv"
  {
    run timeout -k 10 "$FAST_CAP" "$PY" -m pytest -q -rfEs -p no:cacheprovider \
        tests/test_graph_safe.py tests/test_shared_inputs.py -k "cuda or triton"
    rc=$?; [ $rc -ne 0 ] && { echo "fastpath tests exit $rc"; status=$rc; }
    run timeout -k 10 "$FAST_CAP" "$PY" benchmarks/bench_fastpath.py --device cuda --compile --rounds 10 \
        --out "$OUT/fastpath_run"
    rc=$?; [ $rc -ne 0 ] && { echo "fastpath bench exit $rc"; status=$rc; }
  } > "$OUT/fastpath.log" 2>&1
  mv "$OUT/fastpath_run/fastpath.csv" "$OUT/fastpath.csv" 2>/dev/null; rmdir "$OUT/fastpath_run" 2>/dev/null
  grep -E "passed|failed|error|op_calls|kernel|host_us|ratio|first_step" "$OUT/fastpath.log" | tail -20
fi

if want bench; then
  stamp "bench (cap ${BENCH_CAP}s) -> $OUT/bench.log, bench.csv"
  run timeout -k 10 $((BENCH_CAP + 90)) "$PY" benchmarks/bench_triton_gpu.py --time-cap "$BENCH_CAP" \
      --csv "$OUT/bench.csv" > "$OUT/bench.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && { stamp "bench exit $rc"; status=$rc; }
  sed -n '/^bf16, lang30/,$p' "$OUT/bench.log"
  grep -E "failed|Error" "$OUT/bench.log" | head -20
fi

if want crossover; then
  # The launchers alone, graph-replayed, over T (CROSS_ARGS e.g. "--crossover-tokens 64 160 512"):
  # forward / in-place add / backward, unfused -> fused, and what the small-T rule picks.
  stamp "crossover (cap ${CROSS_CAP}s) -> $OUT/crossover.log, crossover.csv"
  # shellcheck disable=SC2086
  run timeout -k 10 $((CROSS_CAP + 90)) "$PY" benchmarks/bench_triton_gpu.py --crossover --quick --time-cap "$CROSS_CAP" \
      ${CROSS_ARGS:-} --csv "${CROSS_CSV:-$OUT/crossover.csv}" > "$OUT/crossover.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && { stamp "crossover exit $rc"; tail -20 "$OUT/crossover.log"; status=$rc; }
  sed -n '/^launchers alone/,$p' "$OUT/crossover.log"
fi

if want profile; then
  stamp "profile -> $OUT/profile.log"
  run timeout -k 10 120 "$PY" benchmarks/bench_triton_gpu.py --profile --shapes "${PROFILE_SHAPE:-1024x4096}" \
      --csv "$OUT/profile.csv" > "$OUT/profile.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && { stamp "profile exit $rc"; tail -20 "$OUT/profile.log"; status=$rc; }
  rm -f "$OUT/profile.csv"
  grep -E "us/call" "$OUT/profile.log"
fi

if want sweep; then
  stamp "sweep (cap ${SWEEP_CAP}s) -> $OUT/sweep.csv, sweep.log"
  # SWEEP_ARGS narrows it, e.g. "--shapes 1024x4096 --decode-tokens 0".
  # shellcheck disable=SC2086
  run timeout -k 10 $((SWEEP_CAP + 90)) "$PY" benchmarks/bench_triton_gpu.py --sweep --quick --time-cap "$SWEEP_CAP" \
      ${SWEEP_ARGS:-} --csv "$OUT/sweep.csv" > "$OUT/sweep.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && { stamp "sweep exit $rc"; status=$rc; }
  grep -E "best|Error|error" "$OUT/sweep.log" | tail -40
fi

if want train; then
  # One whole-model training step at the M2M-124 615M shape (random weights): LSLo vs ft-all vs
  # the frozen model, time and peak memory (benchmarks/bench_train_step.py, issue 8). Run from a
  # full checkout (it needs the lslo package). TRAIN_ARGS adds options, e.g. "--rounds 5".
  # shellcheck disable=SC2086
  stamp "train step (cap ${TRAIN_CAP:-100}s) -> $OUT/train.log, train/results.md, train/steps.csv"
  run timeout -k 10 $((${TRAIN_CAP:-100} + 120)) "$PY" benchmarks/bench_train_step.py --device cuda --precision bf16 \
      --time-cap "${TRAIN_CAP:-100}" --tiny-steps 0 --sensitivity "" ${TRAIN_ARGS:-} --out "$OUT/train" \
      > "$OUT/train.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && { stamp "train exit $rc"; tail -20 "$OUT/train.log"; status=$rc; }
  find "$OUT/train" -type f ! -name results.md ! -name steps.csv -delete 2>/dev/null
  cat "$OUT/train/results.md" 2>/dev/null | head -40
fi

stamp "done, status $status"
exit $status
