"""A run on a Dask cluster: the local run's planning, outcomes and telemetry, with the Dask backend
standing where the process pool stands.

Planning (manifest skips, media checks, estimates and stored lower bounds), the queue's attempts and
quarantine, the manifest, the telemetry store and the log events are the local supervisor's own
(inherited, not copied). What differs is admission: instead of the local memory policy, each pending
file is submitted with its predicted peak as its ``MEM`` request and the scheduler packs; a file
whose request no worker can hold fails (first attempt) or is quarantined (after a kill) with both
figures. A memory restart or a lost worker is a lower bound on the file's peak, never a sample.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from supervisor.cluster import ClusterUnavailable
from supervisor.cluster.backend import DaskBackend
from supervisor.cluster.seam import FileError, FileProgress, FileResult, FileStarted, JobSpec, WorkerExited, WorkerReady
from supervisor.queue import FileJob, FileState
from supervisor.supervisor import MiB, REESTIMATE_S, RunSummary, Supervisor, engine_options

TICK_S = 0.25


class ClusterSupervisor(Supervisor):
    """The run loop for ``--cluster``: submit, then turn the backend's events into outcomes."""

    def __init__(self, settings: Any, **kw: Any) -> None:
        super().__init__(settings, **kw)
        self.backend: DaskBackend | None = None
        self.cluster_workers: dict[str, dict[str, Any]] = {}
        self.where: dict[str, dict[str, Any]] = {}  # file -> {worker, pid, started, request}
        self.timed_out: set[str] = set()

    # -- the run -----------------------------------------------------------------------------------------
    async def run(self, infos: list) -> RunSummary:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.events.put_nowait, ("signal", sig))
        self.plan(infos)
        counts = self.queue.counts()
        c = self.s.cluster
        self.emit("run_started", corpus=[str(p) for p in self.s.corpus], out=str(self.s.out) if self.s.out else None,
                  engine=self.s.engine_name, model=self.s.model_id, device=self.s.run.device, backend="dask",
                  cluster=c.address, limit_mb=None, budget_mb=None, reserve_mb=None, limit_source="cluster",
                  files=counts["total"], pending=counts["pending"], skipped=counts["skipped"], pid=os.getpid(),
                  supervisor_cpu_s=round(time.process_time(), 3))
        if self.store is not None:
            self.store.start_run(self.run_id, corpus=",".join(str(p) for p in self.s.corpus),
                                 engine=self.s.engine_name, model=self.s.model_id, device=self.s.run.device,
                                 settings=self.s.to_dict())
        options = engine_options(self.s, 1)
        options["threads"] = self.s.engine_settings.threads  # 0: each worker uses cores / its workers
        self.backend = DaskBackend(c.address, engine=self.s.engine_name, options=options, run_id=self.run_id,
                                   local_workers=c.local_workers or self.s.max_workers(),
                                   local_memory=c.local_memory, slurm=c.slurm, emit=self.emit, clock=self.clock)
        pump = None
        try:
            try:
                await self.backend.start()
            except ClusterUnavailable as exc:
                self.halted = str(exc)
                self.emit("run_halted", level="error", reason=self.halted)
            else:
                pump = loop.create_task(self._pump())
                await self._cluster_loop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if pump is not None:
                pump.cancel()
            for job in self.queue.in_state(FileState.RUNNING):
                self.backend.cancel(job.rel)
                self.queue.requeue(job, "supervisor stopping")
            await self.backend.close()
        return self._finish()

    async def _pump(self) -> None:
        async for ev in self.backend.events():
            self.events.put_nowait(ev)

    async def _cluster_loop(self) -> None:
        while True:
            try:
                ev = await asyncio.wait_for(self.events.get(), TICK_S)
            except asyncio.TimeoutError:
                ev = None
            if ev is not None:
                await self._cluster_handle(ev)
                while not self.events.empty():
                    await self._cluster_handle(self.events.get_nowait())
            if self.stop_now or self.halted:
                return
            now = self.now()
            if self.watcher is not None and not self.draining:
                for info in self.watcher.poll(now):
                    self._add_watched(info)
            if self._model_changed and now - self._reestimated_at >= REESTIMATE_S:
                self._model_changed = False
                self._reestimated_at = now
                self.reestimate_pending()
            self._check_timeouts(now)
            self._submit()
            self.backend.poll()
            self._cluster_publish(now)
            running = self.queue.in_state(FileState.RUNNING)
            if self.draining and (not running or (self.drain_deadline is not None and now > self.drain_deadline)):
                return
            if not running and self.watcher is None and not self.queue.in_state(FileState.PENDING):
                return

    # -- admission: the scheduler packs by request ------------------------------------------------------
    def _submit(self) -> None:
        if self.draining or self.stop_now:
            return
        b = self.backend
        running = len(self.queue.in_state(FileState.RUNNING))
        pending = self.queue.pending()
        b.wanted(len(pending) + running)
        if not self.cluster_workers:
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
            e = job.estimate
            if e is None:
                continue
            if largest:
                if job.attempts and e.peak_mb > largest:
                    reason = (f"needs ~{e.peak_mb:.0f} MiB after an attempt cut short at "
                              f"{job.lower_bound_mb or 0:.0f} MiB; the largest worker offers {largest:.0f} MiB")
                    self.queue.quarantine(job, reason)
                    self.emit("file_quarantined", level="warning", file=job.rel, reason=reason, attempts=job.attempts,
                              observed_mb=job.last_peak_mb and round(job.last_peak_mb, 1))
                    self._remember_failure(job)
                    continue
                if e.central_mb > largest:
                    reason = f"needs ~{e.central_mb:.0f} MiB, the largest worker offers {largest:.0f} MiB"
                    self.queue.fail(job, reason, retry=False)
                    self.emit("file_failed", level="warning", file=job.rel, reason=reason, kind="too_big", attempt=0)
                    self._remember_failure(job)
                    continue
            request = min(e.peak_mb, largest) if largest else e.peak_mb
            self.queue.start(job, "dask")
            info = job.info
            self.where[job.rel] = {"request": request, "submitted": self.now()}
            self._job_started_wall[job.rel] = time.time()
            self.emit("file_admitted", worker=None, pid=None, file=job.rel, predicted_mb=round(request, 1),
                      predicted_growth_mb=round(e.growth_mb, 1), estimate_source=e.source,
                      audio_seconds=info.audio_seconds, attempt=job.attempts, reason="submitted with MEM request",
                      request_mb=round(request, 1), largest_offer_mb=largest and round(largest, 1))
            b.assign(None, JobSpec(file=job.rel, cha=os.path.abspath(info.path),
                                   media=os.path.abspath(info.media) if info.media else None,
                                   out=os.path.abspath(info.out), options={}, attempt=job.attempts,
                                   predicted_peak_mb=request, predicted_growth_mb=e.growth_mb))
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
                self.kills += 1
                self.emit("worker_killed", level="warning", worker=w["worker"], pid=w.get("pid"), file=job.rel,
                          reason=f"file timeout after {limit:.0f} s")
                self.backend.signal(w["worker"], "kill")

    # -- outcomes ----------------------------------------------------------------------------------------
    async def _cluster_handle(self, ev: Any) -> None:
        if isinstance(ev, tuple) and ev[0] == "signal":
            self._cluster_signal(ev[1])
        elif isinstance(ev, WorkerReady):
            self.cluster_workers[ev.worker_id] = {"pid": ev.pid, "baseline_mb": ev.baseline_mb, "host": ev.host,
                                                  "since": self.now()}
            before = self.predictor.baseline_mb
            self.predictor.observe_baseline(ev.baseline_mb)
            calibrated = self.predictor.calibrate(ev.calibration)
            if calibrated or abs(self.predictor.baseline_mb - before) >= 1.0:
                self.reestimate_pending()  # requests are peaks: a Dask worker's baseline is part of them
            self.emit("worker_ready", worker=ev.worker_id, pid=ev.pid, baseline_mb=round(ev.baseline_mb, 1),
                      host=ev.host)
            if not self.ready_once:
                self.ready_once = True
                self.notifier.ready()
        elif isinstance(ev, WorkerExited):
            self.cluster_workers.pop(ev.worker_id, None)
            self.emit("worker_exited", level="info" if ev.reason == "retired" else "warning", worker=ev.worker_id,
                      pid=ev.pid, exitcode=ev.exitcode, signal=ev.signal, reason=ev.reason)
        elif isinstance(ev, FileStarted):
            job = self.queue.get(ev.file)
            if job is not None and job.state is FileState.RUNNING:
                self.where.setdefault(ev.file, {}).update(worker=ev.worker_id, pid=ev.pid, started=self.now())
                self.emit("file_started", worker=ev.worker_id, pid=ev.pid, file=ev.file)
        elif isinstance(ev, FileProgress):
            w = self.where.get(ev.file)
            if w is not None:
                w["progress"] = ev.progress
        elif isinstance(ev, FileResult):
            self._cluster_result(ev)
        elif isinstance(ev, FileError):
            self._cluster_error(ev)

    def _cluster_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            self._reload()
        elif sig == signal.SIGTERM and not self.draining:
            self.draining = True
            self.drain_deadline = self.now() + self.s.run.drain_grace
            self.notifier.stopping()
            self.emit("drain_started", reason="SIGTERM", grace_s=self.s.run.drain_grace)
        else:
            self.emit("stop_requested", level="warning", signal=signal.Signals(sig).name)
            self.notifier.stopping()
            self.stop_now = True

    def _running(self, file: str) -> FileJob | None:
        job = self.queue.get(file)
        return job if job is not None and job.state is FileState.RUNNING else None

    def _cluster_result(self, ev: FileResult) -> None:
        job = self._running(ev.file)
        if job is None:
            return
        where = self.where.pop(ev.file, {})
        info = job.info
        if not Path(info.out).exists():
            self._cluster_error(FileError(
                worker_id=ev.worker_id, file=ev.file, pid=ev.pid, kind="bad_input",
                reason=(f"{info.out}: written by worker {ev.worker_id} but not visible here; the output folder must "
                        "be on a filesystem shared with the workers, at the same path")), where)
            return
        if info.audio_seconds is None and ev.audio_seconds:
            info.audio_seconds = float(ev.audio_seconds)
        try:
            self._manifest_for(info).mark_done(info)
        except OSError as exc:
            self.emit("manifest_write_failed", level="warning", file=info.rel, error=str(exc))
        self.queue.finish(job, ev.peak_mb)
        self.audio_done_s += float(ev.audio_seconds or info.audio_seconds or 0.0)
        if ev.features_run is not None:  # only real work teaches (not spans from the result cache)
            self.predictor.observe_growth(ev.features_run, ev.growth_mb)
            self._model_changed = True
        w = SimpleNamespace(baseline_pss_mb=ev.baseline_mb, pid=ev.pid)
        self._attempt(job, w, "done", None, ev.growth_mb, ev.wall_s, ev.cpu_s, ev.audio_seconds)
        request = where.get("request")
        self.emit("file_done", worker=ev.worker_id, pid=ev.pid, file=info.rel, peak_mb=round(ev.peak_mb, 1),
                  growth_mb=round(ev.growth_mb, 1), predicted_mb=request and round(request, 1),
                  request_mb=request and round(request, 1),
                  predicted_growth_mb=round(job.estimate.growth_mb, 1) if job.estimate else None,
                  audio_seconds=info.audio_seconds, wall_s=ev.wall_s, cpu_s=ev.cpu_s,
                  turnaround_s=round(self.now() - where["submitted"], 3) if "submitted" in where else None,
                  warnings=len(ev.warnings), stats=ev.stats)
        for line in ev.warnings[:20]:
            self.emit("file_warning", level="warning", file=info.rel, warning=line)

    def _cluster_error(self, ev: FileError, where: dict | None = None) -> None:
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
        if kind == "lost" and not where.get("started"):
            # Queued on a worker that died under another file: not this file's doing, no attempt spent.
            self.queue.requeue(job, ev.reason)
            self.emit("file_requeued", file=job.rel, reason=f"{ev.reason}; it had not started there",
                      attempt=job.attempts, estimate_mb=round(job.estimate.peak_mb, 1) if job.estimate else None,
                      observed_mb=None)
            return
        observed = ev.observed_mb
        baseline = ev.baseline_mb
        growth = max(0.0, observed - baseline) if observed is not None and baseline is not None else None
        w = SimpleNamespace(baseline_pss_mb=baseline, pid=ev.pid)
        if kind == "bad_input":
            state = self.queue.fail(job, ev.reason, retry=False, observed_mb=observed)
            self._attempt(job, w, "failed", ev.reason, growth)
        else:
            censored = kind in ("memory", "lost") and observed is not None
            if kind == "memory":
                self.kills += 1
                self.emit("worker_killed", level="warning", worker=ev.worker_id, pid=ev.pid, file=job.rel,
                          reason=ev.reason, rss_mb=observed and round(observed, 1),
                          predicted_mb=where.get("request") and round(where["request"], 1))
                if growth is not None:
                    self.predictor.observe_kill(self.features(job), growth)
                if self.store is not None and observed is not None:
                    self.store.set_lower_bound(job.info.input_hash, self.s.engine_name, self.s.model_id,
                                               self.s.run.device, observed)
            state = self.queue.fail(job, ev.reason, retry=True, observed_mb=observed,
                                    lower_bound_mb=observed if censored else None)
            outcome = {"memory": "killed", "timeout": "timeout"}.get(kind, "crashed")
            self._attempt(job, w, outcome, ev.reason, growth)
        self.emit("file_failed", level="warning", worker=ev.worker_id, pid=ev.pid, file=job.rel, reason=ev.reason,
                  kind=kind, attempt=job.attempts, observed_mb=observed and round(observed, 1))
        self._after_failure(job, state, ev.reason)

    # -- publishing ----------------------------------------------------------------------------------
    def _cluster_publish(self, now: float) -> None:
        if now - self._last_sample_log >= self.s.memory.sample_log_interval:
            self._last_sample_log = now
            view = self.backend.workers_view()
            self.emit("memory_sample", level="info" if view else "debug", workers=view,
                      offered_mb=sum(w.get("mem_offered_mb") or 0 for w in view),
                      requested_mb=round(sum(w.get("request", 0) for w in self.where.values()), 1))
        interval = self.notifier.watchdog_interval
        if interval and now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()
        if now - self._last_status >= 2.0:
            self._last_status = now
            c = self.queue.counts()
            self.notifier.status(f"{c['done']}/{c['total'] - c['skipped']} done, {c['running']} running, "
                                 f"{c['failed'] + c['quarantined']} failed on {self.s.cluster.address}")
            for hook in self._status_hooks:
                hook(self.status())
        if self.display is not None:
            self.display.update(self.status())

    def status(self) -> dict[str, Any]:
        st = super().status()
        view = self.backend.workers_view() if self.backend is not None else []
        now = self.now()
        running = {f: w for f, w in self.where.items() if w.get("worker")}
        by_worker = {w["worker"]: (f, w) for f, w in running.items()}
        workers = []
        for v in view:
            f, w = by_worker.get(v["worker"], (None, {}))
            workers.append({"worker": v["worker"], "pid": v.get("pid"), "state": "busy" if f else "ready", "file": f,
                            "uss_mb": (w.get("progress") or {}).get("rss_mb") or 0.0, "pss_mb": 0.0,
                            "predicted_mb": w.get("request") and round(w["request"], 1),
                            "mem_offered_mb": v.get("mem_offered_mb"), "progress": (w.get("progress") or {}).get("fraction"),
                            "since_s": round(now - w["started"], 1) if w.get("started") else 0.0})
        st["workers"] = workers
        st["cluster"] = self.s.cluster.address
        offered = float(sum(v.get("mem_offered_mb") or 0 for v in view))
        used = float(sum(w["uss_mb"] or 0.0 for w in workers))
        st["memory"] = {"used_mb": round(used, 1), "budget_mb": round(offered, 1), "limit_mb": round(offered, 1),
                        "committed_mb": round(sum(w.get("request", 0) for w in self.where.values()), 1),
                        "available_mb": None}
        return st
