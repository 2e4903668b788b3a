"""Run the real command line as a subprocess and read its JSON log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHALIGN_SUPERVISE_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(PYTHONPATH=str(ROOT), XDG_STATE_HOME=str(tmp / "state"), HF_HUB_OFFLINE="1",
               BATCHALIGN_SUPERVISE_MEMORY_LEDGER=str(tmp / "ledger" / "ledger.json"))
    env.update(extra)
    return env


def cli_args(corpus: Path | list[Path], out: Path | None, *extra: str, engine: str = "synthetic") -> list[str]:
    corpora = corpus if isinstance(corpus, list) else [corpus]
    args = [sys.executable, "-m", "supervisor.cli", *map(str, corpora)]
    if out is not None:
        args += ["-o", str(out)]
    return args + ["--engine", engine, "--progress", "off", *extra]


def run_cli(args: list[str], tmp: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=tmp, env=env_for(tmp, **env), capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], tmp: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=tmp, env=env_for(tmp, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def events(log: Path) -> list[dict]:
    out = []
    if not log.exists():
        return out
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def named(evs: list[dict], name: str) -> list[dict]:
    return [e for e in evs if e.get("event") == name]


def wait_for_event(log: Path, name: str, timeout: float = 60, predicate=lambda e: True) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in named(events(log), name):
            if predicate(e):
                return e
        time.sleep(0.1)
    raise AssertionError(f"no {name} event in {log} within {timeout} s")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, IndexError):
        return False


def fill_disk(folder: Path) -> None:
    """Take every byte left on the file system that holds ``folder`` (a file named ``filler``)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
