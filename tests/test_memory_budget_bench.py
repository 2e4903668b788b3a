"""The memory-budget benchmark's account of where a run's makespan went (pure, on made-up events)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from bench.memory_budget import where_the_time_went

pytestmark = pytest.mark.timeout(30)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()


def ev(event: str, at: float, **fields) -> dict:
    ts = datetime.fromtimestamp(T0 + at, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    return {"event": event, "ts": ts, **fields}


def test_start_up_files_and_waiting_are_read_from_the_events():
    evs = [ev("file_started", 0.9, worker="w1"), ev("file_started", 1.3, worker="w2"),
           ev("file_done", 5.0, worker="w1", wall_s=4.1, cpu_s=3.6),
           ev("file_started", 5.0, worker="w1"),
           ev("file_done", 9.0, worker="w2", wall_s=7.7, cpu_s=7.5),
           ev("file_done", 9.5, worker="w1", wall_s=4.5, cpu_s=4.5)]
    line = where_the_time_went(evs, T0, 9.6, 2)
    assert "the first file started at 0.90 s, the last worker's first at 1.30 s" in line
    assert "the last file done at 9.50 s, exit 0.10 s" in line
    assert "took 0.7 s beyond their CPU (0.3 s of makespan)" in line
    assert where_the_time_went([], T0, 1.0, 2) == "no file ran"
