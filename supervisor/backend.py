"""The seam between the run core and whatever runs the workers.

The run core (intake, worker tracking, outcomes, telemetry sink, publishing) drives a ``Backend``:
it asks for workers (``spawn``), hands files to them (``assign``), signals them (``signal``) and
reads what happened as ``BackendEvent``s (``events``). It never touches a process, a pipe or a
scheduler itself. ``LocalBackend`` runs the local process pool (``supervisor/pool.py``); a Dask
backend (``supervisor/cluster``) implements the same interface. No method may block the loop:
``spawn``, ``assign`` and ``signal`` start their work and return; what comes of it arrives as events.

Worker ids are strings (local: ``"w3"``; Dask: the worker's address).
"""

from __future__ import annotations

import asyncio
import signal as _signal
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from supervisor.pool import PoolEvent, ProcessPool, SpawnLauncher, WorkerProcess, ZygoteLauncher
from worker import protocol

ACTIONS = ("pause", "resume", "kill", "stop")


@dataclass(frozen=True)
class JobSpec:
    """One attempt at one file, as a backend needs it."""

    file: str  # path relative to its corpus root
    cha: str
    media: str | None
    out: str
    options: dict[str, Any]  # engine options for this file (e.g. ``threads``)
    attempt: int
    predicted_peak_mb: float
    predicted_growth_mb: float
    job_id: str = ""  # unique per attempt: "<file>#<attempt>"


# -- events ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpawned:
    """A worker process exists (it is loading its model); local backend only."""

    worker_id: str
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    """A requested worker could not be started at all."""

    reason: str


@dataclass(frozen=True)
class WorkerLoaded:
    """A starting worker has loaded its model and runs its probes; READY follows."""

    worker_id: str
    pid: int
    private_mb: float  # its private dirty memory after the load, what no other worker shares (0: unknown)


@dataclass(frozen=True)
class WorkerReady:
    worker_id: str
    pid: int
    baseline_mb: float  # USS the worker reported at READY
    calibration: list = field(default_factory=list)
    rss_mb: float | None = None
    pss_mb: float | None = None
    vram_mb: float | None = None  # GPU memory its allocator held at READY (CUDA runs only)


@dataclass(frozen=True)
class WorkerHeartbeat:
    worker_id: str
    job: str | None
    progress: Any = None


@dataclass(frozen=True)
class WorkerLog:
    """One line a worker wrote on stderr (JSON log records or stray output)."""

    worker_id: str
    line: str


@dataclass(frozen=True)
class WorkerBroken:
    """The worker broke the protocol: the run core kills it and never reuses it."""

    worker_id: str
    error: str


@dataclass(frozen=True)
class FileStarted:
    worker_id: str
    file: str


@dataclass(frozen=True)
class FileProgress:
    worker_id: str
    file: str
    progress: dict


@dataclass(frozen=True)
class FileResult:
    worker_id: str
    file: str
    peak_mb: float | None  # the worker's own peak RSS (VmHWM) during the file
    growth_mb: float | None  # the worker's own measurement of growth above its READY baseline
    wall_s: float | None
    cpu_s: float | None
    features_run: dict | None  # what the model really did; None: nothing ran through the model
    warnings: list = field(default_factory=list)
    output: str | None = None
    audio_seconds: float | None = None
    stats: dict | None = None
    job_id: str | None = None
    rss_after_mb: float | None = None  # the worker's RSS once it released the file's memory
    peak_vram_mb: float | None = None  # its allocator's GPU peak during the file (CUDA runs only)


@dataclass(frozen=True)
class FileError:
    worker_id: str
    file: str
    reason: str
    kind: str  # "bad_input" | "output" (cannot be written) | "memory" | "crash" | "timeout" | "lost"
    job_id: str | None = None


@dataclass(frozen=True)
class WorkerExited:
    worker_id: str
    pid: int | None
    exitcode: int | None
    signal: int | None
    reason: str | None  # what the worker said before it left (a boot error), if anything


BackendEvent = (WorkerSpawned | SpawnFailed | WorkerLoaded | WorkerReady | WorkerHeartbeat | WorkerLog | WorkerBroken
                | FileStarted | FileProgress | FileResult | FileError | WorkerExited)

