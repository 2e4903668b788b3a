"""Running as a service: watch mode, SIGHUP, systemd notify, status socket, two supervisors, report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.synth_corpus import make_corpus
from helpers import cli_args, env_for, events, named, start_cli, wait_for_event

pytestmark = pytest.mark.timeout(180)

FAST_WATCH = {"BATCHALIGN_SUPERVISE_SERVICE_SETTLE": "0.5s", "BATCHALIGN_SUPERVISE_SERVICE_SCAN_INTERVAL": "0.2s"}


def _stop(p: subprocess.Popen, timeout: float = 60) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()


def test_watch_mode_picks_up_files_dropped_while_running_and_while_stopped(tmp_path):
    inbox, out, log = tmp_path / "inbox", tmp_path / "out", tmp_path / "watch.jsonl"
    make_corpus(inbox / "a", [3, 4], seed=1)
    args = cli_args([], out, "--watch", str(inbox), "--memory-budget", "600MiB", "--log-json", str(log))
    p = start_cli(args, tmp_path, **FAST_WATCH)
    try:
        wait_for_event(log, "file_done", predicate=lambda e: e["file"] == "a/f001.cha")
        # Dropped while running: picked up once it has settled.
        make_corpus(inbox / "b", [3], seed=2)
        done_b = wait_for_event(log, "file_done", predicate=lambda e: e["file"] == "b/f000.cha")
        assert done_b
        assert _stop(p) == 0
    finally:
        if p.poll() is None:
            p.kill()
    first = named(events(log), "run_started")[-1]["run"]
    # Dropped while stopped: the restarted service aligns it and redoes nothing.
    make_corpus(inbox / "c", [3], seed=3)
    p = start_cli(args, tmp_path, **FAST_WATCH)
    try:
        wait_for_event(log, "file_done", predicate=lambda e: e["file"] == "c/f000.cha")
        time.sleep(1.5)  # several scans: nothing else may be redone
        assert _stop(p) == 0
    finally:
        if p.poll() is None:
            p.kill()
    evs = events(log)
    second = named(evs, "run_started")[-1]["run"]
    assert second != first
    assert {e["file"] for e in named(evs, "file_done") if e["run"] == second} == {"c/f000.cha"}
    assert (out / "c" / "f000.cha").exists() and (out / "a" / "f000.cha").exists()


def test_watch_mode_quarantines_instead_of_retrying_forever(tmp_path):
    inbox, out, log = tmp_path / "inbox", tmp_path / "out", tmp_path / "watch.jsonl"
    bad = make_corpus(inbox, [3], seed=1)[0]
    bad.write_text(bad.read_text().replace("*PAR:", "*XYZ:").replace("*INV:", "*XYZ:"))
    p = start_cli(cli_args([], out, "--watch", str(inbox), "--memory-budget", "600MiB", "--log-json", str(log)),
                  tmp_path, **FAST_WATCH)
    try:
        wait_for_event(log, "file_failed")
        time.sleep(1.5)
        assert _stop(p) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert len(named(events(log), "file_failed")) == 1
    # After a restart the unchanged file is remembered as failed, not retried.
    p = start_cli(cli_args([], out, "--watch", str(inbox), "--memory-budget", "600MiB", "--log-json", str(log)),
                  tmp_path, **FAST_WATCH)
    try:
        skipped = wait_for_event(log, "file_skipped")
        assert "failed earlier" in skipped["reason"]
        time.sleep(1.0)
        assert _stop(p) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert len(named(events(log), "file_failed")) == 1


def test_sighup_reloads_a_changed_budget_without_dropping_work(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [10] * 10)
    cfg = tmp_path / "config.toml"
    cfg.write_text('[memory]\nbudget = "600MiB"\n')
    log = tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus, tmp_path / "out", "--config", str(cfg), "--log-json", str(log), "--workers", "2"),
                  tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.1")
    try:
        wait_for_event(log, "file_started")
        cfg.write_text('[memory]\nbudget = "900MiB"\n')
        p.send_signal(signal.SIGHUP)
        reloaded = wait_for_event(log, "config_reloaded")
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    finally:
        if p.poll() is None:
            p.kill()
    assert reloaded["changed"]["memory.budget"][1] == str(900 * 2**20)
    assert reloaded["budget_mb"] == 900.0
    evs = events(log)
    assert len(named(evs, "file_done")) == 10 and not named(evs, "file_failed")
    late = [e for e in named(evs, "file_admitted") if e["t"] > reloaded["t"]]
    assert late and all(e["budget_mb"] == 900.0 for e in late)


def test_systemd_notify_ready_status_watchdog_stopping(tmp_path):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [4, 4, 4])
    p = start_cli(cli_args(corpus, tmp_path / "out", "--memory-budget", "600MiB"), tmp_path,
                  NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000",
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.1")
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                if p.poll() is not None:
                    break
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        sock.close()
    lines = [ln for m in messages for ln in m.splitlines()]
    assert "READY=1" in lines
    assert any(ln.startswith("STATUS=") and "done" in ln for ln in lines)
    assert "WATCHDOG=1" in lines
    # READY first, STOPPING last, and nothing announced after STOPPING.
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert lines[-1] == "STOPPING=1"
    assert all(ln == "STOPPING=1" for ln in lines[lines.index("STOPPING=1"):])


def test_status_socket_answers_while_workers_run_and_refuses_other_users(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [30, 30, 30])
    state = tmp_path / "state-dir"
    log = tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus, tmp_path / "out", "--memory-budget", "600MiB", "--state-dir", str(state),
                           "--log-json", str(log), "--workers", "2"), tmp_path,
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.1")
    try:
        wait_for_event(log, "file_started")
        sock = state / "control" / f"{p.pid}.sock"  # one socket per running supervisor
        assert (sock.stat().st_mode & 0o777) == 0o600
        r = subprocess.run([sys.executable, "-m", "supervisor.cli", "status", "--state-dir", str(state), "--json"],
                           capture_output=True, text=True, env=env_for(tmp_path), timeout=30)
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["pid"] == p.pid and status["memory"]["budget_mb"] == 600.0
        assert any(w["state"] == "busy" and w["file"] for w in status["workers"])
        human = subprocess.run([sys.executable, "-m", "supervisor.cli", "status", "--state-dir", str(state)],
                               capture_output=True, text=True, env=env_for(tmp_path), timeout=30)
        assert human.returncode == 0 and "busy" in human.stdout
        if os.geteuid() == 0:
            assert _connect_as_nobody(sock) != "answered"
        assert _stop(p, 120) in (0, 4)  # 4 when the drain left a file not started
    finally:
        if p.poll() is None:
            p.kill()


def _connect_as_nobody(sock: Path) -> str:
    """Fork, drop to 'nobody' and try the status request; returns what happened, in a word."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        outcome = "error"
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(5)
            c.connect(str(sock))
            c.sendall(b'{"cmd": "status"}\n')
            reply = c.recv(65536)
            outcome = "answered" if b'"workers"' in reply else "refused"
        except PermissionError:
            outcome = "permission"
        except OSError:
            outcome = "refused"
        finally:
            os.write(w, outcome.encode())
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as fh:
        return fh.read()


