#!/usr/bin/env bash
# The main job: sets up .venv, then runs `lslo demo`: the paper's experiment (synthetic languages, a tiny
# pretrained M2M-100, Pretrain / Ft-all / LSLo with and without gradual pruning) on this CPU, with the
# report in runs/demo/. A finished demo is not run again (--resume keeps every stage already done):
# pass --overwrite to start over, --quick for a two-minute smoke run in another --output-dir.
# The kernel benchmark suite is `lslo bench --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
if [ "$#" -eq 0 ]; then
    set -- --resume
fi
exec python -m lslo demo "$@"
