"""The retry policy of every client: which failures are transient, and how long to wait.

Connection errors, timeouts, 408, 429 and 5xx are transient: retried with exponential backoff
and full jitter (tenacity), where a server's Retry-After (seconds or an HTTP date) wins when it
is longer (capped at 300 s). Other 4xx answers are not retried: `HTTPStatusError` carries the
status, the body and the server's Retry-After.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from selfreward.errors import ServiceError

T = TypeVar("T")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# adapter management: a 500 there is the worker refusing the adapter (wrong shapes, bad files)
ADMIN_RETRY_STATUS = frozenset({408, 429, 502, 503, 504})
MAX_RETRY_AFTER_S = 300.0


class HTTPStatusError(ServiceError):
    def __init__(self, url: str, status: int, body: str, retry_after: float | None = None) -> None:
        self.status = status
        self.body = body
        self.retry_after = retry_after
        super().__init__(f"{url} answered HTTP {status}: {body[:500]}")

    @classmethod
    def check(cls, resp: httpx.Response) -> httpx.Response:
        """`resp` unchanged, or this error (status, body, Retry-After) for a 4xx/5xx answer."""
        if resp.status_code >= 400:
            raise cls(
                str(resp.request.url),
                resp.status_code,
                resp.text,
                parse_retry_after(resp.headers.get("retry-after")),
            )
        return resp


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def is_transient(exc: BaseException, statuses: frozenset[int] = RETRY_STATUS) -> bool:
    if isinstance(exc, HTTPStatusError):
        return exc.status in statuses
    return isinstance(exc, httpx.TransportError | httpx.TimeoutException)


def backoff_wait(initial: float = 0.5, maximum: float = 30.0) -> Callable[[RetryCallState], float]:
    """Exponential backoff with full jitter; a Retry-After from the server wins when longer."""

    def wait(state: RetryCallState) -> float:
        exp = min(maximum, initial * (2 ** (state.attempt_number - 1)))
        delay = random.uniform(0, exp)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, HTTPStatusError) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER_S))
        return delay

    return wait


async def with_retries(
    fn: Callable[[], Awaitable[T]],
    max_retries: int,
    on_retry: Callable[[BaseException], None] | None = None,
    initial_backoff_s: float = 0.5,
    retry_if: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Run `fn` with the retry policy above."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry and state.outcome is not None and state.outcome.exception() is not None:
            on_retry(state.outcome.exception())  # type: ignore[arg-type]

    retrying = AsyncRetrying(
        retry=retry_if_exception(retry_if),
        stop=stop_after_attempt(max_retries + 1),
        wait=backoff_wait(initial_backoff_s),
        reraise=True,
        before_sleep=before_sleep,
    )
    async for attempt in retrying:
        with attempt:
            return await fn()
    raise AssertionError("unreachable")
