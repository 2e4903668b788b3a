"""Whole runs of the real command line with real synthetic workers."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from bench.synth_corpus import make_corpus
import subprocess

from helpers import cli_args, env_for, events, fill_disk, named, pid_alive, run_cli, start_cli, wait_for_event

pytestmark = pytest.mark.timeout(180)


def _outputs_ok(out: Path, corpus: list[Path], root: Path) -> None:
    for cha in corpus:
        target = out / cha.relative_to(root)
        text = target.read_text(encoding="utf-8")
        assert text.startswith("@UTF8") and text.rstrip().endswith("@End"), target
        mains = [ln for ln in text.splitlines() if ln.startswith("*")]
        wors = [ln for ln in text.splitlines() if ln.startswith("%wor:")]
        assert len(wors) == len(mains), target
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_all_files_done_under_a_small_budget(tmp_path):
    corpus_dir = tmp_path / "corpus"
    durations = [5, 8, 12, 20, 30, 45, 6, 9, 14, 25, 60, 7]
    files = make_corpus(corpus_dir, durations, subdirs=3)
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus_dir, out, "--memory-budget", "700MiB", "--workers", "4", "--log-json", str(log)),
                tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _outputs_ok(out, files, corpus_dir)
    evs = events(log)
    assert len(named(evs, "file_done")) == len(files)
    assert {e["file"] for e in named(evs, "file_done")} == {p.relative_to(corpus_dir).as_posix() for p in files}
    # Never more promised than the budget at the moment of any admission.
    for e in named(evs, "file_admitted"):
        assert e["committed_mb"] <= e["budget_mb"] + 1e-6, e
    started = named(evs, "run_started")[0]
    assert started["budget_mb"] == 700.0
    finished = named(evs, "run_finished")[0]
    assert finished["done"] == len(files) and finished["exit_code"] == 0
    # Every event carries the run id; worker events carry worker and pid.
    assert all(e.get("run") == started["run"] for e in evs)
    assert all("pid" in e and "worker" in e for e in named(evs, "file_done"))
    # Workers were spawned one at a time: each spawn after the previous one had loaded its model.
    order = [(e["event"], e["worker"]) for e in evs if e["event"] in ("worker_spawned", "worker_loaded")]
    for (a, wa), (b, wb) in zip(order, order[1:]):
        if a == "worker_spawned":
            assert (b, wb) == ("worker_loaded", wa), order


def test_rerun_skips_done_files_and_force_redoes_them(tmp_path):
    corpus_dir = tmp_path / "corpus"
    files = make_corpus(corpus_dir, [5, 6, 7])
    out = tmp_path / "out"
    args = cli_args(corpus_dir, out, "--memory-budget", "500MiB", "--workers", "2")
    assert run_cli(args, tmp_path).returncode == 0
    log = out / "batchalign-supervise.log.jsonl"
    n_before = len(named(events(log), "file_done"))
    assert n_before == 3
    r = run_cli(args, tmp_path)
    assert r.returncode == 0
    evs = events(log)
    assert len(named(evs, "file_done")) == n_before
    assert len(named(evs, "file_skipped")) == 3
    # A changed input is redone.
    files[0].write_text(files[0].read_text().replace("@End", "@Comment:\tchanged\n@End"))
    assert run_cli(args, tmp_path).returncode == 0
    assert len(named(events(log), "file_done")) == n_before + 1
    assert run_cli(args + ["--force"], tmp_path).returncode == 0
    assert len(named(events(log), "file_done")) == n_before + 4


def test_too_big_file_is_killed_requeued_larger_and_quarantined_while_rest_finish(tmp_path):
    corpus_dir = tmp_path / "corpus"
    # f000 is 150 s: at 4 MiB/s it grows ~600 MiB, while the cold estimate is ~2 MiB/s. Two small
    # files are too few to trust a model (min_samples 3): f000 runs on the cold guess.
    files = make_corpus(corpus_dir, [150, 5, 6])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus_dir, out, "--memory-budget", "420MiB", "--workers", "2", "--log-json", str(log),
                         "--max-attempts", "3"), tmp_path,
                BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.03",
                BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CALIBRATE="false")  # the cold guess, unchecked
    assert r.returncode == 1, r.stderr[-3000:]
    evs = events(log)
    killed = [e for e in named(evs, "worker_killed") if e["file"] == "f000.cha"]
    assert killed and all(k["reason"] == "over the guard" for k in killed)
    requeued = [e for e in named(evs, "file_requeued") if e["file"] == "f000.cha"]
    assert requeued
    admitted = [e for e in named(evs, "file_admitted") if e["file"] == "f000.cha"]
    # The estimate after a kill is at least max(observed x 1.2, observed + 256 MiB).
    assert requeued[0]["estimate_mb"] >= max(requeued[0]["observed_mb"] * 1.2, requeued[0]["observed_mb"] + 256) - 1
    assert admitted[0]["predicted_mb"] < requeued[0]["estimate_mb"]
    q = named(evs, "file_quarantined")
    assert [e["file"] for e in q] == ["f000.cha"]
    # The kill showed it needs more than the whole budget: no attempt is wasted on it.
    assert q[0]["reason"].startswith("needs ~") and "budget is" in q[0]["reason"]
    assert q[0]["observed_mb"] > 420 * 0.75  # the rest of the budget is the supervisor's own
    assert {e["file"] for e in named(evs, "file_done")} == {"f001.cha", "f002.cha"}
    assert "quarantined: f000.cha" in r.stderr


def test_a_cold_run_never_bets_a_file_its_probes_say_cannot_fit(tmp_path):
    """The first worker's probe spans put the model on this machine's figures before anything is
    admitted: the large file is refused at once as too big, with no guard kill, and the rest run."""
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [150, 5, 6, 7, 8])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus_dir, out, "--memory-budget", "420MiB", "--workers", "2", "--log-json", str(log)),
                tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.03")
    assert r.returncode == 1, r.stderr[-3000:]
    evs = events(log)
    assert named(evs, "worker_killed") == []
    admitted = [e["file"] for e in named(evs, "file_admitted")]
    # Largest first (the next ones depend on when the second worker is ready: an uncertain file
    # over a quarter of the pool waits while another runs, a smaller one fills the gap).
    assert "f000.cha" not in admitted and admitted[0] == "f004.cha"
    assert sorted(admitted) == ["f001.cha", "f002.cha", "f003.cha", "f004.cha"]
    (failed,) = named(evs, "file_failed")
    assert failed["file"] == "f000.cha" and failed["kind"] == "too_big"
    assert named(evs, "run_finished")[0]["done"] == 4


def test_file_that_keeps_crashing_its_worker_is_quarantined_after_max_attempts(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [40, 5, 6, 7])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus_dir, out, "--memory-budget", "800MiB", "--workers", "2", "--log-json", str(log),
                           "--max-attempts", "3"), tmp_path,
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.1")
    killed = set()
    try:
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            for e in named(events(log), "file_started"):
                if e["file"] == "f000.cha" and e["pid"] not in killed:
                    killed.add(e["pid"])
                    os.kill(e["pid"], signal.SIGKILL)
            time.sleep(0.05)
        assert p.wait(timeout=30) == 1, p.stderr.read()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    evs = events(log)
    assert len(killed) == 3
    q = named(evs, "file_quarantined")
    assert [e["file"] for e in q] == ["f000.cha"] and q[0]["attempts"] == 3
    assert "SIGKILL" in q[0]["reason"]
    assert len([e for e in named(evs, "file_requeued") if e["file"] == "f000.cha"]) == 2
    assert {e["file"] for e in named(evs, "file_done")} == {"f001.cha", "f002.cha", "f003.cha"}


def test_kill_9_of_a_worker_mid_file_is_done_by_another(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [60, 5, 5])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus_dir, out, "--memory-budget", "800MiB", "--workers", "2", "--log-json", str(log)),
                  tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.08")
    try:
        started = wait_for_event(log, "file_started", predicate=lambda e: e["file"] == "f000.cha")
        time.sleep(0.5)
        os.kill(started["pid"], signal.SIGKILL)
        assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    evs = events(log)
    failed = [e for e in named(evs, "file_failed") if e["file"] == "f000.cha"]
    assert failed and "SIGKILL" in failed[0]["reason"]
    done = [e for e in named(evs, "file_done") if e["file"] == "f000.cha"]
    assert done and done[0]["pid"] != started["pid"]
    exited = [e for e in named(evs, "worker_exited") if e["pid"] == started["pid"]]
    assert exited and exited[0]["signal"] == "SIGKILL"


def test_kill_9_of_the_supervisor_leaves_no_orphans_and_rerun_resumes(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [4, 4, 4, 30, 30, 30, 4, 4])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    args = cli_args(corpus_dir, out, "--memory-budget", "800MiB", "--workers", "2", "--log-json", str(log))
    p = start_cli(args, tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.05")
    try:
        wait_for_event(log, "file_done", timeout=60)
        wait_for_event(log, "file_started", predicate=lambda e: e["file"] in ("f003.cha", "f004.cha", "f005.cha"))
        worker_pids = {e["pid"] for e in named(events(log), "worker_spawned")}
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in worker_pids):
        time.sleep(0.1)
    assert not [pid for pid in worker_pids if pid_alive(pid)], "workers outlived the supervisor"
    done_first = {e["file"] for e in named(events(log), "file_done")}
    assert done_first
    assert not [f for f in out.rglob("*") if f.name.endswith(".tmp")]
    r = run_cli(args, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    evs = events(log)
    runs = named(evs, "run_started")
    second = runs[-1]["run"]
    redone = {e["file"] for e in named(evs, "file_done") if e["run"] == second}
    skipped = {e["file"] for e in named(evs, "file_skipped") if e["run"] == second}
    assert redone.isdisjoint(done_first)
    assert skipped == done_first
    assert len(redone | skipped) == 8


def test_sigterm_drains_running_files_and_exits_4_with_files_left(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [20, 20, 5, 5, 5, 5, 5, 5])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    args = cli_args(corpus_dir, out, "--memory-budget", "800MiB", "--workers", "2", "--log-json", str(log))
    p = start_cli(args, tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.1")
    try:
        started = wait_for_event(log, "file_started", timeout=60)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=90) == 4, p.stderr.read()[-3000:]
        assert "re-run the same command to finish" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    evs = events(log)
    assert named(evs, "drain_started")
    done = {e["file"] for e in named(evs, "file_done")}
    assert started["file"] in done  # the running file finished
    assert len(done) < 8  # and nothing new was started after the drain
    assert not named(evs, "worker_killed")
    fin = named(evs, "run_finished")[0]
    assert fin["drained"] is True and fin["exit_code"] == 4
    # A re-run finishes the rest.
    assert run_cli(args, tmp_path).returncode == 0
    assert len({e["file"] for e in named(events(log), "file_done")}) == 8


def test_learned_model_predicts_the_synthetic_profile_within_20_percent(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [10, 20, 30, 40, 50, 60, 15, 25])
    out = tmp_path / "out"
    telemetry = tmp_path / "t.sqlite"
    r = run_cli(cli_args(corpus_dir, out, "--memory-budget", "1GiB", "--workers", "2", "--telemetry", str(telemetry)),
                tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli([sys.executable, "-m", "supervisor.cli", "ratios", "--telemetry", str(telemetry), "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [row for row in json.loads(r.stdout) if row["engine"] == "synthetic"]
    assert rows and rows[0]["samples"] == 8
    from telemetry.model import Defaults, FileFeatures, MemoryModel
    from telemetry.store import TelemetryStore

    with TelemetryStore(telemetry) as store:
        params = store.load_model("synthetic", "synthetic", "cpu")
        samples = store.samples("synthetic", "synthetic", "cpu")
    # The profile is 4 MiB per audio second on top of a fixed per-file cost (reading and writing the
    # transcript); take that cost from the measurements, then judge the model against the profile.
    overhead = sorted(smp.growth_mb - 4.0 * smp.audio_seconds for smp in samples)[len(samples) // 2]
    assert -10 < overhead < 40  # probes at READY already paid for imports and warm buffers
    model = MemoryModel.from_params(params, Defaults(60, 16, 2.0))
    for seconds in (15, 35, 90, 200):
        # The "total" profile holds the whole file: one span as long as the recording.
        upper, _central = model.predict_growth(FileFeatures(audio_s=seconds, longest_span_s=seconds, n_spans=1))
        truth = 4.0 * seconds + overhead
        assert upper >= truth * 0.95 and abs(upper - truth) / truth < 0.2, (seconds, upper, truth)
    # The next run starts warm: its first admissions use the learned estimate.
    (corpus_dir / "extra").mkdir()
    make_corpus(corpus_dir / "extra", [100], seed=9)
    log = tmp_path / "second.jsonl"
    r = run_cli(cli_args(corpus_dir, out, "--memory-budget", "1GiB", "--telemetry", str(telemetry),
                         "--log-json", str(log)), tmp_path)
    assert r.returncode == 0
    adm = [e for e in named(events(log), "file_admitted") if e["file"] == "extra/f000.cha"][0]
    assert adm["estimate_source"] == "learned"
    assert abs(adm["predicted_growth_mb"] - (400 + overhead)) / (400 + overhead) < 0.2


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [5, 50, 20])
    out = tmp_path / "out"
    r = run_cli(cli_args(corpus_dir, out, "--memory-budget", "1GiB", "--dry-run"), tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ".cha" in ln]
    # Largest predicted peak first, learned or not (the policy limits a cold run's bets).
    assert [ln.split("│")[2].strip() for ln in lines] == ["f001.cha", "f002.cha", "f000.cha"]
    assert not out.exists()


def test_bad_input_fails_that_file_with_one_line_and_the_rest_finish(tmp_path):
    corpus_dir = tmp_path / "corpus"
    files = make_corpus(corpus_dir, [5, 6, 7])
    bad = files[1]
    bad.write_text(bad.read_text().replace("@End\n", ""))
    missing = corpus_dir / "nomedia.cha"
    missing.write_text(files[0].read_text().replace("@Media:\tf000", "@Media:\tghost"))
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus_dir, out, "--memory-budget", "500MiB", "--log-json", str(log)), tmp_path)
    assert r.returncode == 1
    evs = events(log)
    failed = {e["file"]: e for e in named(evs, "file_failed")}
    assert set(failed) == {"f001.cha", "nomedia.cha"}
    assert "f001.cha" in failed["f001.cha"]["reason"] and "\n" not in failed["f001.cha"]["reason"]
    assert failed["f001.cha"]["kind"] == "bad_input"
    assert "ghost" in failed["nomedia.cha"]["reason"]
    assert {e["file"] for e in named(evs, "file_done")} == {"f000.cha", "f002.cha"}
    assert "failed: f001.cha" in r.stderr


def test_unloadable_model_halts_with_exit_3(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [5, 5])
    out = tmp_path / "out"
    r = run_cli(cli_args(corpus_dir, out, "--model", str(tmp_path / "no-such-model"), "--memory-budget", "4GiB",
                         engine="wav2vec"), tmp_path, timeout=150)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "no-such-model" in r.stderr
    log = out / "batchalign-supervise.log.jsonl"
    # A missing folder is refused before any worker starts; a model that fails to load halts after one.
    evs = events(log) if log.exists() else []
    assert len(named(evs, "worker_spawned")) <= 1  # not respawned forever


def test_usage_errors_exit_2(tmp_path):
    r = run_cli(cli_args(tmp_path / "nothing-here", tmp_path / "out"), tmp_path)
    assert r.returncode == 2 and "nothing-here" in r.stderr
    r = run_cli(cli_args(tmp_path, tmp_path / "out", "--memory-budget", "lots"), tmp_path)
    assert r.returncode == 2 and "lots" in r.stderr
    r = run_cli(cli_args(tmp_path, None), tmp_path)
    assert r.returncode == 2


def test_a_run_inside_a_memory_limited_cgroup_reads_the_limit_and_is_never_oom_killed(tmp_path):
    from supervisor.cgroups import MemoryCgroup, cgroups_available

    if not cgroups_available():
        pytest.skip("needs root and a writable memory cgroup hierarchy (cgroup v1 here)")
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [60, 50, 40, 30, 20, 10, 5, 5, 5, 5])
    log = tmp_path / "run.jsonl"
    limit = 700 * 2**20
    with MemoryCgroup(f"bas-run-{os.getpid()}", limit) as cg:
        p = subprocess.Popen(cli_args(corpus_dir, tmp_path / "out", "--reserve", "100MiB", "--log-json", str(log),
                                      "--workers", "3"),
                             cwd=tmp_path, preexec_fn=cg.preexec(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env_for(tmp_path))
        code = p.wait(timeout=150)
        oom, peak = cg.oom_kills(), cg.max_usage()
    assert code == 0, p.stderr.read()[-3000:]
    evs = events(log)
    started = named(evs, "run_started")[0]
    assert started["limit_mb"] == 700.0 and "cgroup" in started["limit_source"]
    assert started["budget_mb"] == 600.0
    assert oom == 0 and peak <= limit
    assert len(named(evs, "file_done")) == 10


def test_second_sigterm_stops_at_once_and_requeues(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [60, 60, 5, 5])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    args = cli_args(corpus_dir, out, "--memory-budget", "800MiB", "--workers", "2", "--log-json", str(log))
    p = start_cli(args, tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.2")
    try:
        wait_for_event(log, "file_started", timeout=60)
        p.send_signal(signal.SIGTERM)
        wait_for_event(log, "drain_started")
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    evs = events(log)
    assert named(evs, "stop_requested")
    killed = [e for e in named(evs, "worker_exited") if e["signal"] == "SIGKILL"]
    assert killed, "running workers were not stopped at once"
    assert not named(evs, "file_done")
    assert not list(out.rglob("*.cha"))
    # Nothing was charged to the files: a re-run does all of them, first try.
    assert run_cli(args, tmp_path).returncode == 0
    again = [e for e in named(events(log), "file_admitted") if e["run"] == named(events(log), "run_started")[-1]["run"]]
    assert {e["attempt"] for e in again} == {1}


def test_the_next_worker_loads_while_the_last_one_runs_its_probes_once_the_model_says_what_they_take(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus = make_corpus(corpus_dir, [5, 5, 5, 5])

    def run(label: str) -> tuple[dict, dict, dict]:
        log = tmp_path / f"{label}.jsonl"
        r = run_cli(cli_args(corpus_dir, tmp_path / f"out-{label}", "--memory-budget", "2GiB", "--workers", "2",
                             "--log-json", str(log)), tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_PROBE_SECONDS="1.5",
                     BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.3")  # the second gets a file
        assert r.returncode == 0, r.stderr[-3000:]
        _outputs_ok(tmp_path / f"out-{label}", corpus, corpus_dir)
        evs = events(log)
        (loaded, *_), (ready, *_), (spawned, *_) = ([e for e in named(evs, name) if e["worker"] == w] for name, w in
                                                   (("worker_loaded", "w1"), ("worker_ready", "w1"),
                                                    ("worker_spawned", "w2")))
        assert loaded["private_mb"] > 0
        return loaded, ready, spawned, evs

    # Cold: nothing yet says what the probes take (they are what measures it), so the second
    # worker waits for the first one's READY after its two measured probes.
    # The second worker only warms up: its probes would measure what the first one's did.
    loaded, ready, spawned, evs = run("cold")
    assert spawned["t"] >= ready["t"]
    assert ready["probes"] == 2
    assert ready["t"] - loaded["t"] >= 3.0
    (skipped,) = named(evs, "probes_skipped")
    assert skipped["worker"] == "w1" and skipped["t"] >= ready["t"]
    (second,) = [e for e in named(evs, "worker_ready") if e["worker"] == "w2"]
    (second_loaded,) = [e for e in named(evs, "worker_loaded") if e["worker"] == "w2"]
    assert second["probes"] == 0 and second["t"] - second_loaded["t"] < 3.0
    # Warm (the same telemetry store): the model holds probes and files, so workers only warm up
    # on the larger probe (one of 1.5 s, unmeasured), and the second worker is spawned once the
    # first has loaded, before that READY, and never before it loaded.
    loaded, ready, spawned, evs = run("warm")
    assert loaded["t"] <= spawned["t"] < ready["t"] - 1.0
    assert ready["probes"] == 0 and len(named(evs, "probes_skipped")) == 1
    assert ready["t"] - loaded["t"] < 3.0
    assert all(e["probes"] == 0 for e in named(evs, "worker_ready"))
    assert not named(evs, "worker_killed") and not named(evs, "worker_paused")


def test_workers_that_hang_at_start_up_halt_the_run_with_exit_3(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [5, 5])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    t0 = time.monotonic()
    r = run_cli(cli_args(corpus_dir, out, "--memory-budget", "500MiB", "--workers", "2", "--log-json", str(log)),
                tmp_path, timeout=90, BATCHALIGN_SUPERVISE_BOOT_TIMEOUT="1s",
                BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_BOOT_SECONDS="60")
    took = time.monotonic() - t0
    assert r.returncode == 3, r.stderr[-3000:]
    evs = events(log)
    assert len(named(evs, "worker_spawned")) == 3  # three tries, then halt: not respawned for ever
    (halted,) = named(evs, "run_halted")
    assert "synthetic" in halted["reason"] and "not ready after 1 s" in halted["reason"]
    line = [ln for ln in r.stderr.splitlines() if "halted:" in ln]
    assert len(line) == 1 and "not ready after 1 s" in line[0] and "model synthetic" in line[0]
    assert took < 30


def test_a_worker_that_dies_while_it_boots_counts_toward_the_halt(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [5])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus_dir, out, "--memory-budget", "500MiB", "--workers", "1", "--log-json", str(log)),
                  tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_BOOT_SECONDS="60")
    try:
        killed: set[int] = set()
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            for e in named(events(log), "worker_spawned"):
                if e["pid"] not in killed:
                    killed.add(e["pid"])
                    os.kill(e["pid"], signal.SIGKILL)
            time.sleep(0.05)
        assert p.wait(timeout=30) == 3, p.stderr.read()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    assert len(killed) == 3
    assert "SIGKILL" in named(events(log), "run_halted")[0]["reason"]


def test_sigterm_while_workers_are_still_starting_exits_at_once(tmp_path):
    corpus_dir = tmp_path / "corpus"
    make_corpus(corpus_dir, [5, 5])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus_dir, out, "--memory-budget", "500MiB", "--log-json", str(log)), tmp_path,
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_BOOT_SECONDS="60")
    try:
        spawned = wait_for_event(log, "worker_spawned", timeout=30)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 4, p.stderr.read()[-3000:]  # interrupted with files left
        assert time.monotonic() - t0 < 5
    finally:
        if p.poll() is None:
            p.kill()
    assert not pid_alive(spawned["pid"])


def test_a_full_telemetry_disk_costs_one_warning_and_every_file_is_done(tmp_path):
    """The store lives on a real 1 MiB tmpfs that fills up once the run is under way: exit 0."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    store = mnt / "telemetry.sqlite"
    corpus_dir = tmp_path / "corpus"
    files = make_corpus(corpus_dir, [3] * 16)
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    try:
        p = start_cli(cli_args(corpus_dir, out, "--memory-budget", "600MiB", "--workers", "2", "--log-json", str(log),
                               "--telemetry", str(store)), tmp_path,
                      BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.2")
        wait_for_event(log, "file_done", timeout=60)
        fill_disk(mnt)  # the store's next writes find the disk full
        code = p.wait(timeout=120)
        stderr = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    evs = events(log)
    assert len(named(evs, "file_done")) == len(files)
    (warned,) = named(evs, "telemetry_unavailable")
    assert warned["store"] == str(store) and "full" in warned["error"]
    assert named(evs, "run_finished")[0]["telemetry"] == "unavailable"
