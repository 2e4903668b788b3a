"""Worker processes: spawn, READY handshake, framed messages, signals, reaping.

The pool does what it is told and reports what happens as events on one queue; it decides nothing.
Each worker is ``python -m worker`` in its own process group (so SIGSTOP/SIGKILL reach any helper
it started, e.g. ffmpeg) with its stdout reserved for frames. A worker that breaks the protocol is
killed and never reused. A cluster backend can stand where this class stands: it needs ``spawn``,
``send_job``, ``pause``/``resume``, ``kill``/``stop`` and to emit the same events.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from worker import protocol


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    PAUSED = "paused"
    STOPPING = "stopping"
    KILLED = "killed"
    EXITED = "exited"


_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.STOPPING, WorkerState.KILLED, WorkerState.EXITED}),
    WorkerState.READY: frozenset({WorkerState.BUSY, WorkerState.STOPPING, WorkerState.KILLED, WorkerState.EXITED}),
    WorkerState.BUSY: frozenset({WorkerState.READY, WorkerState.PAUSED, WorkerState.STOPPING, WorkerState.KILLED,
                                 WorkerState.EXITED}),
    WorkerState.PAUSED: frozenset({WorkerState.BUSY, WorkerState.STOPPING, WorkerState.KILLED, WorkerState.EXITED}),
    WorkerState.STOPPING: frozenset({WorkerState.KILLED, WorkerState.EXITED}),
    WorkerState.KILLED: frozenset({WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class PoolEvent:
    """Something that happened to a worker: kind is message | exited | broken | output."""

    kind: str
    worker: "Worker"
    msg: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    error: str | None = None


@dataclass(eq=False)
class Worker:
    id: int
    proc: asyncio.subprocess.Process
    spawned_at: float
    state: WorkerState = WorkerState.STARTING
    ready_at: float | None = None
    baseline_uss_mb: float | None = None
    baseline_rss_mb: float | None = None
    baseline_pss_mb: float | None = None
    job: Any = None  # the FileJob being aligned
    job_id: str | None = None
    file_started_at: float | None = None
    paused_at: float | None = None
    idle_since: float | None = None
    last_heartbeat: float = 0.0
    progress: float | None = None
    peak_uss_mb: float = 0.0
    uss_mb: float = 0.0
    pss_mb: float = 0.0
    rss_mb: float = 0.0
    kill_reason: str | None = None
    exit_reason: str | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def transition(self, new: WorkerState) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"worker {self.id}: {self.state.value} -> {new.value} is not allowed")
        self.state = new

    @property
    def live(self) -> bool:
        return self.state not in (WorkerState.KILLED, WorkerState.EXITED)


def worker_command(engine: str, options: dict[str, Any], python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "worker", "--engine", engine,
            "--options", json.dumps(options, separators=(",", ":"))]


class ProcessPool:
    """Local subprocess workers. Events (messages, exits, protocol breaks) go to ``events``."""

    def __init__(self, command: list[str], *, events: asyncio.Queue, env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, cwd: Path | None = None) -> None:
        self.command = command
        self.events = events
        self.env = env
        self.clock = clock
        self.cwd = cwd
        self.workers: dict[int, Worker] = {}
        self._next_id = 1

    async def spawn(self) -> Worker:
        env = dict(os.environ if self.env is None else self.env)
        env["BATCHALIGN_SUPERVISE_PARENT_PID"] = str(os.getpid())
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=self.cwd, start_new_session=True,
            limit=protocol.MAX_FRAME + protocol.HEADER_SIZE)
        w = Worker(id=self._next_id, proc=proc, spawned_at=self.clock())
        w.last_heartbeat = w.spawned_at
        self._next_id += 1
        self.workers[w.id] = w
        w.tasks = [asyncio.create_task(self._read_frames(w), name=f"worker-{w.id}-frames"),
                   asyncio.create_task(self._read_stderr(w), name=f"worker-{w.id}-stderr"),
                   asyncio.create_task(self._reap(w), name=f"worker-{w.id}-reap")]
        return w

    def live(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.live]

    async def send(self, w: Worker, msg: dict[str, Any]) -> bool:
        """Send one frame; a worker whose pipe is gone is reported broken, not raised."""
        stdin = w.proc.stdin
        if stdin is None or stdin.is_closing():
            return False
        try:
            stdin.write(protocol.encode(msg))
            await stdin.drain()
            return True
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as exc:
            self.events.put_nowait(PoolEvent("broken", w, error=f"pipe closed: {exc}"))
            return False

    def signal(self, w: Worker, sig: int) -> bool:
        """Signal the worker's whole process group; False when it is already gone."""
        try:
            os.killpg(w.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            try:
                os.kill(w.pid, sig)
                return True
            except ProcessLookupError:
                return False

    def pause(self, w: Worker) -> None:
        w.transition(WorkerState.PAUSED)
        w.paused_at = self.clock()
        self.signal(w, signal.SIGSTOP)

    def resume(self, w: Worker) -> float:
        paused_for = self.clock() - (w.paused_at or self.clock())
        w.transition(WorkerState.BUSY)
        w.paused_at = None
        w.last_heartbeat = self.clock()  # it could not heartbeat while stopped
        self.signal(w, signal.SIGCONT)
        return paused_for

    def kill(self, w: Worker, reason: str) -> None:
        if not w.live:
            return
        w.kill_reason = reason
        w.transition(WorkerState.KILLED)
        self.signal(w, signal.SIGKILL)
        self.signal(w, signal.SIGCONT)  # a stopped group must run to die promptly

    async def stop(self, w: Worker, reason: str) -> None:
        """Ask a worker to finish: SHUTDOWN frame, then stdin closed."""
        if w.state in (WorkerState.STOPPING, WorkerState.KILLED, WorkerState.EXITED):
            return
        w.exit_reason = reason
        if w.state is WorkerState.PAUSED:
            self.signal(w, signal.SIGCONT)
        w.transition(WorkerState.STOPPING)
        await self.send(w, {"type": protocol.SHUTDOWN})
        if w.proc.stdin is not None and not w.proc.stdin.is_closing():
            w.proc.stdin.close()

    def kill_all(self, reason: str) -> None:
        for w in self.live():
            self.kill(w, reason)

    async def wait_all(self, timeout: float) -> bool:
        """Wait for every worker process to be reaped; True when all are gone."""
        tasks = [t for w in self.workers.values() for t in w.tasks[2:3] if not t.done()]
        if not tasks:
            return True
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    # -- per-worker tasks ------------------------------------------------------------------------
    async def _read_frames(self, w: Worker) -> None:
        reader = w.proc.stdout
        assert reader is not None
        try:
            while True:
                try:
                    header = await reader.readexactly(protocol.HEADER_SIZE)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise protocol.ProtocolError("stream closed mid-header") from None
                    return  # clean EOF: the reaper reports the exit
                body = await reader.readexactly(protocol.frame_length(header))
                self.events.put_nowait(PoolEvent("message", w, msg=protocol.decode_body(body)))
        except (protocol.ProtocolError, asyncio.IncompleteReadError) as exc:
            self.events.put_nowait(PoolEvent("broken", w, error=str(exc)))

    async def _read_stderr(self, w: Worker) -> None:
        reader = w.proc.stderr
        assert reader is not None
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            self.events.put_nowait(PoolEvent("output", w, msg={"line": line.decode("utf-8", "replace").rstrip()}))

    async def _reap(self, w: Worker) -> None:
        rc = await w.proc.wait()
        # Let the readers drain what the worker wrote before it died.
        await asyncio.gather(*w.tasks[:2], return_exceptions=True)
        self.events.put_nowait(PoolEvent("exited", w, returncode=rc))
