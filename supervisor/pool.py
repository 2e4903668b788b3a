"""Worker processes: spawn, READY handshake, framed messages, signals, reaping.

The pool does what it is told and reports what happens as events on one queue; it decides nothing.
Each worker is ``python -m worker`` in its own process group (so SIGSTOP/SIGKILL reach any helper
it started, e.g. ffmpeg) with its stdout reserved for frames. A worker that breaks the protocol is
killed and never reused. ``supervisor/backend.py`` puts this pool behind the backend interface
the run core drives (a cluster backend implements the same interface).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from supervisor.sampler import pid_alive
from worker import protocol


@dataclass(frozen=True)
class PoolEvent:
    """Something that happened to a worker process: kind is message | exited | broken | output."""

    kind: str
    worker: "WorkerProcess"
    msg: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    error: str | None = None


@dataclass(eq=False)
class WorkerProcess:
    """One worker process and the tasks that read it. Its lifecycle state is not kept here: the
    supervisor's worker table owns it (``supervisor/workers.py``)."""

    id: int
    proc: Any  # asyncio.subprocess.Process or ForkedProcess
    spawned_at: float
    tasks: list[asyncio.Task] = field(default_factory=list)
    exited: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


def worker_command(engine: str, options: dict[str, Any], python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "worker", "--engine", engine,
            "--options", json.dumps(options, separators=(",", ":"))]


START_METHODS = ("auto", "spawn", "zygote")
_STREAM_LIMIT = protocol.MAX_FRAME + protocol.HEADER_SIZE


def resolve_start_method(method: str, engine: str) -> str:
    """``auto``: fork torch engines from a zygote (shared runtime pages), spawn the synthetic one."""
    if method == "auto":
        return "zygote" if engine in ("wav2vec", "whisper") else "spawn"
    return method


class SpawnLauncher:
    """Each worker a fresh interpreter (``asyncio.create_subprocess_exec``)."""

    async def launch(self, command: list[str], env: dict[str, str], cwd: Path | None) -> Any:
        return await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd, start_new_session=True, limit=_STREAM_LIMIT)

    async def close(self) -> None:
        return None


class ZygoteError(RuntimeError):
    """The zygote could not be started or stopped answering."""


