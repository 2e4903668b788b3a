"""Structured logging: JSON lines on disk, console modes, reconfiguration, crash safety."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from telemetry.logging import bind_run, configure_logging, get_logger, shutdown_logging

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_logging():
    yield
    shutdown_logging()
    configure_logging(json_path=None, console="none")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_json_lines_have_the_contract_fields(tmp_path) -> None:
    path = tmp_path / "logs" / "run.jsonl"
    configure_logging(json_path=path, console="none", run_id="run-1")
    log = get_logger("supervisor")
    log.info("worker_ready", worker=1, pid=123, baseline_mb=812.5)
    log.info("memory_sample", used_mb=1.0, workers=[{"worker": 1, "state": "busy"}], file="a b/é.cha")
    lines = read_lines(path)
    assert [e["event"] for e in lines] == ["worker_ready", "memory_sample"]
    first = lines[0]
    assert list(first)[:3] == ["event", "ts", "level"]
    assert first["level"] == "info" and first["run"] == "run-1" and first["process"] == "supervisor"
    assert first["worker"] == 1 and first["pid"] == 123 and first["baseline_mb"] == 812.5
    assert first["component"] == "supervisor"
    ts = dt.datetime.fromisoformat(first["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - ts).total_seconds()) < 60
    assert isinstance(first["t"], float) and first["t"] >= 0
    assert lines[1]["workers"] == [{"worker": 1, "state": "busy"}] and lines[1]["file"] == "a b/é.cha"


def test_file_is_appended_not_truncated(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text('{"event":"earlier"}\n')
    configure_logging(json_path=path, console="none")
    get_logger().info("later")
    assert [e["event"] for e in read_lines(path)] == ["earlier", "later"]


def test_run_id_is_bound_and_rebindable(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    configure_logging(json_path=path, console="none")
    log = get_logger()
    log.info("before")
    bind_run("r-42", t0=time.monotonic() - 100.0)
    log.info("after")
    before, after = read_lines(path)
    assert "run" not in before
    assert after["run"] == "r-42" and after["t"] >= 100.0


def test_reconfigure_replaces_outputs(tmp_path, capsys) -> None:
    first = tmp_path / "a.jsonl"
    second = tmp_path / "b.jsonl"
    log = get_logger()
    configure_logging(json_path=first, console="plain", run_id="r")
    configure_logging(json_path=first, console="plain", run_id="r")
    log.info("once", n=1)
    configure_logging(json_path=second, console="plain", run_id="r")
    log.info("moved")
    assert [e["event"] for e in read_lines(first)] == ["once"]
    assert [e["event"] for e in read_lines(second)] == ["moved"]
    err = capsys.readouterr().err.splitlines()
    assert len([l for l in err if " once " in l]) == 1
    assert len([l for l in err if " moved" in l]) == 1
    assert "n=1" in next(l for l in err if " once " in l)


def test_logger_made_before_configuration_follows_it(tmp_path) -> None:
    early = get_logger("early")
    path = tmp_path / "run.jsonl"
    configure_logging(json_path=path, console="none", run_id="r")
    early.bind(worker=3).info("bound_event")
    (event,) = read_lines(path)
    assert event["event"] == "bound_event" and event["worker"] == 3 and event["component"] == "early"


def test_console_none_still_shows_warnings(tmp_path, capsys) -> None:
    path = tmp_path / "run.jsonl"
    configure_logging(json_path=path, console="none", run_id="r")
    log = get_logger()
    log.info("quiet_event")
    log.warning("loud_event", reason="x y")
    log.error("worse_event")
    err = capsys.readouterr().err
    assert "quiet_event" not in err
    assert "loud_event" in err and 'reason="x y"' in err and "worse_event" in err
    assert [e["event"] for e in read_lines(path)] == ["quiet_event", "loud_event", "worse_event"]


def test_console_json_for_the_worker(capsys) -> None:
    configure_logging(json_path=None, console="json", process="worker", run_id="r")
    get_logger().info("ready", pid=99)
    (line,) = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert event["event"] == "ready" and event["process"] == "worker" and event["pid"] == 99


def test_level_filter_and_exceptions(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    configure_logging(json_path=path, console="none", level="warning")
    log = get_logger()
    log.debug("d")
    log.info("i")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("crashed", file="x.cha")
    (event,) = read_lines(path)
    assert event["event"] == "crashed" and event["level"] == "error"
    assert "RuntimeError: boom" in event["exception"]
    configure_logging(json_path=path, console="none", level="debug")
    log.debug("now_visible")
    assert read_lines(path)[-1]["event"] == "now_visible"


def test_stdlib_warnings_are_forwarded(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    configure_logging(json_path=path, console="none", run_id="r")
    configure_logging(json_path=path, console="none", run_id="r")
    logging.getLogger("some.library").warning("careful: %s", "disk")
    logging.getLogger("some.library").info("chatter")
    events = read_lines(path)
    assert len(events) == 1
    assert events[0]["event"] == "library_log" and events[0]["message"] == "careful: disk"
    assert events[0]["logger"] == "some.library" and events[0]["run"] == "r"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        configure_logging(json_path=None, console="fancy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        configure_logging(json_path=None, console="none", level="loud")


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from telemetry.logging import configure_logging, get_logger

    configure_logging(json_path=Path(sys.argv[1]), console="none", run_id="crash")
    log = get_logger()
    pad = "x" * 3000
    i = 0
    while True:
        log.info("memory_sample", i=i, pad=pad, workers=[{"worker": w, "uss_mb": 1.5 * w} for w in range(20)])
        i += 1
    """
)


def test_sigkill_leaves_only_complete_lines(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=REPO, env=env,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_size > 2_000_000:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    assert len(complete) > 100
    for n, line in enumerate(complete):
        event = json.loads(line)
        assert event["i"] == n and event["run"] == "crash"
    if tail:  # at most the line being written may be cut short
        with pytest.raises(json.JSONDecodeError):
            json.loads(tail)
