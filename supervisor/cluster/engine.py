"""What runs inside a Dask worker process: the engine held for the process's life, and the task
that aligns one file and measures it.

The engine is loaded once per worker process (by ``EnginePlugin`` when the worker starts or the
supervisor connects, else by the first file) and kept between files. The per-file measurement is
the local worker's: VmHWM is cleared when the file starts (``/proc/self/clear_refs``) and read at
the end, so the peak is the real high-water mark, not a poll. The task never raises for a bad file:
it returns ``{"error", "kind"}`` so the supervisor decides; a worker that dies under it (nanny memory
restart, ``kill -9``, a Slurm kill) reaches the supervisor as a lost task instead.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from supervisor.cluster import TOPIC_FILE, TOPIC_READY
from worker import selfmem
from worker.__main__ import calibrate, load_engine
from worker.engines.base import Job, JobError
from worker.output import OutputError
from worker.protocol import EXIT_PARENT_GONE

THREADS_ENV = "BATCHALIGN_SUPERVISE_WORKER_THREADS"  # torch threads per worker, set by `worker`
PROGRESS_EVERY_S = 1.0


def _key(engine: str, options: dict[str, Any]) -> str:
    return engine + json.dumps(options, sort_keys=True, separators=(",", ":"))


class EngineHolder:
    """The one engine of this worker process; swapping engines releases the old one first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: str | None = None
        self.engine: Any = None
        self.info: dict[str, Any] | None = None

    def get(self, engine: str, options: dict[str, Any]) -> Any:
        key = _key(engine, options)
        with self.lock:
            if self.key != key:
                self.engine, self.key, self.info = None, None, None
                opts = dict(options)
                threads = int(os.environ.get(THREADS_ENV) or 0) or int(opts.get("threads") or 0) or 1
                opts["threads"] = threads
                t0 = time.monotonic()
                self.engine = load_engine(engine, opts)
                probes = calibrate(self.engine, opts, _Log())
                mem = selfmem.own_memory_mb()
                self.key = key
                self.info = {"pid": os.getpid(), "host": socket.gethostname(), "engine": engine,
                             "threads": threads, "startup_s": round(time.monotonic() - t0, 3),
                             "baseline_rss_mb": round(mem["rss_mb"], 1), "baseline_uss_mb": round(mem["uss_mb"], 1),
                             "baseline_pss_mb": round(mem["pss_mb"], 1), "calibration": probes}
                _announce(TOPIC_READY, self.info)
            return self.engine


HOLDER = EngineHolder()


class _Log:
    """``calibrate`` logs a failed probe; in a Dask worker that goes to the worker's own log."""

    def warning(self, event: str, **kw: Any) -> None:
        import logging

        logging.getLogger("batchalign_supervise.worker").warning("%s %s", event, kw.get("traceback", ""))


def _worker():
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def _announce(topic: str, msg: dict[str, Any]) -> None:
    w = _worker()
    if w is not None:
        w.log_event(topic, {**msg, "worker": w.address})


