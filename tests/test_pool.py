"""The worker pool and protocol with real worker processes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.synth_corpus import make_corpus
from supervisor.pool import ProcessPool, worker_command
from supervisor.workers import IllegalTransition, WorkerRecord, WorkerState
from worker import protocol

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]


def test_frames_round_trip_and_strict_framing():
    buf = io.BytesIO()
    protocol.write_frame(buf, {"type": "ready", "pid": 1, "text": "é"})
    buf.seek(0)
    assert protocol.read_frame(buf) == {"type": "ready", "pid": 1, "text": "é"}
    assert protocol.read_frame(buf) is None  # clean EOF
    with pytest.raises(protocol.ProtocolError):
        protocol.read_frame(io.BytesIO(b"\x00\x00\x00\x10{}"))  # truncated body
    with pytest.raises(protocol.ProtocolError):
        protocol.read_frame(io.BytesIO(b"\x7f\xff\xff\xff"))  # absurd length
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_body(b"[1, 2]")  # not a message object
    with pytest.raises(protocol.ProtocolError):
        protocol.encode({"no": "type"})


def test_stray_output_cannot_corrupt_the_protocol_stream():
    code = ("import os, sys; from worker import protocol; out = protocol.take_protocol_stdout(); "
            "print('stray print'); sys.stdout.flush(); os.write(1, b'raw fd write'); "
            "protocol.write_frame(out, {'type': 'ready'})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert protocol.read_frame(io.BytesIO(r.stdout)) == {"type": "ready"}
    assert len(r.stdout) == protocol.HEADER_SIZE + len(b'{"type":"ready"}')
    assert b"stray print" in r.stderr and b"raw fd write" in r.stderr


def _options():
    return {"baseline_mb": 10, "mb_per_audio_second": 1, "cpu_seconds_per_audio_second": 0.01}


async def _next(events: asyncio.Queue, kind: str, timeout: float = 20):
    while True:
        ev = await asyncio.wait_for(events.get(), timeout)
        if ev.kind == kind and (kind != "message" or ev.msg["type"] != protocol.HEARTBEAT):
            return ev


def test_ready_job_result_and_shutdown(tmp_path):
    cha = make_corpus(tmp_path / "c", [3])[0]

    async def scenario():
        events: asyncio.Queue = asyncio.Queue()
        pool = ProcessPool(worker_command("synthetic", _options()), events=events,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        w = await pool.spawn()
        ev = await _next(events, "message")
        assert ev.msg["type"] == protocol.LOADED and ev.msg["pid"] == w.pid
        ev = await _next(events, "message")
        assert ev.msg["type"] == protocol.READY and ev.msg["pid"] == w.pid
        await pool.send(w, {"type": protocol.JOB, "job": "j1", "input": str(cha), "output": str(tmp_path / "o.cha"),
                            "media": str(cha.with_suffix(".wav")), "rel": "f000.cha"})
        started = await _next(events, "message")
        assert started.msg == {"type": protocol.STARTED, "job": "j1"}
        result = await _next(events, "message")
        assert result.msg["type"] == protocol.RESULT and result.msg["audio_seconds"] == pytest.approx(3, abs=0.01)
        assert result.msg["peak_rss_mb"] > 0 and "%wor:" in (tmp_path / "o.cha").read_text()
        await pool.stop(w)
        exited = await _next(events, "exited")
        assert exited.returncode == protocol.EXIT_OK and w.exited

    asyncio.run(scenario())


def test_a_worker_starts_without_rich_and_still_logs_tracebacks_as_json():
    """rich is structlog's console extra (about 70 ms of every worker start); workers write JSON."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "worker", "--engine", "synthetic",
                           "--options", json.dumps(_options())], stdin=subprocess.DEVNULL,
                          capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
    assert proc.returncode == protocol.EXIT_OK, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:")]
    assert "structlog" in imported and "worker.engines.synthetic" in imported
    assert not [m for m in imported if m.startswith("rich.")]  # a refused ``import rich`` still logs a line
    code = ("import worker.__main__ as w; w.keep_console_renderers_out()\n"
            "from telemetry.logging import configure_logging, get_logger\n"
            "configure_logging(json_path=None, console='json', process='worker')\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    get_logger('w').error('boom', exc_info=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = json.loads([x for x in proc.stderr.splitlines() if x.startswith("{")][-1])
    assert line["event"] == "boom" and "ZeroDivisionError" in line["exception"]


def test_a_broken_frame_from_the_supervisor_makes_the_worker_leave():
    async def scenario():
        events: asyncio.Queue = asyncio.Queue()
        pool = ProcessPool(worker_command("synthetic", _options()), events=events,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        w = await pool.spawn()
        await _next(events, "message")
        w.proc.stdin.write(b"\x00\x00\x00\x05nope!")
        await w.proc.stdin.drain()
        exited = await _next(events, "exited")
        assert exited.returncode == protocol.EXIT_PROTOCOL_ERROR

    asyncio.run(scenario())


def test_boot_error_is_reported_with_its_exit_code():
    async def scenario():
        events: asyncio.Queue = asyncio.Queue()
        pool = ProcessPool(worker_command("no-such-engine", {}), events=events,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        await pool.spawn()
        ev = await _next(events, "message")
        assert ev.msg["type"] == protocol.BOOT_ERROR and "no-such-engine" in ev.msg["error"]
        exited = await _next(events, "exited")
        assert exited.returncode == protocol.EXIT_BOOT_ERROR

    asyncio.run(scenario())


def test_pause_resume_and_kill_reach_the_whole_process_group(tmp_path):
    async def scenario():
        events: asyncio.Queue = asyncio.Queue()
        pool = ProcessPool(worker_command("synthetic", _options()), events=events,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        w = await pool.spawn()
        await _next(events, "message")
        pool.pause(w)
        await asyncio.sleep(0.2)
        assert _proc_state(w.pid) == "T"
        pool.resume(w)
        await asyncio.sleep(0.2)
        assert _proc_state(w.pid) in ("S", "R")
        pool.kill(w)
        exited = await _next(events, "exited")
        assert exited.returncode == -signal.SIGKILL

    asyncio.run(scenario())


def test_worker_leaves_when_its_parent_is_killed(tmp_path):
    """An intermediate 'supervisor' spawns a worker and is SIGKILLed: the worker must not survive."""
    code = ("import subprocess, sys, os, json, time; "
            f"p = subprocess.Popen({worker_command('synthetic', _options())!r}, stdin=subprocess.PIPE, "
            "stdout=subprocess.PIPE, env={**os.environ, 'BATCHALIGN_SUPERVISE_PARENT_PID': str(os.getpid())}); "
            "print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    worker_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(100):
        if _proc_state(worker_pid) in (None, "Z"):
            break
        import time

        time.sleep(0.1)
    assert _proc_state(worker_pid) in (None, "Z")


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_worker_states_change_only_along_the_table():
    class Backend:
        def __init__(self):
            self.calls = []

        def spawn(self):
            self.calls.append("spawn")

        def signal(self, wid, action):
            self.calls.append((wid, action))

        def assign(self, wid, spec):
            self.calls.append((wid, "assign"))

    from supervisor.workers import WorkerTable

    b = Backend()
    seen = []
    t = WorkerTable(b, emit=lambda ev, level="info", **f: seen.append(ev), clock=lambda: 0.0)
    w = t.spawned("w1", 123)
    with pytest.raises(IllegalTransition):
        t.pause(w, "pressure", {})  # a starting worker runs no file to pause
    t.kill(w, "test")
    assert w.state is WorkerState.KILLED and b.calls == [("w1", "kill")]
    with pytest.raises(IllegalTransition):
        t._to(w, WorkerState.READY)
    assert seen == ["worker_spawned", "worker_killed"]


def test_what_loading_made_is_frozen_after_one_last_collection():
    """Each file's collection walks only what the file made; cycles loading left are gone first."""
    import gc
    import weakref

    from worker.__main__ import freeze_loaded_objects

    class Node:
        pass

    model = [Node() for _ in range(2000)]  # what loading keeps
    leftover = Node()
    leftover.me = leftover  # a cycle loading left behind
    gone = weakref.ref(leftover)
    del leftover
    before = gc.get_freeze_count()
    try:
        freeze_loaded_objects()
        assert gone() is None, "a cycle left by loading must be collected, not frozen for good"
        assert gc.get_freeze_count() >= before + len(model)
        file_garbage = Node()
        file_garbage.me = file_garbage
        gone = weakref.ref(file_garbage)
        del file_garbage
        gc.collect()
        assert gone() is None, "a file's own cycles are still collected"
    finally:
        gc.unfreeze()


_AFTER_A_LARGE_FILE = r"""
import ctypes, sys
from worker.selfmem import pin_mmap_threshold

pinned = pin_mmap_threshold(int(sys.argv[1]))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]


def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


def touch_and_free(n):
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    libc.free(p)


touch_and_free(24 << 20)  # a large file's tensor: mapped, freed (glibc raises its threshold)
before = rss_kib()
blocks = []
for _ in range(8):  # a smaller file's tensors, freed at its end
    p = libc.malloc(2 << 20)
    libc.memset(p, 1, 2 << 20)
    blocks.append(p)
for p in blocks[:-1]:
    libc.free(p)  # the last one stays live: the heap cannot shrink past it
print(pinned, rss_kib() - before)
"""


@pytest.mark.parametrize("threshold", [0, 128 * 1024])
def test_a_pinned_mmap_threshold_gives_a_smaller_files_tensors_back_after_a_large_one(threshold):
    """glibc's sliding threshold keeps the next, smaller file's freed tensors in the heap; pinned,
    each is mapped alone and unmapped when freed, so what a worker holds follows what is live."""
    out = subprocess.run([sys.executable, "-c", _AFTER_A_LARGE_FILE, str(threshold)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    pinned, kept_kib = out.stdout.split()
    assert pinned == str(bool(threshold))
    if threshold:
        assert int(kept_kib) < 4 << 10  # the one live block, 2 MiB
    else:
        assert int(kept_kib) >= 12 << 10  # freed blocks stay in the heap under the live one


_WAV2VEC_AUTO = r"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path.cwd() / "tests"))
from conftest_models import build_tiny_wav2vec
from worker.engines.wav2vec import Wav2VecEngine, feature_map_bytes_per_second

model = build_tiny_wav2vec(Path(sys.argv[1]))
engine = Wav2VecEngine({"model": str(model), "mmap_threshold": sys.argv[2] or None, "threads": 1})
print(feature_map_bytes_per_second(engine.aligner.hf.config, "fp32"))
""" + _AFTER_A_LARGE_FILE.replace("pin_mmap_threshold(int(sys.argv[1]))", "True")


@pytest.mark.parametrize("threshold", ["auto", ""])
def test_wav2vec_auto_threshold_is_one_second_of_its_first_feature_map(tmp_path, threshold):
    """``auto``: the wav2vec2 engine fixes the threshold once it knows its model (a 16-channel
    first conv layer at stride 5: 3200 frames a second, 200 KiB), so 2 MiB blocks are mapped."""
    out = subprocess.run([sys.executable, "-c", _WAV2VEC_AUTO, str(tmp_path / "w2v"), threshold],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    per_second, _, kept_kib = out.stdout.split()
    assert int(per_second) == 16 * 3200 * 4
    if threshold:
        assert int(kept_kib) < 4 << 10
    else:
        assert int(kept_kib) >= 12 << 10


@pytest.mark.parametrize("warms_up, probed", [(True, [[30.0]]), (False, [])])
def test_a_warm_worker_runs_its_first_pass_only_when_the_pass_leaves_something(warms_up, probed):
    """Warm calibration measures nothing; the unmeasured first pass runs where it changes what
    later files find, and not for an engine whose buffers are freed whole (the synthetic one)."""
    import logging

    from worker.__main__ import calibrate
    from worker.engines.synthetic import SyntheticEngine

    class Engine:
        name = "synthetic"

        def __init__(self):
            self.warms_up = warms_up
            self.calls = []

        def probe(self, lengths):
            self.calls.append(lengths)
            return [{"growth_mb": 1.0}]

    e = Engine()
    assert calibrate(e, {"calibrate": "warm", "span_seconds": 30.0}, logging.getLogger("t")) == []
    assert e.calls == probed
    assert SyntheticEngine({}).warms_up is False and SyntheticEngine({"probe_seconds": 1.0}).warms_up is True
    assert calibrate(e, {"calibrate": True, "span_seconds": 30.0}, logging.getLogger("t")) == [{"growth_mb": 1.0}]
