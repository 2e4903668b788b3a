"""The systemd unit: required keys, paths that stay writable under ProtectSystem=strict, verify."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "batchalign-supervise.service"
BINARY = "/opt/batchalign-supervise/venv/bin/batchalign-supervise"


def _text() -> str:
    # systemd joins a line ending in a backslash with the next one
    return re.sub(r"\\\n\s*", " ", UNIT.read_text())


def _parser() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                   inline_comment_prefixes=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(_text())
    return cp


def _all(section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (Environment=, ReadWritePaths=)."""
    values, current = [], None
    for line in _text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(key + "="):
            values.append(line.split("=", 1)[1])
    return values


def _seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit]
    return total


def test_required_service_keys():
    svc = _parser()["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert 0 < _seconds(svc["WatchdogSec"]) <= 120
    assert svc["KillMode"] == "mixed" and svc["KillSignal"] == "SIGTERM"
    assert _seconds(svc["TimeoutStopSec"]) >= 10 * 60  # above the default drain grace of 10 min
    assert svc["ExecReload"].split() == ["/bin/kill", "-HUP", "$MAINPID"]
    assert svc["StateDirectory"] == "batchalign-supervise"
    assert svc["User"] == "batchalign" and svc["Group"] == "batchalign" and svc["DynamicUser"] == "no"
    assert svc["MemoryMax"] and svc["MemoryHigh"]
    assert svc["Restart"] == "on-failure"
    assert {"2", "3"} <= set(svc["RestartPreventExitStatus"].split())
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict" and svc["PrivateTmp"] == "yes"
    assert "RuntimeDirectory" not in svc  # the ledger's run dir is shared with other users
    assert _parser()["Install"]["WantedBy"] == "multi-user.target"


def test_exec_start_and_writable_paths_agree():
    svc = _parser()["Service"]
    argv = svc["ExecStart"].split()
    assert argv[0] == BINARY
    opts = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("-")}
    assert opts["--watch"] == "/srv/batchalign/inbox" and opts["-o"] == "/srv/batchalign/aligned"
    state = "/var/lib/" + svc["StateDirectory"]
    assert opts["--state-dir"] == state
    assert opts["--log-json"] == f"{state}/log.jsonl"
    assert opts["--telemetry"] == f"{state}/telemetry.sqlite"
    env = dict(v.split("=", 1) for v in _all("Service", "Environment"))
    assert env["HF_HOME"].startswith(state + "/")

    writable = [state]
    if "CacheDirectory" in svc:
        writable.append("/var/cache/" + svc["CacheDirectory"])
    for value in _all("Service", "ReadWritePaths"):
        writable += [p.lstrip("-") for p in value.split()]
    assert "/run/batchalign-supervise" in writable  # the host ledger

    def inside(path: str) -> bool:
        return any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable)

    # ProtectSystem=strict makes everything else read-only
    for path in (opts["--watch"], opts["-o"], opts["--log-json"], opts["--telemetry"], env["HF_HOME"],
                 env.get("XDG_CACHE_HOME", state)):
        assert inside(path), path


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = tmp_path / UNIT.name
    text = UNIT.read_text()
    if not Path(BINARY).exists():
        # verify insists that ExecStart's binary exists; everything else is checked as written
        text = text.replace(BINARY, shutil.which("true") or "/bin/true")
    unit.write_text(text)
    r = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=50,
                       cwd=tmp_path)
    out = r.stdout + r.stderr
    if r.returncode != 0 and ("System has not been booted" in out or "Failed to initialize" in out):
        pytest.skip(f"systemd-analyze cannot run here: {out.strip().splitlines()[0]}")
    assert r.returncode == 0, out
    # unknown keys and bad values are only warnings (exit 0); they must not be there either
    complaints = [line for line in out.splitlines() if UNIT.name in line]
    assert not complaints, "\n".join(complaints)
