"""The SQLite telemetry store: schema, round trips, concurrent writers, reports."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from telemetry.model import quantile
from telemetry.store import (
    SCHEMA_VERSION,
    Attempt,
    Sample,
    StoreError,
    TelemetryStore,
    default_store_path,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
KEY = ("synthetic", "tiny", "cpu")


def attempt(**kw) -> Attempt:
    fields = dict(
        run_id="r1", file="a/x.cha", path="/corpus/a/x.cha", input_hash="hx", engine="synthetic",
        model="tiny", device="cpu", audio_seconds=30.0, media_bytes=3 * 1024 * 1024, transcript_bytes=900,
        worker_baseline_mb=800.0, peak_mb=2000.0, growth_mb=1200.0, predicted_mb=2100.0, wall_s=4.0,
        cpu_s=3.5, outcome="done", reason=None, worker_pid=4242, started_at=1000.0, finished_at=1004.0,
    )
    fields.update(kw)
    return Attempt(**fields)


@pytest.fixture
def store(tmp_path):
    with TelemetryStore(tmp_path / "deep" / "dir" / "telemetry.sqlite") as s:
        yield s


def test_schema_and_pragmas(store, tmp_path) -> None:
    assert store.path.exists()
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("user_version") == SCHEMA_VERSION
    assert store.pragma("busy_timeout") == 30_000
    assert store.pragma("synchronous") == 1  # NORMAL
    conn = sqlite3.connect(store.path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert {"runs", "attempts", "lower_bounds", "baselines", "models"} <= tables


def test_reopen_keeps_data_and_refuses_newer_schema(tmp_path) -> None:
    path = tmp_path / "t.sqlite"
    with TelemetryStore(path) as s:
        s.record_attempt(attempt())
    with TelemetryStore(path) as s:
        assert len(s.attempts()) == 1
        assert s.pragma("user_version") == SCHEMA_VERSION
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError):
        TelemetryStore(path)


def test_default_store_path(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "batchalign-supervise" / "telemetry.sqlite"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / ".local" / "state" / "batchalign-supervise" / "telemetry.sqlite"


def test_runs_round_trip(store) -> None:
    store.start_run("r1", corpus="/corpus", engine="synthetic", model="tiny", device="cpu",
                    settings={"workers": 4, "budget": "6GiB", "path": Path("/x")})
    store.start_run("r2", corpus="/corpus", engine="synthetic", model="tiny", device="cpu", settings={})
    store.record_attempt(attempt(run_id="r1"))
    store.finish_run("r1", {"done": 1, "exit_code": 0})
    runs = store.runs()
    assert [r["run_id"] for r in runs] == ["r2", "r1"]
    r1 = runs[1]
    assert r1["settings"] == {"workers": 4, "budget": "6GiB", "path": "/x"}
    assert r1["summary"] == {"done": 1, "exit_code": 0}
    assert r1["finished_at"] is not None and r1["attempts"] == 1 and r1["done"] == 1
    assert runs[0]["summary"] is None and runs[0]["finished_at"] is None
    assert len(store.runs(limit=1)) == 1


def test_attempt_round_trip_and_samples(store) -> None:
    a = attempt()
    store.record_attempt(a)
    assert store.attempts("r1") == [a]
    store.record_attempt(attempt(file="b.cha", audio_seconds=None, media_bytes=None, growth_mb=None,
                                 finished_at=1005.0))
    store.record_attempt(attempt(file="c.cha", audio_seconds=None, media_bytes=5 * 1024 * 1024,
                                 growth_mb=700.0, finished_at=1006.0))
    store.record_attempt(attempt(file="d.cha", outcome="killed", growth_mb=9000.0, finished_at=1007.0))
    store.record_attempt(attempt(file="e.cha", device="cuda", finished_at=1008.0))
    samples = store.samples(*KEY)
    assert samples == [Sample(None, 5.0, 700.0), Sample(30.0, 3.0, 1200.0)]  # most recent first
    assert store.samples(*KEY, limit=1) == [Sample(None, 5.0, 700.0)]
    with pytest.raises(ValueError):
        store.record_attempt(attempt(outcome="exploded"))


def test_lower_bounds_keep_the_max(store) -> None:
    assert store.lower_bound("h1", *KEY) is None
    store.set_lower_bound("h1", *KEY, 3000.0)
    store.set_lower_bound("h1", *KEY, 2500.0)
    assert store.lower_bound("h1", *KEY) == 3000.0
    store.set_lower_bound("h1", *KEY, 4100.5)
    assert store.lower_bound("h1", *KEY) == 4100.5
    assert store.lower_bound("h1", "synthetic", "tiny", "cuda") is None
    assert store.lower_bound("h2", *KEY) is None


def test_baseline_is_a_high_quantile_of_recent_values(store) -> None:
    assert store.baseline(*KEY) is None
    for i in range(60):
        store.record_baseline(*KEY, uss_mb=10_000.0 if i < 10 else 800.0 + i, rss_mb=900.0, pss_mb=850.0)
    store.record_baseline("synthetic", "tiny", "cuda", uss_mb=1.0, rss_mb=None, pss_mb=None)
    # Only the last 50 count: the 10 early 10 GB values have aged out.
    assert store.baseline(*KEY) == pytest.approx(quantile([800.0 + i for i in range(10, 60)], 0.9))
    assert store.baseline("synthetic", "tiny", "cuda") == 1.0


def test_model_params_round_trip(store) -> None:
    assert store.load_model(*KEY) is None
    params = {"version": 1, "n_samples": 3, "samples": [[1.0, None, 2.0]], "intercept_mb": 5.5}
    store.save_model(*KEY, params)
    assert store.load_model(*KEY) == params
    store.save_model(*KEY, {"version": 1, "n_samples": 4})
    assert store.load_model(*KEY) == {"version": 1, "n_samples": 4}


def test_ratios(store) -> None:
    store.record_attempt(attempt())
    store.record_attempt(attempt(file="b.cha", finished_at=1010.0))
    store.record_attempt(attempt(file="k.cha", outcome="killed"))
    store.record_baseline(*KEY, uss_mb=800.0, rss_mb=900.0, pss_mb=850.0)
    store.save_model(*KEY, {"version": 1, "n_samples": 2, "intercept_mb": 15.0, "mb_per_audio_second": 40.0,
                            "mb_per_media_mb": 60.0, "upper_intercept_mb": 18.0,
                            "upper_mb_per_audio_second": 47.0, "upper_mb_per_media_mb": 70.0})
    store.record_baseline("wav2vec", "base", "cpu", uss_mb=1500.0, rss_mb=None, pss_mb=None)
    rows = {(r["engine"], r["model"], r["device"]): r for r in store.ratios()}
    r = rows[KEY]
    assert r["samples"] == 2 and r["model_samples"] == 2
    assert (r["intercept_mb"], r["mb_per_audio_second"], r["mb_per_media_mb"]) == (15.0, 40.0, 60.0)
    assert r["upper_mb_per_audio_second"] == 47.0
    assert r["baseline_mb"] == 800.0 and r["updated_at"] is not None
    other = rows[("wav2vec", "base", "cpu")]
    assert other["samples"] == 0 and other["intercept_mb"] is None and other["baseline_mb"] == 1500.0


def test_summary(store) -> None:
    store.start_run("r1", corpus="/c", engine="synthetic", model="tiny", device="cpu", settings={})
    t = 1000.0
    rows = [
        attempt(file="a.cha", path="/c/a.cha", audio_seconds=3600.0, peak_mb=2000.0, wall_s=10.0),
        attempt(file="b.cha", path="/c/b.cha", outcome="killed", peak_mb=9000.0, growth_mb=8200.0, wall_s=3.0),
        attempt(file="b.cha", path="/c/b.cha", audio_seconds=1800.0, peak_mb=7000.0, wall_s=50.0),
        attempt(file="c.cha", path="/c/c.cha", outcome="failed", reason="bad CHAT line 3", peak_mb=None,
                wall_s=0.5),
        attempt(file="d.cha", path="/c/d.cha", outcome="killed", peak_mb=12000.0, wall_s=2.0),
        attempt(file="d.cha", path="/c/d.cha", outcome="quarantined", reason="killed twice", peak_mb=None,
                wall_s=None),
    ]
    for i, a in enumerate(rows):
        store.record_attempt(replace(a, started_at=t + i * 100, finished_at=t + i * 100 + 50))
    store.record_attempt(attempt(run_id="r0", file="z.cha", path="/c/z.cha", audio_seconds=60.0,
                                 started_at=0.0, finished_at=10.0))
    s = store.summary("r1")
    assert (s["files"], s["done"], s["failed"], s["quarantined"]) == (4, 2, 1, 1)
    assert s["kills"] == 2 and s["attempts"] == 6
    assert s["audio_seconds"] == 5400.0
    assert s["worst_by_peak"][0]["file"] == "d.cha" and s["worst_by_peak"][0]["peak_mb"] == 12000.0
    assert [w["file"] for w in s["worst_by_wall"]][:2] == ["b.cha", "a.cha"]
    assert len(s["worst_by_peak"]) == 4
    assert s["quarantined_files"] == [{"run": "r1", "file": "d.cha", "reason": "killed twice"}]
    assert s["failed_files"][0]["reason"] == "bad CHAT line 3"
    assert s["wall_s"] > 0
    assert s["throughput"] == pytest.approx(s["audio_seconds"] / s["wall_s"])

    everything = store.summary()
    assert everything["runs"] == 2 and everything["attempts"] == 7 and everything["done"] == 3
    assert everything["audio_seconds"] == 5460.0
    assert store.summary("nope")["attempts"] == 0


def test_top_ten_only(store) -> None:
    for i in range(25):
        store.record_attempt(attempt(file=f"f{i}.cha", path=f"/c/f{i}.cha", peak_mb=float(i), wall_s=float(i)))
    s = store.summary("r1")
    assert [w["peak_mb"] for w in s["worst_by_peak"]] == [float(i) for i in range(24, 14, -1)]
    assert len(s["worst_by_wall"]) == 10


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from telemetry.store import Attempt, TelemetryStore

    path, tag, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    store = TelemetryStore(path)
    while not go.exists():
        pass
    for i in range(200):
        store.record_attempt(Attempt(
            run_id=tag, file=f"{tag}/{i}.cha", path=f"/c/{tag}/{i}.cha", input_hash=f"{tag}{i}",
            engine="synthetic", model="tiny", device="cpu", audio_seconds=float(i), media_bytes=i * 1000,
            transcript_bytes=10, worker_baseline_mb=800.0, peak_mb=900.0 + i, growth_mb=100.0 + i,
            predicted_mb=None, wall_s=0.1, cpu_s=0.1, outcome="done", reason=None, worker_pid=1,
            started_at=float(i), finished_at=float(i) + 0.1))
        store.set_lower_bound("shared", "synthetic", "tiny", "cpu", float(i))
        if i % 20 == 0:
            store.record_baseline("synthetic", "tiny", "cpu", 800.0 + i, None, None)
    store.close()
    print("ok")
    """
)


def test_two_processes_write_concurrently(tmp_path) -> None:
    path = tmp_path / "shared.sqlite"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(go)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for tag in ("A", "B")
    ]
    go.touch()  # both start writing at the same moment, whichever created the schema
    for p in procs:
        out, err = p.communicate(timeout=50)
        assert p.returncode == 0, err
        assert "locked" not in err and out.strip() == "ok"
    with TelemetryStore(path) as s:
        got = s.attempts()
        assert len(got) == 400
        assert {a.file for a in got} == {f"{t}/{i}.cha" for t in "AB" for i in range(200)}
        assert s.lower_bound("shared", *KEY) == 199.0
        assert len(s.samples(*KEY)) == 400
        assert s.pragma("user_version") == SCHEMA_VERSION
