"""The loop's inbox: backend events and signals, waited on with a deadline.

One waiter (the loop) and a timer instead of ``asyncio.wait_for`` around ``Queue.get``: that
makes a task per wait and cancels it on every quiet tick, which at four ticks a second with
workers' heartbeats in between was a measurable share of the loop's CPU.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Inbox:
    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> Any:
        return self._items.popleft()

    async def get(self, timeout: float | None = None) -> Any:
        """The next item; None when ``timeout`` seconds pass first (never None without a timeout)."""
        while not self._items:
            if timeout is not None and timeout <= 0:
                return None
            loop = asyncio.get_running_loop()
            self._waiter = fut = loop.create_future()
            timer = loop.call_later(timeout, _wake, fut) if timeout is not None else None
            try:
                await fut
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if timeout is not None and not self._items:
                return None
        return self._items.popleft()


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
