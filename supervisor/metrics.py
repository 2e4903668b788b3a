"""Prometheus exposition of the supervisor's status snapshot, through ``prometheus_client``.

Two ways out, both drawn from the same ``Supervisor.status()`` dict: ``prometheus_client``'s HTTP
server for a Prometheus that scrapes this host, and its textfile writer for node_exporter's
textfile collector where opening a port is not wanted. A custom collector turns one snapshot into
metric families at scrape time. Memory figures in the snapshot are MiB; Prometheus convention is
base units, so they are exported as bytes.

The HTTP server answers from its own thread; the snapshot is still taken on the event loop (the
scrape waits for it), so the loop stays the one owner of the state it reports.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from supervisor.control import snapshot_of

__all__ = ["CONTENT_TYPE", "DEFAULT_HOST", "MetricsServer", "StatusCollector", "render_prometheus", "write_textfile"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what the server answers a scraper that asks for nothing newer
MIB = 1024 * 1024
DEFAULT_HOST = "127.0.0.1"
SCRAPE_TIMEOUT_S = 5.0

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


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _gauge(name: str, help_text: str, value: float | None = None, labels: list[str] | None = None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_text, labels=labels)
    if value is not None:
        g.add_metric([], value)
    return g


def families(status: dict) -> Iterator[Metric]:
    """The metric families of one status snapshot; absent figures are left out, not zeroed."""
    status = status or {}
    yield _gauge("batchalign_up", "1 while the supervisor is running and answering.", 1)
    if status.get("run") is not None:
        info = _gauge("batchalign_run_info", "Identity of the running supervisor; the value is always 1.",
                      labels=["run", "pid"])
        info.add_metric([str(status["run"]), str(status.get("pid", ""))], 1)
        yield info
    uptime = _number(status.get("uptime_s"))
    if uptime is not None:
        yield _gauge("batchalign_uptime_seconds", "Seconds since the supervisor started.", uptime)
    if status.get("draining") is not None:
        yield _gauge("batchalign_draining", "1 while the supervisor is draining (no new files admitted).",
                     1 if status["draining"] else 0)
    yield from _file_families(status.get("files") or {})
    yield _worker_states(status.get("workers") or ())
    yield from _memory_families(status)
    yield from _vram_families(status.get("vram"), status.get("workers") or ())
    for key, name, help_text in (
        ("audio_done_s", "batchalign_audio_done_seconds", "Seconds of audio aligned in this run."),
        ("audio_total_s", "batchalign_audio_planned_seconds", "Seconds of audio this run knows about."),
    ):
        value = _number(status.get(key))
        if value is not None:
            yield _gauge(name, help_text, value)
    for key, name, help_text in (
        ("kills", "batchalign_kills", "Workers killed to stay within the memory budget."),
        ("pauses", "batchalign_pauses", "Workers paused (SIGSTOP) to let memory settle."),
    ):
        c = CounterMetricFamily(name, help_text)  # exposed as <name>_total
        c.add_metric([], _number(status.get(key)) or 0)
        yield c


def _file_families(files: dict) -> Iterator[Metric]:
    g = GaugeMetricFamily("batchalign_files", "Transcripts in this run by state.", labels=["state"])
    for state in FILE_STATES:
        g.add_metric([state], _number(files.get(state)) or 0)
    for state, value in files.items():
        if state not in FILE_STATES and state != "total" and _number(value) is not None:
            g.add_metric([str(state)], _number(value))
    yield g
    total = _number(files.get("total"))
    if total is not None:
        yield _gauge("batchalign_files_total_planned", "Transcripts this run knows about.", total)


def _worker_states(workers: Any) -> Metric:
    counts: dict[str, int] = {s: 0 for s in WORKER_STATES}
    for worker in workers:
        state = str((worker or {}).get("state") or "unknown").lower()
        counts[state] = counts.get(state, 0) + 1
    g = GaugeMetricFamily("batchalign_workers", "Worker processes by lifecycle state.", labels=["state"])
    for state, n in counts.items():
        g.add_metric([state], n)
    return g


def _memory_families(status: dict) -> Iterator[Metric]:
    memory = status.get("memory") or {}
    for key, name, help_text in _MEMORY:
        value = _number(memory.get(key))
        if value is not None:
            yield _gauge(name, help_text, value * MIB)
    workers = [w for w in status.get("workers") or () if isinstance(w, dict) and _number(w.get("uss_mb")) is not None]
    if workers:
        g = GaugeMetricFamily("batchalign_worker_uss_bytes", "Unique memory of each live worker.",
                              labels=["worker", "pid"])
        for w in workers:
            g.add_metric([str(w.get("worker", "")), str(w.get("pid", ""))], _number(w["uss_mb"]) * MIB)
        yield g


_VRAM = (
    ("used_mb", "batchalign_vram_used_bytes", "GPU memory the workers hold now (NVML)."),
    ("budget_mb", "batchalign_vram_budget_bytes", "GPU memory the pool may use: the device less its reserve, or --vram-budget."),
    ("total_mb", "batchalign_vram_total_bytes", "GPU memory of the devices the run uses."),
    ("free_mb", "batchalign_vram_free_bytes", "Free memory on those devices (NVML)."),
    ("committed_mb", "batchalign_vram_committed_bytes", "GPU memory in use plus what running files are predicted to add."),
)


def _vram_families(vram: dict | None, workers: Any) -> Iterator[Metric]:
    """VRAM beside host memory; only on a run with a GPU (the status then has a ``vram`` part)."""
    if not vram:
        return
    for key, name, help_text in _VRAM:
        value = _number(vram.get(key))
        if value is not None:
            yield _gauge(name, help_text, value * MIB)
    c = CounterMetricFamily("batchalign_cuda_oom", "Files that ran out of GPU memory (retried with more).")
    c.add_metric([], _number(vram.get("ooms")) or 0)
    yield c
    held = [w for w in workers if isinstance(w, dict) and _number(w.get("vram_mb")) is not None]
    if held:
        g = GaugeMetricFamily("batchalign_worker_vram_bytes", "GPU memory of each live worker.", labels=["worker", "pid"])
        for w in held:
            g.add_metric([str(w.get("worker", "")), str(w.get("pid", ""))], _number(w["vram_mb"]) * MIB)
        yield g


class StatusCollector:
    """A ``prometheus_client`` collector whose metrics are one status snapshot, taken per scrape."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from families(self._snapshot())


