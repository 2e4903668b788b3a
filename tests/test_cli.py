"""The command line for people: one-line errors with exit 2, config discovery, output that
survives a pipe, --json everywhere, --version, exit codes, outputs that know what made them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.synth_corpus import make_corpus
from helpers import cli_args, env_for, events, named, run_cli, start_cli, wait_for_event

pytestmark = pytest.mark.timeout(180)

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=tmp_path, env=env_for(tmp_path, **env),
                          capture_output=True, text=True, timeout=120)


def test_version(tmp_path):
    from supervisor import __version__

    r = cli(tmp_path, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"batchalign-supervise {__version__}"


@pytest.mark.parametrize("args,needle", [
    (["--memory-budget", "lots"], "'--memory-budget'"),
    (["--reserve", "a bit"], "'--reserve'"),
    (["--workers", "many"], "'--workers'"),
    (["--poll-interval", "often"], "'--poll-interval'"),
    (["--max-attempts", "0"], "'--max-attempts'"),
    (["--engine", "bert"], "'--engine'"),
])
def test_bad_option_values_name_the_option_in_one_line(tmp_path, args, needle):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [2])
    r = run_cli(cli_args(corpus, tmp_path / "out", *args), tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_output_and_missing_corpus_are_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [2])
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run_cli(cli_args(corpus, blocker / "out"), tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"batchalign-supervise: output {blocker / 'out'}: cannot write there")
    r = run_cli(cli_args(corpus, blocker), tmp_path)
    assert r.returncode == 2 and "exists and is not a folder" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli(cli_args(tmp_path / "nope", tmp_path / "out"), tmp_path)
    assert r.returncode == 2 and r.stderr == f"batchalign-supervise: corpus {tmp_path / 'nope'}: no such file or folder\n"


def test_config_toml_in_the_current_folder_is_not_read(tmp_path):
    (tmp_path / "config.toml").write_text("[server]\nport = 80\n")  # some other program's
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [2])
    r = run_cli(cli_args(corpus, tmp_path / "out"), tmp_path)
    assert r.returncode == 0, r.stderr
    xdg = tmp_path / "xdg"
    (xdg / "batchalign-supervise").mkdir(parents=True)
    (xdg / "batchalign-supervise" / "config.toml").write_text("[run]\nmax_attempts = 0\n")
    r = run_cli(cli_args(corpus, tmp_path / "out2"), tmp_path, XDG_CONFIG_HOME=str(xdg))
    assert r.returncode == 2 and "max_attempts" in r.stderr and r.stderr.count("\n") == 1


def test_ratios_piped_are_whole_tab_separated_lines_with_iso_times(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [3, 4, 5, 6])
    telemetry = tmp_path / "t.sqlite"
    r = run_cli(cli_args(corpus, tmp_path / "out", "--telemetry", str(telemetry), "--workers", "1"), tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli(tmp_path, "ratios", "--telemetry", str(telemetry))
    lines = r.stdout.splitlines()
    header = lines[0].split("\t")
    assert header[0] == "engine" and header[-1] == "updated"
    row = dict(zip(header, lines[1].split("\t")))
    assert row["engine"] == "synthetic" and row["model"] == "synthetic" and "\u2026" not in r.stdout
    assert ISO.match(row["updated"]), row
    data = json.loads(cli(tmp_path, "ratios", "--telemetry", str(telemetry), "--json").stdout)
    assert data[0]["engine"] == "synthetic"


def test_json_from_every_command(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [2, 3])
    out = tmp_path / "out"
    r = run_cli(cli_args(corpus, out, "--json"), tmp_path)
    summary = json.loads(r.stdout)
    assert summary["event"] == "run_finished" and summary["done"] == 2 and summary["exit_code"] == 0
    assert json.loads(cli(tmp_path, "report", str(out / "batchalign-supervise.log.jsonl"), "--json").stdout)["totals"]["done"] == 2
    assert isinstance(json.loads(cli(tmp_path, "models", "list", "--json").stdout), list)
    assert "parts" in json.loads(cli(tmp_path, "cache", "--json").stdout)
    assert json.loads(cli(tmp_path, "models", "verify", "--json").stdout) == []
    r = cli(tmp_path, "status", "--json")
    assert r.returncode == 1 and r.stderr.startswith("batchalign-supervise: no supervisor is running")


def test_outputs_record_what_made_them_and_other_settings_realign(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [2, 3])
    out = tmp_path / "out"
    r = run_cli(cli_args(corpus, out), tmp_path)
    assert r.returncode == 0
    entry = json.loads((out / ".batchalign-supervise" / "done.jsonl").read_text().splitlines()[0])
    ident = entry["identity"]
    assert ident["engine"] == "synthetic" and ident["dtype"] == "fp32" and ident["device"] == "cpu"
    assert "span_seconds" in ident["options"] and ident["aligner"]
    # synthetic timings say what they are
    assert "@Comment:\tsynthetic timings" in (out / "f000.cha").read_text()
    assert "made-up timings" in r.stderr
    r = run_cli(cli_args(corpus, out), tmp_path)  # same settings: skipped
    assert "0 done" in r.stderr and "2 skipped" in r.stderr
    r = run_cli(cli_args(corpus, out, "--dtype", "bf16"), tmp_path)  # another dtype: made again, and said why
    assert r.returncode == 0 and "2 done" in r.stderr
    assert "re-aligned 2 finished file(s) made with other settings (dtype fp32 -> bf16)" in r.stderr
    realigned = named(events(out / "batchalign-supervise.log.jsonl"), "file_realigned")
    assert {e["file"] for e in realigned} == {"f000.cha", "f001.cha"}
    r = run_cli(cli_args(corpus, out, "--dtype", "bf16"), tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_SPAN_SECONDS="12")
    assert "re-aligned 2" in r.stderr and "span_seconds 30.0 -> 12.0" in r.stderr


def test_sigint_with_files_left_exits_4_and_says_rerun_finishes(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, [30, 30, 30, 30])
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    p = start_cli(cli_args(corpus, out, "--workers", "1", "--log-json", str(log)), tmp_path,
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.1")
    try:
        wait_for_event(log, "file_started", timeout=60)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 4
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert "interrupted with files left; re-run the same command to finish them" in err
    r = run_cli(cli_args(corpus, out, "--log-json", str(log)), tmp_path)
    assert r.returncode == 0 and len(list(out.glob("*.cha"))) == 4
    assert "0 failed" in r.stderr and "skipped" in r.stderr


def test_status_lists_every_running_supervisor_and_shows_one_by_pid_or_output(tmp_path):
    procs = []
    try:
        for name in ("a", "b"):
            corpus = tmp_path / f"corpus-{name}"
            make_corpus(corpus, [60, 60])
            log = tmp_path / f"{name}.jsonl"
            procs.append((start_cli(cli_args(corpus, tmp_path / f"out-{name}", "--workers", "1", "--log-json", str(log)),
                                    tmp_path, BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.2"),
                          log))
        for _, log in procs:
            wait_for_event(log, "file_started", timeout=60)
        r = cli(tmp_path, "status", "--json")
        assert r.returncode == 0, (r.stderr, sorted(map(str, (tmp_path / "state").rglob("*"))),
                                   [p.stderr.read1().decode() if False else "" for p, _ in procs])
        listed = json.loads(r.stdout)
        # one supervisor listed prints its status alone: say which sockets there were
        assert isinstance(listed, list), (r.stdout[:2000], sorted(map(str, tmp_path.rglob("*.sock"))),
                                          [(p.pid, p.poll()) for p, _ in procs])
        assert sorted(s["pid"] for s in listed) == sorted(p.pid for p, _ in procs)
        r = cli(tmp_path, "status")
        rows = [ln.split("\t") for ln in r.stdout.splitlines()]
        assert rows[0][0] == "pid" and len(rows) == 3
        one = json.loads(cli(tmp_path, "status", str(procs[1][0].pid), "--json").stdout)
        assert one["pid"] == procs[1][0].pid and one["out"].endswith("out-b")
        by_out = json.loads(cli(tmp_path, "status", str(tmp_path / "out-a"), "--json").stdout)
        assert by_out["pid"] == procs[0][0].pid
        r = cli(tmp_path, "status", "999999")
        assert r.returncode == 1 and "no running supervisor has pid or output folder 999999" in r.stderr
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, _ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
