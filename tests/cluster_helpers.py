"""A real Dask scheduler and real `batchalign-supervise worker` processes on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import ROOT, env_for

# The synthetic profile the cluster tests run: 4 MiB and 0.05 CPU s per audio second; cold
# estimates far below it and no probe spans at READY, so that learning (and a kill) shows.
CONFIG = """
[run]
engine = "synthetic"
[engine.synthetic]
mb_per_audio_second = 4.0
cpu_seconds_per_audio_second = 0.05
cold_mb_per_span_second = 1.0
cold_mb_per_audio_second = 0.0
cold_intercept_mb = 8.0
calibrate = false
"""


def stop_groups(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, last started first; SIGKILL what has not exited in 15 s."""
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, extra: str = "") -> Path:
    path = tmp / "config.toml"
    path.write_text(CONFIG + extra)
    return path


def _wait_file(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}: {path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in {path} within {timeout} s: {path.read_text(errors='replace')[-3000:]}")


class DaskCluster:
    """`dask scheduler` plus `batchalign-supervise worker` processes, stopped together."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.env = env_for(tmp)

    def start_scheduler(self) -> None:
        log = self.tmp / "scheduler.log"
        p = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", str(self.port), "--no-dashboard"], cwd=self.tmp, env=self.env,
                             stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
        self.procs.append(p)
        _wait_file(log, "Scheduler at:", p, 30)

    def start_worker(self, memory_limit: str, *extra: str) -> subprocess.Popen:
        log = self.tmp / f"worker{len(self.workers)}.log"
        p = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "worker", self.address, "--memory-limit",
                              memory_limit, "--engine", "synthetic", *extra], cwd=self.tmp, env=self.env,
                             stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
        self.procs.append(p)
        self.workers.append(p)
        _wait_file(log, "batchalign-supervise worker:", p, 60)
        return p

    def stop(self) -> None:
        stop_groups(self.procs)


def cluster_args(corpus: Path, out: Path, address: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli", str(corpus), "-o", str(out), "--cluster", address,
            "--config", str(config), "--progress", "off", *extra]


__all__ = ["CONFIG", "DaskCluster", "ROOT", "cluster_args", "free_port", "write_config"]