def test_report_on_a_log_from_a_run_killed_with_kill_9(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [5, 5, 30, 30, 30])
    log = tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus, tmp_path / "out", "--memory-budget", "600MiB", "--log-json", str(log)), tmp_path,
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.1",
                  BATCHALIGN_SUPERVISE_MEMORY_SAMPLE_LOG_INTERVAL="0.25s")
    try:
        wait_for_event(log, "file_done")
        time.sleep(0.5)
        p.kill()
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    with open(log, "a") as fh:
        fh.write('{"event": "memory_sample", "used_')  # a torn last line, as kill -9 can leave
    png = tmp_path / "report.png"
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "report", str(log), "--plot", str(png)],
                       capture_output=True, text=True, env=env_for(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "f00" in r.stdout
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.shape[1] >= 800 and img.std() > 0.01


def test_two_supervisors_share_one_cgroup_budget_through_the_host_ledger(tmp_path):
    from supervisor.cgroups import MemoryCgroup, cgroups_available

    if not cgroups_available():
        pytest.skip("needs root and a writable memory cgroup hierarchy to give both runs one real limit")
    corpora = []
    for name in ("alice", "bob"):
        make_corpus(tmp_path / name, [40, 40, 10, 10, 10], seed=len(name))
        corpora.append(tmp_path / name)
    ledger = tmp_path / "ledger" / "ledger.json"
    limit = 900 * 2**20
    with MemoryCgroup(f"bas-two-{os.getpid()}", limit) as cg:
        procs = []
        for corpus in corpora:
            args = cli_args(corpus, tmp_path / f"out-{corpus.name}", "--reserve", "100MiB", "--log-json",
                            str(tmp_path / f"{corpus.name}.jsonl"), "--workers", "3",
                            "--state-dir", str(tmp_path / f"state-{corpus.name}"))
            procs.append(subprocess.Popen(args, cwd=tmp_path, preexec_fn=cg.preexec(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True,
                                          env=env_for(tmp_path, BATCHALIGN_SUPERVISE_MEMORY_LEDGER=str(ledger),
                                                      BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_MB_PER_AUDIO_SECOND="8",
                                                      BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_COLD_MB_PER_AUDIO_SECOND="9",
                                                      BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.05",
                                                      BATCHALIGN_SUPERVISE_MEMORY_SAMPLE_LOG_INTERVAL="0.25s")))
        codes = [p.wait(timeout=150) for p in procs]
        oom = cg.oom_kills()
        peak = cg.max_usage()
    assert codes == [0, 0], [p.stderr.read()[-2000:] for p in procs]
    assert oom == 0
    assert peak <= limit
    seen_others = 0.0
    for corpus in corpora:
        evs = events(tmp_path / f"{corpus.name}.jsonl")
        assert len(named(evs, "file_done")) == 5
        assert named(evs, "run_started")[0]["limit_mb"] == 900.0
        seen_others = max([seen_others] + [e.get("others_reserved_mb", 0) for e in named(evs, "memory_sample")])
    assert seen_others > 0, "neither supervisor saw the other's reservation"


def test_prometheus_metrics_over_http_and_textfile_during_a_run(tmp_path):
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [30, 30, 5])
    prom = tmp_path / "textfile" / "batchalign.prom"
    log = tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus, tmp_path / "out", "--memory-budget", "600MiB", "--log-json", str(log),
                           "--metrics-port", str(port), "--metrics-textfile", str(prom)), tmp_path,
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.1")
    try:
        wait_for_event(log, "file_started")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        samples = _samples(body)
        assert samples["batchalign_up"] == 1
        assert samples["batchalign_memory_budget_bytes"] == 600 * 2**20
        assert 'batchalign_workers{state="busy"}' in samples
        assert p.wait(timeout=120) == 0
    finally:
        if p.poll() is None:
            p.kill()
    final = _samples(prom.read_text())
    assert final['batchalign_files{state="done"}'] == 3
    assert final["batchalign_kills_total"] == 0


def _samples(exposition: str) -> dict[str, float]:
    """name{labels} -> value of every sample line (prometheus_client writes floats: 3.0)."""
    out = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
