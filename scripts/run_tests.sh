#!/usr/bin/env bash
# The test command: sets up .venv, builds the extension, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# CI must exercise the compiled backend, not silently fall back to the reference.
export LSLO_REQUIRE_CPP="${LSLO_REQUIRE_CPP:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q -p no:cacheprovider tests "$@"
