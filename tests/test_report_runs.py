"""report: which run it shows, the run list, implausible-alignment counts, JSON, and a memory axis
that fits the data with the budget in view."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import env_for
from telemetry.report import choose_run, figure, load_events, run_infos, select_run, summarize, render_text

pytestmark = pytest.mark.timeout(120)

LOGS = Path(__file__).parent / "data" / "logs"


def _ev(run: str, event: str, t: float, **kw) -> dict:
    return {"event": event, "run": run, "t": t, "ts": f"2026-01-01T00:00:{int(t):02d}Z", **kw}


def _resume_log(path: Path) -> Path:
    """A run that aligned two files, then a resume that only skipped them."""
    evs = [
        _ev("r1", "run_started", 0, files=2, engine="whisper", model="whisper-tiny.en", device="cpu",
            budget_mb=20000.0, limit_mb=24000.0),
        _ev("r1", "file_admitted", 1, file="a.cha", predicted_mb=300, audio_seconds=10, attempt=1, worker=1),
        _ev("r1", "memory_sample", 2, used_mb=250.0, budget_mb=20000.0, limit_mb=24000.0,
            workers=[{"worker": 1, "uss_mb": 200.0, "pss_mb": 210.0, "file": "a.cha"},
                     {"worker": 2, "uss_mb": 180.0, "pss_mb": 190.0, "file": None}]),
        _ev("r1", "file_done", 3, file="a.cha", peak_mb=280, predicted_mb=300, audio_seconds=10, wall_s=2, worker=1),
        _ev("r1", "file_warning", 3, file="a.cha", warning="a.cha:7: implausible: no speech energy in 0.00-4.00 s; bullet kept"),
        _ev("r1", "file_warning", 3, file="a.cha", warning="a.cha:9: 1 of 3 words could not be placed (x)"),
        _ev("r1", "file_admitted", 4, file="b.cha", predicted_mb=300, audio_seconds=12, attempt=1, worker=2),
        _ev("r1", "memory_sample", 5, used_mb=300.0, budget_mb=20000.0, limit_mb=24000.0,
            workers=[{"worker": 1, "uss_mb": 150.0, "pss_mb": 160.0, "file": None},
                     {"worker": 2, "uss_mb": 240.0, "pss_mb": 250.0, "file": "b.cha"}]),
        _ev("r1", "file_done", 6, file="b.cha", peak_mb=290, predicted_mb=300, audio_seconds=12, wall_s=2, worker=2,
            stats={"implausible_utterances": 1}),
        _ev("r1", "file_warning", 6, file="b.cha", warning="implausible: b.cha:4: every word at the minimum length"),
        _ev("r1", "run_finished", 7, done=2, failed=0, quarantined=0, skipped=0, exit_code=0, wall_s=7),
        _ev("r2", "run_started", 0, files=2, engine="whisper", model="whisper-tiny.en", device="cpu"),
        _ev("r2", "file_skipped", 0, file="a.cha", reason="already done"),
        _ev("r2", "file_skipped", 0, file="b.cha", reason="already done"),
        _ev("r2", "run_finished", 1, done=0, failed=0, quarantined=0, skipped=2, exit_code=0, wall_s=1),
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in evs))
    return path


def test_default_is_the_last_run_that_did_work(tmp_path):
    events = load_events(_resume_log(tmp_path / "log.jsonl"))
    infos = run_infos(events)
    assert [(i["run"], i["done"], i["skipped"], i["did_work"]) for i in infos] == [
        ("r1", 2, 0, True), ("r2", 0, 2, False)]
    assert choose_run(infos) == "r1"
    assert choose_run(infos, "last") == "r2"
    assert choose_run(infos, "r2") == "r2"
    assert choose_run(infos, "nope") is None


def test_implausible_warnings_are_counted_by_their_tag(tmp_path):
    rep = summarize(select_run(load_events(_resume_log(tmp_path / "log.jsonl")), "r1"))
    assert rep.warnings == 3
    assert rep.totals["implausible"] == 2
    assert [f for f, _ in rep.implausible] == ["a.cha", "b.cha"]
    text = render_text(rep)
    assert "implausible alignments 2" in text and "Implausible alignments (2" in text


def test_memory_axis_fits_the_data_and_shows_the_budget(tmp_path):
    import matplotlib.pyplot as plt

    events = select_run(load_events(_resume_log(tmp_path / "log.jsonl")), "r1")
    fig = figure(events)
    try:
        band, main = fig.axes[0], fig.axes[1]
        assert main.get_ylim()[1] < 0.6  # GiB: the data (0.3 GiB at most), not the 19.5 GiB budget
        low, high = band.get_ylim()
        assert low < 20000 / 1024 < high  # the budget line is in view, in the band above
        assert any("budget" in (t.get_text()) for t in band.get_legend().get_texts())
        labels = [t.get_text() for t in main.texts]
        assert "w1" in labels and "w2" in labels  # each worker's line is named where it ends
    finally:
        plt.close(fig)
    fig = figure(select_run(load_events(LOGS / "complete.jsonl")))
    try:  # budget near the data: one axis, from 0 to just above the limit
        main = fig.axes[0]
        assert main.get_ylim()[1] == pytest.approx(12.0 * 1.05, rel=0.02)
    finally:
        plt.close(fig)


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60)


def test_report_command_lists_runs_and_picks_one(tmp_path):
    log = _resume_log(tmp_path / "log.jsonl")
    r = _cli(tmp_path, "report", str(log))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("run r1 (2 runs in this log")
    assert "files 2 done" in r.stdout
    r = _cli(tmp_path, "report", str(log), "--runs")
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == ["run", "started", "files", "done", "failed", "skipped", "exit"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["r1", "r2"]
    r = _cli(tmp_path, "report", str(log), "--run", "r2", "--json")
    data = json.loads(r.stdout)
    assert data["run"] == "r2" and data["totals"]["skipped"] == 2
    r = _cli(tmp_path, "report", str(log), "--run", "zz")
    assert r.returncode == 2 and "no run 'zz' (runs: r1, r2)" in r.stderr
    r = _cli(tmp_path, "report", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