class ForkedProcess:
    """A worker forked by the zygote, with the surface the pool uses of ``asyncio.subprocess.Process``."""

    def __init__(self) -> None:
        self.pid: int = 0
        self.returncode: int | None = None
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self._exited: asyncio.Future = asyncio.get_running_loop().create_future()

    def _set_exited(self, rc: int) -> None:
        if not self._exited.done():
            self.returncode = rc
            self._exited.set_result(rc)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class ZygoteLauncher:
    """Forks workers from ``python -m worker.zygote``, started once (on the first launch) and again
    after it dies. The supervisor itself never forks: it holds asyncio state, sockets and SQLite.

    The zygote imports the engine's runtime and freezes its objects, so its workers share those
    pages instead of each holding ~270 MiB of private runtime. If the zygote dies, every worker it
    forked dies with it (PR_SET_PDEATHSIG) and is reported exited with -SIGKILL. If it cannot be
    started at all, workers are spawned as fresh interpreters instead (``fallback_reason`` says why).
    """

    READY_TIMEOUT = 120.0
    MAX_START_FAILURES = 3

    def __init__(self, engine: str, *, python: str | None = None) -> None:
        self.engine = engine
        self.python = python or sys.executable
        self.zygote: asyncio.subprocess.Process | None = None
        self.zygote_pid: int | None = None
        self.fallback_reason: str | None = None
        self._spawn = SpawnLauncher()
        self._sock: Any = None
        self._reader: asyncio.Task | None = None
        self._stderr_task: asyncio.Task | None = None
        self._stderr_tail: list[str] = []
        self._ready: asyncio.Future | None = None
        self._pending: dict[int, tuple[asyncio.Future, ForkedProcess]] = {}
        self._procs: dict[int, ForkedProcess] = {}
        self._next_req = 1
        self._failures = 0
        self._lock = asyncio.Lock()

    async def launch(self, command: list[str], env: dict[str, str], cwd: Path | None) -> Any:
        argv = _worker_argv(command)
        if argv is None or self._failures >= self.MAX_START_FAILURES:
            return await self._spawn.launch(command, env, cwd)
        try:
            await self._ensure_zygote(env, cwd)
            return await self._fork(argv, env, cwd)
        except ZygoteError as exc:
            self._failures += 1
            self.fallback_reason = str(exc)
            await self._discard_zygote()
            return await self._spawn.launch(command, env, cwd)

    async def _ensure_zygote(self, env: dict[str, str], cwd: Path | None) -> None:
        async with self._lock:
            if self.zygote is not None and self.zygote.returncode is None and self._reader is not None \
                    and not self._reader.done():
                return
            await self._discard_zygote()
            loop = asyncio.get_running_loop()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self.zygote = await asyncio.create_subprocess_exec(
                    self.python, "-m", "worker.zygote", "--engine", self.engine, "--control-fd", str(theirs.fileno()),
                    pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd,
                    start_new_session=True)
            except OSError as exc:
                ours.close()
                raise ZygoteError(f"zygote did not start: {exc}") from None
            finally:
                theirs.close()
            ours.setblocking(False)
            self._sock = ours
            self._stderr_tail = []
            self._ready = loop.create_future()
            self._reader = asyncio.create_task(self._read_control(ours), name="zygote-control")
            self._stderr_task = asyncio.create_task(self._read_zygote_stderr(self.zygote), name="zygote-stderr")
            try:
                self.zygote_pid = await asyncio.wait_for(asyncio.shield(self._ready), self.READY_TIMEOUT)
            except (asyncio.TimeoutError, ZygoteError) as exc:
                tail = " | ".join(self._stderr_tail[-5:])
                raise ZygoteError(f"zygote not ready: {exc or 'timeout'} {tail}".strip()) from None

    async def _fork(self, argv: list[str], env: dict[str, str], cwd: Path | None) -> ForkedProcess:
        loop = asyncio.get_running_loop()
        proc = ForkedProcess()
        pipes = [os.pipe() for _ in range(3)]  # (read, write) each
        child = [pipes[0][0], pipes[1][1], pipes[2][1]]
        ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
        req_id, self._next_req = self._next_req, self._next_req + 1
        fut = loop.create_future()
        self._pending[req_id] = (fut, proc)
        env = {**env, "BATCHALIGN_SUPERVISE_PARENT_PID": str(self.zygote_pid)}
        body = json.dumps({"req": req_id, "argv": argv, "env": env, "cwd": str(cwd) if cwd else None}).encode()
        try:
            for _ in range(500):
                try:
                    socket.send_fds(self._sock, [body], child)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            else:
                raise ZygoteError("zygote control socket stays full")
            reply = await asyncio.wait_for(asyncio.shield(fut), 30.0)
        except (OSError, asyncio.TimeoutError, ZygoteError) as exc:
            self._pending.pop(req_id, None)
            for fd in ours:
                os.close(fd)
            raise ZygoteError(f"zygote did not fork a worker: {exc or 'timeout'}") from None
        finally:
            for fd in child:
                os.close(fd)
        if "pid" not in reply:
            for fd in ours:
                os.close(fd)
            raise ZygoteError(f"zygote refused: {reply.get('error')}")
        proc.stdout = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(proc.stdout, loop=loop),
                                     os.fdopen(ours[1], "rb", buffering=0))
        proc.stderr = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(proc.stderr, loop=loop),
                                     os.fdopen(ours[2], "rb", buffering=0))
        transport, proto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                         os.fdopen(ours[0], "wb", buffering=0))
        proc.stdin = asyncio.StreamWriter(transport, proto, None, loop)
        return proc

    async def _read_control(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(sock, 1 << 16)
                if not data:
                    break
                msg = json.loads(data)
                if "ready" in msg:
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(int(msg["ready"]))
                elif "exited" in msg:
                    proc = self._procs.pop(int(msg["exited"]), None)
                    if proc is not None:
                        proc._set_exited(int(msg["returncode"]))
                elif "req" in msg:
                    fut, proc = self._pending.pop(msg["req"], (None, None))
                    if fut is None:
                        continue
                    if "pid" in msg:
                        proc.pid = int(msg["pid"])
                        self._procs[proc.pid] = proc
                    if not fut.done():
                        fut.set_result(msg)
        except (OSError, ValueError):
            pass
        finally:
            await self._zygote_gone()

    async def _zygote_gone(self) -> None:
        """The zygote is gone: its workers die with it (pdeathsig); report each once it has."""
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ZygoteError("zygote exited"))
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(ZygoteError("zygote exited"))
        self._pending.clear()
        procs, self._procs = list(self._procs.values()), {}
        for _ in range(100):
            if not any(pid_alive(p.pid) for p in procs):
                break
            await asyncio.sleep(0.05)
        for p in procs:
            p._set_exited(-signal.SIGKILL)

    async def _read_zygote_stderr(self, zygote: asyncio.subprocess.Process) -> None:
        assert zygote.stderr is not None
        while line := await zygote.stderr.readline():
            self._stderr_tail = (self._stderr_tail + [line.decode("utf-8", "replace").rstrip()])[-20:]

    async def _discard_zygote(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_WR)  # the zygote reads EOF and leaves
            except OSError:
                pass
        if self.zygote is not None:
            if self.zygote.returncode is None:
                try:
                    await asyncio.wait_for(self.zygote.wait(), 5.0)
                except asyncio.TimeoutError:
                    try:
                        self.zygote.kill()
                    except ProcessLookupError:
                        pass
                    await self.zygote.wait()
            self.zygote = None
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._stderr_task is not None:
            await asyncio.gather(self._stderr_task, return_exceptions=True)
            self._stderr_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        """Stop the zygote: closing its control socket makes it leave."""
        async with self._lock:
            await self._discard_zygote()


