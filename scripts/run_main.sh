#!/usr/bin/env bash
# The main job: sets up .venv and runs the quick benchmark suite (lslo vs the baselines),
# writing benchmarks/results/results.csv, the plots and the table in benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m benchmarks --quick "$@"
