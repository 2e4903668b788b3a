"""VRAM beside host memory: the budget, per-worker readings and the per-file VRAM prediction.

One owner for the run's VRAM state (``VramAccounting``), fed by the loop: NVML readings at each tick
(``supervisor.gpu``), the figures a worker reports itself (torch's allocator: ``vram_mb`` at READY,
``peak_vram_mb`` in a result), finished files, and CUDA out-of-memory errors. It hands the pure
policy VRAM views beside the host ones; it decides nothing.

The prediction reuses the host memory model by composition: a second ``telemetry.model.Predictor``
over its own ``MemoryModel`` per (engine, model, device, dtype), with VRAM cold defaults, learning
from the same ``features_run`` as the host model. A CUDA out-of-memory is a censored observation
exactly like a guard kill: the file's VRAM lower bound rises to what it held, the next estimate to
``bump_after_kill`` of it, and the attempt counts towards ``--max-attempts``.

On a CPU run (or without NVML) nothing here is built and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from supervisor.gpu import MiB, GpuReading, VramReader
from telemetry.model import Defaults, Estimate, FileFeatures, MemoryModel, Predictor, remaining_growth

# Cold VRAM guesses before any worker or file was measured (MiB): a CUDA context with a model
# (the READY reading replaces the baseline at once), and activations per second of the longest span.
VRAM_COLD = {
    "wav2vec": Defaults(baseline_mb=1200.0, intercept_mb=128.0, mb_per_span_second=12.0),
    "whisper": Defaults(baseline_mb=2500.0, intercept_mb=256.0, mb_per_span_second=16.0),
    "synthetic": Defaults(baseline_mb=256.0, intercept_mb=32.0, mb_per_span_second=2.0),
}
DEFAULT_RESERVE_FRACTION = 0.05  # of the device: the driver, fragmentation, other users
MIN_RESERVE_MB = 512.0


@dataclass(frozen=True)
class VramLimits:
    total_mb: float
    budget_mb: float
    reserve_mb: float
    source: str  # "device" | "budget"
    names: tuple[str, ...] = ()


def vram_limits(reading: GpuReading, budget: int | None = None, reserve: int | None = None) -> VramLimits:
    """Budget = min(device total - reserve, ``--vram-budget``); reserve defaults to
    max(5% of the device, 512 MiB)."""
    total = reading.total / MiB
    res = reserve / MiB if reserve is not None else max(total * DEFAULT_RESERVE_FRACTION, MIN_RESERVE_MB)
    res = min(res, total * 0.5)
    room = max(total - res, 1.0)
    if budget is not None and budget / MiB < room:
        return VramLimits(total, budget / MiB, res, "budget", tuple(d.name for d in reading.devices))
    return VramLimits(total, room, res, "device", tuple(d.name for d in reading.devices))


def make_vram_predictor(engine: str, params: dict | None = None, *, quantile: float = 0.9, margin: float = 0.1,
                        min_samples: int = 3, baseline_mb: float | None = None) -> Predictor:
    cold = VRAM_COLD.get(engine, VRAM_COLD["wav2vec"])
    kw = dict(quantile=quantile, margin=margin, min_samples=min_samples)
    model = MemoryModel.from_params(params, cold, **kw) if params else MemoryModel(cold, **kw)
    return Predictor(model, baseline_mb if baseline_mb is not None else cold.baseline_mb,
                     baseline_measured=baseline_mb is not None)


@dataclass
class WorkerVram:
    """One worker's GPU memory (MiB): at READY, now, and the highest seen during its file."""

    pid: int | None = None
    baseline_mb: float | None = None
    current_mb: float = 0.0
    file_peak_mb: float = 0.0
    reported_ready_mb: float | None = None  # torch's reserved memory the worker reported at READY


