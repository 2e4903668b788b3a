"""The supervisor loop: wait for an event or the next tick -> sample -> decide -> act.

Modelled on gunicorn's arbiter: signal handlers only enqueue; one loop owns every state change;
workers are spawned one at a time, reaped, and murdered when they stop heartbeating; a worker that
cannot boot halts the run instead of being respawned forever. Memory decisions come from the pure
``MemoryPolicy``; this module turns them into process actions and records what happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from supervisor import corpus as corpus_mod
from supervisor.corpus import FileInfo, Manifest
from supervisor.identity import output_identity
from supervisor.policy import Act, Bands, Decision, MemoryPolicy, PendingView, Snapshot, WorkerView, remaining_growth
from supervisor.pool import (PoolEvent, ProcessPool, Worker, WorkerState, ZygoteLauncher, resolve_start_method,
                             worker_command)
from supervisor.queue import FileJob, FileState, WorkQueue
from supervisor.sampler import Limits, ProcSampler, Sampler, detect_limits
from supervisor.sd_notify import Notifier
from supervisor.settings import Settings, SettingsError, reload_settings
from telemetry.model import Defaults, FileFeatures, MemoryModel, Predictor
from telemetry.model import remaining_growth as file_remaining_growth
from telemetry.store import Attempt, TelemetryStore
from worker import protocol
from worker.align import plan_features
from worker.engines.base import JobError

MiB = 2**20
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HALTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4
MAX_BOOT_FAILURES = 3
REESTIMATE_S = 2.0
# The policy fits files first-fit in queue order; the head of a large queue is enough to find one.
POLICY_WINDOW = 256


@dataclass
class RunSummary:
    exit_code: int
    counts: dict[str, int]
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (file, state, reason)
    halted: str | None = None


def engine_options(s: Settings, workers: int) -> dict[str, Any]:
    """What the worker's engine needs; torch threads split so the pool never oversubscribes."""
    eng = s.engine_settings
    opts: dict[str, Any] = {k: v for k, v in vars(eng).items() if not k.startswith("cold_")}
    threads = eng.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    opts.update(model=s.model_location, device=s.run.device, dtype=s.run.dtype, threads=threads,
                cache_dir=str(s.state_dir / "cache"))
    return opts


def cold_defaults(s: Settings) -> Defaults:
    eng = s.engine_settings
    return Defaults(baseline_mb=eng.cold_baseline_mb, intercept_mb=eng.cold_intercept_mb,
                    mb_per_span_second=eng.cold_mb_per_span_second,
                    mb_per_audio_second=eng.cold_mb_per_audio_second, mb_per_media_mb=eng.cold_mb_per_media_mb)


def model_key(s: Settings) -> str:
    """The learned model's key beside engine and device: the model, its dtype unless fp32, and the
    synthetic engine's profile (different shapes must never share one model)."""
    key = s.model_id
    if s.run.dtype and s.run.dtype != "fp32":
        key += f"@{s.run.dtype}"
    profile = getattr(s.engine_settings, "profile", "total")
    if s.engine_name == "synthetic" and profile != "total":
        key += f"/{profile}"
    return key


def make_predictor(s: Settings, store: TelemetryStore | None) -> Predictor:
    eng = s.engine_settings
    defaults = cold_defaults(s)
    kw = dict(quantile=s.memory.quantile, margin=s.memory.margin, min_samples=s.memory.min_samples)
    params = store.load_model(s.engine_name, model_key(s), s.run.device) if store else None
    model = MemoryModel.from_params(params, defaults, **kw) if params else MemoryModel(defaults, **kw)
    # PSS at READY: what a worker is charged, and close to its whole cost when it runs alone.
    learned = store.baseline(s.engine_name, s.model_id, s.run.device, measure="pss") if store else None
    return Predictor(model, learned if learned is not None else eng.cold_baseline_mb,
                     baseline_measured=learned is not None)


def bands_from(s: Settings) -> Bands:
    m = s.memory
    return Bands(admit_below=m.admit_below, pause_above=m.pause_above, resume_below=m.resume_below,
                 kill_above=m.kill_above, psi_admit_below=m.psi_admit_below, psi_pause_above=m.psi_pause_above,
                 max_pause_s=m.max_pause, kill_settle_s=m.kill_settle, pause_cooldown_s=m.pause_cooldown)