def _watch_parent(parent: int) -> None:
    """Leave when the nanny (or the supervisor of a LocalCluster) is gone: no model-sized orphans."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(EXIT_PARENT_GONE)


_watching = False


class EnginePlugin(WorkerPlugin):
    """Worker plugin: load the engine when the worker starts (or when the supervisor registers it)."""

    name = "batchalign-engine"

    def __init__(self, engine: str, options: dict[str, Any]) -> None:
        self.engine = engine
        self.options = options

    async def setup(self, worker: Any) -> None:
        import asyncio

        global _watching
        if not _watching:
            _watching = True
            threading.Thread(target=_watch_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, HOLDER.get, self.engine, self.options)
            # From the worker itself: a loading thread is not a task thread and cannot find its worker.
            worker.log_event(TOPIC_READY, {**(HOLDER.info or {}), "worker": worker.address})
        except Exception as exc:  # the first file reports it again, with its name
            worker.log_event(TOPIC_READY, {"worker": worker.address, "pid": os.getpid(),
                                           "boot_error": f"{self.engine}: {type(exc).__name__}: {exc}"})

    def teardown(self, worker: Any) -> None:
        return None

    def transition(self, key: Any, start: str, finish: str, **kw: Any) -> None:
        return None


def engine_info(dask_worker: Any = None) -> dict[str, Any] | None:
    """For ``client.run``: what this worker process has loaded (None before it has)."""
    return HOLDER.info


def set_allowed_failures(dask_scheduler: Any = None, n: int = 0) -> int:
    """For ``client.run_on_scheduler``: the supervisor, not the scheduler, decides retries."""
    old = dask_scheduler.allowed_failures
    dask_scheduler.allowed_failures = n
    return old


def _unreadable(path: Path, what: str, where: str) -> str | None:
    if os.access(path, os.R_OK):
        return None
    state = "does not exist" if not os.path.exists(path) else "is not readable"
    return (f"{path}: {what} {state} on worker {where}; the corpus must be on a filesystem "
            f"shared with the workers, at the same path")


class _Progress:
    """The engine's progress callback: a fraction, and spans done with the growth so far above
    READY (the local worker's ``progress`` message), sent to the supervisor at most once a second.
    Growth is counted from the READY baseline, as the local pool counts it: memory an earlier file
    left in the heap is this file's to reuse, so counting from just before the file would undercount."""

    def __init__(self, spec: dict[str, Any], ready_rss_mb: float) -> None:
        self.spec, self.ready_rss_mb = spec, ready_rss_mb
        self.fraction: float | None = None
        self._sent_at = 0.0

    def _send(self, **extra: Any) -> None:
        now = time.monotonic()
        if now - self._sent_at < PROGRESS_EVERY_S and not extra.get("final"):
            return
        self._sent_at = now
        rss = selfmem.rss_mb() or 0.0
        peak = selfmem.hwm_mb() or rss
        _announce(TOPIC_FILE, {"phase": "progress", "key": self.spec["key"], "file": self.spec["file"],
                               "pid": os.getpid(), "fraction": self.fraction, "rss_mb": round(rss, 1),
                               "peak_rss_mb": round(peak, 1), "growth_mb": round(max(0.0, peak - self.ready_rss_mb), 1),
                               **{k: v for k, v in extra.items() if k != "final"}})

    def __call__(self, fraction: float) -> None:
        self.fraction = round(float(fraction), 4)
        self._send()

    def spans(self, done: int, total: int) -> None:
        self._send(spans_done=int(done), spans_total=int(total), final=done >= total)


def align_file(spec: dict[str, Any]) -> dict[str, Any]:
    """Align one file on this worker; returns its result or ``{"error", "kind"}``, and its memory."""
    w = _worker()
    where = f"{w.address if w else '?'} ({socket.gethostname()})"
    base = {"worker": w.address if w else None, "pid": os.getpid(), "host": socket.gethostname()}
    for path, what in ((Path(spec["cha"]), "transcript"), (Path(spec["media"]) if spec.get("media") else None, "media")):
        problem = _unreadable(path, what, where) if path is not None else None
        if problem:
            return {**base, "error": problem, "kind": "bad_input"}
    try:
        engine = HOLDER.get(spec["engine"], spec["options"])
    except Exception as exc:
        return {**base, "error": f"{spec['engine']}: cannot load the engine on {where}: {type(exc).__name__}: {exc}",
                "kind": "boot"}
    job = Job(job=spec["key"], input=Path(spec["cha"]), output=Path(spec["out"]),
              media=Path(spec["media"]) if spec.get("media") else None, rel=spec["file"], options={})
    selfmem.clear_hwm()
    before = selfmem.own_memory_mb()
    t0, c0 = time.monotonic(), time.process_time()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    _announce(TOPIC_FILE, {"phase": "started", "key": spec["key"], "file": spec["file"], "pid": os.getpid(),
                           "rss_mb": round(before["rss_mb"], 1)})
    ready_rss = (HOLDER.info or {}).get("baseline_rss_mb") or before["rss_mb"]
    progress = _Progress(spec, ready_rss)

    def memory() -> dict[str, Any]:
        hwm = selfmem.hwm_mb() or 0.0
        return {"baseline_rss_mb": round(ready_rss, 1), "rss_before_mb": round(before["rss_mb"], 1),
                "peak_rss_mb": round(hwm, 1), "growth_mb": round(max(0.0, hwm - ready_rss), 1),
                "wall_s": round(time.monotonic() - t0, 3)}

    try:
        result = engine.run(job, progress)
    except JobError as exc:
        kind = "bad_input" if exc.kind in ("input", "media") else "crash"
        return {**base, **memory(), "error": str(exc), "kind": kind, "engine_kind": exc.kind}
    except OutputError as exc:  # the output folder's fault (full, read-only), not the file's
        return {**base, **memory(), "error": str(exc), "kind": "output"}
    except MemoryError:
        return {**base, **memory(), "error": f"{job.input}: out of memory inside the worker", "kind": "memory"}
    except Exception as exc:  # an engine bug fails the file, not the worker
        line = f"{job.input}: {type(exc).__name__}: {exc}".replace("\n", " ")
        return {**base, **memory(), "error": line[:2000], "kind": "crash", "traceback": traceback.format_exc()[-4000:]}
    finally:
        try:
            engine.release()
        except Exception:
            pass
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - c0 + (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {**base, **memory(), "output": str(result.output), "audio_seconds": result.audio_seconds,
            "cpu_s": round(cpu, 3), "stats": result.stats, "warnings": result.warnings[:200],
            "features_run": getattr(result, "features_run", None)}
