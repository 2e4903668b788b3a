"""Worker entry: load the engine once, say READY, align one file per request until told to stop.

Frames go out on a private copy of stdout (fd 1 is pointed at stderr so stray prints cannot corrupt
the stream); log lines go to stderr as JSON for the supervisor to forward. The worker leaves as soon
as its supervisor is gone (stdin EOF, a changed parent pid, or PR_SET_PDEATHSIG on Linux), so a
``kill -9`` of the supervisor never leaves a model-sized orphan behind.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import signal
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO

from worker import gpumem, protocol, selfmem
from worker.engines.base import BootError, Job, JobError
from worker.output import OutputError


def _set_parent_death_signal() -> None:
    """Ask the kernel to SIGKILL us when the supervisor's thread that spawned us dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def keep_console_renderers_out() -> None:
    """Keep rich out of this process: structlog imports it at once for console tracebacks (about
    70 ms, a quarter of a synthetic worker's start, paid again by every worker started), and a
    worker only writes JSON lines. Libraries that use rich treat it as optional, as if absent."""
    sys.modules.setdefault("rich", None)


_read_status_kb = selfmem.read_status_kb
_own_memory_mb = selfmem.own_memory_mb
_clear_hwm = selfmem.clear_hwm
# Progress messages at most this often: a span can take milliseconds on a small model.
PROGRESS_INTERVAL_S = 0.25


