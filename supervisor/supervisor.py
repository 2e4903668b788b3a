"""The supervisor loop: wait for an event or the next tick -> sense -> decide -> act.

Modelled on gunicorn's arbiter: signal handlers only enqueue; one loop hands every event to the
part that owns what it changes; workers that cannot boot halt the run instead of being respawned
forever. The parts (see docs/DESIGN.md): intake (planning, watch mode, manifests), the worker
table, outcomes, the estimator (predictor, lower bounds), senses (the readings), the telemetry
sink and the publisher (log, ledger, watchdog, status). The loop itself owns only the run's phase
(draining, stopping, halted): it asks the pure ``MemoryPolicy`` and hands its decisions to
``Actions``; nothing on it blocks: the backend starts workers and writes to them in tasks, and
files, hashes, scans, the store and the ledger are side jobs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import anyio

from supervisor.actions import Actions
from supervisor.backend import (Backend, FileError, FileProgress, FileResult, FileStarted, LocalBackend, SpawnFailed,
                                WorkerBroken, WorkerExited, WorkerHeartbeat, WorkerLoaded, WorkerLog, WorkerReady,
                                WorkerSpawned)
from supervisor.corpus import Candidate
from supervisor.estimates import Estimator, make_predictor, model_key
from supervisor.identity import output_identity
from supervisor.inbox import Inbox
from supervisor.intake import Intake
from supervisor.outcomes import (EXIT_FAILED, EXIT_HALTED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE,  # noqa: F401
                                 Outcomes, RunSummary)
from supervisor.policy import Act, MemoryPolicy, Snapshot, committed_mb, promise_added_mb, used_mb
from supervisor.pool import ZygoteLauncher, resolve_start_method, worker_command
from supervisor.publish import Publisher, memory_figures, status_header, status_of
from supervisor.queue import FileState, WorkQueue
from supervisor.reload import bands_from, reread, shown
from supervisor.sampler import Limits, Sampler, detect_limits
from supervisor.sd_notify import Notifier
from supervisor.senses import Senses, default_sampler
from supervisor.settings import Settings, SettingsError
from supervisor.sidejobs import SideJobs
from supervisor.sink import TelemetrySink
from supervisor.workers import WorkerRecord, WorkerTable
from telemetry.logging import worker_record
from telemetry.model import FileFeatures
from supervisor import model_server, vram as vram_mod
from telemetry.store import TelemetryStore
from worker.align import plan_features, span_cap
from worker.engines.base import JobError

MiB = 2**20
# The policy fits files first-fit in queue order; the head of a large queue is enough to find one.
POLICY_WINDOW = 256
SHUTDOWN_WAIT_S = 10.0
SIDE_JOBS_WAIT_S = 30.0
WAKE = ("wake", None)  # inbox marker: a side job finished, decide on what it brought
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def engine_options(s: Settings, workers: int) -> dict[str, Any]:
    """What the worker's engine needs at start; each file then gets the threads it can use now."""
    eng = s.engine_settings
    opts: dict[str, Any] = {k: v for k, v in vars(eng).items() if not k.startswith("cold_")}
    threads = eng.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    opts.update(model=s.model_location, device=s.run.device, dtype=s.run.dtype, threads=threads,
                cache_dir=str(s.state_dir / "cache"))
    return opts


def file_planner(s: Settings) -> Callable[[Any], FileFeatures]:
    """What the engine will hold for a file, from its plan (blocking: intake calls it off the loop)."""
    options = engine_options(s, 1)

    def plan(info: Any) -> FileFeatures:
        try:
            return plan_features(info.path, info.media, s.engine_name, options, header=info.header)
        except JobError as exc:
            if exc.kind == "input":  # a transcript the worker's own reader refuses: the file fails now
                raise
        except (OSError, ValueError):
            pass
        # media the header could not describe: the worker says what is wrong; until then, size alone
        return FileFeatures(audio_s=info.audio_seconds, media_mb=info.media_mb)

    return plan


