#!/usr/bin/env bash
# The test command: sets up .venv, builds the extension, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# CI must exercise the compiled backend, not silently fall back to the reference: a failed
# build of the extension fails here, loudly, and test_cpp_backend asserts it loaded.
export LSLO_REQUIRE_CPP="${LSLO_REQUIRE_CPP:-1}"
./scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q -p no:cacheprovider tests "$@"
