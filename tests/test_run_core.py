"""The run core driven through its seams: a scripted backend, fake memory readings, real files.

Each test pins a defect the loop once had: a side job that took the run down, a paused worker
lost when its file ended, a reload filed under another engine, blind admission when host memory
could not be read, out-of-memory errors treated as warnings, cached answers taught as samples,
threads fixed at spawn, a spawn that blocked the loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from bench.synth_corpus import make_corpus
from supervisor.backend import (FileError, FileResult, FileStarted, JobSpec, LocalBackend, WorkerExited, WorkerReady,
                                WorkerSpawned)
from supervisor.corpus import find_transcripts
from supervisor.sampler import HostMem, Limits, ProcMem
from supervisor.settings import Settings
from supervisor.supervisor import Supervisor
from supervisor.workers import WorkerState, WorkerTable
from telemetry.store import TelemetryStore

pytestmark = pytest.mark.timeout(60)
MiB = 2**20


class Log:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __getattr__(self, level):
        return lambda event, **f: self.events.append({"event": event, "level": level, **f})

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]


class Sampler:
    """Host memory as given (or unreadable); each worker at its baseline plus what a test sets."""

    def __init__(self, available_mb: float | None = 8000.0) -> None:
        self.available_mb = available_mb
        self.extra: dict[int, float] = {}

    def host(self) -> HostMem:
        if self.available_mb is None:
            raise OSError(5, "Input/output error: /proc/meminfo")
        b = int(self.available_mb * MiB)
        return HostMem(total=16 << 30, available=b, psi_some_avg10=0.0, psi_full_avg10=0.0, swap_free=0,
                       mem_available=b)

    def tree(self, pid: int, *, exact: bool = False) -> ProcMem:
        b = int((50 + self.extra.get(pid, 0.0)) * MiB)
        return ProcMem(pid=pid, rss=b, uss=b, pss=b, swap=0, hwm=b)


class Backend:
    """Workers that answer each file as ``script(spec)`` says: a list of events to send back."""

    name = "scripted"

    def __init__(self, script=None) -> None:
        self.q: asyncio.Queue = asyncio.Queue()
        self.n = 0
        self.assigned: list[tuple[str, JobSpec]] = []
        self.signals: list[tuple[str, str]] = []
        self.script = script or (lambda wid, spec: [FileResult(wid, spec.file, None, 10.0, 0.1, 0.1, {},
                                                               job_id=spec.job_id)])

    async def start(self) -> None:
        return None

    def spawn(self) -> None:
        self.n += 1
        wid, pid = f"w{self.n}", 50000 + self.n
        self.q.put_nowait(WorkerSpawned(wid, pid))
        self.q.put_nowait(WorkerReady(wid, pid, 50.0))

    def assign(self, wid, spec: JobSpec) -> None:
        self.assigned.append((wid, spec))
        self.q.put_nowait(FileStarted(wid, spec.file))
        for ev in self.script(wid, spec):
            self.q.put_nowait(ev)

    def signal(self, wid, action) -> None:
        self.signals.append((wid, action))
        if action in ("kill", "stop"):
            self.q.put_nowait(WorkerExited(wid, 50000 + int(wid[1:]), -9 if action == "kill" else 0,
                                           9 if action == "kill" else None, None))

    async def events(self):
        while True:
            yield await self.q.get()

    async def close(self) -> None:
        return None


def settings(tmp_path: Path, **memory) -> Settings:
    s = Settings()
    s.run.engine = "synthetic"
    s.run.workers = "2"
    s.run.state_dir = str(tmp_path / "state")
    s.memory.ledger = "off"
    s.memory.poll_interval = 0.02
    for k, v in memory.items():
        setattr(s.memory, k, v)
    s.corpus = [tmp_path / "corpus"]
    s.out = tmp_path / "out"
    s.service.control_socket = "off"
    return s


def limits(budget_mb: float = 4000) -> Limits:
    b = int(budget_mb * MiB)
    return Limits(limit=b, budget=b, reserve=512 * MiB, source="test", host_total=16 << 30, cgroup_limit=None,
                  cgroup_path=None)


def supervise(tmp_path, durations, *, backend=None, sampler=None, store=None, stop_after=None, **memory):
    make_corpus(tmp_path / "corpus", durations)
    s = settings(tmp_path, **memory)
    log = Log()
    sup = Supervisor(s, log=log, sampler=sampler or Sampler(), store=store, limits=limits(),
                     backend=backend or Backend())
    found = find_transcripts(s.corpus, out_root=s.out, in_place=False)

    async def main():
        if stop_after is not None:
            asyncio.get_running_loop().call_later(stop_after, sup.inbox.put_nowait, ("signal", signal.SIGINT))
        return await sup.run(found)

    summary = asyncio.run(main())
    return sup, log, summary


def test_a_paused_worker_whose_file_ends_is_continued_and_takes_the_next_file():
    class B:
        def __init__(self):
            self.calls = []

        def signal(self, wid, action):
            self.calls.append(action)

        def assign(self, wid, spec):
            self.calls.append("assign")

    b = B()
    t = WorkerTable(b, emit=lambda *a, **k: None, clock=time.monotonic)
    w = t.spawned("w1", 1)
    t._to(w, WorkerState.READY)
    t.assign(w, type("J", (), {"rel": "a.cha", "estimate": None})(), JobSpec("a.cha", "a", None, "o", {}, 1, 1, 1))
    t.pause(w, "pressure", {})
    assert t.release(w) is not None
    assert w.state is WorkerState.READY and w.job is None and w.paused_at is None
    assert b.calls == ["assign", "pause", "resume"]  # SIGCONT: it can run the next file


def test_a_released_worker_counts_what_it_says_it_holds_not_its_last_sampled_peak():
    class B:
        def assign(self, wid, spec):
            pass

    t = WorkerTable(B(), emit=lambda *a, **k: None, clock=time.monotonic)
    w = t.spawned("w1", 1)
    t._to(w, WorkerState.READY)
    w.baseline_uss_mb, w.baseline_pss_mb, w.baseline_rss_mb = 150.0, 160.0, 200.0
    t.assign(w, type("J", (), {"rel": "a.cha", "estimate": None})(), JobSpec("a.cha", "a", None, "o", {}, 1, 1, 1))
    w.uss_mb, w.pss_mb, w.rss_mb = 1300.0, 1310.0, 1350.0  # sampled at the file's peak
    t.release(w, rss_after_mb=230.0)
    assert w.held_mb == pytest.approx(30.0)
    assert (w.uss_mb, w.pss_mb, w.rss_mb) == pytest.approx((180.0, 190.0, 230.0))
    # Unknown: the readings wait for the next sample (never guessed lower).
    t.assign(w, type("J", (), {"rel": "b.cha", "estimate": None})(), JobSpec("b.cha", "b", None, "o", {}, 1, 1, 1))
    w.uss_mb, w.pss_mb = 900.0, 910.0
    t.release(w)
    assert (w.uss_mb, w.pss_mb) == (900.0, 910.0)


def test_a_failing_telemetry_store_costs_one_warning_and_the_run_goes_on(tmp_path):
    class FullStore(TelemetryStore):
        def record_attempt(self, a):
            raise sqlite3.OperationalError("database or disk is full")

    store = FullStore(tmp_path / "t.sqlite")
    sup, log, summary = supervise(tmp_path, [3, 4, 5, 6, 7], store=store)
    assert summary.exit_code == 0 and summary.counts["done"] == 5
    warnings = log.named("telemetry_unavailable")
    assert len(warnings) == 1 and "disk is full" in warnings[0]["error"] and str(store.path) == warnings[0]["store"]
    assert sup.estimator.predictor.model.n_samples == 5  # learning went on in memory
    assert not log.named("handler_failed")


def test_host_memory_that_cannot_be_read_admits_nothing_and_says_so(tmp_path):
    sup, log, summary = supervise(tmp_path, [3, 4], sampler=Sampler(available_mb=None), stop_after=1.0)
    assert not log.named("file_admitted") and not log.named("worker_spawn_requested")
    (said,) = log.named("host_memory_unreadable")
    assert said["level"] == "error" and "admitting nothing" in said["effect"]
    assert summary.exit_code == 4 and summary.counts["pending"] == 2  # interrupted with files left


def test_out_of_memory_in_the_engine_is_a_memory_failure_requeued_larger(tmp_path):
    tries: dict[str, int] = {}

    def script(wid, spec):
        tries[spec.file] = tries.get(spec.file, 0) + 1
        if spec.file == "f000.cha" and tries[spec.file] == 1:
            return [FileError(wid, spec.file, "f000.cha: the model failed on 0-30 s: OutOfMemoryError", "memory",
                              job_id=spec.job_id)]
        return [FileResult(wid, spec.file, None, 10.0, 0.1, 0.1, {}, job_id=spec.job_id)]

    backend = Backend(script)
    sampler = Sampler()
    sup, log, summary = supervise(tmp_path, [30, 3], backend=backend, sampler=sampler)
    assert summary.exit_code == 0
    (failed,) = log.named("file_failed")
    assert failed["kind"] == "memory" and failed["file"] == "f000.cha"
    (requeued,) = log.named("file_requeued")
    first = [s for _, s in backend.assigned if s.file == "f000.cha"]
    assert requeued["estimate_mb"] >= first[0].predicted_peak_mb and first[1].predicted_peak_mb > first[0].predicted_peak_mb
    assert not log.named("file_warning")
    # A fresh process after an out-of-memory error: the worker that raised it is stopped.
    assert ("w1", "stop") in backend.signals or ("w2", "stop") in backend.signals


def test_only_files_the_model_really_ran_teach_it(tmp_path):
    def script(wid, spec):  # f000 and f001 answered from the result cache: nothing ran through the model
        ran = None if spec.file in ("f000.cha", "f001.cha") else {"audio_s": 3.0}
        return [FileResult(wid, spec.file, None, 30.0, 0.1, 0.1, ran, job_id=spec.job_id)]

    sup, log, summary = supervise(tmp_path, [3, 3, 3], backend=Backend(script))
    assert summary.exit_code == 0
    assert sup.estimator.predictor.model.n_samples == 1
    assert {e["file"]: e["sample"] for e in log.named("file_done")} == {"f000.cha": False, "f001.cha": False,
                                                                        "f002.cha": True}


def test_each_file_gets_the_threads_its_worker_can_use_now(tmp_path):
    held = []

    def script(wid, spec):
        held.append(spec)
        return []  # files keep running until the test ends

    backend = Backend(script)
    sup, log, summary = supervise(tmp_path, [3, 3], backend=backend, stop_after=1.5)
    cores = os.cpu_count() or 1
    threads = [s.options["threads"] for s in held]
    assert threads == [max(1, cores), max(1, cores // 2)]


def test_sighup_refuses_an_engine_change_and_keeps_filing_under_the_running_key(tmp_path):
    from supervisor.settings import load_settings

    cfg = tmp_path / "config.toml"
    common = f'state_dir = "{tmp_path / "state"}"\n'
    cfg.write_text(f'[run]\nengine = "synthetic"\n{common}[memory]\nbudget = "600MiB"\n')
    s = load_settings(config=cfg, environ={})
    log = Log()
    sup = Supervisor(s, log=log, sampler=Sampler(), limits=limits(), backend=Backend())
    cfg.write_text(f'[run]\nengine = "wav2vec"\nmodel = "facebook/wav2vec2-base-960h"\n{common}'
                   '[memory]\nbudget = "900MiB"\n')
    sup.reload_cli = {}
    import supervisor.reload as sup_mod

    real = sup_mod.reload_settings
    sup_mod.reload_settings = lambda cur, cli=None: real(cur, environ={}, cli=cli)
    try:
        sup._reload()
    finally:
        sup_mod.reload_settings = real
    (refused,) = log.named("config_reload_refused")
    assert set(refused["changed"]) == {"run.engine", "run.model"} and "restart" in refused["reason"]
    assert sup.s.engine_name == "synthetic" and sup.sink.key == ("synthetic", "synthetic", "cpu")
    (reloaded,) = log.named("config_reloaded")
    assert "memory.budget" in reloaded["changed"] and reloaded["budget_mb"] == 900.0


def test_a_spawn_never_blocks_the_loop():
    class SlowLauncher:
        async def launch(self, command, env, cwd):
            await asyncio.sleep(3)
            raise OSError("model mount does not answer")

        async def close(self):
            return None

    async def scenario():
        b = LocalBackend(["true"], launcher=SlowLauncher())
        await b.start()
        t0 = time.monotonic()
        b.spawn()
        assert time.monotonic() - t0 < 0.05
        ticks = 0
        events = b.events()
        nxt = asyncio.ensure_future(events.__anext__())
        while not nxt.done():
            await asyncio.sleep(0.1)  # the loop keeps ticking while the spawn waits
            ticks += 1
        assert ticks >= 20
        assert "model mount" in nxt.result().reason
        await b.close()

    asyncio.run(scenario())


def test_a_handler_that_raises_is_reported_with_its_context_and_the_run_goes_on(tmp_path):
    def script(wid, spec):
        # A result from a worker that never existed: the handler must not take the loop down.
        return [FileResult("w99", spec.file, None, 1.0, 0.1, 0.1, {}, job_id=spec.job_id),
                FileResult(wid, spec.file, None, 10.0, 0.1, 0.1, {}, job_id=spec.job_id)]

    sup, log, summary = supervise(tmp_path, [3], backend=Backend(script))
    assert summary.exit_code == 0
    assert not log.named("handler_failed")  # unknown workers are ignored, not a crash
    bad = FileResult("w1", "f000.cha", None, 1.0, 0.1, 0.1, {}, job_id="f000.cha#1")
    w = sup.workers.records["w1"]
    w.job, w.job_id = object(), "f000.cha#1"  # a corrupt record: the handler raises
    sup._handle(bad)
    (failed,) = log.named("handler_failed")
    assert failed["handler"] == "FileResult" and failed["worker"] == "w1" and failed["level"] == "error"


def test_memory_a_worker_still_holds_is_the_floor_of_its_next_files_peak(tmp_path):
    """A worker whose last file left 200 MiB in its heap peaks there again on a small file: the
    prediction for that file on that worker says so (and the policy sees at least that growth)."""

    def script(wid, spec):
        return [FileResult(wid, spec.file, 260.0, 210.0, 0.1, 0.1, {"audio_s": 5.0, "longest_span_s": 5.0},
                           job_id=spec.job_id, rss_after_mb=250.0)]

    sup, log, _ = supervise(tmp_path / "again", [5, 5, 5, 5, 5], backend=Backend(script))
    admitted = log.named("file_admitted")
    assert len(admitted) == 5
    seen: set[str] = set()
    for e in admitted:
        if e["worker"] not in seen:  # a worker's first file: nothing held yet
            seen.add(e["worker"])
            assert "held_mb" not in e
        else:
            assert e["held_mb"] == pytest.approx(200.0)
            assert e["predicted_mb"] >= 50.0 + 200.0 - 1.0



class ShortHost(Sampler):
    """The host runs short (another user) while a file runs, until the guard has killed it ``times``."""

    def __init__(self, backend: Backend, times: int) -> None:
        super().__init__()
        self.backend, self.times = backend, times

    def host(self) -> HostMem:
        kills = sum(1 for _, a in self.backend.signals if a == "kill")
        running = len(self.backend.assigned) > kills
        self.available_mb = 100.0 if running and kills < self.times else 8000.0
        return super().host()


@pytest.mark.parametrize("kills, done", [(1, True), (5, False)])
def test_a_file_killed_for_others_memory_within_its_prediction_keeps_its_attempts(tmp_path, kills, done):
    """Host memory runs short while a file is far under its prediction: the guard kills it, and the
    kill costs no attempt (it was a bystander), up to max_attempts such kills; then they count."""
    backend = Backend()

    def script(wid, spec):
        if len(backend.assigned) <= kills:
            return []  # runs until killed
        return [FileResult(wid, spec.file, None, 10.0, 0.1, 0.1, {"audio_s": 3.0}, job_id=spec.job_id)]

    backend.script = script
    make_corpus(tmp_path / "corpus", [3])
    s = settings(tmp_path, kill_settle=0.05)
    s.run.max_attempts = 1
    log = Log()
    sup = Supervisor(s, log=log, sampler=ShortHost(backend, kills), limits=limits(), backend=backend)
    summary = asyncio.run(sup.run(find_transcripts(s.corpus, out_root=s.out, in_place=False)))
    job = sup.queue.get("f000.cha")
    killed = [a for _, a in backend.signals if a == "kill"]
    if done:  # one bystander kill, then done on its one counted attempt
        assert summary.exit_code == 0 and job.state.value == "done"
        assert len(killed) == 1 and job.spared == 1 and job.attempts == 1
        (requeued,) = log.named("file_requeued")
        assert requeued["spared"] == 1 and "host memory nearly exhausted" in requeued["reason"]
        assert not log.named("file_failed") and job.lower_bound_mb is None
    else:  # always killed: one spared kill, then the counted one quarantines it
        assert summary.exit_code == 1 and job.state.value == "quarantined"
        assert len(killed) == 2 and job.spared == 1 and job.attempts == 1


def test_a_file_is_reported_done_only_once_the_manifest_holds_it(tmp_path):
    """A supervisor killed right after logging ``file_done`` must not redo that file on re-run, so
    the event waits for the manifest entry; an entry that cannot be written is said in the event."""
    manifest = tmp_path / "out" / ".batchalign-supervise" / "done.jsonl"
    seen: dict[str, bool] = {}

    class Watching(Log):
        def __getattr__(self, level):
            def log(event, **f):
                if event == "file_done":
                    text = manifest.read_text() if manifest.exists() else ""
                    seen[f["file"]] = f'"rel":"{f["file"]}"' in text
                self.events.append({"event": event, "level": level, **f})
            return log

    def script(wid, spec):
        out = tmp_path / "out" / spec.file
        out.parent.mkdir(parents=True, exist_ok=True)
        if spec.file != "f002.cha":  # f002's output is missing: its manifest entry cannot be made
            out.write_text("@UTF8\n@Begin\n@End\n")
        return [FileResult(wid, spec.file, None, 10.0, 0.1, 0.1, {}, job_id=spec.job_id)]

    make_corpus(tmp_path / "corpus", [3, 4, 5])
    s = settings(tmp_path)
    log = Watching()
    sup = Supervisor(s, log=log, sampler=Sampler(), limits=limits(), backend=Backend(script))
    summary = asyncio.run(sup.run(find_transcripts(s.corpus, out_root=s.out, in_place=False)))
    assert summary.exit_code == 0
    assert seen == {"f000.cha": True, "f001.cha": True, "f002.cha": False}
    done = {e["file"]: e for e in log.named("file_done")}
    assert "recorded" not in done["f000.cha"] and done["f002.cha"]["recorded"] is False
    (failed,) = log.named("manifest_write_failed")
    assert failed["file"] == "f002.cha"