class Supervisor:
    def __init__(self, settings: Settings, *, log: Any, sampler: Sampler | None = None,
                 clock: Callable[[], float] = time.monotonic, notifier: Notifier | None = None,
                 store: TelemetryStore | None = None, limits: Limits | None = None,
                 display: Any = None, reload_cli: dict | None = None, watcher: Any = None,
                 backend: Backend | None = None, listing: Any = None, vram_reader: Any = None) -> None:
        self.s = settings
        self.log = log
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.reload_cli = reload_cli or {}
        self.backend = backend
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.limits = limits or detect_limits(budget=settings.memory.budget, reserve=settings.memory.reserve)
        self.key = (settings.engine_name, settings.model_id, settings.run.device)
        self.cores = os.cpu_count() or 1
        self.t0 = clock()
        self.wall0 = time.time()
        self.inbox = Inbox()
        self.draining = False
        self.drain_deadline: float | None = None
        self.stop_now = False
        self.halted: str | None = None
        self._capacity_changed = False

        self.queue = WorkQueue(settings.run.max_attempts)
        self.policy = MemoryPolicy(bands_from(settings))
        self.jobs = SideJobs(self.emit, wake=self._wake)
        self.senses = Senses(sampler or default_sampler(), self.emit,
                             extra_pids=lambda: getattr(self.backend, "extra_pids", lambda: [])())
        self.probe_span_s = span_cap(settings.engine_name, {"span_seconds": settings.engine_settings.span_seconds})
        self.estimator = Estimator(make_predictor(settings, store), self.queue,
                                   stored_bounds=store.lower_bounds(*self.key) if store else None, clock=clock)
        self.sink = TelemetrySink(store, self.jobs, self.emit, self.key, model_key(settings))
        self.intake = Intake(queue=self.queue, estimator=self.estimator, jobs=self.jobs, emit=self.emit,
                             forget=self.policy.forget, force=settings.force,
                             media_dir=Path(settings.run.media_dir) if settings.run.media_dir else None,
                             out_root=settings.out, in_place=settings.in_place, watcher=watcher, clock=clock,
                             listing=listing, identity=output_identity(settings), plan=file_planner(settings))
        self.outcomes = Outcomes(queue=self.queue, estimator=self.estimator, intake=self.intake, sink=self.sink,
                                 emit=self.emit, run_id=self.run_id, forget=self.policy.forget)
        self.publisher = Publisher(notifier=self.notifier, jobs=self.jobs, emit=self.emit, display=display)
        self.workers: WorkerTable | None = None
        self.actions: Actions | None = None
        # VRAM beside host memory on a CUDA run (None on a CPU run: nothing below changes then).
        self.vram, self.vram_views = vram_mod.open_accounting(settings, store, vram_reader, self.emit,
                                                              model_key(settings))

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def budget_mb(self) -> float:
        return self.limits.budget / MiB

    @property
    def realigned(self) -> list[tuple[str, str]]:
        return self.intake.realigned

    @property
    def kills(self) -> int:
        return self.workers.kills if self.workers else 0

    @property
    def pauses(self) -> int:
        return self.workers.pauses if self.workers else 0

    def now(self) -> float:
        return self.clock()

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        fields.setdefault("t", round(self.now() - self.t0, 3))
        getattr(self.log, level)(event, **fields)

    def plan(self, candidates: list[Candidate]) -> None:
        """Plan the whole corpus now (``--dry-run``)."""
        self.intake.plan_now(candidates)

    def add_status_hook(self, hook: Callable[[dict], None]) -> None:
        self.publisher.hooks = [*self.publisher.hooks, hook]

    # -- the run -------------------------------------------------------------------------------------
    async def run(self, candidates: list[Candidate]) -> RunSummary:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.inbox.put_nowait, ("signal", sig))
        self.emit("run_started", corpus=[str(p) for p in self.s.corpus], out=str(self.s.out) if self.s.out else None,
                  engine=self.key[0], model=self.key[1], device=self.key[2],
                  limit_mb=round(self.limits.limit / MiB, 1), budget_mb=round(self.budget_mb, 1),
                  reserve_mb=round(self.limits.reserve / MiB, 1), limit_source=self.limits.source,
                  files=len(candidates), max_workers=self.s.max_workers(self.cores), pid=os.getpid(),
                  supervisor_cpu_s=round(time.process_time(), 3), **vram_mod.run_fields(self.vram, self.s))
        self.sink.start_run(self.run_id, ",".join(str(p) for p in self.s.corpus), self.s.to_dict())
        await anyio.to_thread.run_sync(self.publisher.open_ledger, self.s.memory.ledger,
                                       f"{os.getpid()}-{self.run_id}")
        if self.backend is None:
            self.backend = self._local_backend()
        self.workers = WorkerTable(self.backend, emit=self.emit, clock=self.clock)
        self.actions = Actions(workers=self.workers, queue=self.queue, outcomes=self.outcomes, cores=self.cores,
                               fixed_threads=self.s.engine_settings.threads, budget_mb=lambda: self.budget_mb,
                               admit_fields=lambda rel: vram_mod.admit_fields(self.vram, rel))
        await self.backend.start()
        pump = asyncio.create_task(self._pump(), name="backend-events")
        self.intake.start_planning(candidates)
        try:
            await self._loop()
        finally:
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)
            await self._shutdown()
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        result, summary = self._finish()
        self.sink.finish(self.run_id, self.estimator.params(), summary)
        vram_mod.save(self.sink, self.vram, self.key, model_key(self.s))
        if not await self.jobs.drain(SIDE_JOBS_WAIT_S):
            self.emit("side_jobs_abandoned", level="warning", after_s=SIDE_JOBS_WAIT_S)
        await anyio.to_thread.run_sync(self.publisher.close_ledger)
        return result

    def _local_backend(self) -> LocalBackend:
        options = engine_options(self.s, self.s.max_workers(self.cores))
        if options.get("calibrate") and self.estimator.probes_learned(self.probe_span_s):
            # Learned in earlier runs from files and probes: measuring the probes again would only
            # delay every worker's first file (Whisper base: several seconds of CPU each).
            options["calibrate"] = "warm"
            self.emit("probes_skipped", reason="the learned model holds probe spans and files already")
        method = resolve_start_method(self.s.run.start_method, self.key[0])
        launcher = ZygoteLauncher(self.key[0]) if method == "zygote" else None
        if model_server.use_model_server(self.s):  # one model copy per GPU, spans sent to it
            server = model_server.ModelServer(self.key[0], options, emit=self.emit)
            cmd = worker_command(self.key[0], model_server.served_options(options, server, self.s.run.boot_timeout))
            return model_server.ServedBackend(cmd, server, launcher=launcher, clock=self.clock)
        cmd = worker_command(self.key[0], options)
        warm = worker_command(self.key[0], {**options, "calibrate": "warm"}) if options.get("calibrate") is True else None
        return LocalBackend(cmd, launcher=launcher, clock=self.clock, warm_command=warm)

    async def _pump(self) -> None:
        async for ev in self.backend.events():
            self.inbox.put_nowait(ev)

    async def _loop(self) -> None:
        next_tick = self.now()
        while True:
            ev = await self.inbox.get(max(0.0, next_tick - self.now()))
            if ev is not None:
                self._handle(ev)
                while not self.inbox.empty():
                    self._handle(self.inbox.get_nowait())
            if self.stop_now or self.halted:
                return
            now = self.now()
            if now >= next_tick:
                self._guarded("tick", self._tick, now)
                next_tick = now + self.s.memory.poll_interval
            elif self._capacity_changed:
                # A file finished or a worker became ready: decide now on the last readings rather
                # than leave a worker idle until the next tick. Stale readings only overstate use.
                self._guarded("decide", self._decide, now)
            if self._done():
                return

    def _guarded(self, what: str, fn: Callable[..., None], *args: Any, **context: Any) -> None:
        """One failing handler is logged with its context; the loop goes on."""
        try:
            fn(*args)
        except Exception as exc:
            self.emit("handler_failed", level="error", handler=what, error=f"{type(exc).__name__}: {exc}",
                      exc_info=True, **context)

    def _done(self) -> bool:
        if self.workers.running():
            return False
        if self.draining:
            return True
        if self.intake.watcher is not None or self.intake.planning:
            return False
        return not self.queue.in_state(FileState.PENDING, FileState.RUNNING)

    # -- events --------------------------------------------------------------------------------------
    def _wake(self) -> None:
        """A side job finished (files planned, a store written): decide now, not at the next tick."""
        self._capacity_changed = True
        self.inbox.put_nowait(WAKE)

    def _handle(self, ev: Any) -> None:
        if ev is WAKE:
            return
        if isinstance(ev, tuple) and ev[0] == "signal":
            self._guarded("signal", self._on_signal, ev[1], signal=signal.Signals(ev[1]).name)
            return
        handler = self._HANDLERS.get(type(ev))
        if handler is None:
            self.emit("handler_failed", level="error", handler="dispatch", error=f"unknown event {ev!r}")
            return
        self._guarded(type(ev).__name__, handler, self, ev, worker=getattr(ev, "worker_id", None))

    def _on_spawn_failed(self, ev: SpawnFailed) -> None:
        self.workers.spawn_failed(ev.reason)
        self._check_boot()

    def _on_loaded(self, ev: WorkerLoaded) -> None:
        if self.workers.loaded(ev):
            self._capacity_changed = True  # the next worker may start loading now

    def _on_ready(self, ev: WorkerReady) -> None:
        self._capacity_changed = True
        w = self.workers.ready(ev, self.senses.exact(ev.pid))
        if w is None:
            return
        if self.vram is not None:
            self.vram.ready(w.id, ev.pid, getattr(ev, "vram_mb", None))
            self.vram_views.changed()
        self.estimator.learn_baseline(w.baseline_pss_mb, w.calibration)
        if w.calibration and getattr(self.backend, "probes_measured", lambda: False)():
            self.emit("probes_skipped", reason=f"measured by {w.id} in this run", worker=w.id)
        self.sink.baseline(w.baseline_uss_mb, w.baseline_rss_mb, w.baseline_pss_mb)
        if not self.workers.ready_once:
            self.workers.ready_once = True
            self.notifier.ready()
        if self.draining:
            self.workers.stop(w, "draining")

    def _on_started(self, ev: FileStarted) -> None:
        self.workers.file_started(ev.worker_id)
        if self.vram is not None:
            self.vram.started(ev.worker_id)

    def _on_result(self, ev: FileResult) -> None:
        self._file_over(ev, "result", self.outcomes.from_result)

    def _on_error(self, ev: FileError) -> None:
        self._file_over(ev, "error", self.outcomes.from_error)

    def _file_over(self, ev: FileResult | FileError, what: str, outcome_of: Callable[..., Any]) -> None:
        """A worker's file ended (result or error): release the worker, then apply the outcome."""
        self._capacity_changed = True
        w = self.workers.holder(ev.worker_id, ev.job_id, what)
        if w is None:
            return
        outcome = outcome_of(w, w.job, ev)
        if self.vram is not None:
            outcome = vram_mod.file_over(self.vram, self.vram_views, w, outcome, ev, self.emit)
        self.workers.release(w, getattr(ev, "rss_after_mb", None))
        self.outcomes.apply(outcome)
        out_of_memory = isinstance(ev, FileError) and ev.kind == "memory"
        if self.draining or out_of_memory:
            # After an out-of-memory error a fresh process is the only clean state.
            self.workers.stop(w, "draining" if self.draining else "out of memory")

    def _on_exited(self, ev: WorkerExited) -> None:
        self._capacity_changed = True
        w = self.workers.get(ev.worker_id)
        ex = self.workers.exited(ev)
        if self.vram is not None:
            self.vram.forget(ev.worker_id)
        if ex is None:
            return
        if ex.job is not None:
            self.outcomes.apply(self.outcomes.from_exit(w, ex.job, ev, stopping=self.stop_now))
        if ex.boot_failure:
            self._check_boot()

    def _on_log(self, ev: WorkerLog) -> None:
        if ev.line:
            w = self.workers.get(ev.worker_id)
            event, level, fields = worker_record(ev.line)
            self.emit(event, level=level, worker=ev.worker_id, pid=w.pid if w else None, **fields)

    _HANDLERS: dict[type, Callable[..., None]] = {
        WorkerSpawned: lambda self, ev: self.workers.spawned(ev.worker_id, ev.pid),
        SpawnFailed: _on_spawn_failed, WorkerLoaded: _on_loaded, WorkerReady: _on_ready,
        WorkerHeartbeat: lambda self, ev: self.workers.heartbeat(ev.worker_id, ev.progress),
        FileProgress: lambda self, ev: self.workers.file_progress(ev.worker_id, ev.progress),
        FileStarted: lambda self, ev: self._on_started(ev),
        FileResult: _on_result, FileError: _on_error, WorkerExited: _on_exited,
        WorkerBroken: lambda self, ev: self.workers.broken(ev.worker_id, ev.error), WorkerLog: _on_log,
    }

    def _check_boot(self) -> None:
        reason = self.workers.halt_reason(self.key[0], self.key[1])
        if reason is not None and not self.halted:
            self.halted = reason
            self.emit("run_halted", level="error", reason=reason, boot_failures=self.workers.boot_failures)

    # -- signals -------------------------------------------------------------------------------------
    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            self._reload()
        elif sig == signal.SIGTERM and not self.draining:
            self.draining = True
            self.drain_deadline = self.now() + self.s.run.drain_grace
            self.notifier.stopping()
            self.emit("drain_started", reason="SIGTERM", grace_s=self.s.run.drain_grace)
            self._drain_workers()
        else:
            self.emit("stop_requested", level="warning", signal=signal.Signals(sig).name)
            self.notifier.stopping()
            self.stop_now = True

    def _drain_workers(self) -> None:
        self.workers.drain()

    def _reload(self) -> None:
        try:
            new, applied, refused = reread(self.s, self.reload_cli)
        except SettingsError as exc:
            self.emit("config_reload_failed", level="error", error=str(exc))
            return
        if refused:
            self.emit("config_reload_refused", level="warning", changed=shown(refused),
                      reason="a restart is needed to change these; the running values stay")
        self.s = new
        self.policy.bands = bands_from(new)
        self.queue.max_attempts = new.run.max_attempts
        if "memory.budget" in applied or "memory.reserve" in applied:
            self.limits = detect_limits(budget=new.memory.budget, reserve=new.memory.reserve)
        self.emit("config_reloaded", changed=shown(applied), budget_mb=round(self.budget_mb, 1))

    # -- the tick ------------------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        self.senses.sample(now, self.workers)
        if self.vram is not None:
            error = self.vram.sample(self.workers.present(), extra=getattr(self.backend, "gpu_pids", dict)())
            if error is not None:
                self.emit("gpu_memory_unreadable", level="warning", error=error,
                          effect="admitting on the last GPU readings until NVML answers again")
        r = self.s.run
        self.workers.check_health(
            now, boot_timeout=r.boot_timeout, heartbeat_timeout=r.heartbeat_timeout,
            file_timeout=lambda job: r.file_timeout + r.file_timeout_per_audio_second * (job.info.audio_seconds or 0))
        self._check_boot()
        if not self.draining:
            self.intake.scan(now)
        if self.draining and self.drain_deadline is not None and now > self.drain_deadline:
            for w in self.workers.running():
                self.workers.kill(w, "drain grace period over", by_us=True)
        self._decide(now)
        self._publish(now)

    def _decide(self, now: float) -> None:
        if self.halted:
            return
        self.estimator.refresh(now)
        self._capacity_changed = False
        snap = self.snapshot(now)
        decisions = self.policy.decide(snap)
        added = promise_added_mb(decisions)
        if added > 0:
            # Room is promised to the host ledger before it is taken: files and workers wait for
            # the claim (one ledger step, off the loop); pauses and kills never do.
            promise = committed_mb(snap) - used_mb(snap) + added
            if not self.publisher.covers(promise):
                self.publisher.claim(promise, snap.others_reserved_mb, self.senses.host)
                decisions = [d for d in decisions if d.act not in (Act.ADMIT, Act.SPAWN)]
        for d in decisions:
            self._guarded("act", self.actions.apply, d, decision=d.act.value, file=d.file)

    def _remaining(self, w: WorkerRecord) -> float:
        """A running file's remaining growth, corrected from its progress (the one place)."""
        seen = max(0.0, w.uss_mb - (w.baseline_uss_mb or w.uss_mb))
        return self.estimator.remaining(w.job, w.progress, seen)

    def others_mb(self) -> float:
        return self.publisher.others_now(self.limits.reserve / MiB)

    def snapshot(self, now: float) -> Snapshot:
        h = self.senses.host
        workers = self.workers.views(self._remaining)
        pending = self.estimator.pending_views(POLICY_WINDOW)
        vram: dict[str, Any] = {}
        if self.vram is not None:
            vram, pending, workers = vram_mod.policy_views(self.vram_views, self.queue, pending, workers,
                                                           self.workers.get)
        return Snapshot(now=now, **vram, budget_mb=self.budget_mb, reserve_mb=self.limits.reserve / MiB,
                        available_mb=self.senses.available_mb, workers=workers,
                        pending=pending, predicted_baseline_mb=self.estimator.baseline_mb,
                        max_workers=self.s.max_workers(self.cores), psi_some10=h.psi_some_avg10 if h else None,
                        psi_full10=h.psi_full_avg10 if h else None, draining=self.draining or self.stop_now,
                        others_reserved_mb=self.others_mb(), overhead_mb=self.senses.overhead_mb,
                        probe_growth_mb=self.estimator.probe_growth_mb(self.probe_span_s)
                        if any(w.state == "starting" for w in workers) else None,
                        idle_retire_s=self.s.service.idle_retire if self.intake.watcher is not None else None)

    # -- publishing ------------------------------------------------------------------------------------
    def _publish(self, now: float) -> None:
        snap = self.snapshot(now)
        used, committed = used_mb(snap), committed_mb(snap)
        self.publisher.exchange(committed - used, self.senses.host)
        self.publisher.tick(now, status=self.status, sample=lambda: self._memory(snap),
                            interval=self.s.memory.sample_log_interval, busy=bool(self.workers.live()),
                            counts=self.queue.counts())

    def _memory(self, snap: Snapshot) -> dict[str, Any]:
        figures = memory_figures(used=used_mb(snap), committed=committed_mb(snap), budget_mb=self.budget_mb,
                                 limit_mb=self.limits.limit / MiB, host=self.senses.host, others_mb=self.others_mb(),
                                 workers=self.workers.live())
        return vram_mod.with_vram(figures, self.vram, snap if self.vram is not None else None)

    def status(self) -> dict[str, Any]:
        """What ``status --json`` prints and the metrics are drawn from (see docs/DESIGN.md)."""
        now = self.now()
        memory = self._memory(self.snapshot(now)) if self.workers is not None else None
        out = status_of(header=status_header(self.run_id, self.wall0, now - self.t0, self.draining), now=now,
                        memory=memory, budget_mb=self.budget_mb, limit_mb=self.limits.limit / MiB,
                        queue=self.queue, intake=self.intake, audio_done_s=self.outcomes.audio_done_s,
                        kills=self.kills, pauses=self.pauses,
                        workers=self.workers.live() if self.workers is not None else [])
        return vram_mod.with_vram_status(out, self.vram, memory)

    # -- ending ----------------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        if self.workers is None:
            return
        self.workers.end("drain: supervisor stopping" if self.draining else "supervisor stopping",
                         at_once=bool(self.stop_now or self.halted))
        if not await self._await_exits(SHUTDOWN_WAIT_S):
            self.workers.kill_stragglers()
            await self._await_exits(SHUTDOWN_WAIT_S)
        await self.backend.close()
        while not self.inbox.empty():
            ev = self.inbox.get_nowait()
            if isinstance(ev, (WorkerExited, FileResult, FileError)):
                self._handle(ev)
        for job in self.queue.in_state(FileState.RUNNING):
            self.queue.requeue(job, "supervisor stopping")

    async def _await_exits(self, timeout: float) -> bool:
        """Handle events until every worker has exited (pending spawns included)."""
        deadline = self.now() + timeout
        while self.workers.present() or self.workers.spawning:
            ev = await self.inbox.get(deadline - self.now())
            if ev is None:
                return False
            if isinstance(ev, WorkerSpawned):  # a spawn that landed while stopping: end it too
                self._handle(ev)
                self.workers.kill(self.workers.get(ev.worker_id), "supervisor stopping", by_us=True)
            elif not isinstance(ev, tuple):
                self._handle(ev)
            self.publisher.watchdog(self.now())
        return True

    def _finish(self) -> tuple[RunSummary, dict[str, Any]]:
        result, summary = self.outcomes.summary(halted=self.halted, draining=self.draining, stopping=self.stop_now,
                                                kills=self.kills, pauses=self.pauses,
                                                wall_s=round(time.time() - self.wall0, 2))
        summary["supervisor_cpu_s"] = round(time.process_time(), 3)
        self.emit("run_finished", level="info" if result.exit_code == 0 else "warning", **summary)
        self.notifier.stopping()
        return result, summary
