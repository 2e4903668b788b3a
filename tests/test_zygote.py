"""Workers forked by the zygote (worker/zygote.py) through the pool's ZygoteLauncher."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.synth_corpus import make_corpus
from helpers import cli_args, events, named, pid_alive, run_cli
from supervisor.pool import ProcessPool, SpawnLauncher, ZygoteLauncher, resolve_start_method, worker_command
from worker import protocol

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _options():
    return {"baseline_mb": 10, "mb_per_audio_second": 1, "cpu_seconds_per_audio_second": 0.01}


async def _next(events_q: asyncio.Queue, kind: str, timeout: float = 30):
    while True:
        ev = await asyncio.wait_for(events_q.get(), timeout)
        if ev.kind == kind and (kind != "message" or ev.msg["type"] != protocol.HEARTBEAT):
            return ev


async def _ready(events_q: asyncio.Queue, n: int, timeout: float = 60) -> dict[int, dict]:
    ready: dict[int, dict] = {}
    while len(ready) < n:
        ev = await _next(events_q, "message", timeout)
        if ev.msg["type"] == protocol.LOADED:
            continue
        assert ev.msg["type"] == protocol.READY, ev.msg
        ready[ev.worker.id] = ev.msg
    return ready


def _wait_gone(pids, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    return not any(pid_alive(p) for p in pids)


def test_auto_start_method_forks_torch_engines_only():
    assert resolve_start_method("auto", "wav2vec") == "zygote"
    assert resolve_start_method("auto", "whisper") == "zygote"
    assert resolve_start_method("auto", "synthetic") == "spawn"
    assert resolve_start_method("spawn", "wav2vec") == "spawn"


def test_forked_workers_align_pause_resume_and_are_killed(tmp_path):
    chas = make_corpus(tmp_path / "c", [3, 4])

    async def scenario():
        q: asyncio.Queue = asyncio.Queue()
        launcher = ZygoteLauncher("synthetic")
        pool = ProcessPool(worker_command("synthetic", _options()), events=q, env=ENV, launcher=launcher)
        w1, w2 = await pool.spawn(), await pool.spawn()
        ready = await _ready(q, 2)
        assert launcher.fallback_reason is None
        zygote = launcher.zygote_pid
        for w in (w1, w2):
            assert ready[w.id]["pid"] == w.pid and os.getpgid(w.pid) == w.pid  # own process group
            assert _ppid(w.pid) == zygote
        for w, cha in zip((w1, w2), chas):
            await pool.send(w, {"type": protocol.JOB, "job": f"j{w.id}", "input": str(cha),
                                "output": str(tmp_path / f"o{w.id}.cha"), "media": str(cha.with_suffix(".wav")),
                                "rel": cha.name})
        results = {}
        while len(results) < 2:
            ev = await _next(q, "message")
            if ev.msg["type"] == protocol.RESULT:
                results[ev.worker.id] = ev.msg
        assert all("%wor:" in (tmp_path / f"o{i}.cha").read_text() for i in (w1.id, w2.id))
        pool.pause(w1)
        await asyncio.sleep(0.2)
        assert _state(w1.pid) == "T"
        pool.resume(w1)
        await asyncio.sleep(0.2)
        assert _state(w1.pid) in ("S", "R")
        pool.kill(w1)
        ev = await _next(q, "exited")
        assert ev.worker is w1 and ev.returncode == -signal.SIGKILL
        assert pid_alive(w2.pid)
        await pool.stop(w2)
        ev = await _next(q, "exited")
        assert ev.worker is w2 and ev.returncode == protocol.EXIT_OK
        await pool.close()
        assert _wait_gone([zygote])

    asyncio.run(scenario())


def test_kill_9_of_the_zygote_takes_its_workers_and_the_next_spawn_starts_a_new_one():
    async def scenario():
        q: asyncio.Queue = asyncio.Queue()
        launcher = ZygoteLauncher("synthetic")
        pool = ProcessPool(worker_command("synthetic", _options()), events=q, env=ENV, launcher=launcher)
        w1, w2 = await pool.spawn(), await pool.spawn()
        await _ready(q, 2)
        first = launcher.zygote_pid
        os.kill(first, signal.SIGKILL)
        exited = {}
        while len(exited) < 2:
            ev = await _next(q, "exited")
            exited[ev.worker.id] = ev.returncode
        assert exited == {w1.id: -signal.SIGKILL, w2.id: -signal.SIGKILL}
        assert not pid_alive(w1.pid) and not pid_alive(w2.pid)
        w3 = await pool.spawn()
        await _ready(q, 1)
        assert launcher.zygote_pid not in (None, first) and _ppid(w3.pid) == launcher.zygote_pid
        await pool.stop(w3)
        assert (await _next(q, "exited")).returncode == protocol.EXIT_OK
        await pool.close()

    asyncio.run(scenario())


_STAND_IN = """
import asyncio, os, sys, time
from supervisor.pool import ProcessPool, ZygoteLauncher, worker_command
async def main():
    q = asyncio.Queue()
    launcher = ZygoteLauncher("synthetic")
    pool = ProcessPool(worker_command("synthetic", {}), events=q, launcher=launcher)
    ws = [await pool.spawn(), await pool.spawn()]
    print(launcher.zygote_pid, *[w.pid for w in ws], flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_kill_9_of_the_supervisor_takes_the_zygote_and_its_workers():
    parent = subprocess.Popen([sys.executable, "-c", _STAND_IN], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    assert _wait_gone(pids), [p for p in pids if pid_alive(p)]


def test_a_whole_run_through_the_zygote(tmp_path):
    corpus_dir = tmp_path / "corpus"
    files = make_corpus(corpus_dir, [5, 8, 12, 6, 9], subdirs=2)
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus_dir, out, "--memory-budget", "600MiB", "--workers", "3", "--log-json", str(log)),
                tmp_path, BATCHALIGN_SUPERVISE_START_METHOD="zygote")
    assert r.returncode == 0, r.stderr[-3000:]
    evs = events(log)
    assert {e["file"] for e in named(evs, "file_done")} == {p.relative_to(corpus_dir).as_posix() for p in files}
    pids = {e["pid"] for e in named(evs, "worker_spawned")}
    assert pids and _wait_gone(pids)
    # Workers that served files exit cleanly; one still loading when the last file finished is
    # stopped at once (the run does not wait for a boot it no longer needs), and nothing was killed.
    ready = {e["pid"] for e in named(evs, "worker_ready")}
    exits = named(evs, "worker_exited")
    assert named(evs, "worker_killed") == []
    assert all(e["exitcode"] == 0 for e in exits if e["pid"] in ready), exits


