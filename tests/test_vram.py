"""VRAM: NVML sensing through a fake reader, the VRAM budget in the pure policy, the VRAM prediction."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from supervisor.gpu import MiB, FakeVramReader, GpuReading, NvmlReader, device_indices, open_reader
from supervisor.policy import (Act, Bands, MemoryPolicy, PendingView, Snapshot, WorkerView, vram_committed_mb)
from supervisor.vram import VramAccounting, make_vram_predictor, vram_limits
from telemetry.model import FileFeatures

pytestmark = pytest.mark.timeout(30)


def snap(workers=(), pending=(), vram_budget=None, vram_free=None, vram_baseline=0.0, **kw) -> Snapshot:
    return Snapshot(now=100.0, budget_mb=100_000.0, reserve_mb=1000.0, available_mb=1e9, workers=tuple(workers),
                    pending=tuple(pending), predicted_baseline_mb=1000.0, max_workers=kw.pop("max_workers", 8),
                    vram_budget_mb=vram_budget, vram_free_mb=vram_free, predicted_vram_baseline_mb=vram_baseline, **kw)


def idle(i, vram=0.0):
    return WorkerView(id=f"w{i}", state="ready", pss_mb=1000, uss_mb=1000, baseline_uss_mb=1000, idle_since=0.0,
                      vram_mb=vram)


def busy(i, vram=0.0, vram_left=0.0):
    return WorkerView(id=f"w{i}", state="busy", pss_mb=1000, uss_mb=1000, baseline_uss_mb=1000, file=f"f{i}",
                      growth_mb=100, remaining_mb=100, file_started_at=float(i), vram_mb=vram,
                      vram_remaining_mb=vram_left)


def pend(name, vram_growth=0.0, vram_central=0.0):
    return PendingView(file=name, peak_mb=1100, growth_mb=100, central_peak_mb=1050, vram_growth_mb=vram_growth,
                       vram_central_peak_mb=vram_central)


def acts(ds):
    return [(d.act, d.worker, d.file) for d in ds]


# -- the policy ---------------------------------------------------------------------------------------

def test_without_a_gpu_the_vram_fields_change_nothing():
    p = MemoryPolicy(Bands())
    ws = [idle(1, vram=50_000), idle(2, vram=50_000)]
    out = p.decide(snap(workers=ws, pending=[pend("a", vram_growth=90_000), pend("b", vram_growth=90_000)]))
    assert acts(out) == [(Act.ADMIT, "w1", "a"), (Act.ADMIT, "w2", "b")]


def test_admission_counts_the_vram_budget():
    p = MemoryPolicy(Bands())
    ws = [idle(i, vram=2000) for i in range(1, 5)]
    # 4 workers hold 8000 of a 12000 budget: room for two files of 1500 more, not three.
    out = p.decide(snap(workers=ws, pending=[pend(x, vram_growth=1500) for x in "abcd"], vram_budget=12_000))
    assert acts(out) == [(Act.ADMIT, "w1", "a"), (Act.ADMIT, "w2", "b")]


def test_running_files_remaining_vram_is_promised():
    p = MemoryPolicy(Bands())
    ws = [busy(1, vram=3000, vram_left=4000), idle(2, vram=3000)]
    assert p.decide(snap(workers=ws, pending=[pend("a", vram_growth=1500)], vram_budget=11_000)) == []
    out = p.decide(snap(workers=ws, pending=[pend("a", vram_growth=1500)], vram_budget=11_500))
    assert acts(out) == [(Act.ADMIT, "w2", "a")]


def test_device_free_memory_limits_admission_too():
    p = MemoryPolicy(Bands())
    ws = [idle(1, vram=2000)]
    # Budget allows it, but another user took the device: only 1000 MiB free.
    assert p.decide(snap(workers=ws, pending=[pend("a", vram_growth=1500)], vram_budget=80_000, vram_free=1000)) == []
    out = p.decide(snap(workers=ws, pending=[pend("a", vram_growth=1500)], vram_budget=80_000, vram_free=2000))
    assert acts(out) == [(Act.ADMIT, "w1", "a")]


def test_spawn_needs_a_new_workers_vram_context_plus_the_file():
    p = MemoryPolicy(Bands())
    ws = [busy(1, vram=3000)]
    pending = [pend("a", vram_growth=1000)]
    assert p.decide(snap(workers=ws, pending=pending, vram_budget=6500, vram_baseline=3000)) == []
    out = p.decide(snap(workers=ws, pending=pending, vram_budget=7000, vram_baseline=3000))
    assert acts(out) == [(Act.SPAWN, None, "a")]


def test_a_starting_workers_vram_baseline_is_committed():
    s = snap(workers=[WorkerView(id="w1", state="starting", pss_mb=0, uss_mb=0), busy(2, vram=500, vram_left=200)],
             vram_budget=10_000, vram_baseline=3000)
    assert vram_committed_mb(s) == pytest.approx(3700)


def test_a_file_over_the_vram_budget_alone_is_rejected_once():
    p = MemoryPolicy(Bands())
    s = snap(workers=[idle(1, vram=2000)], pending=[pend("big", vram_growth=20_000, vram_central=18_000)],
             vram_budget=16_000)
    out = p.decide(s)
    assert [d.act for d in out] == [Act.REJECT] and "GPU memory" in out[0].reason
    assert [d.act for d in p.decide(s)] == []  # said once


def test_vram_over_the_admit_band_admits_nothing():
    p = MemoryPolicy(Bands())
    ws = [busy(1, vram=9500), idle(2, vram=0)]
    assert p.decide(snap(workers=ws, pending=[pend("a", vram_growth=10)], vram_budget=10_000)) == []


def test_eight_files_under_a_budget_for_three_run_three_at_a_time():
    """A budget below what 8 files need: at most what fits runs at once, the rest wait, all finish."""
    p = MemoryPolicy(Bands())
    files = [f"f{i}" for i in range(8)]
    ctx, grow, budget = 1000.0, 1500.0, 3 * (1000 + 1500) + 200
    workers: dict[str, WorkerView] = {}
    done: list[str] = []
    running_max = 0
    for step in range(200):
        pending = [pend(f, vram_growth=grow) for f in files if f not in done
                   and all(w.file != f for w in workers.values())]
        out = p.decide(snap(workers=list(workers.values()), pending=pending, vram_budget=budget,
                            vram_baseline=ctx, max_workers=8))
        for d in out:
            if d.act is Act.SPAWN:
                wid = f"w{len(workers) + 1}"
                workers[wid] = idle(len(workers) + 1, vram=ctx)
            elif d.act is Act.ADMIT:
                workers[d.worker] = replace(workers[d.worker], state="busy", file=d.file, vram_mb=ctx + grow,
                                            file_started_at=float(step))
        used = sum(w.vram_mb for w in workers.values())
        assert used <= budget
        running = [w for w in workers.values() if w.state == "busy"]
        running_max = max(running_max, len(running))
        if running and step % 2:  # the oldest file finishes
            w = min(running, key=lambda w: w.file_started_at)
            done.append(w.file)
            workers[w.id] = replace(w, state="ready", file=None, vram_mb=ctx, idle_since=float(step))
        if len(done) == 8:
            break
    assert sorted(done) == sorted(files)
    assert running_max == 3


# -- sensing --------------------------------------------------------------------------------------------

def test_device_indices():
    assert device_indices("cuda") == [0] and device_indices("cuda:3") == [3]
    assert device_indices("cpu") is None and device_indices("mps") is None


def test_open_reader_on_cpu_needs_no_nvml():
    assert open_reader("cpu") == (None, "not a CUDA device")


class _FakeNvml:
    """pynvml's calls the reader uses, answering like one 80 GiB device with two processes."""

    def __init__(self):
        self.inited = self.shut = False

    def nvmlInit(self):
        self.inited = True

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("h", i)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 * 1024 * MiB, free=70 * 1024 * MiB, used=10 * 1024 * MiB)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=11, usedGpuMemory=3000 * MiB), SimpleNamespace(pid=12, usedGpuMemory=None)]


