"""A run on a Dask cluster: the run core's parts (intake, queue, estimator, outcomes, telemetry
sink, publisher) with the Dask backend standing where the local backend stands.

Planning (manifest skips, media checks, features, stored lower bounds), the queue's attempts and
quarantine, the manifests, the telemetry store and the log events are the run core's own (built by
``Supervisor.__init__`` and driven here, not copied). What differs is admission: the local memory
policy decides which local worker takes which file; here each pending file is submitted with its
predicted peak as its ``MEM`` request and the scheduler packs, and a file whose request no worker
can hold fails (first attempt) or is quarantined (after a kill) with both figures. A memory restart
or a lost worker is a lower bound on the file's peak, never a sample.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


from supervisor.backend import NOT_RETRIED, FileProgress, FileResult, FileStarted, JobSpec, WorkerExited, WorkerReady
from supervisor.cluster import ClusterUnavailable
from supervisor.cluster.backend import DaskBackend
from supervisor.cluster.seam import ClusterFileError
from supervisor.outcomes import Outcome
from supervisor.publish import status_header
from supervisor.queue import FileJob, FileState
from supervisor.supervisor import SIDE_JOBS_WAIT_S, RunSummary, Supervisor, engine_options

TICK_S = 0.25


class ClusterSupervisor(Supervisor):
    """The run loop for ``--cluster``: submit by request, then turn the backend's events into outcomes."""

    def __init__(self, settings: Any, **kw: Any) -> None:
        super().__init__(settings, **kw)
        self.dask: DaskBackend | None = None
        self.cluster_workers: dict[str, dict[str, Any]] = {}
        self.where: dict[str, dict[str, Any]] = {}  # file -> {request, submitted, worker, pid, started, progress}
        self.timed_out: set[str] = set()
        self._kills = 0

    @property
    def kills(self) -> int:
        return self._kills

    @property
    def pauses(self) -> int:
        return 0  # a Dask task cannot be paused; the scheduler packs by request instead

    # -- the run -----------------------------------------------------------------------------------------
    async def run(self, candidates: list) -> RunSummary:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.inbox.put_nowait, ("signal", sig))
        c = self.s.cluster
        self.emit("run_started", corpus=[str(p) for p in self.s.corpus], out=str(self.s.out) if self.s.out else None,
                  engine=self.key[0], model=self.key[1], device=self.key[2], backend="dask", cluster=c.address,
                  limit_mb=None, budget_mb=None, reserve_mb=None, limit_source="cluster", files=len(candidates),
                  pid=os.getpid(), supervisor_cpu_s=round(time.process_time(), 3))
        self.sink.start_run(self.run_id, ",".join(str(p) for p in self.s.corpus), self.s.to_dict())
        options = engine_options(self.s, 1)
        options["threads"] = self.s.engine_settings.threads  # 0: each worker uses cores / its workers
        self.dask = self.backend = DaskBackend(
            c.address, engine=self.key[0], options=options, run_id=self.run_id,
            local_workers=c.local_workers or self.s.max_workers(), local_memory=c.local_memory, slurm=c.slurm,
            emit=self.emit, clock=self.clock)
        pump = None
        try:
            try:
                await self.dask.start()
            except ClusterUnavailable as exc:
                self.halted = str(exc)
                self.emit("run_halted", level="error", reason=self.halted)
            else:
                pump = loop.create_task(self._pump(), name="backend-events")
                self.intake.start_planning(candidates)
                await self._cluster_loop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if pump is not None:
                pump.cancel()
            for job in self.queue.in_state(FileState.RUNNING):
                self.dask.cancel(job.rel)
                self.queue.requeue(job, "supervisor stopping")
            await self.dask.close()
        result, summary = self._finish()
        self.sink.finish(self.run_id, self.estimator.params(), summary)
        if not await self.jobs.drain(SIDE_JOBS_WAIT_S):
            self.emit("side_jobs_abandoned", level="warning", after_s=SIDE_JOBS_WAIT_S)
        return result

    async def _cluster_loop(self) -> None:
        while True:
            try:
                ev = await asyncio.wait_for(self.inbox.get(), TICK_S)
            except asyncio.TimeoutError:
                ev = None
            if ev is not None:
                self._guarded("event", self._cluster_handle, ev)
                while not self.inbox.empty():
                    self._guarded("event", self._cluster_handle, self.inbox.get_nowait())
            if self.stop_now or self.halted:
                return
            now = self.now()
            if not self.draining:
                self.intake.scan(now)
            self.estimator.refresh(now)
            self._guarded("timeouts", self._check_timeouts, now)
            self._guarded("submit", self._submit)
            self.dask.poll()
            self._guarded("publish", self._cluster_publish, now)
            running = self.queue.in_state(FileState.RUNNING)
            if self.draining and (not running or (self.drain_deadline is not None and now > self.drain_deadline)):
                return
            if (not running and self.intake.watcher is None and not self.intake.planning
                    and not self.queue.in_state(FileState.PENDING)):
                return

    # -- admission: the scheduler packs by request ------------------------------------------------------
    def _submit(self) -> None:
        if self.draining or self.stop_now:
            return
        b = self.dask
        running = len(self.queue.in_state(FileState.RUNNING))
        pending = self.queue.pending()
        b.wanted(len(pending) + running)
        if not self.ready_once:
            # Requests are peaks with a Dask worker's own baseline in them (and its probe spans):
            # nothing can run before a worker exists anyway, so wait for the first one's figures.
            if b.boot_errors:
                self.halted = b.boot_errors[0]
                self.emit("run_halted", level="error", reason=self.halted)
            return
        window = max(1, b.worker_count()) + 1  # a little queued at the scheduler; later files get newer estimates
        largest = b.largest_offer_mb()
        for job in pending:
            if running >= window:
                break
            e = job.estimate or self.estimator.estimate(job)
            if largest and e.central_mb > largest:
                if job.attempts:
                    reason = (f"needs ~{e.central_mb:.0f} MiB after an attempt cut short at "
                              f"{job.lower_bound_mb or 0:.0f} MiB; the largest worker offers {largest:.0f} MiB")
                else:
                    reason = f"needs ~{e.central_mb:.0f} MiB, the largest worker offers {largest:.0f} MiB"
                self.outcomes.reject(job, reason)
                continue
            request = min(e.peak_mb, largest) if largest else e.peak_mb
            self.queue.start(job, "dask")
            self.outcomes.started(job)
            info = job.info
            self.where[job.rel] = {"request": request, "submitted": self.now()}
            self.emit("file_admitted", worker=None, pid=None, file=job.rel, predicted_mb=round(request, 1),
                      predicted_growth_mb=round(e.growth_mb, 1), estimate_source=e.source,
                      estimate_uncertain=e.uncertain, audio_seconds=info.audio_seconds, attempt=job.attempts,
                      reason="submitted with MEM request", request_mb=round(request, 1),
                      largest_offer_mb=largest and round(largest, 1))
            b.assign(None, JobSpec(file=job.rel, cha=os.path.abspath(info.path),
                                   media=os.path.abspath(info.media) if info.media else None,
                                   out=os.path.abspath(info.out), options={}, attempt=job.attempts,
                                   predicted_peak_mb=request, predicted_growth_mb=e.growth_mb,
                                   job_id=f"{job.rel}#{job.attempts}"))
            running += 1

    def _check_timeouts(self, now: float) -> None:
        for job in self.queue.in_state(FileState.RUNNING):
            w = self.where.get(job.rel) or {}
            started = w.get("started")
            if started is None or job.rel in self.timed_out:
                continue
            limit = self.s.run.file_timeout + self.s.run.file_timeout_per_audio_second * (job.info.audio_seconds or 0)
            if now - started > limit and w.get("worker"):
                self.timed_out.add(job.rel)
                self._kills += 1
                self.emit("worker_killed", level="warning", worker=w["worker"], pid=w.get("pid"), file=job.rel,
                          reason=f"file timeout after {limit:.0f} s")
                self.dask.signal(w["worker"], "kill")

    # -- outcomes ----------------------------------------------------------------------------------------
    def _cluster_handle(self, ev: Any) -> None:
        if isinstance(ev, tuple) and ev[0] == "signal":
            self._on_signal(ev[1])
        elif isinstance(ev, WorkerReady):
            self.cluster_workers[ev.worker_id] = {"pid": ev.pid, "baseline_mb": ev.baseline_mb,
                                                  "host": getattr(ev, "host", None), "since": self.now()}
            before = self.estimator.baseline_mb
            # The RSS at READY: a Dask worker's nanny restarts it on RSS, so requests are RSS peaks.
            self.estimator.learn_baseline(ev.baseline_mb, ev.calibration)
            if abs(self.estimator.baseline_mb - before) >= 1.0:
                for job in self.queue.in_state(FileState.PENDING):
                    self.estimator.estimate(job)
            self.emit("worker_ready", worker=ev.worker_id, pid=ev.pid, baseline_mb=round(ev.baseline_mb, 1),
                      host=getattr(ev, "host", None))
            if not self.ready_once:
                self.ready_once = True
                self.notifier.ready()
        elif isinstance(ev, WorkerExited):
            self.cluster_workers.pop(ev.worker_id, None)
            self.emit("worker_exited", level="info" if ev.reason == "retired" else "warning", worker=ev.worker_id,
                      pid=ev.pid, exitcode=ev.exitcode, signal=ev.signal, reason=ev.reason)
        elif isinstance(ev, FileStarted):
            job = self._running(ev.file)
            if job is not None:
                pid = getattr(ev, "pid", None)
                self.where.setdefault(ev.file, {}).update(worker=ev.worker_id, pid=pid, started=self.now())
                self.emit("file_started", worker=ev.worker_id, pid=pid, file=ev.file)
        elif isinstance(ev, FileProgress):
            w = self.where.get(ev.file)
            if w is not None:
                w["progress"] = ev.progress
        elif isinstance(ev, FileResult):
            self._cluster_result(ev)
        elif isinstance(ev, ClusterFileError):
            self._cluster_error(ev)

    ready_once = False

    def _drain_workers(self) -> None:
        """Dask workers are the cluster's: a drain only stops submitting."""

    def _running(self, file: str) -> FileJob | None:
        job = self.queue.get(file)
        return job if job is not None and job.state is FileState.RUNNING else None

    def _cluster_result(self, ev: Any) -> None:
        job = self._running(ev.file)
        if job is None:
            return
        where = self.where.pop(ev.file, {})
        info = job.info
        if not Path(info.out).exists():
            self._cluster_error(ClusterFileError(
                worker_id=ev.worker_id, file=ev.file, pid=ev.pid, kind="bad_input",
                reason=(f"{info.out}: written by worker {ev.worker_id} but not visible here; the output folder must "
                        "be on a filesystem shared with the workers, at the same path")), where)
            return
        w = SimpleNamespace(id=ev.worker_id, pid=ev.pid, baseline_pss_mb=ev.baseline_mb)
        growth = ev.growth_mb or 0.0
        self.outcomes.apply(Outcome(job, w, "done", growth_mb=growth, peak_mb=ev.peak_mb, result=ev))

    def _cluster_error(self, ev: ClusterFileError, where: dict | None = None) -> None:
        job = self._running(ev.file)
        if job is None:
            return
        where = where if where is not None else self.where.pop(ev.file, {})
        kind = "timeout" if ev.file in self.timed_out and ev.kind == "lost" else ev.kind
        self.timed_out.discard(ev.file)
        if kind == "boot":
            self.queue.requeue(job, ev.reason)
            self.halted = ev.reason
            self.emit("run_halted", level="error", reason=ev.reason)
            return
        if kind == "lost" and ev.bystander:
            # Queued on a worker that died under another file: not this file's doing, no attempt spent.
            self.queue.requeue(job, ev.reason)
            self.emit("file_requeued", file=job.rel, reason=f"{ev.reason}; it had not started there",
                      attempt=job.attempts, estimate_mb=round(job.estimate.peak_mb, 1) if job.estimate else None,
                      observed_mb=None)
            return
        observed, baseline = ev.observed_mb, ev.baseline_mb
        growth = max(0.0, observed - baseline) if observed is not None and baseline is not None else None
        w = SimpleNamespace(id=ev.worker_id, pid=ev.pid, baseline_pss_mb=baseline)
        if kind == "memory":
            self._kills += 1
            self.emit("worker_killed", level="warning", worker=ev.worker_id, pid=ev.pid, file=job.rel,
                      reason=ev.reason, rss_mb=observed and round(observed, 1),
                      predicted_mb=where.get("request") and round(where["request"], 1))
        # Cut short by memory, or lost with a known high-water mark: a lower bound, never a sample.
        censored = kind in ("memory", "lost") and observed is not None
        outcome = {"memory": "killed", "timeout": "timeout", "bad_input": "failed", "output": "failed"}.get(kind, "crashed")
        self.outcomes.apply(Outcome(job, w, outcome, ev.reason, growth, observed, retry=kind not in NOT_RETRIED,
                                    memory=censored, kind=kind))

    # -- publishing ----------------------------------------------------------------------------------
    def _cluster_publish(self, now: float) -> None:
        view = self.dask.workers_view()
        self.publisher.tick(now, status=self.status, sample=lambda: self._cluster_memory(view),
                            interval=self.s.memory.sample_log_interval, busy=bool(self.where),
                            counts=self.queue.counts())

    def _cluster_memory(self, view: list[dict]) -> dict[str, Any]:
        offered = float(sum(v.get("mem_offered_mb") or 0 for v in view))
        used = float(sum((w.get("progress") or {}).get("rss_mb") or 0.0 for w in self.where.values()))
        return {"used_mb": round(used, 1), "budget_mb": round(offered, 1), "limit_mb": round(offered, 1),
                "committed_mb": round(sum(w.get("request", 0) for w in self.where.values()), 1),
                "available_mb": None, "workers": view}

    def status(self) -> dict[str, Any]:
        now = self.now()
        c = self.queue.counts()
        view = self.dask.workers_view() if self.dask is not None else []
        by_worker = {w["worker"]: (f, w) for f, w in self.where.items() if w.get("worker")}
        workers = []
        for v in view:
            f, w = by_worker.get(v["worker"], (None, {}))
            workers.append({"worker": v["worker"], "pid": v.get("pid"), "state": "busy" if f else "ready", "file": f,
                            "uss_mb": (w.get("progress") or {}).get("rss_mb") or 0.0, "pss_mb": 0.0,
                            "predicted_mb": w.get("request") and round(w["request"], 1),
                            "mem_offered_mb": v.get("mem_offered_mb"),
                            "progress": (w.get("progress") or {}).get("fraction"),
                            "since_s": round(now - w["started"], 1) if w.get("started") else 0.0})
        mem = {k: v for k, v in self._cluster_memory(view).items() if k != "workers"}
        return {
            **status_header(self.run_id, self.wall0, now - self.t0, self.draining),
            "cluster": self.s.cluster.address, "memory": mem,
            "files": {k: c[k] for k in ("pending", "running", "done", "failed", "quarantined", "skipped", "total")},
            "planning": {"planned": self.intake.planned, "files": self.intake.total} if self.intake.planning else None,
            "audio_done_s": round(self.outcomes.audio_done_s, 1),
            "audio_total_s": round(sum(j.info.audio_seconds or 0 for j in self.queue
                                       if j.state is not FileState.SKIPPED), 1),
            "kills": self.kills, "pauses": 0, "workers": workers,
            "queue": [{"file": j.rel, "predicted_mb": round(j.estimate.peak_mb, 1) if j.estimate else None,
                       "attempts": j.attempts} for j in self.queue.pending()[:20]],
        }
