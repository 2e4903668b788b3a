"""bench/gpu_check.py runs end to end on a CPU (--quick --device cpu): both modes, the budget run, the targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--quick", "--device", "cpu", "--levels", "1",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=880,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "targets (ratios from this run)" in r.stdout and "all runs finished every file" in r.stdout
    assert "every file done, no CUDA out-of-memory: yes" in r.stdout
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    runs = {(x["mode"], x["files"]): x for x in figures["runs"]}
    assert set(runs) == {("naive", 1), ("server", 1)}
    assert all(x["done"] == 1 and x["audio_s"] > 0 and x["throughput"] > 0 for x in runs.values())
    assert figures["budget_run"]["done"] == 1 and figures["budget_run"]["cuda_ooms"] == 0