def _worker_argv(command: list[str]) -> list[str] | None:
    """The worker's own arguments when ``command`` is ``PYTHON -m worker ...``; else None (spawn it)."""
    if len(command) >= 3 and command[1:3] == ["-m", "worker"]:
        return list(command[3:])
    return None


class ProcessPool:
    """Local subprocess workers. Events (messages, exits, protocol breaks) go to ``events``.

    ``launcher`` starts each worker process: ``SpawnLauncher`` (default) or ``ZygoteLauncher``.
    The pool only does what it is told to a process; which state a worker is in is not its business.
    """

    def __init__(self, command: list[str], *, events: asyncio.Queue, env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, cwd: Path | None = None,
                 launcher: SpawnLauncher | ZygoteLauncher | None = None) -> None:
        self.command = command
        self.events = events
        self.env = env
        self.clock = clock
        self.cwd = cwd
        self.launcher = launcher or SpawnLauncher()
        self.workers: dict[int, WorkerProcess] = {}
        self._next_id = 1

    async def spawn(self) -> WorkerProcess:
        env = dict(os.environ if self.env is None else self.env)
        env["BATCHALIGN_SUPERVISE_PARENT_PID"] = str(os.getpid())
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = await self.launcher.launch(self.command, env, self.cwd)
        w = WorkerProcess(id=self._next_id, proc=proc, spawned_at=self.clock())
        self._next_id += 1
        self.workers[w.id] = w
        w.tasks = [asyncio.create_task(self._read_frames(w), name=f"worker-{w.id}-frames"),
                   asyncio.create_task(self._read_stderr(w), name=f"worker-{w.id}-stderr"),
                   asyncio.create_task(self._reap(w), name=f"worker-{w.id}-reap")]
        return w

    def live(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if not w.exited]

    async def send(self, w: WorkerProcess, msg: dict[str, Any]) -> bool:
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

    def signal(self, w: WorkerProcess, sig: int) -> bool:
        """Signal the worker's whole process group; False when it is already gone."""
        if w.exited:
            return False
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

    def pause(self, w: WorkerProcess) -> None:
        self.signal(w, signal.SIGSTOP)

    def resume(self, w: WorkerProcess) -> None:
        self.signal(w, signal.SIGCONT)

    def kill(self, w: WorkerProcess) -> None:
        self.signal(w, signal.SIGKILL)
        self.signal(w, signal.SIGCONT)  # a stopped group must run to die promptly

    async def stop(self, w: WorkerProcess) -> None:
        """Ask a worker to finish: SHUTDOWN frame, then stdin closed (a stopped one is continued)."""
        self.signal(w, signal.SIGCONT)
        await self.send(w, {"type": protocol.SHUTDOWN})
        if w.proc.stdin is not None and not w.proc.stdin.is_closing():
            w.proc.stdin.close()

    def kill_all(self) -> None:
        for w in self.live():
            self.kill(w)

    async def wait_all(self, timeout: float) -> bool:
        """Wait for every worker process to be reaped; True when all are gone."""
        tasks = [t for w in self.workers.values() for t in w.tasks[2:3] if not t.done()]
        if not tasks:
            return True
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def close(self) -> None:
        """Release what the launcher holds (the zygote); call after the workers are gone."""
        await self.launcher.close()

    # -- per-worker tasks ------------------------------------------------------------------------
    async def _read_frames(self, w: WorkerProcess) -> None:
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

    async def _read_stderr(self, w: WorkerProcess) -> None:
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

    async def _reap(self, w: WorkerProcess) -> None:
        rc = await w.proc.wait()
        # Let the readers drain what the worker wrote before it died.
        await asyncio.gather(*w.tasks[:2], return_exceptions=True)
        w.exited = True
        self.events.put_nowait(PoolEvent("exited", w, returncode=rc))
