"""Whole runs on a real Dask scheduler with two real `batchalign-supervise worker` processes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from bench.synth_corpus import make_corpus
from cluster_helpers import DaskCluster, cluster_args, write_config
from helpers import events, named, run_cli, start_cli, wait_for_event
from telemetry.store import TelemetryStore

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cluster(tmp_path):
    c = DaskCluster(tmp_path)
    try:
        c.start_scheduler()
        c.start_worker("450MiB")
        c.start_worker("900MiB")
        yield c
    finally:
        c.stop()


def _rels(paths: list[Path], root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in paths}


def test_skewed_corpus_finishes_with_requests_from_predictions(cluster, tmp_path):
    corpus = tmp_path / "corpus"
    files = make_corpus(corpus, [4, 6, 5, 70, 8, 5, 7, 40, 6, 5], subdirs=2)
    out, log = tmp_path / "out", tmp_path / "run.jsonl"
    cfg = write_config(tmp_path)
    r = run_cli(cluster_args(corpus, out, cluster.address, cfg, "--log-json", str(log)), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    evs = events(log)
    done = named(evs, "file_done")
    assert {e["file"] for e in done} == _rels(files, corpus)
    for cha in files:
        text = (out / cha.relative_to(corpus)).read_text()
        assert "%wor:" in text and text.rstrip().endswith("@End")
    assert not [p for p in out.rglob("*.tmp")]
    # Every file ran on a Dask worker, named by its address, and asked for its predicted peak.
    assert all(e["worker"].startswith("tcp://127.0.0.1:") and e["pid"] for e in done)
    assert len({e["worker"] for e in done}) == 2
    admitted = {e["file"]: e for e in named(evs, "file_admitted")}
    assert all(e["request_mb"] > 0 for e in admitted.values())
    ready = named(evs, "worker_ready")
    assert len(ready) >= 2 and all(e["baseline_mb"] > 20 for e in ready)
    # The worker measured each file's peak itself (VmHWM reset per file): growth follows the profile.
    big = next(e for e in done if e["audio_seconds"] == 70)
    assert 0.8 * 280 <= big["growth_mb"] <= 1.3 * 280, big
    assert named(evs, "run_finished")[0]["exit_code"] == 0


def test_file_too_big_for_any_worker_is_killed_retried_larger_and_quarantined(cluster, tmp_path):
    corpus = tmp_path / "corpus"
    # f000 grows by 1200 MiB: more than the larger worker (900 MiB) can hold.
    files = make_corpus(corpus, [300, 5, 6, 8, 5])
    out, log = tmp_path / "out", tmp_path / "run.jsonl"
    cfg = write_config(tmp_path)
    r = run_cli(cluster_args(corpus, out, cluster.address, cfg, "--log-json", str(log), "--max-attempts", "3"),
                tmp_path, timeout=200, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.01")
    assert r.returncode == 1, r.stderr[-3000:]
    evs = events(log)
    assert {e["file"] for e in named(evs, "file_done")} == _rels(files[1:], corpus)
    killed = [e for e in named(evs, "worker_killed") if e["file"] == "f000.cha"]
    assert killed and all("nanny memory restart" in k["reason"] for k in killed)
    failed = [e for e in named(evs, "file_failed") if e["file"] == "f000.cha"]
    assert failed and all(e["kind"] == "memory" for e in failed)
    # Each retry asks for more than the attempt before it was killed at.
    requests = [e["request_mb"] for e in named(evs, "file_admitted") if e["file"] == "f000.cha"]
    requeued = [e for e in named(evs, "file_requeued") if e["file"] == "f000.cha"]
    assert requeued and requeued[0]["estimate_mb"] > requests[0]
    assert requests == sorted(requests) and len(set(requests)) == len(requests)
    assert all(q["estimate_mb"] >= k["rss_mb"] * 1.2 - 1 for q, k in zip(requeued, killed))
    quarantined = named(evs, "file_quarantined")
    assert [q["file"] for q in quarantined] == ["f000.cha"]
    assert "largest worker offers" in quarantined[0]["reason"] or quarantined[0]["attempts"] == 3
    assert "quarantined: f000.cha" in r.stderr
    # The kill is remembered: a later run starts from the lower bound, not the cold guess.
    with TelemetryStore(tmp_path / "state" / "batchalign-supervise" / "telemetry.sqlite") as store:
        attempts = [a for a in store.attempts() if a.file == "f000.cha"]
        assert any(a.outcome == "killed" for a in attempts)


def test_kill_9_of_a_worker_mid_file_is_done_elsewhere(cluster, tmp_path):
    corpus = tmp_path / "corpus"
    files = make_corpus(corpus, [60, 5, 6, 7, 5, 6])  # f000: 6 s of work, fits either worker
    out, log = tmp_path / "out", tmp_path / "run.jsonl"
    cfg = write_config(tmp_path)
    p = start_cli(cluster_args(corpus, out, cluster.address, cfg, "--log-json", str(log)), tmp_path,
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.1")
    try:
        started = wait_for_event(log, "file_started", 60, lambda e: e["file"] == "f000.cha")
        time.sleep(1.0)
        os.kill(started["pid"], signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    evs = events(log)
    lost = [e for e in named(evs, "file_failed") if e["file"] == "f000.cha"]
    assert len(lost) == 1 and lost[0]["kind"] == "lost" and lost[0]["pid"] == started["pid"]
    done = [e for e in named(evs, "file_done") if e["file"] == "f000.cha"]
    assert len(done) == 1 and done[0]["pid"] != started["pid"]
    assert sorted(e["file"] for e in named(evs, "file_done")) == sorted(_rels(files, corpus))
    # Files queued behind it on that worker were requeued without spending an attempt.
    assert {e["file"] for e in named(evs, "file_failed")} == {"f000.cha"}


def test_kill_9_of_the_supervisor_then_rerun_redoes_no_finished_file(cluster, tmp_path):
    corpus = tmp_path / "corpus"
    files = make_corpus(corpus, [5, 6, 7, 8, 5, 6, 40, 9, 5, 6])
    out = tmp_path / "out"
    log = out / "batchalign-supervise.log.jsonl"
    cfg = write_config(tmp_path)
    args = cluster_args(corpus, out, cluster.address, cfg)
    p = start_cli(args, tmp_path)
    try:
        deadline = time.monotonic() + 90
        while len(named(events(log), "file_done")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    # Finished = recorded in the manifest (a kill between an output's rename and its manifest line
    # redoes that one file, by design).
    manifest = out / ".batchalign-supervise" / "done.jsonl"
    first = {json.loads(line)["rel"] for line in manifest.read_text().splitlines() if line.strip()}
    assert 1 <= len(first) < len(files)
    r = run_cli(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    evs = events(log)
    runs = [e["run"] for e in named(evs, "run_started")]
    second = [e for e in evs if e["run"] == runs[-1]]
    redone = {e["file"] for e in named(second, "file_done")}
    assert not (redone & first), redone & first
    assert redone | first == _rels(files, corpus)
    assert {e["file"] for e in named(second, "file_skipped")} >= first


def test_cluster_results_update_the_learned_model_in_the_store(cluster, tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [5, 10, 20, 40, 60, 8])
    out = tmp_path / "out"
    cfg = write_config(tmp_path)
    store_path = tmp_path / "state" / "batchalign-supervise" / "telemetry.sqlite"
    r = run_cli(cluster_args(corpus, out, cluster.address, cfg), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    with TelemetryStore(store_path) as store:
        samples = store.samples("synthetic", "synthetic", "cpu")
        params = store.load_model("synthetic", "synthetic", "cpu")
        rows = store.ratios()
    assert len(samples) == 6
    row = next(r for r in rows if r["engine"] == "synthetic")
    assert row["samples"] == 6 and params
    # A second run predicts from what the cluster taught: requests close to the measured peaks.
    out2, log2 = tmp_path / "out2", tmp_path / "run2.jsonl"
    r = run_cli(cluster_args(corpus, out2, cluster.address, cfg, "--log-json", str(log2)), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    evs = events(log2)
    # The profile grows 4 MiB per audio second; the cold guess was 1: the first run under-asked.
    assert all(a["estimate_source"] != "cold" for a in named(evs, "file_admitted"))
    requests = {e["file"]: e["request_mb"] for e in named(evs, "file_admitted")}
    for e in named(evs, "file_done"):
        assert e["peak_mb"] <= requests[e["file"]] <= 1.5 * e["peak_mb"], (e, requests[e["file"]])


def test_a_worker_that_cannot_read_a_file_names_the_path(tmp_path):
    from supervisor.cluster.engine import align_file

    missing = tmp_path / "elsewhere" / "f.cha"
    r = align_file({"key": "k", "file": "f.cha", "cha": str(missing), "media": None, "out": str(tmp_path / "o.cha"),
                    "engine": "synthetic", "options": {}})
    assert r["kind"] == "bad_input"
    assert str(missing) in r["error"] and "does not exist" in r["error"] and "shared" in r["error"]
