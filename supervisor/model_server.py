"""The model server's supervisor side: one process per GPU holds the model (``worker/model_server.py``).

The supervisor treats the server like a worker that takes no files: spawned once when the run
starts, READY handshake (with its socket and memory), watched through its pipe, and restarted when
it dies; the workers that had spans in flight reconnect and send them again, so no file loses its
attempt to a server crash (one that no server answers within the boot timeout fails its attempt).
Its host memory is charged to the budget beside the supervisor's own (``extra_pids``), its GPU
memory beside the workers' (``gpu_pids``). A server that cannot load its model (boot error), or that
died ``MAX_RESTARTS`` times, is not started again; the workers then fail to boot and the run halts
with their reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

from supervisor.backend import LocalBackend
from worker import protocol

MAX_RESTARTS = 5
RESTART_BACKOFF_S = 0.5


def use_model_server(settings: Any) -> bool:
    """``--model-server on``, or ``auto`` on a CUDA device, for the torch engines."""
    mode = getattr(settings.run, "model_server", "off")
    torch_engine = settings.engine_name in ("wav2vec", "whisper")
    if mode == "on":
        return torch_engine
    return mode == "auto" and torch_engine and settings.run.device.startswith("cuda")


class ModelServer:
    """The server process: started, watched, restarted, stopped."""

    def __init__(self, engine: str, options: dict[str, Any], *, emit: Callable[..., None],
                 python: str | None = None, env: dict[str, str] | None = None,
                 max_restarts: int = MAX_RESTARTS, max_batch: int | None = None) -> None:
        self.engine = engine
        self.options = {k: v for k, v in options.items() if k != "model_server"}
        self.emit = emit
        self.python = python or sys.executable
        self.env = env
        self.max_restarts = max_restarts
        self.max_batch = max_batch
        self.dir = tempfile.mkdtemp(prefix="bas-model-")
        self.socket = os.path.join(self.dir, "server.sock")
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.ready = asyncio.Event()
        self.failed: str | None = None
        self.closing = False
        self._task: asyncio.Task | None = None
        self.ready_msg: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "worker.model_server", "--engine", self.engine,
               "--options", json.dumps(self.options, separators=(",", ":")), "--socket", self.socket]
        return cmd + (["--max-batch", str(self.max_batch)] if self.max_batch else [])

    async def start(self) -> None:
        self._task = asyncio.create_task(self._keep(), name="model-server")

    async def _keep(self) -> None:
        while not self.closing:
            env = dict(os.environ if self.env is None else self.env)
            env["BATCHALIGN_SUPERVISE_PARENT_PID"] = str(os.getpid())
            t0 = time.monotonic()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
                    limit=protocol.MAX_FRAME + protocol.HEADER_SIZE)
            except OSError as exc:
                self._give_up(f"cannot start the model server: {exc}")
                return
            self.emit("model_server_spawned", pid=self.proc.pid, restarts=self.restarts)
            stderr = asyncio.create_task(self._drain(self.proc.stderr))
            boot_error = await self._read(self.proc, t0)
            code = await self.proc.wait()
            await asyncio.gather(stderr, return_exceptions=True)
            self.ready.clear()
            if self.closing:
                return
            self.emit("model_server_exited", level="warning", pid=self.proc.pid, exitcode=code,
                      reason=boot_error, restarts=self.restarts)
            if boot_error is not None or code == protocol.EXIT_BOOT_ERROR:
                self._give_up(boot_error or f"exit code {code} before READY")
                return
            if self.restarts >= self.max_restarts:
                self._give_up(f"died {self.restarts + 1} times (last: exit code {code})")
                return
            self.restarts += 1
            await asyncio.sleep(RESTART_BACKOFF_S * self.restarts)

    def _give_up(self, why: str) -> None:
        self.failed = why
        self.emit("model_server_failed", level="error", reason=why, restarts=self.restarts,
                  effect="workers cannot reach a model: they fail to boot and the run halts")

    async def _read(self, proc: asyncio.subprocess.Process, t0: float) -> str | None:
        """Frames until the pipe closes: READY (announced), heartbeats; the boot error if one came."""
        assert proc.stdout is not None
        while True:
            try:
                header = await proc.stdout.readexactly(protocol.HEADER_SIZE)
                msg = protocol.decode_body(await proc.stdout.readexactly(protocol.frame_length(header)))
            except (asyncio.IncompleteReadError, protocol.ProtocolError):
                return None
            kind = msg.get("type")
            if kind == protocol.READY:
                self.ready_msg = msg
                self.ready.set()
                self.emit("model_server_ready", pid=proc.pid, startup_s=round(time.monotonic() - t0, 3),
                          rss_mb=msg.get("rss_mb"), uss_mb=msg.get("uss_mb"), vram_mb=msg.get("vram_mb"),
                          device=msg.get("device"), restarts=self.restarts)
            elif kind == protocol.BOOT_ERROR:
                return str(msg.get("error") or "boot error")

    async def _drain(self, stream: Any) -> None:
        while stream is not None:
            line = await stream.readline()
            if not line:
                return
            text = line.decode(errors="replace").strip()
            if text:
                self.emit("model_server_log", level="debug", line=text[:2000])

    def kill(self) -> None:
        """SIGKILL the running server (it is restarted); for tests and the shutdown path."""
        if self.pid is not None:
            try:
                os.killpg(self.pid, 9)
            except ProcessLookupError:
                pass

    async def close(self, timeout: float = 10.0) -> None:
        self.closing = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                if proc.stdin is not None:
                    proc.stdin.write(protocol.encode({"type": protocol.SHUTDOWN}))
                    proc.stdin.close()
                await asyncio.wait_for(proc.wait(), timeout)
            except (asyncio.TimeoutError, OSError, RuntimeError):
                self.kill()
                await proc.wait()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class ServedBackend(LocalBackend):
    """The local pool plus the model server its workers send spans to."""

    def __init__(self, command: list[str], server: ModelServer, **kw: Any) -> None:
        super().__init__(command, **kw)
        self.server = server

    async def start(self) -> None:
        await self.server.start()
        await super().start()

    def extra_pids(self) -> list[int]:
        return super().extra_pids() + ([self.server.pid] if self.server.pid else [])

    def gpu_pids(self) -> dict[str, int]:
        return {"model-server": self.server.pid} if self.server.pid else {}

    async def close(self) -> None:
        await super().close()
        await self.server.close()


def served_options(options: dict[str, Any], server: ModelServer, boot_timeout: float) -> dict[str, Any]:
    """The workers' engine options: the server's socket, and how long to wait for it (a large
    model may take minutes to load; a restart a few seconds)."""
    return {**options, "model_server": server.socket, "server_reconnect_s": float(boot_timeout), "device": "cpu"}