def test_nvml_reader_reads_devices_and_processes():
    nv = _FakeNvml()
    r = NvmlReader([0], nvml=nv)
    got = r.read()
    assert got.devices[0].name == "NVIDIA H200" and got.total == 80 * 1024 * MiB and got.free == 70 * 1024 * MiB
    assert got.processes == {11: 3000 * MiB}  # a hidden figure is unknown, never 0
    assert got.of([11, 99]) == 3000 * MiB and got.of([12]) is None
    r.close()
    assert nv.shut


def test_vram_limits_budget_and_reserve():
    reading = FakeVramReader(total_mb=81_920).read()
    lim = vram_limits(reading)
    assert lim.source == "device" and lim.reserve_mb == pytest.approx(4096) and lim.budget_mb == pytest.approx(77_824)
    lim = vram_limits(reading, budget=10_000 * MiB)
    assert lim.source == "budget" and lim.budget_mb == pytest.approx(10_000)


# -- the accounting and the prediction ------------------------------------------------------------------

def _acct(total=24_000.0):
    reader = FakeVramReader(total_mb=total)
    return reader, VramAccounting(reader=reader, limits=vram_limits(reader.read()),
                                  predictor=make_vram_predictor("wav2vec", min_samples=2))


def test_ready_baseline_comes_from_nvml_else_from_the_worker():
    reader, acct = _acct()
    reader.procs[100] = 900.0
    acct.sample([])
    assert acct.ready("w1", 100, reported_mb=400.0) == pytest.approx(900.0)
    assert acct.ready("w2", 200, reported_mb=400.0) == pytest.approx(400.0)  # NVML does not list it
    assert acct.predictor.baseline_mb >= 400.0