def _registry(snapshot: Callable[[], dict]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(snapshot))
    return registry


def render_prometheus(status: dict) -> str:
    """The text exposition of one status snapshot."""
    return generate_latest(_registry(lambda: status)).decode("utf-8")


def write_textfile(path: str | Path, status: dict) -> Path:
    """Atomically replace ``path`` (a ``.prom`` file) for node_exporter's textfile collector;
    ``prometheus_client`` writes a temporary file beside it and renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), _registry(lambda: status))
    path.chmod(0o644)  # readable by node_exporter, which usually runs as another user
    return path


class MetricsServer:
    """``prometheus_client``'s HTTP server on ``host:port`` (``/metrics``), serving live snapshots.

    ``host`` None or empty means 127.0.0.1: exposing the port is a decision.
    """

    def __init__(self, host: str | None, port: int,
                 get_status: Callable[[], dict | Awaitable[dict]]) -> None:
        self._get_status = get_status
        self.host = host or DEFAULT_HOST
        self._port = int(port)
        self._server: Any = None
        self._thread: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        """The bound port (the kernel's choice when 0 was asked for)."""
        return self._server.server_port if self._server is not None else self._port

    def _snapshot(self) -> dict:
        """Called in the HTTP thread: the loop takes the snapshot, this thread waits for it."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(snapshot_of(self._get_status), self._loop)
        return future.result(timeout=SCRAPE_TIMEOUT_S)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server, self._thread = await asyncio.to_thread(
            start_http_server, self._port, self.host, _registry(self._snapshot))

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()
