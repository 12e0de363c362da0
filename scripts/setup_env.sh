#!/usr/bin/env bash
# Create .venv (if missing) and install lslo with its C++ extension and the dev tools.
# Used by run_main.sh and run_tests.sh so that each works alone on a fresh clone.
#
# A second run is quick: the installs and the extension build (~80 s) are skipped when nothing they
# depend on changed since the last successful set-up. .venv/.lslo-setup.stamp holds a hash of
# pyproject.toml, setup.py, csrc/*, this script, the Python and the torch version; any change
# (or LSLO_SETUP_FORCE=1) runs the whole set-up again. With LSLO_REQUIRE_CPP=1 an up-to-date stamp
# is trusted only if the C++ extension imports; otherwise the build runs again and fails loudly.
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
STAMP=.venv/.lslo-setup.stamp

setup_hash() {
    # The torch version from its metadata (importing torch takes seconds); "none" before it is installed.
    local torch_version
    torch_version="$(python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo none)"
    {
        echo "python $(python -c 'import sys; print(sys.version)')"
        echo "torch $torch_version"
        # Sorted, so that the hash does not depend on the file system's listing order.
        find pyproject.toml setup.py csrc scripts/setup_env.sh -type f -print0 2>/dev/null | LC_ALL=C sort -z \
            | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}

up_to_date() {
    [ "${LSLO_SETUP_FORCE:-0}" != "1" ] || return 1
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(setup_hash)" ] || return 1
    # The stamp is not enough if the environment was damaged since (package removed, build deleted).
    python -c 'import lslo' 2>/dev/null || return 1
    if [ "${LSLO_REQUIRE_CPP:-0}" = "1" ]; then
        python -c 'import lslo_kernels._C' 2>/dev/null || return 1
    fi
}

if up_to_date; then
    echo "[lslo] .venv is up to date (pyproject.toml, setup.py, csrc/ and torch unchanged): skipping installs and build"
else
    rm -f "$STAMP"
    # torch is pinned to the CPU wheel on purpose: an open range pulls a multi-GB CUDA build.
    # On a GPU machine install the CUDA build of the same version first; this line then keeps it.
    python -m pip install -q "torch==2.13.0" "setuptools>=70.1" wheel pybind11 ninja
    echo "[lslo] installing lslo (+ C++ extension) and dev dependencies"
    python -m pip install -q --no-build-isolation -e ".[dev]"
    # Hashed after the installs: the torch version is the one now installed.
    setup_hash > "$STAMP"
fi
python - <<'PY'
import lslo_kernels
from lslo_kernels.backends import _unavailable_reasons
print("[lslo] backends available on cpu:", ", ".join(lslo_kernels.available_backends("cpu")))
if "cpp" not in lslo_kernels.available_backends("cpu"):
    print("[lslo] WARNING: C++ backend missing:", _unavailable_reasons.get("cpp"))
    print("[lslo] (set-up is skipped while nothing changes: LSLO_SETUP_FORCE=1 retries the build)")
PY
