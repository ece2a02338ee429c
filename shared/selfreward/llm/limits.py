"""Limits of one backend in this process: requests in flight and requests per minute.

`Limits.slot()` is what every request to a backend goes through (each retry attempt too):
first a concurrency slot, then the sliding-window rate limit (`requests_per_minute` in any
60 s), so a request is counted when it is sent, not while it waits for a slot: the limit holds
for the requests that actually reach the backend.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class RateLimiter:
    """Sliding-window limit of `per_minute` acquisitions in any 60 seconds."""

    def __init__(self, per_minute: int | None, window_s: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self._stamps: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if not self.per_minute:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._stamps and now - self._stamps[0] >= self.window_s:
                    self._stamps.popleft()
                if len(self._stamps) < self.per_minute:
                    self._stamps.append(now)
                    return
                await asyncio.sleep(self.window_s - (now - self._stamps[0]))


class Limits:
    """Concurrency bound + rate limit of one backend (see the module docstring)."""

    def __init__(
        self, concurrency: int, requests_per_minute: int | None = None, window_s: float = 60.0
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.requests_per_minute = requests_per_minute
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._rate = RateLimiter(requests_per_minute, window_s)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._semaphore:
            await self._rate.acquire()
            yield
