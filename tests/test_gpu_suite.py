"""bench/gpu_suite.sh, the one prepared GPU benchmark, runs end to end here with --dry-run (tiny shapes on the
CPU, one process per row, the table at the end), so it cannot rot while no GPU is around."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_every_row_of_the_gpu_plan_is_a_valid_row():
    from train_step import Row

    script = (ROOT / "bench" / "gpu_suite.sh").read_text()
    plans = re.findall(r'"([\w-]+):((?:flux2|diffusers)[^"]*)"', script)
    assert {variant for variant, _ in plans} >= {"klein-base-4b", "klein-base-9b", "dev", "dry"}
    rows = [Row.parse(name) for _, names in plans for name in names.split()]
    assert {r.impl for r in rows} == {"flux2", "diffusers"} and any(r.fp8 == "matmul" for r in rows)


def test_dry_run_writes_the_rows_and_the_table(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "failed" not in out.stdout, out.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["flux2+compile+fp8", "diffusers"]
    assert all(r["step_s"] > 0 and r["step_peak_mib"] > 0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| dry | flux2+compile+fp8 | all |" in table and "| dry | diffusers | all |" in table
    # The QLoRA memory targets run first (bench/memory.py --gpu; on the CPU here, the tiny variant).
    qlora = json.loads((tmp_path / "memory_gpu.json").read_text())["gpu"]["rows"]
    assert [(r["variant"], r["quantize"], r["res"]) for r in qlora] == [("tiny", "nf4", 64)]
    assert qlora[0]["peak_gib"] > 0
    assert "QLoRA memory targets on cpu" in table and "| tiny | 64^2 | 4 |" in table