# -- the real torch path -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from conftest_models import build_tiny_wav2vec

    return build_tiny_wav2vec(tmp_path_factory.mktemp("tiny") / "w2v")


def test_wav2vec_run_through_the_zygote(tiny, tmp_path):
    corpus_dir = tmp_path / "corpus"
    files = make_corpus(corpus_dir, [4, 6])
    out = tmp_path / "out"
    log = tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus_dir, out, "--model", str(tiny), "--memory-budget", "4GiB", "--workers", "2",
                         "--start-method", "zygote", "--log-json", str(log), engine="wav2vec"), tmp_path, timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    evs = events(log)
    assert len(named(evs, "file_done")) == len(files)
    for cha in files:
        assert "%wor:" in (out / cha.relative_to(corpus_dir)).read_text()


def test_forked_torch_workers_hold_far_less_private_memory_than_a_spawned_one(tiny):
    import psutil

    cmd = worker_command("wav2vec", {"model": str(tiny), "threads": 1})

    async def uss_of(launcher, n: int) -> list[float]:
        q: asyncio.Queue = asyncio.Queue()
        pool = ProcessPool(cmd, events=q, env={**ENV, "HF_HUB_OFFLINE": "1"}, launcher=launcher)
        ws = [await pool.spawn() for _ in range(n)]
        await _ready(q, n, timeout=90)
        uss = [psutil.Process(w.pid).memory_full_info().uss for w in ws]
        for w in ws:
            await pool.stop(w)
        assert await pool.wait_all(30)
        await pool.close()
        return uss

    async def scenario():
        spawned = (await uss_of(SpawnLauncher(), 1))[0]
        launcher = ZygoteLauncher("wav2vec")
        forked = await uss_of(launcher, 2)
        assert launcher.fallback_reason is None
        return spawned, forked

    spawned, forked = asyncio.run(scenario())
    assert all(u < 0.6 * spawned for u in forked), (spawned / 2**20, [u / 2**20 for u in forked])


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None
