"""`ratios` shows the learned model in words; `ratios --reset` forgets it, for one key or all."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import run_cli  # noqa: E402

from telemetry.model import Defaults, FileFeatures, MemoryModel  # noqa: E402
from telemetry.store import TelemetryStore  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def learned(n: int = 5) -> dict:
    model = MemoryModel(Defaults(100, 10, 1.0))
    for k in range(n):
        s = 5.0 + 5 * k
        model.observe(FileFeatures(audio_s=s * 3, longest_span_s=s, n_spans=3), 20.0 + 2.0 * s)
    return model.params()


def test_reset_forgets_one_model_or_an_engine_or_everything(tmp_path):
    db = tmp_path / "t.sqlite"
    with TelemetryStore(db) as store:
        store.save_model("wav2vec", "org/m", "cpu", learned())
        store.save_model("wav2vec", "org/m@bf16", "cpu", learned())
        store.save_model("wav2vec", "other", "cpu", learned())
        store.save_model("whisper", "tiny", "cpu", learned())
        store.set_lower_bound("h", "wav2vec", "org/m", "cpu", 900.0)
        store.record_baseline("wav2vec", "org/m", "cpu", 100.0, 120.0, 110.0)
    cmd = [sys.executable, "-m", "supervisor.cli", "ratios", "--telemetry", str(db)]
    shown = run_cli(cmd + ["--json"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert any("MiB per second of the longest span" in line for r in rows for line in r["explain"])
    words = run_cli(cmd, tmp_path)
    assert "growth = " in words.stdout and "per second of the longest span" in words.stdout

    r = run_cli(cmd + ["--reset", "wav2vec/org/m"], tmp_path)
    assert r.returncode == 0 and "forgot 2 learned models" in r.stdout
    with TelemetryStore(db) as store:
        assert store.load_model("wav2vec", "org/m", "cpu") is None
        assert store.load_model("wav2vec", "org/m@bf16", "cpu") is None  # its dtype variant too
        assert store.load_model("wav2vec", "other", "cpu") is not None
        assert store.lower_bound("h", "wav2vec", "org/m", "cpu") is None
        assert store.baseline("wav2vec", "org/m", "cpu") is None
    assert "forgot 1 learned model " in run_cli(cmd + ["--reset", "wav2vec"], tmp_path).stdout
    assert "forgot 1 learned model " in run_cli(cmd + ["--reset"], tmp_path).stdout
    with TelemetryStore(db) as store:
        assert store.load_model("whisper", "tiny", "cpu") is None
    # A target without --reset is a usage error, not a silent reset.
    assert run_cli(cmd + ["whisper"], tmp_path).returncode == 2