def test_file_growth_is_learned_per_key_and_moves_the_estimate():
    reader, acct = _acct()
    reader.procs[100] = 1000.0
    acct.sample([])
    acct.ready("w1", 100, reported_mb=300.0)
    worker = SimpleNamespace(id="w1", pid=100, job=object())
    feats = [FileFeatures(audio_s=60.0, longest_span_s=s, n_spans=4) for s in (5.0, 10.0, 20.0, 30.0)]
    cold = acct.estimate("x", FileFeatures(audio_s=60, longest_span_s=20.0, n_spans=4)).growth_mb
    for i, f in enumerate(feats):
        acct.started("w1")
        reader.procs[100] = 1000.0 + 50.0 * f.longest_span_s  # 50 MiB per span second
        acct.sample([worker])
        reader.procs[100] = 1000.0
        acct.sample([SimpleNamespace(id="w1", pid=100, job=None)])
        assert acct.learn("w1", f"f{i}", f.to_dict(), None) == pytest.approx(50.0 * f.longest_span_s)
    learned = acct.estimate("x", FileFeatures(audio_s=60, longest_span_s=20.0, n_spans=4))
    assert learned.source != "cold" and learned.growth_mb >= 1000.0 > cold
    assert learned.growth_mb < 1000.0 * 1.6


def test_worker_reported_allocator_peak_counts_when_nvml_is_blind():
    reader, acct = _acct()
    acct.sample([])
    acct.ready("w1", 100, reported_mb=300.0)  # NVML lists nothing for this pid
    assert acct.growth_seen("w1", 1500.0) == pytest.approx(1200.0)


def test_cuda_oom_raises_the_files_vram_estimate():
    reader, acct = _acct()
    reader.procs[100] = 1000.0
    acct.sample([])
    acct.ready("w1", 100, reported_mb=None)
    f = FileFeatures(audio_s=60, longest_span_s=30.0, n_spans=2)
    before = acct.estimate("a.cha", f)
    reader.procs[100] = 9000.0
    acct.sample([SimpleNamespace(id="w1", pid=100, job=object())])
    bound = acct.out_of_memory("w1", "a.cha", f)
    assert bound == pytest.approx(9000.0)
    after = acct.estimate("a.cha", f)
    assert after.peak_mb >= 9000.0 * 1.2 > before.peak_mb and after.source == "lower_bound"
    assert acct.ooms == 1


def test_a_failing_reader_is_reported_once_and_keeps_the_last_figures():
    reader, acct = _acct()
    reader.procs[1] = 700.0
    acct.sample([SimpleNamespace(id="w1", pid=1, job=None)])
    reader.fail = RuntimeError("GPU is lost")
    assert "GPU is lost" in acct.sample([])
    assert acct.sample([]) is None
    assert acct.worker_mb("w1") == pytest.approx(700.0)
    assert acct.figures()["vram_used_mb"] == pytest.approx(700.0)


def test_reading_of_a_tree_sums_its_members():
    r = GpuReading(devices=(), processes={1: 10 * MiB, 2: 5 * MiB})
    assert r.of([1, 2, 3]) == 15 * MiB


def test_with_a_model_server_files_and_new_workers_cost_no_vram():
    from supervisor.vram import VramViews

    reader, acct = _acct()
    views = VramViews(acct, per_file=False)
    assert views.pending("a.cha", FileFeatures(audio_s=600, longest_span_s=30.0)) == (0.0, 0.0)
    assert views.snapshot_fields()["predicted_vram_baseline_mb"] == 0.0
    assert VramViews(acct).snapshot_fields()["predicted_vram_baseline_mb"] > 0


def test_vram_settings_from_the_environment_and_a_bad_model_server_value():
    from supervisor.settings import SettingsError, load_settings

    s = load_settings(environ={"BATCHALIGN_SUPERVISE_MEMORY_VRAM_BUDGET": "12GiB",
                               "BATCHALIGN_SUPERVISE_MODEL_SERVER": "off"})
    assert s.memory.vram_budget == 12 * 2**30 and s.run.model_server == "off"
    with pytest.raises(SettingsError, match="model_server"):
        load_settings(environ={"BATCHALIGN_SUPERVISE_MODEL_SERVER": "sometimes"})