@dataclass
class VramAccounting:
    """The run's VRAM state; see the module docstring."""

    reader: VramReader
    limits: VramLimits
    predictor: Predictor
    workers: dict[str, WorkerVram] = field(default_factory=dict)
    estimates: dict[str, Estimate] = field(default_factory=dict)  # by file
    lower_bounds: dict[str, float] = field(default_factory=dict)  # by file: peak a CUDA OOM hit
    reading: GpuReading | None = None
    error: str | None = None
    ooms: int = 0

    # -- sensing ---------------------------------------------------------------------------------
    def sample(self, workers: list[Any], pids_of: Any = None, extra: dict[str, int] | None = None) -> str | None:
        """Read NVML once; returns a new error's text (to log once), else None. ``extra``: other
        processes of ours that hold GPU memory (the model server), by name."""
        try:
            self.reading = self.reader.read()
        except Exception as exc:  # noqa: BLE001 - a driver hiccup: keep the last figures
            first = self.error is None
            self.error = f"{type(exc).__name__}: {exc}"
            return self.error if first else None
        self.error = None
        for w in workers:
            v = self.workers.setdefault(w.id, WorkerVram(pid=w.pid))
            v.pid = w.pid
            pids = pids_of(w) if pids_of is not None else [w.pid]
            got = self.reading.of(pids) if w.pid else None
            if got is not None:
                v.current_mb = got / MiB
            if w.job is not None:
                v.file_peak_mb = max(v.file_peak_mb, v.current_mb)
        for name, pid in (extra or {}).items():
            got = self.reading.of([pid])
            self.workers.setdefault(name, WorkerVram(pid=pid)).current_mb = got / MiB if got is not None else 0.0
        return None

    def ready(self, worker_id: str, pid: int, reported_mb: float | None) -> float | None:
        """A worker is READY: its VRAM baseline (NVML, else what it reported), which teaches the
        predictor's baseline."""
        v = self.workers.setdefault(worker_id, WorkerVram(pid=pid))
        v.pid = pid
        v.reported_ready_mb = reported_mb
        try:  # a fresh reading: the worker's context appeared since the last tick
            self.reading = self.reader.read()
        except Exception:  # noqa: BLE001 - the last reading (or the worker's own figure) stands
            pass
        seen = self.reading.of([pid]) if self.reading is not None else None
        base = seen / MiB if seen is not None else reported_mb
        if base is not None:
            v.baseline_mb = v.current_mb = float(base)
            self.predictor.observe_baseline(float(base))
        v.file_peak_mb = v.current_mb
        return v.baseline_mb

    def started(self, worker_id: str) -> None:
        v = self.workers.get(worker_id)
        if v is not None:
            v.file_peak_mb = v.current_mb

    def forget(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    # -- the prediction ----------------------------------------------------------------------------
    def estimate(self, rel: str, features: FileFeatures) -> Estimate:
        est = self.predictor.estimate(features, self.lower_bounds.get(rel))
        self.estimates[rel] = est
        return est

    def growth_seen(self, worker_id: str, reported_peak_mb: float | None) -> float | None:
        """A file's VRAM growth: the highest NVML reading during it above the READY baseline, or the
        worker's own allocator peak above what it held at READY, whichever is larger."""
        v = self.workers.get(worker_id)
        if v is None:
            return None
        got = []
        if v.baseline_mb is not None:
            got.append(max(0.0, v.file_peak_mb - v.baseline_mb))
        if reported_peak_mb is not None and v.reported_ready_mb is not None:
            got.append(max(0.0, float(reported_peak_mb) - v.reported_ready_mb))
        return max(got) if got else None

    def learn(self, worker_id: str, rel: str, features_run: dict | None, reported_peak_mb: float | None) -> float | None:
        """A finished file teaches the VRAM model when the model ran on it; returns its growth."""
        growth = self.growth_seen(worker_id, reported_peak_mb)
        if growth is not None and features_run is not None:
            self.predictor.observe_growth(features_run, growth)
        self.estimates.pop(rel, None)
        return growth

    def out_of_memory(self, worker_id: str, rel: str, features: FileFeatures | None) -> float:
        """A CUDA out-of-memory on ``rel``: it needs more VRAM than it got to (a lower bound for the
        file and for files at least as large); returns the bound (MiB, baseline included)."""
        self.ooms += 1
        v = self.workers.get(worker_id)
        est = self.estimates.get(rel)
        base = (v.baseline_mb if v is not None and v.baseline_mb is not None else self.predictor.baseline_mb)
        growth = max(self.growth_seen(worker_id, None) or 0.0, est.growth_mb if est is not None else 0.0)
        bound = base + growth
        self.lower_bounds[rel] = max(self.lower_bounds.get(rel, 0.0), bound)
        if features is not None and growth > 0:
            self.predictor.observe_kill(features, growth)
        return self.lower_bounds[rel]

    def remaining(self, worker_id: str, rel: str | None, progress: Any) -> float:
        est = self.estimates.get(rel) if rel else None
        v = self.workers.get(worker_id)
        if est is None or v is None:
            return 0.0
        seen = max(0.0, v.current_mb - (v.baseline_mb or v.current_mb))
        prog = None
        if isinstance(progress, dict):  # host growth figures mean nothing here: spans only
            prog = {k: progress[k] for k in ("spans_done", "spans_total") if k in progress}
        return remaining_growth(est, prog, seen)

    # -- what others show ---------------------------------------------------------------------------
    def used_mb(self) -> float:
        return sum(v.current_mb for v in self.workers.values())

    def figures(self, committed_mb: float | None = None) -> dict[str, Any]:
        """VRAM figures beside the host ones in status, memory samples and metrics."""
        r = self.reading
        out = {"vram_used_mb": round(self.used_mb(), 1), "vram_budget_mb": round(self.limits.budget_mb, 1),
               "vram_total_mb": round(self.limits.total_mb, 1),
               "vram_free_mb": round(r.free / MiB, 1) if r is not None else None}
        if committed_mb is not None:
            out["vram_committed_mb"] = round(committed_mb, 1)
        return out

    def worker_mb(self, worker_id: str) -> float | None:
        v = self.workers.get(worker_id)
        return round(v.current_mb, 1) if v is not None else None


def is_cuda_oom(reason: str | None) -> bool:
    """A memory error whose text names the GPU (torch: "CUDA out of memory", "CUDA error: out of memory")."""
    text = (reason or "").lower()
    return "cuda" in text and ("out of memory" in text or "outofmemoryerror" in text)


class VramViews:
    """What the pure policy sees of VRAM: per-worker figures and per-pending-file estimates. Pending
    estimates are cached until the VRAM model learns (the loop must not refit 256 files per tick)."""

    def __init__(self, acct: VramAccounting, *, per_file: bool = True) -> None:
        self.acct = acct
        self.per_file = per_file  # False with a model server: files then hold no GPU memory of their own
        self._version = 0
        self._cache: dict[str, tuple[int, float, float]] = {}

    def changed(self) -> None:
        self._version += 1

    def pending(self, rel: str, features: FileFeatures) -> tuple[float, float]:
        """(predicted VRAM growth, central peak) of a pending file; (0, 0) without per-file VRAM."""
        if not self.per_file:
            return 0.0, 0.0
        hit = self._cache.get(rel)
        if hit is not None and hit[0] == self._version:
            return hit[1], hit[2]
        est = self.acct.estimate(rel, features)
        central = est.central_mb if est.source != "cold" else 0.0
        self._cache[rel] = (self._version, est.growth_mb, central)
        return est.growth_mb, central

    def worker(self, view: Any, progress: Any) -> Any:
        v = self.acct.workers.get(str(view.id))
        if v is None:
            return view
        left = self.acct.remaining(str(view.id), view.file, progress) if self.per_file and view.file else 0.0
        return replace(view, vram_mb=v.current_mb, vram_remaining_mb=left)

    def snapshot_fields(self) -> dict[str, Any]:
        r = self.acct.reading
        free = None if r is None else r.free / MiB - self.acct.limits.reserve_mb
        # With a model server the workers hold no GPU memory: a new one costs none.
        return {"vram_budget_mb": self.acct.limits.budget_mb, "vram_free_mb": free,
                "predicted_vram_baseline_mb": self.acct.predictor.baseline_mb if self.per_file else 0.0}


# -- the loop's hooks: each one line in supervisor.py, nothing on a CPU run ------------------------------

def open_accounting(settings: Any, store: Any, reader: VramReader | None, emit: Any,
                    key: str) -> tuple[VramAccounting | None, VramViews | None]:
    """VRAM accounting for a CUDA run (``reader`` injected by tests, else NVML); (None, None) on a
    CPU run, and with one warning on a CUDA run that cannot read NVML."""
    from supervisor.gpu import open_reader  # noqa: PLC0415

    device = settings.run.device
    if reader is None:
        reader, why = open_reader(device)
        if reader is None:
            if device.startswith("cuda"):
                emit("gpu_memory_unavailable", level="warning", device=device, error=why,
                     effect="no VRAM budget: files are admitted on host memory alone")
            return None, None
    try:
        reading = reader.read()
    except Exception as exc:  # noqa: BLE001 - a driver that answers nothing
        emit("gpu_memory_unavailable", level="warning", device=device, error=f"{type(exc).__name__}: {exc}",
             effect="no VRAM budget: files are admitted on host memory alone")
        return None, None
    m = settings.memory
    params = store.load_model(settings.engine_name, key + VRAM_KEY, device) if store else None
    predictor = make_vram_predictor(settings.engine_name, params, quantile=m.quantile, margin=m.margin,
                                    min_samples=m.min_samples)
    acct = VramAccounting(reader=reader, limits=vram_limits(reading, m.vram_budget, m.vram_reserve),
                          predictor=predictor, reading=reading)
    from supervisor.model_server import use_model_server  # noqa: PLC0415 - model_server imports this module

    return acct, VramViews(acct, per_file=not use_model_server(settings))


VRAM_KEY = "#vram"  # the VRAM model's store key: the host model's key with this suffix


def run_fields(acct: VramAccounting | None, settings: Any) -> dict[str, Any]:
    if acct is None:
        return {}
    lim = acct.limits
    return {"vram_budget_mb": round(lim.budget_mb, 1), "vram_total_mb": round(lim.total_mb, 1),
            "vram_reserve_mb": round(lim.reserve_mb, 1), "vram_source": lim.source, "gpu": list(lim.names)}


def policy_views(views: VramViews, queue: Any, pending: tuple, workers: tuple,
                 get_worker: Any) -> tuple[dict[str, Any], tuple, tuple]:
    """The snapshot's VRAM fields, pending views with VRAM estimates, worker views with VRAM readings."""
    from supervisor.estimates import Estimator  # noqa: PLC0415

    out_p = []
    for p in pending:
        job = queue.get(p.file)
        if job is None:
            out_p.append(p)
            continue
        g, c = views.pending(p.file, Estimator.features(job))
        out_p.append(replace(p, vram_growth_mb=g, vram_central_peak_mb=c))
    out_w = []
    for w in workers:
        rec = get_worker(w.id) if isinstance(w.id, str) else None
        out_w.append(views.worker(w, rec.progress if rec is not None else None))
    return views.snapshot_fields(), tuple(out_p), tuple(out_w)


def admit_fields(acct: VramAccounting | None, rel: str) -> dict[str, Any]:
    est = acct.estimates.get(rel) if acct is not None else None
    if est is None:
        return {}
    return {"predicted_vram_mb": round(est.peak_mb, 1), "predicted_vram_growth_mb": round(est.growth_mb, 1)}


def file_over(acct: VramAccounting, views: VramViews, w: Any, outcome: Any, ev: Any, emit: Any) -> Any:
    """A file ended: a result teaches the VRAM model; a CUDA out-of-memory raises the file's VRAM
    bound and fails the attempt as a memory failure (retried, quarantined after max attempts),
    leaving the host estimate alone (the host did not run short)."""
    rel = outcome.job.rel
    est = acct.estimates.get(rel)
    predicted = {"vram_predicted_mb": round(est.peak_mb, 1)} if est is not None else {}
    if outcome.outcome == "done":
        growth = acct.learn(w.id, rel, getattr(ev, "features_run", None), getattr(ev, "peak_vram_mb", None))
        views.changed()
        v = acct.workers.get(w.id)
        extra = {**predicted, "vram_growth_mb": None if growth is None else round(growth, 1),
                 "vram_peak_mb": None if growth is None or v is None or v.baseline_mb is None
                 else round(v.baseline_mb + growth, 1)}
        return replace(outcome, extra={**outcome.extra, **extra})
    if getattr(ev, "kind", None) == "memory" and is_cuda_oom(getattr(ev, "reason", "")):
        features = outcome.job.features if isinstance(outcome.job.features, FileFeatures) else None
        bound = acct.out_of_memory(w.id, rel, features)
        views.changed()
        return replace(outcome, memory=False, kind="memory", reason=f"CUDA out of memory at {bound:.0f} MiB of GPU "
                       f"memory: {ev.reason}", extra={**outcome.extra, **predicted, "vram_observed_mb": round(bound, 1)})
    return outcome


def with_vram(figures: dict[str, Any], acct: VramAccounting | None, snap: Any) -> dict[str, Any]:
    """Memory figures (memory_sample, status) with the VRAM ones beside them, per worker too."""
    if acct is None:
        return figures
    from supervisor.policy import vram_committed_mb  # noqa: PLC0415

    figures.update(acct.figures(vram_committed_mb(snap) if snap is not None else None))
    for w in figures.get("workers") or []:
        w["vram_mb"] = acct.worker_mb(w["worker"])
    return figures


def with_vram_status(status: dict[str, Any], acct: VramAccounting | None, memory: dict | None) -> dict[str, Any]:
    if acct is None:
        return status
    keys = ("vram_used_mb", "vram_budget_mb", "vram_total_mb", "vram_free_mb", "vram_committed_mb")
    src = memory if memory is not None else acct.figures()
    status["vram"] = {k.removeprefix("vram_"): src.get(k) for k in keys} | {"ooms": acct.ooms}
    for w in status.get("workers") or []:
        w["vram_mb"] = acct.worker_mb(w["worker"])
    return status


def save(sink: Any, acct: VramAccounting | None, key: tuple[str, str, str], model_key: str) -> None:
    """The learned VRAM model goes to the store beside the host one (a side job, like it)."""
    if acct is None or sink.store is None:
        return
    engine, _, device = key
    sink._submit("save_model", sink.store.save_model, engine, model_key + VRAM_KEY, device,
                 acct.predictor.model.params())