class Supervisor:
    def __init__(self, settings: Settings, *, log: Any, sampler: Sampler | None = None,
                 clock: Callable[[], float] = time.monotonic, notifier: Notifier | None = None,
                 store: TelemetryStore | None = None, limits: Limits | None = None,
                 display: Any = None, reload_cli: dict | None = None, watcher: Any = None) -> None:
        self.s = settings
        self.log = log
        # Exact smaps reads walk page tables (~11 ms per GiB): ration them; status-based estimates
        # track anonymous growth in between.
        self.sampler = sampler or ProcSampler(exact_share=0.002, min_exact_interval=5.0)
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.store = store
        self.display = display
        self.watcher = watcher
        self.reload_cli = reload_cli or {}
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.limits = limits or detect_limits(budget=settings.memory.budget, reserve=settings.memory.reserve)
        self.queue = WorkQueue(settings.run.max_attempts)
        self.policy = MemoryPolicy(bands_from(settings))
        self.predictor = make_predictor(settings, store)
        self.events: asyncio.Queue = asyncio.Queue()
        self.pool: ProcessPool | None = None
        self.manifests: dict[Path, Manifest] = {}
        self.identity = output_identity(settings)
        self.realigned: list[tuple[str, str]] = []  # (file, what changed) of outputs made again
        self.t0 = clock()
        self.wall0 = time.time()
        self.draining = False
        self.drain_deadline: float | None = None
        self.stop_now = False
        self.halted: str | None = None
        self.boot_failures = 0
        self.kills = 0
        self.pauses = 0
        self.ready_once = False
        self.host = None
        self.used_mb = 0.0
        self.committed_mb = 0.0
        self._last_sample_log = -1e9
        self._last_status = -1e9
        self._last_watchdog = -1e9
        self._job_started_wall: dict[str, float] = {}
        self._finishing = False
        self.ledger = None
        self.ledger_owner = f"{os.getpid()}-{self.run_id}"
        self.audio_done_s = 0.0
        self._status_hooks: list[Callable[[dict], None]] = []
        self.others_mb = 0.0
        self._capacity_changed = False
        self._bounds_read: set[str] = set()
        self._model_changed = False
        self._reestimated_at = -1e9
        self.overhead_mb = 0.0
        self._overhead_at = -1e9
        self._spans_progress: dict[Any, dict] = {}

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def budget_mb(self) -> float:
        return self.limits.budget / MiB

    def now(self) -> float:
        return self.clock()

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        fields.setdefault("t", round(self.now() - self.t0, 3))
        getattr(self.log, level)(event, **fields)

    def _wfields(self, w: Worker) -> dict[str, Any]:
        return {"worker": w.id, "pid": w.pid}

    # -- planning ----------------------------------------------------------------------------------
    def plan(self, infos: list[FileInfo]) -> None:
        """Queue every file; skip done ones, fail those whose media are missing, estimate the rest."""
        for info in infos:
            manifest = self._manifest_for(info)
            if not self.s.force and manifest.is_done(info):
                self.queue.add(info, FileState.SKIPPED)
                self.emit("file_skipped", file=info.rel, reason="already done")
                continue
            stale = None if self.s.force else manifest.stale_reason(info)
            if stale:
                self.realigned.append((info.rel, stale))
                self.emit("file_realigned", file=info.rel, reason=f"made with other settings: {stale}")
            job = self.queue.add(info)
            if info.media_error:
                self.queue.fail(job, info.media_error, retry=False)
                self.emit("file_failed", level="warning", file=info.rel, reason=info.media_error,
                          kind="media", attempt=0)
                self._remember_failure(job)
                continue
            self.estimate(job)

    def _manifest_for(self, info: FileInfo) -> Manifest:
        root = self._out_root(info)
        m = self.manifests.get(root)
        if m is None:
            m = self.manifests[root] = Manifest(root / corpus_mod.MANIFEST_DIR / "done.jsonl", self.identity)
        return m

    def _out_root(self, info: FileInfo) -> Path:
        depth = len(Path(info.rel).parts)
        return info.out.parents[depth - 1] if depth else info.out.parent

    def estimate(self, job: FileJob) -> None:
        if job.rel not in self._bounds_read and self.store is not None:
            # Once per file: later bounds come from this run's own kills, already on the job.
            self._bounds_read.add(job.rel)
            stored = self.store.lower_bound(job.info.input_hash, self.s.engine_name, self.s.model_id,
                                            self.s.run.device)
            if stored is not None:
                job.lower_bound_mb = max(job.lower_bound_mb or 0.0, stored)
        job.estimate = self.predictor.estimate(self.features(job), job.lower_bound_mb)
        self.queue.touch()

    def features(self, job: FileJob) -> FileFeatures:
        """What the engine will hold for this file, from its plan (once per file)."""
        if job.features is None:
            info = job.info
            try:
                job.features = plan_features(info.path, info.media, self.s.engine_name, engine_options(self.s, 1))
            except (JobError, OSError, ValueError):
                # The worker reports bad input with its line; until then, size alone.
                job.features = FileFeatures(audio_s=info.audio_seconds, media_mb=info.media_mb)
        return job.features

    def reestimate_pending(self) -> None:
        for job in self.queue.in_state(FileState.PENDING):
            self.estimate(job)

    # -- the loop ------------------------------------------------------------------------------------
    async def run(self, infos: list[FileInfo]) -> RunSummary:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.events.put_nowait, ("signal", sig))
        self.plan(infos)
        counts = self.queue.counts()
        self.emit("run_started", corpus=[str(p) for p in self.s.corpus], out=str(self.s.out) if self.s.out else None,
                  engine=self.s.engine_name, model=self.s.model_id, device=self.s.run.device,
                  limit_mb=round(self.limits.limit / MiB, 1), budget_mb=round(self.budget_mb, 1),
                  reserve_mb=round(self.limits.reserve / MiB, 1), limit_source=self.limits.source,
                  files=counts["total"], pending=counts["pending"], skipped=counts["skipped"],
                  max_workers=self.s.max_workers(), pid=os.getpid(),
                  supervisor_cpu_s=round(time.process_time(), 3))
        if self.store is not None:
            self.store.start_run(self.run_id, corpus=",".join(str(p) for p in self.s.corpus),
                                 engine=self.s.engine_name, model=self.s.model_id, device=self.s.run.device,
                                 settings=self.s.to_dict())
        self._open_ledger()
        cmd = worker_command(self.s.engine_name, engine_options(self.s, self.s.max_workers()))
        method = resolve_start_method(self.s.run.start_method, self.s.engine_name)
        launcher = ZygoteLauncher(self.s.engine_name) if method == "zygote" else None
        self.pool = ProcessPool(cmd, events=self.events, clock=self.clock, launcher=launcher)
        try:
            await self._loop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._shutdown_workers()
            if self.ledger is not None:
                self.ledger.unregister(self.ledger_owner)
        return self._finish()

    async def _loop(self) -> None:
        next_tick = self.now()
        while True:
            timeout = max(0.0, next_tick - self.now())
            try:
                ev = await asyncio.wait_for(self.events.get(), timeout)
            except asyncio.TimeoutError:
                ev = None
            if ev is not None:
                await self._handle(ev)
                while not self.events.empty():
                    await self._handle(self.events.get_nowait())
            if self.stop_now or self.halted:
                return
            if self.now() >= next_tick:
                await self._tick()
                next_tick = self.now() + self.s.memory.poll_interval
            elif self._capacity_changed:
                # A file finished or a worker became ready: decide now on the last readings rather
                # than leave a worker idle until the next tick. Stale readings only overstate use.
                await self._decide(self.now())
            if self._done():
                return

    def _done(self) -> bool:
        running = any(w.job is not None for w in self.pool.live()) if self.pool else False
        if running:
            return False
        if self.draining:
            return True
        if self.watcher is not None:
            return False
        return not self.queue.in_state(FileState.PENDING, FileState.RUNNING)

    # -- events --------------------------------------------------------------------------------------
    async def _handle(self, ev: Any) -> None:
        if isinstance(ev, tuple) and ev[0] == "signal":
            await self._on_signal(ev[1])
            return
        assert isinstance(ev, PoolEvent)
        w = ev.worker
        if ev.kind == "exited" or (ev.kind == "message" and ev.msg.get("type") in (
                protocol.READY, protocol.RESULT, protocol.ERROR)):
            self._capacity_changed = True
        if ev.kind == "message":
            await self._on_message(w, ev.msg)
        elif ev.kind == "output":
            self._on_output(w, ev.msg["line"])
        elif ev.kind == "broken":
            if w.live:
                self.emit("worker_protocol_error", level="error", **self._wfields(w), error=ev.error)
                self.pool.kill(w, f"protocol error: {ev.error}")
        elif ev.kind == "exited":
            self._on_exit(w, ev.returncode)

    async def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            self._reload()
        elif sig == signal.SIGTERM and not self.draining:
            self.draining = True
            self.drain_deadline = self.now() + self.s.run.drain_grace
            self.notifier.stopping()
            self.emit("drain_started", reason="SIGTERM", grace_s=self.s.run.drain_grace)
            for w in self.pool.live():
                if w.job is None:
                    await self.pool.stop(w, "draining")
        else:
            self.emit("stop_requested", level="warning", signal=signal.Signals(sig).name)
            self.notifier.stopping()
            self.stop_now = True

    def _reload(self) -> None:
        try:
            new = reload_settings(self.s, cli=self.reload_cli)
        except SettingsError as exc:
            self.emit("config_reload_failed", level="error", error=str(exc))
            return
        changed = {}
        for section in ("memory", "run", "service"):
            old_d, new_d = vars(getattr(self.s, section)), vars(getattr(new, section))
            for k in old_d:
                if old_d[k] != new_d[k]:
                    changed[f"{section}.{k}"] = [old_d[k], new_d[k]]
        self.s = new
        self.policy.bands = bands_from(new)
        self.queue.max_attempts = new.run.max_attempts
        if "memory.budget" in changed or "memory.reserve" in changed:
            self.limits = detect_limits(budget=new.memory.budget, reserve=new.memory.reserve)
        self.emit("config_reloaded", changed={k: [str(a), str(b)] for k, (a, b) in changed.items()},
                  budget_mb=round(self.budget_mb, 1))

    async def _on_message(self, w: Worker, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        now = self.now()
        if kind == protocol.HEARTBEAT:
            w.last_heartbeat = now
            w.progress = msg.get("progress")
        elif kind == protocol.PROGRESS:
            w.last_heartbeat = now
            if w.job is not None and msg.get("job") == w.job_id:
                self._spans_progress[w.id] = msg
        elif kind == protocol.READY:
            if w.state is not WorkerState.STARTING:
                self.pool.kill(w, "protocol error: READY twice")
                return
            w.transition(WorkerState.READY)
            w.ready_at = w.idle_since = w.last_heartbeat = now
            mem = self.sampler.tree(w.pid, exact=True)  # a real smaps read, not an estimate
            w.baseline_uss_mb = (mem.uss if mem else msg.get("uss_mb", 0) * MiB) / MiB
            w.baseline_pss_mb = (mem.pss if mem else msg.get("pss_mb", 0) * MiB) / MiB
            w.baseline_rss_mb = (mem.rss if mem else msg.get("rss_mb", 0) * MiB) / MiB
            w.uss_mb, w.pss_mb, w.rss_mb = w.baseline_uss_mb, w.baseline_pss_mb, w.baseline_rss_mb
            self.boot_failures = 0
            self.predictor.observe_baseline(w.baseline_pss_mb)
            if self.predictor.calibrate(msg.get("calibration")):
                self._model_changed = True
            if self.store is not None:
                self.store.record_baseline(self.s.engine_name, self.s.model_id, self.s.run.device,
                                           w.baseline_uss_mb, w.baseline_rss_mb, w.baseline_pss_mb)
            self.emit("worker_ready", **self._wfields(w), baseline_mb=round(w.baseline_uss_mb, 1),
                      baseline_pss_mb=round(w.baseline_pss_mb, 1), baseline_rss_mb=round(w.baseline_rss_mb, 1),
                      startup_s=round(now - w.spawned_at, 3))
            if not self.ready_once:
                self.ready_once = True
                self.notifier.ready()
            if self.draining:
                await self.pool.stop(w, "draining")
        elif kind == protocol.BOOT_ERROR:
            w.exit_reason = msg.get("error", "boot error")
            self.emit("worker_boot_error", level="error", **self._wfields(w), error=w.exit_reason)
        elif kind == protocol.STARTED:
            if w.job is not None:
                self.emit("file_started", **self._wfields(w), file=w.job.rel)
        elif kind == protocol.RESULT:
            self._on_result(w, msg)
        elif kind == protocol.ERROR:
            self._on_error(w, msg)
        else:
            self.pool.kill(w, f"protocol error: unexpected {kind!r}")

    def _file_growth(self, w: Worker, reported_hwm_mb: float | None = None) -> float:
        polled = w.peak_uss_mb - (w.baseline_uss_mb or 0.0)
        hwm = (reported_hwm_mb - (w.baseline_rss_mb or 0.0)) if reported_hwm_mb else 0.0
        return max(0.0, polled, hwm)

    def _attempt(self, job: FileJob, w: Worker, outcome: str, reason: str | None, growth: float | None,
                 wall: float | None = None, cpu: float | None = None, audio: float | None = None) -> None:
        if self.store is None:
            return
        info = job.info
        started = self._job_started_wall.pop(job.rel, time.time())
        self.store.record_attempt(Attempt(
            run_id=self.run_id, file=info.rel, path=str(info.path), input_hash=info.input_hash,
            engine=self.s.engine_name, model=self.s.model_id, device=self.s.run.device,
            audio_seconds=audio if audio is not None else info.audio_seconds, media_bytes=info.media_bytes,
            transcript_bytes=info.transcript_bytes, worker_baseline_mb=w.baseline_pss_mb,
            peak_mb=(w.baseline_pss_mb or 0.0) + growth if growth is not None else None, growth_mb=growth,
            predicted_mb=job.estimate.peak_mb if job.estimate else None, wall_s=wall, cpu_s=cpu,
            outcome=outcome, reason=reason, worker_pid=w.pid, started_at=started, finished_at=time.time()))

    def _release(self, w: Worker) -> FileJob | None:
        job = w.job
        w.job = None
        w.job_id = None
        w.file_started_at = None
        w.progress = None
        self._spans_progress.pop(w.id, None)
        if w.state is WorkerState.BUSY:
            w.transition(WorkerState.READY)
            w.idle_since = self.now()
        return job

    def _on_result(self, w: Worker, msg: dict[str, Any]) -> None:
        if w.job is None or msg.get("job") != w.job_id:
            self.pool.kill(w, "protocol error: result for a job it does not hold")
            return
        growth = self._file_growth(w, msg.get("peak_rss_mb"))
        job = self._release(w)
        info = job.info
        audio = msg.get("audio_seconds")
        if info.audio_seconds is None and audio:
            info.audio_seconds = float(audio)
        try:
            self._manifest_for(info).mark_done(info)
        except OSError as exc:
            self.emit("manifest_write_failed", level="warning", file=info.rel, error=str(exc))
        self.queue.finish(job, (w.baseline_pss_mb or 0.0) + growth)
        self.audio_done_s += float(audio or info.audio_seconds or 0.0)
        # Only real work teaches: nothing when every span came from the result cache.
        if msg.get("features_run") is not None:
            self.predictor.observe_growth(msg["features_run"], growth)
        self._attempt(job, w, "done", None, growth, msg.get("wall_s"), msg.get("cpu_s"), audio)
        self.emit("file_done", **self._wfields(w), file=info.rel, peak_mb=round((w.baseline_pss_mb or 0) + growth, 1),
                  growth_mb=round(growth, 1), predicted_mb=round(job.estimate.peak_mb, 1) if job.estimate else None,
                  predicted_growth_mb=round(job.estimate.growth_mb, 1) if job.estimate else None,
                  audio_seconds=info.audio_seconds, wall_s=msg.get("wall_s"), cpu_s=msg.get("cpu_s"),
                  warnings=len(msg.get("warnings") or []), stats=msg.get("stats"))
        for line in (msg.get("warnings") or [])[:20]:
            self.emit("file_warning", level="warning", file=info.rel, warning=line)
        self._model_changed = True
        if self.draining:
            asyncio.get_running_loop().create_task(self.pool.stop(w, "draining"))

    def _on_error(self, w: Worker, msg: dict[str, Any]) -> None:
        if w.job is None or msg.get("job") != w.job_id:
            self.pool.kill(w, "protocol error: error for a job it does not hold")
            return
        growth = self._file_growth(w)
        job = self._release(w)
        kind = msg.get("kind", "internal")
        reason = str(msg.get("error", "unknown error"))
        retry = kind not in ("input", "media")
        state = self.queue.fail(job, reason, retry=retry, observed_mb=(w.baseline_pss_mb or 0) + growth)
        self._attempt(job, w, "failed", reason, growth)
        self.emit("file_failed", level="warning", **self._wfields(w), file=job.rel, reason=reason, kind=kind,
                  attempt=job.attempts)
        self._after_failure(job, state, reason)
        if self.draining:
            asyncio.get_running_loop().create_task(self.pool.stop(w, "draining"))

    def _remember_failure(self, job: FileJob) -> None:
        """Record a file that failed for good, so watch mode does not retry it after a restart."""
        try:
            self._manifest_for(job.info).mark_failed(job.info, job.state.value, job.reason or "")
        except OSError as exc:
            self.emit("manifest_write_failed", level="warning", file=job.rel, error=str(exc))

    def _after_failure(self, job: FileJob, state: FileState, reason: str) -> None:
        if state in (FileState.FAILED, FileState.QUARANTINED):
            self._remember_failure(job)
        if state is FileState.PENDING:
            self.policy.forget(job.rel)
            self.estimate(job)
            self.emit("file_requeued", file=job.rel, reason=reason, attempt=job.attempts,
                      estimate_mb=round(job.estimate.peak_mb, 1), observed_mb=job.last_peak_mb and round(job.last_peak_mb, 1))
        elif state is FileState.QUARANTINED:
            self.emit("file_quarantined", level="warning", file=job.rel, reason=reason, attempts=job.attempts,
                      observed_mb=job.last_peak_mb and round(job.last_peak_mb, 1))
            if self.store is not None:
                self.store.record_attempt(Attempt(
                    run_id=self.run_id, file=job.rel, path=str(job.info.path), input_hash=job.info.input_hash,
                    engine=self.s.engine_name, model=self.s.model_id, device=self.s.run.device,
                    audio_seconds=job.info.audio_seconds, media_bytes=job.info.media_bytes,
                    transcript_bytes=job.info.transcript_bytes, worker_baseline_mb=None, peak_mb=job.last_peak_mb,
                    growth_mb=None, predicted_mb=job.estimate.peak_mb if job.estimate else None, wall_s=None,
                    cpu_s=None, outcome="quarantined", reason=reason, worker_pid=None, started_at=time.time(),
                    finished_at=time.time()))

    def _on_output(self, w: Worker, line: str) -> None:
        if not line:
            return
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError
        except ValueError:
            self.emit("worker_output", level="debug", **self._wfields(w), line=line[:2000])
            return
        level = rec.pop("level", "info")
        event = rec.pop("event", "log")
        rec.pop("timestamp", None), rec.pop("ts", None)
        self.emit("worker_log", level="warning" if level in ("warning", "error", "critical") else "debug",
                  **self._wfields(w), worker_event=event, worker_level=level, **{k: v for k, v in rec.items()
                                                                                 if k not in ("worker", "pid", "t")})

    def _on_exit(self, w: Worker, rc: int | None) -> None:
        was = w.state
        killed_reason = w.kill_reason
        if w.state is WorkerState.EXITED:
            return
        w.transition(WorkerState.EXITED)
        sig = -rc if rc is not None and rc < 0 else None
        self.emit("worker_exited", level="info" if rc == 0 or killed_reason or was is WorkerState.STOPPING else "warning",
                  **self._wfields(w), exitcode=rc, signal=signal.Signals(sig).name if sig else None,
                  state=was.value, reason=killed_reason or w.exit_reason)
        if was is WorkerState.STARTING or (w.ready_at is None and killed_reason is None):
            self.boot_failures += 1
            if rc == protocol.EXIT_BOOT_ERROR or self.boot_failures >= MAX_BOOT_FAILURES:
                self.halted = w.exit_reason or f"worker exited with code {rc} before it was ready"
                self.emit("run_halted", level="error", reason=self.halted)
        job = w.job
        if job is None:
            return
        growth = self._file_growth(w)
        observed_peak = (w.baseline_pss_mb or 0.0) + growth
        self._release(w)
        w.job = None
        if self.stop_now or (killed_reason or "").startswith("drain"):
            self.queue.requeue(job, killed_reason or "supervisor stopping")
            self._attempt(job, w, "killed", killed_reason or "supervisor stopping", growth)
            return
        memory_kill = killed_reason in ("over the guard", "host memory nearly exhausted")
        if memory_kill:
            outcome, reason = "killed", f"killed: {killed_reason} at {observed_peak:.0f} MiB"
        elif killed_reason:
            outcome = "timeout" if "heartbeat" in killed_reason or "timeout" in killed_reason else "killed"
            reason = f"killed: {killed_reason}"
        else:
            outcome = "crashed"
            reason = f"worker died ({'signal ' + signal.Signals(sig).name if sig else f'exit code {rc}'})"
        state = self.queue.fail(job, reason, retry=True, observed_mb=observed_peak,
                                lower_bound_mb=observed_peak if (memory_kill or sig == signal.SIGKILL) else None)
        if memory_kill:
            self.predictor.observe_kill(job.features, growth)
        if memory_kill and self.store is not None:
            self.store.set_lower_bound(job.info.input_hash, self.s.engine_name, self.s.model_id, self.s.run.device,
                                       observed_peak)
        self._attempt(job, w, outcome, reason, growth)
        self.emit("file_failed", level="warning", **self._wfields(w), file=job.rel, reason=reason, kind=outcome,
                  attempt=job.attempts)
        self._after_failure(job, state, reason)

    # -- the tick ------------------------------------------------------------------------------------
    async def _tick(self) -> None:
        now = self.now()
        self._sample(now)
        self._check_health(now)
        if self.watcher is not None and not self.draining:
            for info in self.watcher.poll(now):
                self._add_watched(info)
        if self.draining and self.drain_deadline is not None and now > self.drain_deadline:
            for w in self.pool.live():
                if w.job is not None:
                    self.pool.kill(w, "drain grace period over")
        await self._decide(now)
        self._publish(now)

    async def _decide(self, now: float) -> None:
        # Refitting costs milliseconds per sample set: at most every REESTIMATE_S, not per file.
        if self._model_changed and now - self._reestimated_at >= REESTIMATE_S:
            self._model_changed = False
            self._reestimated_at = now
            self.reestimate_pending()
        self._capacity_changed = False
        for d in self.policy.decide(self.snapshot(now)):
            await self._act(d, now)

    def _sample(self, now: float) -> None:
        try:
            self.host = self.sampler.host()
        except OSError:
            self.host = None
        used = 0.0
        for w in self.pool.workers.values():
            if w.state is WorkerState.EXITED:
                continue
            mem = self.sampler.tree(w.pid)
            if mem is None:
                continue
            w.uss_mb, w.pss_mb, w.rss_mb = mem.uss / MiB, mem.pss / MiB, mem.rss / MiB
            if w.job is not None:
                w.peak_uss_mb = max(w.peak_uss_mb, w.uss_mb)
            used += w.pss_mb
        if now - self._overhead_at >= 10.0:  # static memory: an exact read now and then is enough
            self._overhead_at = now
            self.overhead_mb = self._overhead()
        self.used_mb = used + self.overhead_mb

    def _overhead(self) -> float:
        """The supervisor's own PSS and the zygote's (its workers are counted on their own)."""
        read = getattr(self.sampler, "process_pss", None)
        if read is None:
            return 0.0
        total = 0
        for pid in (os.getpid(), getattr(self.pool.launcher, "zygote_pid", None)):
            if pid:
                total += read(pid) or 0
        return total / MiB

    def _check_health(self, now: float) -> None:
        hb, boot = self.s.run.heartbeat_timeout, self.s.run.boot_timeout
        for w in self.pool.live():
            if w.state is WorkerState.STARTING and now - w.spawned_at > boot:
                self.pool.kill(w, f"not ready after {boot:.0f} s")
            elif w.state in (WorkerState.READY, WorkerState.BUSY) and now - w.last_heartbeat > hb:
                self._kill(w, f"no heartbeat for {now - w.last_heartbeat:.0f} s")
            elif w.state is WorkerState.BUSY and w.job is not None and w.file_started_at is not None:
                limit = self.s.run.file_timeout + self.s.run.file_timeout_per_audio_second * (w.job.info.audio_seconds or 0)
                if now - w.file_started_at > limit:
                    self._kill(w, f"file timeout after {limit:.0f} s")

    def _corrected_growth(self, w: Worker) -> float:
        """A running file's predicted growth, corrected from its progress (seen + what remains)."""
        if w.job is None or w.job.estimate is None:
            return 0.0
        seen = max(0.0, w.uss_mb - (w.baseline_uss_mb or 0.0)) if w.baseline_uss_mb is not None else 0.0
        return seen + file_remaining_growth(w.job.estimate, self._spans_progress.get(w.id), seen)

    def snapshot(self, now: float) -> Snapshot:
        workers = []
        for w in self.pool.workers.values():
            if w.state is WorkerState.EXITED:
                continue
            workers.append(WorkerView(
                id=w.id, state=w.state.value, pss_mb=w.pss_mb, uss_mb=w.uss_mb, baseline_uss_mb=w.baseline_uss_mb,
                file=w.job.rel if w.job else None,
                growth_mb=self._corrected_growth(w),
                file_started_at=w.file_started_at, paused_at=w.paused_at, idle_since=w.idle_since))
        # A cold guess never refuses a file ("cannot fit even alone"): the first worker's probe spans
        # at READY re-estimate everything on figures from this machine before anything is refused.
        pending = tuple(PendingView(file=j.rel, peak_mb=j.estimate.peak_mb, growth_mb=j.estimate.growth_mb,
                                    central_peak_mb=j.estimate.central_mb if j.estimate.source != "cold" else 0.0)
                        for j in self.queue.pending()[:POLICY_WINDOW] if j.estimate is not None)
        available = self.host.available / MiB if self.host else float("inf")
        others = 0.0
        if self.ledger is not None:
            try:
                others = self.ledger.others(self.ledger_owner) / MiB
            except OSError:
                others = 0.0
        self.others_mb = others
        snap = Snapshot(now=now, budget_mb=self.budget_mb, reserve_mb=self.limits.reserve / MiB,
                        available_mb=available, workers=tuple(workers), pending=pending,
                        predicted_baseline_mb=self.predictor.baseline_mb, max_workers=self.s.max_workers(),
                        psi_some10=self.host.psi_some_avg10 if self.host else None,
                        psi_full10=self.host.psi_full_avg10 if self.host else None,
                        draining=self.draining or self.stop_now, others_reserved_mb=others,
                        overhead_mb=self.overhead_mb,
                        idle_retire_s=self.s.service.idle_retire if self.watcher is not None else None)
        live = [v for v in workers if v.state != "killed"]
        self.committed_mb = self.used_mb + sum(remaining_growth(v) for v in live) + \
            sum(snap.predicted_baseline_mb for v in live if v.state == "starting")
        return snap

    async def _act(self, d: Decision, now: float) -> None:
        w = self.pool.workers.get(d.worker) if d.worker is not None else None
        if d.act is Act.SPAWN:
            w = await self.pool.spawn()
            self.emit("worker_spawned", **self._wfields(w), reason=d.reason, **d.figures)
        elif d.act is Act.ADMIT and w is not None and w.state is WorkerState.READY:
            job = self.queue.get(d.file)
            if job is None or job.state is not FileState.PENDING:
                return
            self.queue.start(job, w.id)
            w.transition(WorkerState.BUSY)
            w.job, w.job_id = job, f"{job.rel}#{job.attempts}"
            w.file_started_at, w.idle_since = now, None
            # The last reading may predate the previous file's release: start from the baseline.
            w.peak_uss_mb = w.baseline_uss_mb or 0.0
            w.last_heartbeat = now
            self._job_started_wall[job.rel] = time.time()
            info = job.info
            self.emit("file_admitted", **self._wfields(w), file=job.rel, predicted_mb=round(job.estimate.peak_mb, 1),
                      predicted_growth_mb=round(job.estimate.growth_mb, 1), estimate_source=job.estimate.source,
                      estimate_uncertain=job.estimate.uncertain,
                      audio_seconds=info.audio_seconds, attempt=job.attempts, reason=d.reason,
                      committed_mb=d.figures.get("committed_mb"), budget_mb=round(self.budget_mb, 1))
            await self.pool.send(w, {"type": protocol.JOB, "job": w.job_id, "input": str(info.path),
                                     "output": str(info.out), "media": str(info.media) if info.media else None,
                                     "rel": info.rel, "options": {}})
        elif d.act is Act.PAUSE and w is not None and w.state is WorkerState.BUSY:
            self.pool.pause(w)
            self.pauses += 1
            self.emit("worker_paused", **self._wfields(w), file=w.job.rel if w.job else None, reason=d.reason,
                      uss_mb=round(w.uss_mb, 1), **d.figures)
        elif d.act is Act.RESUME and w is not None and w.state is WorkerState.PAUSED:
            paused_s = self.pool.resume(w)
            self.emit("worker_resumed", **self._wfields(w), file=w.job.rel if w.job else None, reason=d.reason,
                      paused_s=round(paused_s, 2), **{k: v for k, v in d.figures.items() if k != "paused_s"})
        elif d.act is Act.KILL and w is not None and w.live:
            self._kill(w, d.reason, d.figures)
        elif d.act is Act.RETIRE and w is not None and w.state is WorkerState.READY:
            self.emit("worker_retired", **self._wfields(w), uss_mb=round(w.uss_mb, 1), reason=d.reason)
            await self.pool.stop(w, f"retired: {d.reason}")
        elif d.act is Act.REJECT:
            job = self.queue.get(d.file)
            if job is None or job.state is not FileState.PENDING:
                return
            if job.attempts:
                self.queue.quarantine(job, d.reason)
                self.emit("file_quarantined", level="warning", file=job.rel, reason=d.reason, attempts=job.attempts,
                          observed_mb=job.last_peak_mb and round(job.last_peak_mb, 1))
            else:
                self.queue.fail(job, d.reason, retry=False)
                self.emit("file_failed", level="warning", file=job.rel, reason=d.reason, kind="too_big", attempt=0)
            self._remember_failure(job)

    def _kill(self, w: Worker, reason: str, figures: dict | None = None) -> None:
        self.kills += 1
        self.emit("worker_killed", level="warning", **self._wfields(w), file=w.job.rel if w.job else None,
                  reason=reason, uss_mb=round(w.uss_mb, 1), used_mb=round(self.used_mb, 1),
                  budget_mb=round(self.budget_mb, 1),
                  predicted_mb=round(w.job.estimate.peak_mb, 1) if w.job is not None and w.job.estimate else None,
                  **{k: v for k, v in (figures or {}).items() if k not in ("uss_mb", "used_mb", "budget_mb")})
        self.pool.kill(w, reason)

    # -- publishing ------------------------------------------------------------------------------------
    def _publish(self, now: float) -> None:
        if now - self._last_sample_log >= self.s.memory.sample_log_interval:
            self._last_sample_log = now
            self.emit("memory_sample", level="debug" if not self.pool.live() else "info",
                      used_mb=round(self.used_mb, 1), committed_mb=round(self.committed_mb, 1),
                      budget_mb=round(self.budget_mb, 1), limit_mb=round(self.limits.limit / MiB, 1),
                      available_mb=round(self.host.available / MiB, 1) if self.host else None,
                      psi_some10=self.host.psi_some_avg10 if self.host else None,
                      others_reserved_mb=round(self.others_mb, 1),
                      workers=[{"worker": w.id, "pid": w.pid, "state": w.state.value, "uss_mb": round(w.uss_mb, 1),
                                "pss_mb": round(w.pss_mb, 1), "file": w.job.rel if w.job else None}
                               for w in self.pool.live()])
        if self.ledger is not None:
            try:
                self.ledger.update(self.ledger_owner, int(max(0.0, self.committed_mb - self.used_mb) * MiB))
            except OSError:
                pass
        interval = self.notifier.watchdog_interval
        if interval and now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()
        if now - self._last_status >= 2.0:
            self._last_status = now
            c = self.queue.counts()
            self.notifier.status(f"{c['done']}/{c['total'] - c['skipped']} done, {c['running']} running, "
                                 f"{c['failed'] + c['quarantined']} failed; memory {self.used_mb:.0f}/"
                                 f"{self.budget_mb:.0f} MiB")
            for hook in self._status_hooks:
                hook(self.status())
        if self.display is not None:
            self.display.update(self.status())

    def add_status_hook(self, hook: Callable[[dict], None]) -> None:
        self._status_hooks = [*self._status_hooks, hook]

    def status(self) -> dict[str, Any]:
        now = self.now()
        c = self.queue.counts()
        return {
            "run": self.run_id, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.wall0)),
            "uptime_s": round(now - self.t0, 1), "draining": self.draining,
            "memory": {"used_mb": round(self.used_mb, 1), "budget_mb": round(self.budget_mb, 1),
                       "limit_mb": round(self.limits.limit / MiB, 1), "committed_mb": round(self.committed_mb, 1),
                       "available_mb": round(self.host.available / MiB, 1) if self.host else None},
            "files": {k: c[k] for k in ("pending", "running", "done", "failed", "quarantined", "skipped", "total")},
            "audio_done_s": round(self.audio_done_s, 1),
            "audio_total_s": round(sum(j.info.audio_seconds or 0 for j in self.queue
                                       if j.state is not FileState.SKIPPED), 1),
            "kills": self.kills, "pauses": self.pauses,
            "workers": [{"worker": w.id, "pid": w.pid, "state": w.state.value, "file": w.job.rel if w.job else None,
                         "uss_mb": round(w.uss_mb, 1), "pss_mb": round(w.pss_mb, 1),
                         "predicted_mb": round(w.job.estimate.peak_mb, 1) if w.job is not None and w.job.estimate else None,
                         "progress": w.progress,
                         "since_s": round(now - (w.file_started_at or w.idle_since or w.spawned_at), 1)}
                        for w in (self.pool.live() if self.pool else [])],
            "queue": [{"file": j.rel, "predicted_mb": round(j.estimate.peak_mb, 1) if j.estimate else None,
                       "attempts": j.attempts} for j in self.queue.pending()[:20]],
        }

    # -- watch mode ------------------------------------------------------------------------------------
    def _add_watched(self, info: FileInfo) -> None:
        existing = self.queue.get(info.rel)
        if existing is not None and existing.state in (FileState.PENDING, FileState.RUNNING):
            return
        if existing is not None and existing.info.input_hash == info.input_hash:
            return  # unchanged since we last handled it (done, failed or quarantined)
        manifest = self._manifest_for(info)
        if not self.s.force and manifest.is_done(info):
            return
        earlier = None if self.s.force else manifest.failed(info)
        if earlier is not None:
            if existing is None:
                self.queue.add(info, FileState.SKIPPED)
                self.emit("file_skipped", file=info.rel,
                          reason=f"{earlier['state']} earlier, unchanged since: {earlier.get('reason', '')}")
            return
        if existing is not None:
            del self.queue.jobs[info.rel]
            self.queue.touch()
        job = self.queue.add(info)
        self.policy.forget(info.rel)
        self.emit("file_discovered", file=info.rel, audio_seconds=info.audio_seconds)
        if info.media_error:
            self.queue.fail(job, info.media_error, retry=False)
            self.emit("file_failed", level="warning", file=info.rel, reason=info.media_error, kind="media", attempt=0)
            self._remember_failure(job)
            return
        self.estimate(job)

    # -- ending ----------------------------------------------------------------------------------------
    def _open_ledger(self) -> None:
        spec = self.s.memory.ledger
        if spec == "off":
            return
        from supervisor.ledger import HostLedger

        try:
            self.ledger = HostLedger(Path(spec) if spec else None)
            self.ledger.register(self.ledger_owner)
        except OSError as exc:
            self.emit("ledger_unavailable", level="warning", error=str(exc))
            self.ledger = None

    async def _shutdown_workers(self) -> None:
        if self.pool is None:
            return
        for w in self.pool.live():
            if w.job is not None or self.stop_now or self.halted:
                self.pool.kill(w, "supervisor stopping" if not self.draining else "drain: supervisor stopping")
            else:
                await self.pool.stop(w, "run finished")
        if not await self.pool.wait_all(10.0):
            self.pool.kill_all("did not exit after shutdown")
            await self.pool.wait_all(10.0)
        await self.pool.close()
        while not self.events.empty():
            ev = self.events.get_nowait()
            if isinstance(ev, PoolEvent) and ev.kind == "exited":
                self._on_exit(ev.worker, ev.returncode)
        for job in self.queue.in_state(FileState.RUNNING):
            self.queue.requeue(job, "supervisor stopping")

    def _finish(self) -> RunSummary:
        c = self.queue.counts()
        failures = [(j.rel, j.state.value, j.reason or "") for j in self.queue.in_state(FileState.FAILED, FileState.QUARANTINED)]
        if self.halted:
            code = EXIT_HALTED
        elif (self.draining or self.stop_now) and (c["pending"] or c["running"]):
            code = EXIT_INTERRUPTED  # asked to stop with files left: re-running finishes them
        elif self.draining:
            code = EXIT_OK  # a drain that left nothing undone (watch mode's stop): a success
        elif failures or c["pending"] or c["running"]:
            code = EXIT_FAILED
        else:
            code = EXIT_OK
        wall = time.time() - self.wall0
        summary = {"done": c["done"], "failed": c["failed"], "quarantined": c["quarantined"], "skipped": c["skipped"],
                   "pending": c["pending"], "kills": self.kills, "pauses": self.pauses, "wall_s": round(wall, 2),
                   "audio_seconds": round(self.audio_done_s, 1), "exit_code": code, "halted": self.halted,
                   "drained": self.draining, "supervisor_cpu_s": round(time.process_time(), 3)}
        self.emit("run_finished", level="info" if code == 0 else "warning", **summary)
        if self.store is not None:
            self.store.save_model(self.s.engine_name, model_key(self.s), self.s.run.device, self.predictor.model.params())
            self.store.finish_run(self.run_id, summary)
        self.notifier.stopping()
        return RunSummary(exit_code=code, counts=c, failures=failures, halted=self.halted)
