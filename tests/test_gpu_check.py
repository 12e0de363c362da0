"""scripts/gpu_check.sh: its dry mode on the CPU prints every stage's command, and every test file
with GPU-only tests is run by it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ALL_STAGES = "env tests fastpath bench crossover profile sweep train"


def test_dry_run_prints_every_stage_and_runs_nothing(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "STAGES": ALL_STAGES, "PYTHON": "false"}
    done = subprocess.run(["bash", str(SCRIPT)], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    dry = [line for line in done.stdout.splitlines() if line.startswith("[dry] ")]
    text = "\n".join(dry)
    for expected in ("nvidia-smi", "tests/test_triton_backend.py", "tests/test_triton_gemm.py", "tests/test_graph_safe.py",
                     "benchmarks/bench_fastpath.py --device cuda --compile", "bench_triton_gpu.py --time-cap",
                     "--crossover", "--profile", "--sweep", "benchmarks/bench_train_step.py --device cuda"):
        assert expected in text, expected
    # Every command runs under its own time cap.
    assert all("timeout -k" in line for line in dry if "pytest" in line or "benchmarks/" in line)
    assert "done, status 0" in done.stdout


def test_every_gpu_test_file_is_in_the_script():
    script = SCRIPT.read_text()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if re.search(r"pytest\.mark\.gpu|def gpu\(", path.read_text()):
            assert f"tests/{path.name}" in script, path.name