# The worker protocol's error kinds, as the run core reads them.
ERROR_KINDS = {"input": "bad_input", "media": "bad_input", "bad_input": "bad_input", "memory": "memory",
               "timeout": "timeout", "lost": "lost", "output": "output"}


# Kinds that fail the same way again: bad input, and an output that cannot be written (a full disk,
# a read-only folder: not the file's fault, and no retry would change it).
NOT_RETRIED = frozenset({"bad_input", "output"})


def error_kind(worker_kind: str | None) -> str:
    """A worker's error kind as a ``FileError`` kind; anything unknown is a crash (retried)."""
    return ERROR_KINDS.get(worker_kind or "", "crash")


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    def spawn(self) -> None: ...

    def assign(self, worker_id: str | None, job: JobSpec) -> None: ...

    def signal(self, worker_id: str, action: str) -> None: ...

    def events(self) -> AsyncIterator[BackendEvent]: ...

    async def close(self) -> None: ...


class LocalBackend:
    """The local process pool behind the backend interface.

    Spawning (a fork from the zygote, which may first have to start) and writing to a worker's pipe
    run as tasks, so the loop keeps sampling and deciding while they take their time.
    """

    name = "local"

    def __init__(self, command: list[str], *, launcher: SpawnLauncher | ZygoteLauncher | None = None,
                 env: dict[str, str] | None = None, clock: Callable[[], float] | None = None,
                 warm_command: list[str] | None = None) -> None:
        self._raw: asyncio.Queue = asyncio.Queue()
        kw = {"clock": clock} if clock is not None else {}
        self.pool = ProcessPool(command, events=self._raw, env=env, launcher=launcher, **kw)
        self._warm_command = warm_command
        self._out: asyncio.Queue = asyncio.Queue()
        self._procs: dict[str, WorkerProcess] = {}
        self._boot_errors: dict[str, str] = {}
        self._tasks: set[asyncio.Task] = set()
        self._pump: asyncio.Task | None = None

    @staticmethod
    def _wid(w: WorkerProcess) -> str:
        return f"w{w.id}"

    async def start(self) -> None:
        self._pump = asyncio.create_task(self._translate(), name="local-backend-events")

    def _task(self, coro: Any, name: str) -> None:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def spawn(self) -> None:
        self._task(self._spawn(), "local-backend-spawn")

    def probes_measured(self) -> bool:
        """A worker of this run measured its READY probes: the workers started from now on only
        warm up (the same spans on the same model and machine would measure the same), so each
        reaches READY, and lets the next one start, without them. True if that changed anything."""
        if self._warm_command is None:
            return False
        self.pool.command, self._warm_command = self._warm_command, None
        return True

    async def _spawn(self) -> None:
        try:
            w = await self.pool.spawn()
        except Exception as exc:  # a launcher failure is the run core's to count, not a crash of the loop
            self._out.put_nowait(SpawnFailed(f"{type(exc).__name__}: {exc}"))
            return
        wid = self._wid(w)
        self._procs[wid] = w
        self._out.put_nowait(WorkerSpawned(wid, w.pid))

    def assign(self, worker_id: str | None, job: JobSpec) -> None:
        w = self._procs.get(worker_id or "")
        if w is None:
            raise KeyError(f"no local worker {worker_id!r}")
        msg = {"type": protocol.JOB, "job": job.job_id, "input": job.cha, "output": job.out, "media": job.media,
               "rel": job.file, "options": dict(job.options)}
        self._task(self.pool.send(w, msg), f"send-{worker_id}")

    def signal(self, worker_id: str, action: str) -> None:
        w = self._procs.get(worker_id)
        if w is None:
            return
        if action == "pause":
            self.pool.pause(w)
        elif action == "resume":
            self.pool.resume(w)
        elif action == "kill":
            self.pool.kill(w)
        elif action == "stop":
            self._task(self.pool.stop(w), f"stop-{worker_id}")
        else:
            raise ValueError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")

    def extra_pids(self) -> list[int]:
        """Processes of ours that are not workers but hold memory (the zygote)."""
        pid = getattr(self.pool.launcher, "zygote_pid", None)
        return [pid] if pid else []

    async def events(self) -> AsyncIterator[BackendEvent]:
        while True:
            yield await self._out.get()

    def kill_all(self) -> None:
        self.pool.kill_all()

    async def wait_all(self, timeout: float) -> bool:
        return await self.pool.wait_all(timeout)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()
        # Exits reaped while closing still reach the run core.
        while not self._raw.empty():
            self._out.put_nowait(self._convert(self._raw.get_nowait()))
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)

    async def _translate(self) -> None:
        while True:
            ev = self._convert(await self._raw.get())
            if ev is not None:
                self._out.put_nowait(ev)

    def _convert(self, ev: PoolEvent) -> BackendEvent | None:
        wid = self._wid(ev.worker)
        if ev.kind == "output":
            return WorkerLog(wid, ev.msg.get("line", ""))
        if ev.kind == "broken":
            return WorkerBroken(wid, ev.error or "protocol error")
        if ev.kind == "exited":
            rc = ev.returncode
            sig = -rc if rc is not None and rc < 0 else None
            return WorkerExited(wid, ev.worker.pid, rc, sig, self._boot_errors.pop(wid, None))
        return self._message(wid, ev.worker, ev.msg)

    def _message(self, wid: str, w: WorkerProcess, msg: dict[str, Any]) -> BackendEvent | None:
        kind = msg.get("type")
        job = msg.get("job")
        file = job.rsplit("#", 1)[0] if isinstance(job, str) else ""
        if kind == protocol.HEARTBEAT:
            return WorkerHeartbeat(wid, job, msg.get("progress"))
        if kind == protocol.LOADED:
            # Private dirty pages: memory-mapped weights are clean and shared by the next worker, so a
            # lone first worker's USS overstates what a load costs; a worker that could not read its
            # smaps reports its RSS there (an upper bound).
            mem = msg.get("dirty_mb", msg.get("uss_mb"))
            return WorkerLoaded(wid, int(msg.get("pid") or w.pid), float(mem or 0.0))
        if kind == protocol.READY:
            return WorkerReady(wid, int(msg.get("pid") or w.pid), float(msg.get("uss_mb") or 0.0),
                               list(msg.get("calibration") or []), rss_mb=msg.get("rss_mb"), pss_mb=msg.get("pss_mb"),
                               vram_mb=msg.get("vram_mb"))
        if kind == protocol.BOOT_ERROR:
            self._boot_errors[wid] = str(msg.get("error") or "boot error")
            return WorkerLog(wid, f"boot error: {self._boot_errors[wid]}")
        if kind == protocol.STARTED:
            return FileStarted(wid, file)
        if kind == getattr(protocol, "PROGRESS", "progress"):
            return FileProgress(wid, file, {k: v for k, v in msg.items() if k not in ("type", "job")})
        if kind == protocol.RESULT:
            return FileResult(wid, file, peak_mb=msg.get("peak_rss_mb"), growth_mb=msg.get("growth_mb"),
                              wall_s=msg.get("wall_s"), cpu_s=msg.get("cpu_s"),
                              features_run=features_run(msg),
                              warnings=list(msg.get("warnings") or []), output=msg.get("output"),
                              audio_seconds=msg.get("audio_seconds"), stats=msg.get("stats"), job_id=job,
                              rss_after_mb=msg.get("rss_after_mb"), peak_vram_mb=msg.get("peak_vram_mb"))
        if kind == protocol.ERROR:
            return FileError(wid, file, str(msg.get("error") or "unknown error"), error_kind(msg.get("kind")),
                             job_id=job)
        return WorkerBroken(wid, f"unexpected message {kind!r}")


def features_run(msg: dict[str, Any]) -> dict | None:
    """What the model really did for a RESULT: its ``features_run``; from a worker that does not
    send it, ``{}`` (the planned features) unless its stats show the model saw no audio at all
    (every utterance answered from the result cache)."""
    if "features_run" in msg:
        return msg["features_run"]
    stats = msg.get("stats") or {}
    if stats.get("cached_utterances") and not stats.get("audio_seconds_aligned"):
        return None
    return {}


def signal_name(sig: int | None) -> str | None:
    try:
        return _signal.Signals(sig).name if sig else None
    except ValueError:
        return str(sig)

