"""The Dask backend: each file a Dask task whose ``MEM`` resource request is its predicted peak.

One ``Client`` in the supervisor's event loop talks to an existing scheduler (``tcp://HOST:PORT``),
a ``LocalCluster`` of worker processes (``local``) or a dask-jobqueue ``SLURMCluster`` that this
backend scales (``slurm``, see ``slurm.py``). The scheduler packs files onto workers by their
request; each worker runs one file at a time (one thread), so a file that kills its worker can
only ever blame itself. ``allowed-failures`` is set to 0 on the scheduler: a worker that dies under
a file (nanny memory restart, ``kill -9``, a Slurm kill) fails that task at once and the run core,
not the scheduler, decides whether and with how much memory it runs again. What happened is told
as the seam's events; this module decides nothing about files.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, AsyncIterator, Callable

from supervisor.cluster import MEM, TOPIC_FILE, TOPIC_READY, ClusterUnavailable, require_distributed
from supervisor.backend import BackendEvent, FileProgress, JobSpec, WorkerExited
from supervisor.cluster.seam import ClusterFileError as FileError
from supervisor.cluster.seam import ClusterFileResult as FileResult
from supervisor.cluster.seam import ClusterFileStarted as FileStarted
from supervisor.cluster.seam import ClusterWorkerReady as WorkerReady

MiB = 2**20
# A worker lost under a file may have been restarted by its nanny for memory: that event can trail
# the task's failure by a moment, so the verdict waits this long for it.
MEMORY_EVENT_GRACE_S = 1.0
# The tasks one worker death fails all arrive within the grace: older losses are another death's.
LOSS_WINDOW_S = 3 * MEMORY_EVENT_GRACE_S
REFRESH_S = 0.5


class DaskBackend:
    name = "dask"

    def __init__(self, address: str, *, engine: str, options: dict[str, Any], run_id: str,
                 local_workers: int = 2, local_memory: int | None = None, slurm: Any = None,
                 emit: Callable[..., None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.engine = engine
        self.options = options
        self.run_id = run_id
        self.local_workers = local_workers
        self.local_memory = local_memory
        self.slurm_settings = slurm
        self.emit = emit or (lambda *a, **k: None)
        self.clock = clock
        self.client: Any = None
        self.cluster: Any = None
        self.slurm: Any = None  # SlurmPool
        self.queue: asyncio.Queue[BackendEvent] = asyncio.Queue()
        self.futures: dict[str, tuple[JobSpec, Any, asyncio.Task]] = {}
        self.running: dict[str, dict[str, Any]] = {}  # key -> started info (worker, pid, rss)
        self.by_file: dict[str, str] = {}  # file -> key of its current attempt
        self.memory_kills: dict[str, dict[str, Any]] = {}  # worker address / pid -> nanny restart event
        self.started_on: dict[str, str] = {}  # worker address -> key of the task it last started
        self.lost_on: dict[str, list[tuple[str, float]]] = {}  # worker address -> (key, when) failed as it died
        self.workers: dict[str, dict[str, Any]] = {}  # address -> ready info
        self._seq = 0
        self._closing = False
        self._sched_workers: dict[str, Any] = {}
        self.boot_errors: list[str] = []  # engines that could not load on a worker (the run halts)
        self.baselines: dict[str, float | None] = {}  # address -> READY RSS, kept after the worker left
        self._refresher: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        require_distributed()
        import dask
        from distributed import Client

        from supervisor.cluster.engine import EnginePlugin, engine_info, set_allowed_failures
        from supervisor.cluster.worker import dask_memory_config

        dask.config.set({**dask_memory_config(), "distributed.scheduler.allowed-failures": 0,
                         "distributed.admin.tick.limit": "10s"})
        target: Any = self.address
        try:
            if self.address == "local":
                target = self.cluster = await self._local_cluster()
            elif self.address == "slurm":
                from supervisor.cluster.slurm import SlurmPool

                self.slurm = SlurmPool(self.slurm_settings, emit=self.emit)
                target = self.cluster = await self.slurm.start()
            self.client = await Client(target, asynchronous=True, timeout="30s")
        except (OSError, TimeoutError, asyncio.TimeoutError, ValueError, RuntimeError) as exc:
            await self.close()
            raise ClusterUnavailable(f"cannot reach or start the Dask cluster {self.address!r}: "
                                     f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None
        previous = await self.client.run_on_scheduler(set_allowed_failures, n=0)
        self.emit("cluster_connected", scheduler=self.client.scheduler.address, cluster=self.address,
                  allowed_failures_was=previous)
        self.client.subscribe_topic(TOPIC_READY, self._on_ready)
        self.client.subscribe_topic(TOPIC_FILE, self._on_file)
        self.client.subscribe_topic("worker-restart-memory", self._on_memory_restart)
        self.client.subscribe_topic("all", self._on_cluster_event)
        await self.client.register_plugin(EnginePlugin(self.engine, self.options), name=EnginePlugin.name)
        await self._refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        infos = await self.client.run(engine_info)
        for addr, info in infos.items():
            if info:
                self._on_ready((time.time(), {**info, "worker": addr}))

    async def _local_cluster(self) -> Any:
        from distributed import LocalCluster

        from supervisor.cluster.engine import THREADS_ENV
        from supervisor.cluster.worker import _cores, default_memory_limit, offered_mb

        n = max(1, self.local_workers)
        limit = self.local_memory or default_memory_limit(n)
        threads = max(1, _cores() // n)
        return await LocalCluster(n_workers=n, threads_per_worker=1, processes=True, memory_limit=limit,
                                  resources={MEM: offered_mb(limit)}, host="127.0.0.1", dashboard_address=None,
                                  asynchronous=True, env={THREADS_ENV: str(threads)})

    async def _refresh(self) -> None:
        ident = await self.client.scheduler.identity(n_workers=-1)
        self._sched_workers = dict(ident.get("workers") or {})

    async def _refresh_loop(self) -> None:
        """The scheduler's view of its workers (resources, limits), a moment old at most."""
        while not self._closing:
            await asyncio.sleep(REFRESH_S)
            try:
                await self._refresh()
            except Exception:
                continue

    async def close(self) -> None:
        import logging

        self._closing = True
        if self._refresher is not None:
            self._refresher.cancel()
        # Tearing down our own scheduler makes it complain about the client it just lost.
        logging.getLogger("distributed").setLevel(logging.CRITICAL + 1)
        for _spec, fut, task in list(self.futures.values()):
            task.cancel()
        if self.client is not None:
            try:
                if self.futures:
                    await self.client.cancel([f for _s, f, _t in self.futures.values()], force=True)
            except Exception:
                pass
            try:
                await self.client.close(timeout=10)
            except Exception:
                pass
        if self.slurm is not None:
            await self.slurm.close()
        elif self.cluster is not None:
            try:
                await self.cluster.close(timeout=20)
            except Exception:
                pass
        self.futures.clear()

    # -- the seam ------------------------------------------------------------------------------------
    def spawn(self) -> None:
        """Workers come from the cluster; with Slurm the pool is scaled by ``wanted()``."""

    def assign(self, worker_id: str | None, job: JobSpec) -> None:
        from supervisor.cluster.engine import align_file

        self._seq += 1
        key = f"align-{self.run_id}-{self._seq}"
        request = max(1, math.ceil(job.predicted_peak_mb))
        spec = {"key": key, "file": job.file, "cha": job.cha, "media": job.media, "out": job.out,
                "engine": self.engine, "options": self.options}
        if self.slurm is not None:
            self.slurm.ensure(request, self.largest_offer_mb(live_only=True))
        fut = self.client.submit(align_file, spec, key=key, resources={MEM: request}, pure=False, retries=0)
        task = asyncio.get_running_loop().create_task(self._watch(key, job, fut))
        self.futures[key] = (job, fut, task)
        self.by_file[job.file] = key

    def signal(self, worker_id: str, action: str) -> None:
        """``kill``/``stop``: restart or retire that worker (a thread cannot be interrupted)."""
        if self.client is None:
            return
        loop = asyncio.get_running_loop()
        if action == "kill":
            loop.create_task(self._quiet(self.client.restart_workers([worker_id], raise_for_error=False)))
        elif action == "stop":
            loop.create_task(self._quiet(self.client.retire_workers([worker_id])))

    async def events(self) -> AsyncIterator[BackendEvent]:
        while True:
            yield await self.queue.get()

    # -- what the core may ask -----------------------------------------------------------------------
    def largest_offer_mb(self, live_only: bool = False) -> float | None:
        """The most MEM one worker offers (with Slurm: what the largest allowed job would)."""
        offers = [w["resources"].get(MEM, 0) for w in self._scheduler_workers().values()]
        live = max(offers) if offers else None
        if live_only or self.slurm is None:
            return live
        return max(live or 0, self.slurm.max_offer_mb())

    def worker_count(self) -> int:
        n = len(self._scheduler_workers())
        if self.slurm is not None:
            n = max(n, self.slurm.target_workers())
        return n

    def wanted(self, pending: int) -> None:
        """Slurm: keep enough standard jobs for what is waiting (never more than ``max_jobs``)."""
        if self.slurm is not None:
            self.slurm.scale_for(pending)

    def poll(self) -> None:
        if self.slurm is not None:
            busy = {info.get("worker") for info in self.running.values()}
            idle = [w.get("name") for addr, w in self._sched_workers.items()
                    if addr not in busy and not w.get("metrics", {}).get("task_counts", {}).get("executing")
                    and not w.get("processing")]
            self.slurm.poll([str(n) for n in idle if n is not None])

    def cancel(self, file: str) -> None:
        key = self.by_file.pop(file, None)
        if key and key in self.futures:
            _job, fut, task = self.futures.pop(key)
            task.cancel()
            asyncio.get_running_loop().create_task(self._quiet(fut.cancel(force=True)))

    def workers_view(self) -> list[dict[str, Any]]:
        out = []
        busy = {info.get("worker"): (k, info) for k, info in self.running.items()}
        for addr, w in self._scheduler_workers().items():
            key, info = busy.get(addr, (None, None))
            out.append({"worker": addr, "pid": (info or {}).get("pid") or self.workers.get(addr, {}).get("pid"),
                        "state": "busy" if key else "ready", "file": (info or {}).get("file"),
                        "mem_offered_mb": w["resources"].get(MEM), "memory_limit_mb": round(w.get("memory_limit", 0) / MiB),
                        "rss_mb": (info or {}).get("rss_mb")})
        return out

    # -- internals -----------------------------------------------------------------------------------
    def _scheduler_workers(self) -> dict[str, Any]:
        return self._sched_workers

    async def _quiet(self, aw: Any) -> None:
        try:
            await aw
        except Exception as exc:
            self.emit("cluster_call_failed", level="warning", error=f"{type(exc).__name__}: {exc}")

    def _on_ready(self, event: tuple) -> None:
        _ts, msg = event
        addr = msg.get("worker")
        if msg.get("boot_error"):
            self.emit("worker_boot_error", level="error", worker=addr, pid=msg.get("pid"), error=msg["boot_error"])
            self.boot_errors.append(f"workers cannot load the engine: {msg['boot_error']}")
            return
        self.workers[addr] = msg
        self.baselines[addr] = msg.get("baseline_rss_mb")
        self.queue.put_nowait(WorkerReady(worker_id=addr, pid=msg.get("pid"), baseline_mb=msg.get("baseline_rss_mb", 0.0),
                                          calibration=msg.get("calibration") or [], rss_mb=msg.get("baseline_rss_mb"),
                                          pss_mb=msg.get("baseline_pss_mb"), host=msg.get("host")))

    def _on_file(self, event: tuple) -> None:
        _ts, msg = event
        key = msg.get("key")
        if key not in self.futures:
            return  # a task of an earlier run (its supervisor was killed) still finishing on a worker
        job = self.futures[key][0]
        if msg.get("phase") == "started":
            self.running[key] = dict(msg)
            self.started_on[msg["worker"]] = key
            self.queue.put_nowait(FileStarted(worker_id=msg["worker"], file=job.file, pid=msg.get("pid")))
        else:
            info = self.running.setdefault(key, dict(msg))
            # The high-water mark so far: what a lost attempt is known to have needed at least.
            info["peak_rss_mb"] = max(info.get("peak_rss_mb") or 0.0, msg.get("peak_rss_mb") or 0.0)
            self.queue.put_nowait(FileProgress(worker_id=msg["worker"], file=job.file, progress={
                k: msg.get(k) for k in ("fraction", "rss_mb", "spans_done", "spans_total", "growth_mb")}))

    def _on_memory_restart(self, event: tuple) -> None:
        _ts, msg = event
        rec = {"rss_mb": (msg.get("rss") or 0) / MiB, "worker": msg.get("worker"), "pid": msg.get("pid")}
        for k in (msg.get("worker"), str(msg.get("pid"))):
            if k:
                self.memory_kills[k] = rec

    def _on_cluster_event(self, event: tuple) -> None:
        _ts, msg = event
        if msg.get("action") == "add-worker":
            asyncio.get_running_loop().create_task(self._quiet(self._refresh()))
        if msg.get("action") == "remove-worker":
            self._sched_workers.pop(msg.get("worker"), None)
            addr = msg.get("worker")
            info = self.workers.pop(addr, {}) if addr else {}
            kill = self.memory_kills.get(addr or "")
            reason = "nanny memory restart" if kill else ("retired" if msg.get("expected") else "worker lost")
            self.queue.put_nowait(WorkerExited(worker_id=addr, pid=info.get("pid"), exitcode=None,
                                               signal=None, reason=reason))

    async def _watch(self, key: str, job: JobSpec, fut: Any) -> None:
        from distributed.scheduler import KilledWorker

        try:
            r = await fut
        except asyncio.CancelledError:
            return
        except KilledWorker as exc:
            last = getattr(getattr(exc, "last_worker", None), "address", None)
            if last:
                now = self.clock()
                earlier = [(k, t) for k, t in self.lost_on.get(last, []) if t >= now - LOSS_WINDOW_S]
                self.lost_on[last] = earlier + [(key, now)]
            await asyncio.sleep(MEMORY_EVENT_GRACE_S)
            await self._lost(key, job, exc)
            return
        except Exception as exc:
            started = self.running.pop(key, {})
            self._forget(key)
            self.queue.put_nowait(FileError(worker_id=started.get("worker"), file=job.file, pid=started.get("pid"),
                                            reason=f"{job.cha}: task failed: {type(exc).__name__}: {exc}"[:2000],
                                            kind="crash"))
            return
        self.running.pop(key, None)
        self._forget(key)
        if "error" in r:
            self.queue.put_nowait(FileError(worker_id=r.get("worker"), file=job.file, pid=r.get("pid"),
                                            reason=r["error"], kind=r.get("kind", "crash"),
                                            observed_mb=r.get("peak_rss_mb"), baseline_mb=r.get("baseline_rss_mb")))
            return
        self.queue.put_nowait(FileResult(
            worker_id=r.get("worker"), file=job.file, peak_mb=r.get("peak_rss_mb", 0.0), growth_mb=r.get("growth_mb", 0.0),
            wall_s=r.get("wall_s"), cpu_s=r.get("cpu_s"), features_run=r.get("features_run"),
            warnings=r.get("warnings") or [], output=r.get("output", job.out), pid=r.get("pid"),
            baseline_mb=r.get("baseline_rss_mb"), audio_seconds=r.get("audio_seconds"), stats=r.get("stats")))

    def _ran_there(self, key: str, addr: str | None) -> bool:
        """Whether this task is the one the dead worker was executing, not one queued behind it.

        A worker runs one task at a time, so the one it last reported starting is the culprit and
        every other task the scheduler had placed on it is a bystander (Dask fails them all, with
        ``allowed-failures`` at 0). When no start reached us (the worker died at once), the worker
        had picked the earliest submitted of them, as Dask runs a worker's tasks in priority order."""
        if self.running.get(key, {}).get("worker") == addr:
            return True
        recent = self.clock() - LOSS_WINDOW_S
        lost = [k for k, t in self.lost_on.get(addr or "", []) if t >= recent]
        culprit = self.started_on.get(addr or "")
        if culprit is not None and (culprit in self.futures or culprit in lost):
            return culprit == key
        return not lost or min(lost, key=_submitted) == key

    async def _lost(self, key: str, job: JobSpec, exc: Exception) -> None:
        last = getattr(exc, "last_worker", None)
        started = self.running.get(key, {})
        addr = started.get("worker") or getattr(last, "address", None)
        culprit = self._ran_there(key, addr)
        self.running.pop(key, None)
        self._forget(key)
        if not culprit:
            # Queued on a worker that died under another file: no attempt of this file ran.
            self.queue.put_nowait(FileError(worker_id=addr, file=job.file, pid=None, kind="lost",
                                            reason=f"worker {addr} died under another file", bystander=True))
            return
        kill = self.memory_kills.get(str(started.get("pid"))) or self.memory_kills.get(addr or "")
        if kill:
            self.queue.put_nowait(FileError(worker_id=addr, file=job.file, pid=started.get("pid") or kill.get("pid"),
                                            reason=f"nanny memory restart at {kill['rss_mb']:.0f} MiB",
                                            kind="memory", observed_mb=kill["rss_mb"],
                                            baseline_mb=self.baselines.get(addr or "") or started.get("rss_mb")))
            return
        observed = started.get("peak_rss_mb") or started.get("rss_mb")
        baseline = self.baselines.get(addr or "")
        where = await self.slurm.describe_loss(addr) if self.slurm is not None and addr else None
        self.queue.put_nowait(FileError(worker_id=addr, file=job.file, pid=started.get("pid") or None,
                                        reason=f"worker {addr} lost while aligning ({where or 'killed or crashed'})",
                                        kind="memory" if where and "OUT_OF_MEMORY" in where else "lost",
                                        observed_mb=observed, baseline_mb=baseline))

    def _forget(self, key: str) -> None:
        entry = self.futures.pop(key, None)
        if entry is not None and self.by_file.get(entry[0].file) == key:
            del self.by_file[entry[0].file]


def _submitted(key: str) -> int:
    """A task's submission order, from its key (``align-RUN-SEQ``)."""
    return int(key.rsplit("-", 1)[1])
