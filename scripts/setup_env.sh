#!/usr/bin/env bash
# Create .venv (if missing) and install lslo with its C++ extension and the dev tools.
# Used by run_main.sh and run_tests.sh so that each works alone on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[lslo] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch is pinned to the CPU wheel on purpose: an open range pulls a multi-GB CUDA build.
# On a GPU machine install the CUDA build of the same version first; this line then keeps it.
python -m pip install -q "torch==2.13.0" "setuptools>=70.1" wheel pybind11 ninja
echo "[lslo] installing lslo (+ C++ extension) and dev dependencies"
python -m pip install -q --no-build-isolation -e ".[dev]"
python - <<'PY'
import lslo_kernels
from lslo_kernels.backends import _unavailable_reasons
print("[lslo] backends available on cpu:", ", ".join(lslo_kernels.available_backends("cpu")))
if "cpp" not in lslo_kernels.available_backends("cpu"):
    print("[lslo] WARNING: C++ backend missing:", _unavailable_reasons.get("cpp"))
PY
