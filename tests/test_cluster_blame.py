"""Which file a dead Dask worker is blamed on: the one it was executing, never one queued behind it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from supervisor.backend import JobSpec
from supervisor.cluster.backend import DaskBackend

pytestmark = pytest.mark.timeout(30)

A = "tcp://127.0.0.1:4001"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _backend() -> DaskBackend:
    b = DaskBackend("tcp://127.0.0.1:1", engine="synthetic", options={}, run_id="r", clock=Clock())
    return b


def _submit(b: DaskBackend, file: str) -> tuple[str, JobSpec]:
    b._seq += 1
    key = f"align-r-{b._seq}"
    job = JobSpec(file=file, cha=file, media=None, out=file, options={}, attempt=0,
                  predicted_peak_mb=100.0, predicted_growth_mb=50.0, job_id=file)
    b.futures[key] = (job, None, None)
    b.by_file[file] = key
    return key, job


def _died(b: DaskBackend, *keys: str) -> None:
    b.lost_on[A] = [(k, b.clock()) for k in keys]


def _lose(b: DaskBackend, key: str, job: JobSpec):
    exc = SimpleNamespace(last_worker=SimpleNamespace(address=A))
    asyncio.run(b._lost(key, job, exc))
    return b.queue.get_nowait()


def test_a_nanny_memory_restart_is_blamed_on_the_running_file_only():
    b = _backend()
    big, big_job = _submit(b, "big.cha")
    small, small_job = _submit(b, "small.cha")
    b._on_file((0, {"key": big, "phase": "started", "worker": A, "pid": 7, "rss_mb": 60.0}))
    b.queue.get_nowait()  # FileStarted
    b._on_memory_restart((0, {"worker": A, "pid": 7, "rss": 900 * 2**20}))
    _died(b, small, big)  # the order Dask fails them in says nothing
    queued = _lose(b, small, small_job)
    assert queued.file == "small.cha" and queued.kind == "lost" and queued.bystander and queued.observed_mb is None
    ran = _lose(b, big, big_job)
    assert ran.file == "big.cha" and ran.kind == "memory" and ran.observed_mb == pytest.approx(900)


def test_without_a_start_message_the_earliest_submitted_file_is_blamed():
    b = _backend()
    first, first_job = _submit(b, "first.cha")
    second, second_job = _submit(b, "second.cha")
    b._on_memory_restart((0, {"worker": A, "pid": 9, "rss": 800 * 2**20}))
    _died(b, second, first)
    assert _lose(b, second, second_job).bystander
    blamed = _lose(b, first, first_job)
    assert blamed.kind == "memory" and not blamed.bystander


def test_a_file_that_finished_earlier_on_the_worker_does_not_shield_the_next():
    b = _backend()
    done, _ = _submit(b, "done.cha")
    b._on_file((0, {"key": done, "phase": "started", "worker": A, "pid": 7}))
    b.running.pop(done)
    b._forget(done)  # finished
    nxt, nxt_job = _submit(b, "next.cha")
    b.queue.get_nowait()
    _died(b, nxt)
    lost = _lose(b, nxt, nxt_job)
    assert lost.kind == "lost" and not lost.bystander and "lost while aligning" in lost.reason