class Channel:
    """Frame writer shared by the main thread and the heartbeat thread."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        data = protocol.encode(msg)
        with self.lock:
            self.out.write(data)
            self.out.flush()


class Heartbeat(threading.Thread):
    """Sends a heartbeat every ``interval`` seconds and leaves if the supervisor has gone."""

    def __init__(self, channel: Channel, interval: float, parent: int) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.channel = channel
        self.interval = interval
        self.parent = parent
        self.job: str | None = None
        self.progress: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            if self.parent and os.getppid() != self.parent:
                os._exit(protocol.EXIT_PARENT_GONE)
            try:
                self.channel.send({"type": protocol.HEARTBEAT, "job": self.job, "progress": self.progress,
                                   "rss_mb": round((_read_status_kb("VmRSS") or 0) / 1024, 1)})
            except (BrokenPipeError, OSError):
                os._exit(protocol.EXIT_PARENT_GONE)


def load_engine(name: str, options: dict[str, Any]):
    """Import only the engine asked for: the synthetic one must start without importing torch."""
    selfmem.pin_mmap_threshold(options.get("mmap_threshold"))
    if options.get("model_server") and name in ("wav2vec", "whisper"):
        from worker.model_server import ServedEngine  # the model lives in the server: this stays on the CPU
        return ServedEngine(name, options)
    if name == "synthetic":
        from worker.engines.synthetic import SyntheticEngine
        return SyntheticEngine(options)
    if name == "wav2vec":
        from worker.engines.wav2vec import Wav2VecEngine
        return Wav2VecEngine(options)
    if name == "whisper":
        from worker.engines.whisper import WhisperEngine
        return WhisperEngine(options)
    raise BootError(f"unknown engine {name!r} (known: wav2vec, whisper, synthetic)")


def _follow_threads(threads: Any) -> None:
    """Run this file on the threads the supervisor gives it now (cores / running workers)."""
    torch = sys.modules.get("torch")
    if threads and torch is not None and int(threads) != torch.get_num_threads():
        torch.set_num_threads(int(threads))


class _Progress:
    """The progress callback an engine gets: a fraction for the heartbeat, and spans done, which
    go out at once (throttled) as ``progress`` messages with the growth so far above READY."""

    def __init__(self, channel: Channel, heartbeat: Heartbeat, job: str, ready_rss_mb: float) -> None:
        self.channel, self.heartbeat, self.job, self.ready_rss_mb = channel, heartbeat, job, ready_rss_mb
        self._sent_at = 0.0

    def __call__(self, fraction: float) -> None:
        self.heartbeat.progress = round(float(fraction), 4)

    def spans(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done <= 0 or (done < total and now - self._sent_at < PROGRESS_INTERVAL_S):
            return
        self._sent_at = now
        peak = selfmem.hwm_mb() or selfmem.rss_mb() or 0.0
        self.channel.send({"type": protocol.PROGRESS, "job": self.job, "spans_done": int(done),
                           "spans_total": int(total), "growth_mb": round(max(0.0, peak - self.ready_rss_mb), 1)})


def calibrate(engine, options: dict[str, Any], log) -> list[dict[str, Any]]:
    """Probe spans measured on this worker after loading (the READY ``calibration``): the first
    real file is then admitted on figures from this hardware, not on configured defaults.

    ``calibrate`` is true (measure), false (nothing) or ``"warm"``: the supervisor's learned model
    already holds probes and files from earlier runs, so only the unmeasured first pass runs (it
    leaves the allocator as every file after it finds it, keeping this READY baseline like the
    ones learned)."""
    mode = options.get("calibrate", True)
    if not mode:
        return []
    try:
        from worker.align import SpanAligner, measure_probes, probe_lengths, probe_plans, span_cap

        aligner = getattr(engine, "aligner", None)
        if isinstance(aligner, SpanAligner):
            return measure_probes(aligner, probe_plans(aligner.max_span_s), engine.release,
                                  measure=mode != "warm")
        lengths = probe_lengths(span_cap(getattr(engine, "name", ""), options))
        if mode == "warm":
            if getattr(engine, "warms_up", True):
                engine.probe(lengths[-1:])  # the largest, unmeasured
            return []
        return engine.probe(lengths)
    except Exception:  # noqa: BLE001 - a failed probe leaves the defaults in charge, never the worker down
        log.warning("calibration_failed", traceback=traceback.format_exc())
        return []


def freeze_loaded_objects() -> None:
    """Put what loading made (the imported runtime, the model) out of the collector's reach.

    Each file ends with a full ``gc.collect()`` (cycles among a file's tensors and transcripts must
    go before the next file's peak), and a full pass walks every tracked object: about 190 ms a
    file with Whisper base loaded in a fresh interpreter, 12 ms for the synthetic engine's imports
    alone. Those objects live as long as the worker, so after one last collection (garbage that
    loading left in cycles goes now, not never) they are frozen and each file's pass walks only
    what that file made. Frozen objects are still freed by reference count."""
    gc.collect()
    gc.freeze()


def serve(engine, channel: Channel, stdin: BinaryIO, heartbeat: Heartbeat, log, ready_rss_mb: float = 0.0) -> int:
    while True:
        try:
            msg = protocol.read_frame(stdin)
        except protocol.ProtocolError as exc:
            log.error("protocol_error", error=str(exc))
            return protocol.EXIT_PROTOCOL_ERROR
        if msg is None or msg["type"] == protocol.SHUTDOWN:
            return protocol.EXIT_OK
        if msg["type"] != protocol.JOB:
            log.error("protocol_error", error=f"unexpected message {msg['type']!r}")
            return protocol.EXIT_PROTOCOL_ERROR
        job = Job.from_message(msg)
        _follow_threads(job.options.get("threads"))
        heartbeat.job, heartbeat.progress = job.job, 0.0
        _clear_hwm()
        gpumem.reset_peak()
        t0, c0 = time.monotonic(), time.process_time()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        channel.send({"type": protocol.STARTED, "job": job.job})

        progress = _Progress(channel, heartbeat, job.job, ready_rss_mb)
        released = False
        try:
            result = engine.run(job, progress)
        except JobError as exc:
            channel.send({"type": protocol.ERROR, "job": job.job, "error": str(exc), "kind": exc.kind})
        except OutputError as exc:  # the output folder's fault (full, read-only), not the file's
            channel.send({"type": protocol.ERROR, "job": job.job, "error": str(exc), "kind": "output"})
        except MemoryError:
            channel.send({"type": protocol.ERROR, "job": job.job, "kind": "memory",
                          "error": f"{job.input}: out of memory inside the worker"})
            return protocol.EXIT_OK  # a fresh process is the only clean state after MemoryError
        except Exception as exc:  # an engine bug must fail the file, not the run
            from worker.align import is_out_of_memory  # noqa: PLC0415

            if is_out_of_memory(exc):  # a CUDA/torch out-of-memory outside a span: a memory failure
                channel.send({"type": protocol.ERROR, "job": job.job, "kind": "memory",
                              "error": f"{job.input}: out of memory: {type(exc).__name__}: {exc}".replace("\n", " ")[:2000]})
                return protocol.EXIT_OK
            log.error("job_crashed", file=str(job.input), traceback=traceback.format_exc())
            line = f"{job.input}: {type(exc).__name__}: {exc}".replace("\n", " ")
            channel.send({"type": protocol.ERROR, "job": job.job, "error": line[:2000], "kind": "internal"})
        else:
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = time.process_time() - c0 + (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            peak = round((_read_status_kb("VmHWM") or 0) / 1024, 1)
            wall = round(time.monotonic() - t0, 3)
            # Released before the result goes out, so the result can say what the worker still
            # holds: the floor of its next file's peak (that file reuses the memory).
            engine.release()
            released = True
            channel.send({
                "type": protocol.RESULT, "job": job.job, "output": str(result.output),
                "audio_seconds": result.audio_seconds, "peak_rss_mb": peak,
                "rss_after_mb": round((_read_status_kb("VmRSS") or 0) / 1024, 1),
                "wall_s": wall, "cpu_s": round(cpu, 3),
                "stats": result.stats, "warnings": result.warnings[:200],
                "features_run": getattr(result, "features_run", None),
                **({"peak_vram_mb": v} if (v := gpumem.peak_mb()) is not None else {}),
            })
        finally:
            heartbeat.job, heartbeat.progress = None, None
        if not released:
            engine.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--options", default="{}", help="engine options as JSON")
    parser.add_argument("--heartbeat", type=float, default=1.0)
    args = parser.parse_args(argv)

    _set_parent_death_signal()
    parent = int(os.environ.get("BATCHALIGN_SUPERVISE_PARENT_PID") or 0)
    if parent and os.getppid() != parent:
        return protocol.EXIT_PARENT_GONE
    out = protocol.take_protocol_stdout()
    stdin = os.fdopen(os.dup(0), "rb", buffering=0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle

    keep_console_renderers_out()
    from telemetry.logging import configure_logging, get_logger

    configure_logging(json_path=None, console="json", process="worker")
    log = get_logger("worker")
    channel = Channel(out)
    options = json.loads(args.options)
    t0 = time.monotonic()
    try:
        engine = load_engine(args.engine, options)
    except BootError as exc:
        channel.send({"type": protocol.BOOT_ERROR, "error": str(exc)})
        return protocol.EXIT_BOOT_ERROR
    except Exception as exc:
        channel.send({"type": protocol.BOOT_ERROR, "error": f"{args.engine}: {type(exc).__name__}: {exc}"})
        log.error("boot_failed", traceback=traceback.format_exc())
        return protocol.EXIT_BOOT_ERROR
    # Loaded: the supervisor may start the next worker's load while this one runs its probes.
    channel.send({"type": protocol.LOADED, "pid": os.getpid(), "startup_s": round(time.monotonic() - t0, 3),
                  **{k: round(v, 1) for k, v in _own_memory_mb().items()}})
    probes = calibrate(engine, options, log)
    freeze_loaded_objects()
    mem = _own_memory_mb()
    channel.send({"type": protocol.READY, "pid": os.getpid(), "protocol": protocol.PROTOCOL_VERSION,
                  "engine": args.engine, "model": getattr(engine, "model", ""),
                  "device": getattr(engine, "device", "cpu"), "startup_s": round(time.monotonic() - t0, 3),
                  "calibration": probes, **{k: round(v, 1) for k, v in mem.items()},
                  **({"vram_mb": v} if (v := gpumem.reserved_mb()) is not None else {})})
    heartbeat = Heartbeat(channel, args.heartbeat, parent)
    heartbeat.start()
    try:
        return serve(engine, channel, stdin, heartbeat, log, mem["rss_mb"])
    except (BrokenPipeError, OSError):
        return protocol.EXIT_PARENT_GONE


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown of big model objects: the OS reclaims faster
