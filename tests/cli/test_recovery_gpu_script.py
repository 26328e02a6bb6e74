"""bench/recovery_gpu.sh (the GPU budget run of the recovery issue) end to end on a CPU and a tiny model, so that
the first run on a lent device does not fail on a flag or a key: compress, distil with held-out selection,
evaluate both, write the table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_recovery_script_runs_on_cpu_with_a_tiny_model(tiny_dir, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MODEL": str(tiny_dir), "DEVICE": "cpu", "NSAMPLES": "8", "CALIB_SEQLEN": "32", "STEPS": "4",
           "BATCH": "2", "TOKENS": "2048", "SEQLEN": "32", "LR": "1e-3", "EVAL_EVERY": "2", "HELDOUT": "256",
           "TASKS": "piqa", "LIMIT": "2", "PPL_TOKENS": "256", "EVAL_SEQLEN": "64",
           "RESULTS": str(tmp_path / "results" / "recovery.md"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "recovery_gpu.sh"), str(tmp_path / "run")], check=False, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = (tmp_path / "results" / "recovery.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| c03")}
    assert set(rows) == {"c03", "c03-distilled"}
    for row in rows.values():
        kl, wiki, lambada, acc = [c.strip() for c in row.split("|")[2:6]]
        assert float(kl) > 0 and float(wiki) > 1 and float(lambada) > 1 and re.fullmatch(r"[\d.]+ ± [\d.]+", acc)
    selection = json.loads((tmp_path / "run" / "c03-distilled" / "come_plan.json").read_text())["distillation"]["selection"]
    assert selection["kl_after"] <= selection["kl_before"]  # never worse on the held-out windows
    assert f"{selection['kl_before']:.4f} -> {selection['kl_after']:.4f}" in table
    assert f"{4 * 2 * 32:,} training tokens" in table
    assert not list((tmp_path / "results").glob("*.tmp"))
