"""Blocking work off the loop: store writes, manifest appends and hashing, folder scans, the ledger.

Each side job runs in a worker thread (``anyio.to_thread.run_sync``); the loop only starts it and,
when it is over, gets its result back as a callback on the loop. Jobs on one *lane* run one at a
time in the order they were submitted (a lane per resource: the store, the manifest, the ledger),
so writes to one file never race. A side job that raises is reported with its lane and what it
was doing; it never takes the run down.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable

import anyio


class SideJobs:
    def __init__(self, emit: Callable[..., None], wake: Callable[[], None] | None = None) -> None:
        self.emit = emit
        self.wake = wake  # told when a job finished, so the loop decides on its result at once
        self._lanes: dict[str, anyio.CapacityLimiter] = {}
        self._busy: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()

    def busy(self, lane: str) -> int:
        """Jobs submitted on ``lane`` and not finished yet."""
        return self._busy.get(lane, 0)

    def submit(self, lane: str, fn: Callable[..., Any], *args: Any, what: str = "",
               on_done: Callable[[Any], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None) -> None:
        limiter = self._lanes.get(lane)
        if limiter is None:
            limiter = self._lanes[lane] = anyio.CapacityLimiter(1)
        self._busy[lane] = self._busy.get(lane, 0) + 1
        task = asyncio.get_running_loop().create_task(
            self._run(lane, limiter, functools.partial(fn, *args), what, on_done, on_error), name=f"side-{lane}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, lane: str, limiter: anyio.CapacityLimiter, fn: Callable[[], Any], what: str,
                   on_done: Callable[[Any], None] | None, on_error: Callable[[BaseException], None] | None) -> None:
        try:
            try:
                result = await anyio.to_thread.run_sync(fn, limiter=limiter)
            except Exception as exc:
                if on_error is not None:
                    on_error(exc)
                else:
                    self.emit("side_job_failed", level="warning", lane=lane, what=what,
                              error=f"{type(exc).__name__}: {exc}")
                return
            if on_done is not None:
                on_done(result)
        except Exception as exc:  # a bug in a callback: say so with its context, keep the run
            self.emit("handler_failed", level="error", lane=lane, what=what, error=f"{type(exc).__name__}: {exc}",
                      exc_info=True)
        finally:
            self._busy[lane] -= 1
            if self.wake is not None:
                self.wake()

    async def drain(self, timeout: float) -> bool:
        """Wait for every submitted job (and jobs those submit); True when all finished in time."""
        with anyio.move_on_after(timeout):
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            return True
        return False
