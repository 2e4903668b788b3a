"""VRAM through the whole run core: a scripted backend, a fake NVML reader, real files.

A CUDA out-of-memory is a memory failure of its file (requeued with a larger VRAM estimate,
quarantined after max attempts, never "done with warnings"); status, events and metrics show VRAM
beside RAM on a GPU run and nothing of it on a CPU run.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.synth_corpus import make_corpus
from supervisor.backend import FileError, FileResult, WorkerReady, WorkerSpawned
from supervisor.corpus import find_transcripts
from supervisor.gpu import FakeVramReader
from supervisor.supervisor import Supervisor
from test_run_core import Backend, Log, Sampler, limits, settings

pytestmark = pytest.mark.timeout(60)
CTX = 700.0  # MiB a worker holds on the GPU at READY


class GpuBackend(Backend):
    """Scripted workers that also hold GPU memory in a fake NVML: CTX at READY."""

    def __init__(self, reader: FakeVramReader, script=None) -> None:
        super().__init__(script)
        self.reader = reader

    def spawn(self) -> None:
        self.n += 1
        wid, pid = f"w{self.n}", 50000 + self.n
        self.reader.procs[pid] = CTX
        self.q.put_nowait(WorkerSpawned(wid, pid))
        self.q.put_nowait(WorkerReady(wid, pid, 50.0, vram_mb=CTX - 300))


def run(tmp_path, durations, backend, reader=None, device="cuda", **memory):
    make_corpus(tmp_path / "corpus", durations)
    s = settings(tmp_path, sample_log_interval=0.0, **memory)
    s.run.device = device
    s.run.max_attempts = 3
    log = Log()
    sup = Supervisor(s, log=log, sampler=Sampler(), limits=limits(), backend=backend, vram_reader=reader)
    found = find_transcripts(s.corpus, out_root=s.out, in_place=False)
    statuses = []
    sup.add_status_hook(statuses.append)
    summary = asyncio.run(sup.run(found))
    return sup, log, summary


def test_a_cuda_out_of_memory_is_retried_with_more_vram_then_quarantined(tmp_path):
    reader = FakeVramReader(total_mb=24_000)

    def script(wid, spec):
        if spec.file == "f000.cha":
            reader.procs[50000 + int(wid[1:])] = CTX + 3000  # what it held when the allocator failed
            return [FileError(wid, spec.file, "f000.cha: the model failed on 0.00-30.00 s: OutOfMemoryError: "
                              "CUDA out of memory. Tried to allocate 2.00 GiB", "memory", job_id=spec.job_id)]
        return [FileResult(wid, spec.file, None, 10.0, 0.1, 0.1, {"audio_s": 3.0, "longest_span_s": 3.0},
                           job_id=spec.job_id, peak_vram_mb=CTX - 300 + 200)]

    backend = GpuBackend(reader, script)

    def assign(wid, spec):  # the error arrives after a few ticks, so NVML saw what the file held
        backend.assigned.append((wid, spec))
        later = script(wid, spec)
        asyncio.get_running_loop().call_later(0.15 if spec.file == "f000.cha" else 0.0,
                                              lambda: [backend.q.put_nowait(e) for e in later])

    backend.assign = assign
    sup, log, summary = run(tmp_path, [30, 3], backend, reader)
    assert summary.counts["done"] == 1 and summary.counts["quarantined"] == 1
    failed = [e for e in log.named("file_failed") if e["file"] == "f000.cha"]
    assert len(failed) == 3 and all(e["kind"] == "memory" and "CUDA out of memory" in e["reason"] for e in failed)
    admitted = [e["predicted_vram_mb"] for e in log.named("file_admitted") if e["file"] == "f000.cha"]
    assert len(admitted) == 3 and admitted[0] < admitted[1] <= admitted[2]
    assert admitted[1] >= (CTX + 3000) * 1.2  # above what it held when it failed
    (q,) = log.named("file_quarantined")
    assert q["file"] == "f000.cha"
    assert not log.named("file_warning") and not [e for e in log.named("file_done") if e["file"] == "f000.cha"]
    # The host did not run short: the host estimate keeps no lower bound from a GPU failure.
    assert sup.queue.get("f000.cha").lower_bound_mb is None
    # Each worker that raised it is replaced: a fresh CUDA context.
    assert sum(1 for _, a in backend.signals if a == "stop") >= 3
    assert sup.status()["vram"]["ooms"] == 3


def test_status_events_and_metrics_show_vram_beside_ram(tmp_path):
    reader = FakeVramReader(total_mb=24_000)

    def script(wid, spec):
        return [FileResult(wid, spec.file, None, 10.0, 0.1, 0.1, {"audio_s": 3.0, "longest_span_s": 3.0},
                           job_id=spec.job_id, peak_vram_mb=CTX - 300 + 250)]

    sup, log, summary = run(tmp_path, [3, 4, 5], GpuBackend(reader, script), reader, vram_budget=8000 * 2**20)
    assert summary.exit_code == 0
    (started,) = log.named("run_started")
    assert started["vram_budget_mb"] == 8000.0 and started["vram_total_mb"] == 24_000.0 and started["gpu"]
    admitted = log.named("file_admitted")
    assert admitted and all(e["predicted_vram_mb"] > 0 for e in admitted)
    done = log.named("file_done")
    assert len(done) == 3 and all(e["vram_growth_mb"] == pytest.approx(250.0) for e in done)
    assert all(e["vram_peak_mb"] == pytest.approx(CTX + 250.0) for e in done)
    samples = log.named("memory_sample")
    assert samples and "vram_used_mb" in samples[0] and "vram_mb" in (samples[0]["workers"] or [{"vram_mb": 0}])[0]
    status = sup.status()
    assert status["vram"]["budget_mb"] == 8000.0 and "used_mb" in status["vram"]
    from supervisor.metrics import render_prometheus

    text = render_prometheus(status)
    assert "batchalign_vram_budget_bytes" in text and "batchalign_vram_used_bytes" in text


def test_a_cpu_run_shows_no_vram(tmp_path):
    sup, log, summary = run(tmp_path, [3, 4], Backend(), None, device="cpu")
    assert summary.exit_code == 0 and sup.vram is None
    assert "vram" not in sup.status()
    assert not any(k.startswith("vram") for e in log.events for k in e)
    from supervisor.metrics import render_prometheus

    assert "vram" not in render_prometheus(sup.status())


def test_a_cuda_run_without_nvml_says_so_once_and_admits_on_host_memory(tmp_path, monkeypatch):
    import supervisor.gpu as gpu

    monkeypatch.setattr(gpu, "open_reader", lambda device: (None, "nvidia-ml-py is not installed"))
    sup, log, summary = run(tmp_path, [3], Backend(), None, device="cuda")
    assert summary.exit_code == 0 and sup.vram is None
    (w,) = log.named("gpu_memory_unavailable")
    assert "nvidia-ml-py" in w["error"] and "host memory" in w["effect"]


def test_report_shows_vram_beside_ram_on_a_gpu_run_only(tmp_path):
    from telemetry.report import render_text, summarize

    reader = FakeVramReader(total_mb=24_000)

    def script(wid, spec):
        return [FileResult(wid, spec.file, None, 10.0, 0.1, 0.1, {"audio_s": 3.0, "longest_span_s": 3.0},
                           job_id=spec.job_id, peak_vram_mb=CTX - 300 + 250)]

    sup, log, summary = run(tmp_path / "gpu", [3, 4], GpuBackend(reader, script), reader)
    text = render_text(summarize(log.events))
    assert "VRAM budget" in text and "VRAM MiB" in text and f"{CTX + 250:,.0f}" in text
    sup, log, summary = run(tmp_path / "cpu", [3, 4], Backend(), None, device="cpu")
    text = render_text(summarize(log.events))
    assert "VRAM" not in text
