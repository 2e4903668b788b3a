"""Prometheus text exposition of the supervisor's status snapshot.

Two ways out, both drawn from the same ``Supervisor.status()`` dict: a small HTTP endpoint for a
Prometheus server that scrapes this host, and a ``.prom`` file for node_exporter's textfile
collector where opening a port is not wanted. Memory figures in the snapshot are MiB; Prometheus
convention is base units, so they are exported as bytes.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from pathlib import Path
from typing import Any, Awaitable, Callable

from worker.output import atomic_write_bytes

__all__ = ["CONTENT_TYPE", "DEFAULT_HOST", "MetricsServer", "render_prometheus", "write_textfile"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MIB = 1024 * 1024
DEFAULT_HOST = "127.0.0.1"

FILE_STATES = ("done", "failed", "quarantined", "pending", "running", "skipped")
# Every worker state is always exported (0 when absent) so rate()/absent() queries stay stable.
WORKER_STATES = ("starting", "ready", "busy", "paused", "stopping", "killed", "exited")

_MEMORY = (
    ("used_mb", "batchalign_memory_used_bytes", "Memory charged to the pool now (PSS of worker trees plus the supervisor)."),
    ("budget_mb", "batchalign_memory_budget_bytes", "Memory the pool may use: limit minus reserve."),
    ("limit_mb", "batchalign_memory_limit_bytes", "Effective limit: min(host RAM, cgroup limit, --memory-budget)."),
    ("available_mb", "batchalign_memory_available_bytes", "MemAvailable of the host (or the cgroup's headroom)."),
    ("committed_mb", "batchalign_memory_committed_bytes", "Current use plus predicted remaining growth of running files."),
)


def _escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, Any] | None = None) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_fmt(value)}")
        else:
            self.lines.append(f"{name} {_fmt(value)}")


def render_prometheus(status: dict) -> str:
    """The exposition (format 0.0.4) for one status snapshot; absent figures are left out, not zeroed."""
    status = status or {}
    w = _Writer()

    w.family("batchalign_up", "gauge", "1 while the supervisor is running and answering.")
    w.sample("batchalign_up", 1)

    run = status.get("run")
    if run is not None:
        w.family("batchalign_run_info", "gauge", "Identity of the running supervisor; the value is always 1.")
        w.sample("batchalign_run_info", 1, {"run": run, "pid": status.get("pid", "")})

    uptime = _number(status.get("uptime_s"))
    if uptime is not None:
        w.family("batchalign_uptime_seconds", "gauge", "Seconds since the supervisor started.")
        w.sample("batchalign_uptime_seconds", uptime)

    draining = status.get("draining")
    if draining is not None:
        w.family("batchalign_draining", "gauge", "1 while the supervisor is draining (no new files admitted).")
        w.sample("batchalign_draining", 1 if draining else 0)

    files = status.get("files") or {}
    w.family("batchalign_files", "gauge", "Transcripts in this run by state.")
    for state in FILE_STATES:
        value = _number(files.get(state))
        w.sample("batchalign_files", 0 if value is None else value, {"state": state})
    for state, value in files.items():
        if state not in FILE_STATES and state != "total" and _number(value) is not None:
            w.sample("batchalign_files", _number(value), {"state": state})
    total = _number(files.get("total"))
    if total is not None:
        w.family("batchalign_files_total_planned", "gauge", "Transcripts this run knows about.")
        w.sample("batchalign_files_total_planned", total)

    counts: dict[str, int] = {s: 0 for s in WORKER_STATES}
    for worker in status.get("workers") or ():
        state = str((worker or {}).get("state") or "unknown").lower()
        counts[state] = counts.get(state, 0) + 1
    w.family("batchalign_workers", "gauge", "Worker processes by lifecycle state.")
    for state, n in counts.items():
        w.sample("batchalign_workers", n, {"state": state})

    memory = status.get("memory") or {}
    for key, name, help_text in _MEMORY:
        value = _number(memory.get(key))
        if value is None:
            continue
        w.family(name, "gauge", help_text)
        w.sample(name, value * MIB)

    workers = [wk for wk in status.get("workers") or () if isinstance(wk, dict)]
    uss = [(wk, _number(wk.get("uss_mb"))) for wk in workers]
    if any(v is not None for _, v in uss):
        w.family("batchalign_worker_uss_bytes", "gauge", "Unique memory of each live worker.")
        for wk, v in uss:
            if v is not None:
                w.sample("batchalign_worker_uss_bytes", v * MIB, {"worker": wk.get("worker", ""), "pid": wk.get("pid", "")})

    for key, name, help_text in (
        ("audio_done_s", "batchalign_audio_done_seconds", "Seconds of audio aligned in this run."),
        ("audio_total_s", "batchalign_audio_planned_seconds", "Seconds of audio this run knows about."),
    ):
        value = _number(status.get(key))
        if value is not None:
            w.family(name, "gauge", help_text)
            w.sample(name, value)

    for key, name, help_text in (
        ("kills", "batchalign_kills_total", "Workers killed to stay within the memory budget."),
        ("pauses", "batchalign_pauses_total", "Workers paused (SIGSTOP) to let memory settle."),
    ):
        value = _number(status.get(key))
        w.family(name, "counter", help_text)
        w.sample(name, 0 if value is None else value)

    return "\n".join(w.lines) + "\n"


def write_textfile(path: str | Path, status: dict) -> Path:
    """Atomically replace ``path`` (a ``.prom`` file) for node_exporter's textfile collector.

    The temporary file lives in the same directory (so the rename is atomic) and does not end in
    ``.prom`` (so the collector never reads it half-written).
    """
    path = Path(path)
    # Readable by node_exporter, which usually runs as another user.
    atomic_write_bytes(path, render_prometheus(status).encode("utf-8"), mode=0o644)
    return path


class MetricsServer:
    """A minimal asyncio HTTP/1.1 endpoint: GET /metrics, 404 for anything else.

    Small on purpose: no framework dependency, one request per connection, bounded reads with a
    timeout so a stuck client cannot hold a task forever. ``host`` None or empty means 127.0.0.1: exposing the port is a decision.
    """

    MAX_REQUEST = 16 * 1024
    READ_TIMEOUT = 10.0

    def __init__(
        self,
        host: str | None,
        port: int,
        get_status: Callable[[], dict | Awaitable[dict]],
    ) -> None:
        self._get_status = get_status
        self.host = host or DEFAULT_HOST
        self._port = int(port)
        self._server: asyncio.base_events.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (the kernel's choice when 0 was asked for)."""
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self._port, limit=self.MAX_REQUEST, reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _status(self) -> dict:
        result = self._get_status()
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.READ_TIMEOUT)
            except asyncio.IncompleteReadError as exc:
                head = exc.partial
            except (asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                await self._respond(writer, 400, "Bad Request", b"bad request\n")
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) < 2:
                await self._respond(writer, 400, "Bad Request", b"bad request\n")
                return
            method, target = parts[0], parts[1]
            path = target.split("?", 1)[0]
            if path != "/metrics":
                await self._respond(writer, 404, "Not Found", b"not found; try /metrics\n")
                return
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, "Method Not Allowed", b"method not allowed\n", extra={"Allow": "GET, HEAD"})
                return
            try:
                body = render_prometheus(await self._status()).encode("utf-8")
            except Exception as exc:  # a broken snapshot must not kill the server
                await self._respond(writer, 500, "Internal Server Error", f"status unavailable: {exc}\n".encode())
                return
            await self._respond(writer, 200, "OK", body, content_type=CONTENT_TYPE, head_only=method == "HEAD")
        finally:
            try:
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        code: int,
        reason: str,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        head_only: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(extra or {}),
        }
        head = f"HTTP/1.1 {code} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            writer.write(head.encode("latin-1") + (b"" if head_only else body))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
