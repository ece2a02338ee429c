"""Limits of one backend: requests in flight, requests per minute, tokens per minute.

`slot()` is what every request to a backend goes through (each retry attempt too): first a
concurrency slot, then the sliding-window rate limits (`requests_per_minute` requests and
`tokens_per_minute` tokens in any 60 s), so a request is counted when it is sent, not while it
waits for a slot: the limits hold for the requests that actually reach the backend. Tokens are
known only from the backend's answer (its reported usage): `record_tokens(n)` adds them, and a
request is sent while the tokens of the last 60 s are below the limit (so one request in
flight may overshoot it by its own tokens).

Two implementations with one interface (`AnyLimits`):
- `Limits`: in this process (the embedded mode, the policy service's own clients);
- `SharedLimits`: in Redis, one budget per backend shared by every process that names the same
  backend with the same Redis (every judge replica and every stage worker), see its docstring.
429s and Retry-After are handled by the retry policy (selfreward.llm.retry) as before; each
attempt takes a slot again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

WINDOW_S = 60.0


class RateLimiter:
    """Sliding-window limits: `per_minute` acquisitions and `tokens_per_minute` recorded tokens in
    any `window_s` seconds (None: no limit)."""

    def __init__(
        self, per_minute: int | None, window_s: float = WINDOW_S, tokens_per_minute: int | None = None
    ) -> None:
        self.per_minute = per_minute
        self.tokens_per_minute = tokens_per_minute
        self.window_s = window_s
        self._stamps: deque[float] = deque()
        self._tokens: deque[tuple[float, int]] = deque()
        self._token_total = 0
        self._lock = asyncio.Lock()

    def record_tokens(self, n: int) -> None:
        if self.tokens_per_minute and n > 0:
            self._tokens.append((time.monotonic(), n))
            self._token_total += n

    def _wait_s(self, now: float) -> float:
        """0 when a request may be sent now, else how long until it may."""
        while self._stamps and now - self._stamps[0] >= self.window_s:
            self._stamps.popleft()
        while self._tokens and now - self._tokens[0][0] >= self.window_s:
            self._token_total -= self._tokens.popleft()[1]
        wait = 0.0
        if self.per_minute and len(self._stamps) >= self.per_minute:
            wait = self.window_s - (now - self._stamps[len(self._stamps) - self.per_minute])
        if self.tokens_per_minute and self._token_total >= self.tokens_per_minute:
            left = self._token_total
            for at, n in self._tokens:  # until enough of the oldest leave the window
                left -= n
                if left < self.tokens_per_minute:
                    wait = max(wait, self.window_s - (now - at))
                    break
        return wait

    async def acquire(self) -> None:
        if not self.per_minute and not self.tokens_per_minute:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                wait = self._wait_s(now)
                if wait <= 0:
                    self._stamps.append(now)
                    return
                await asyncio.sleep(wait)


class Limits:
    """Concurrency bound + rate limits of one backend in this process (see the module docstring)."""

    def __init__(
        self,
        concurrency: int,
        requests_per_minute: int | None = None,
        window_s: float = WINDOW_S,
        tokens_per_minute: int | None = None,
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._rate = RateLimiter(requests_per_minute, window_s, tokens_per_minute)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._semaphore:
            await self._rate.acquire()
            yield

    async def record_tokens(self, n: int) -> None:
        """Count `n` tokens the backend reported against `tokens_per_minute`."""
        self._rate.record_tokens(n)

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------- shared through Redis

KEY_PREFIX = "selfreward:limits:v1:"
LEASE_TTL_S = 120.0  # a lease of a process that died (SIGKILL) frees its slot after this
POLL_S = 0.05  # wait between tries while every slot is taken (randomised 0.5x-1.5x)
RETRY_AFTER_S = 2.0  # after a Redis error the in-process fallback is used this long

# One atomic step on the server, on the server's clock (TIME), so that clients' clocks never
# matter. KEYS: requests (zset: request id -> send time, ms), leases (zset: lease id -> expiry,
# ms), tokens (zset: "<id>:<tokens>" -> record time, ms). ARGV: op, id, concurrency, rpm, tpm
# (0 = no limit), window ms, lease ttl ms, poll ms, tokens.
#   acquire: drop what left the window and expired leases; refuse while leases >= concurrency
#            (wait: poll ms), requests in the window >= rpm or tokens in the window >= tpm (wait:
#            until enough of the oldest entries leave the window); else add the lease and the
#            request. Answers {1, now ms} or {0, wait ms}.
#   renew:   push a held lease's expiry to now + ttl (while its request runs).
#   release: free the lease and move the request's time to now (its end): a request counts
#            from its sending until a window after its answer, so that the backend, which
#            counts requests when they arrive, sees at most rpm in any window whatever the
#            time between our count and its arrival (measured: without it, 12 of 200 requests
#            arrived above the quota in bench/judge_scaling.py's tight run).
#   tokens:  record tokens the backend reported.
# Every key expires when unused for a window and a lease ttl.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, id = ARGV[1], ARGV[2]
local window, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local keep = window + ttl
if op == 'renew' then
  local changed = redis.call('ZADD', KEYS[2], 'XX', 'CH', now + ttl, id)
  redis.call('PEXPIRE', KEYS[2], keep)
  return {changed, now}
end
if op == 'release' then
  -- the request counts until a window after its answer: whatever its transit time, the
  -- backend (which counts at arrival) never sees more than rpm in any window
  redis.call('ZADD', KEYS[1], 'XX', now, id)
  redis.call('ZREM', KEYS[2], id)
  return {1, now}
end
if op == 'tokens' then
  redis.call('ZADD', KEYS[3], now, id .. ':' .. ARGV[9])
  redis.call('PEXPIRE', KEYS[3], keep)
  return {1, now}
end
local concurrency, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
local wait = 0
if concurrency > 0 and redis.call('ZCARD', KEYS[2]) >= concurrency then
  wait = tonumber(ARGV[8])
end
if rpm > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= rpm then
    local e = redis.call('ZRANGE', KEYS[1], n - rpm, n - rpm, 'WITHSCORES')
    wait = math.max(wait, tonumber(e[2]) + window - now)
  end
end
if tpm > 0 then
  local entries = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
  local total = 0
  for i = 1, #entries, 2 do
    total = total + tonumber(string.match(entries[i], ':(%d+)$'))
  end
  if total >= tpm then
    for i = 1, #entries, 2 do
      total = total - tonumber(string.match(entries[i], ':(%d+)$'))
      if total < tpm then
        wait = math.max(wait, tonumber(entries[i + 1]) + window - now)
        break
      end
    end
  end
end
if wait > 0 then
  return {0, math.max(1, wait)}
end
redis.call('ZADD', KEYS[2], now + ttl, id)
redis.call('ZADD', KEYS[1], now, id)
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
return {1, now}
"""


@dataclass(frozen=True)
class Lease:
    """One request's slot: `granted_at` is the server's time (s) when it was counted; `shared`
    is False for a slot of the in-process fallback (Redis was away)."""

    id: str
    granted_at: float
    shared: bool = True


class SharedLimits:
    """The limits of one backend in Redis, shared by every process using that backend.

    Keys `selfreward:limits:v1:{<identity>}:requests|leases|tokens`, where the identity names
    the backend (its spec with endpoint and model, see selfreward.llm.backend.limits_identity),
    so every judge replica and worker talking to the same backend through the same Redis draws
    on one budget. Each process enforces the numbers it was configured with against the shared
    counts: configure a backend's quota once per run or deployment (the `judge` section).

    The state is three sorted sets changed by one Lua script (`SCRIPT`) that Redis runs
    atomically, on Redis' own clock (`TIME`): check the three limits and take a lease and a
    request stamp in one step, so no two processes can both take the last slot. A lease expires
    `lease_ttl_s` after it was taken or last renewed (a held slot is renewed every third of
    it), so the slots of a process killed with SIGKILL come back by themselves. Why not the
    `limits` library: its Redis moving window counts hits of one limit per call; it has no
    concurrency leases, and checking a request limit, a token limit and the slots together
    would take several calls that are not atomic together, nor can it record tokens that are
    only known after the request (over the limit already).

    In this process at most `concurrency` requests wait for a slot and one of them asks Redis
    at a time. While Redis is unreachable the limits fall back to this process' own (as
    `Limits`) for RETRY_AFTER_S at a time, with a warning: a judge goes on, and a 429 from the
    backend backs off as always.
    """

    def __init__(
        self,
        redis_url: str,
        identity: str,
        concurrency: int,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        *,
        window_s: float = WINDOW_S,
        lease_ttl_s: float = LEASE_TTL_S,
        poll_s: float = POLL_S,
    ) -> None:
        self.redis_url = redis_url
        self.identity = identity
        self.concurrency = max(1, concurrency)
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.window_s = window_s
        self.lease_ttl_s = lease_ttl_s
        self.poll_s = poll_s
        prefix = f"{KEY_PREFIX}{{{identity}}}"
        self.keys = (f"{prefix}:requests", f"{prefix}:leases", f"{prefix}:tokens")
        self.errors = 0
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._lock = asyncio.Lock()
        self._fallback = RateLimiter(requests_per_minute, window_s, tokens_per_minute)
        self._redis: Any = None  # opened on first use, in the event loop that uses it
        self._script: Any = None
        self._skip_until = 0.0
        self._down = False

    def _conn(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff

            self._redis = aioredis.Redis.from_url(
                self.redis_url,
                socket_timeout=10,
                socket_connect_timeout=3,
                health_check_interval=10,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
            )
            self._script = self._redis.register_script(SCRIPT)
        return self._redis

    def _args(self, op: str, id_: str, tokens: int = 0) -> list[str | int]:
        return [
            op,
            id_,
            self.concurrency,
            self.requests_per_minute or 0,
            self.tokens_per_minute or 0,
            max(1, round(self.window_s * 1000)),
            max(1, round(self.lease_ttl_s * 1000)),
            max(1, round(self.poll_s * 1000)),
            tokens,
        ]

    async def _run(self, op: str, id_: str, tokens: int = 0) -> tuple[int, int]:
        self._conn()
        granted, value = await self._script(keys=list(self.keys), args=self._args(op, id_, tokens))
        return int(granted), int(value)

    def _usable(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if not self._down:
            log.warning(
                "shared limits of %s: Redis unavailable (%s: %s); using this process' limits",
                self.identity,
                type(exc).__name__,
                exc,
            )
        self._down = True
        self._skip_until = time.monotonic() + RETRY_AFTER_S

    def _ok(self) -> None:
        if self._down:
            log.warning("shared limits of %s: Redis is back", self.identity)
        self._down = False

    async def acquire(self) -> Lease:
        """Wait for a lease (concurrency, requests and tokens per window); `release` it after.

        `slot()` does both; this is for callers that want the lease itself."""
        import redis

        lease_id = uuid.uuid4().hex
        async with self._lock:
            while self._usable():
                try:
                    granted, value = await self._run("acquire", lease_id)
                except (redis.RedisError, OSError) as exc:
                    self._failed(exc)
                    break
                self._ok()
                if granted:
                    return Lease(lease_id, value / 1000.0)
                delay = value / 1000.0
                if value <= round(self.poll_s * 1000):  # a poll for a free slot: spread them out
                    delay *= random.uniform(0.5, 1.5)
                await asyncio.sleep(delay)
            await self._fallback.acquire()
            return Lease(lease_id, time.time(), shared=False)

    async def release(self, lease: Lease) -> None:
        if not lease.shared or self._redis is None:
            return
        import redis

        with contextlib.suppress(redis.RedisError, OSError):  # else it expires after its ttl
            await self._run("release", lease.id)

    async def _renew(self, lease: Lease) -> None:
        import redis

        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            try:
                changed, _ = await self._run("renew", lease.id)
            except (redis.RedisError, OSError) as exc:
                log.debug("shared limits of %s: lease not renewed (%s)", self.identity, exc)
                continue
            if not changed:
                log.debug("shared limits of %s: lease %s expired before renewal", self.identity, lease.id)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._semaphore:
            lease = await self.acquire()
            renew = asyncio.create_task(self._renew(lease)) if lease.shared else None
            try:
                yield
            finally:
                if renew is not None:
                    renew.cancel()
                # shielded: a cancelled request still gives its slot back
                await asyncio.shield(self.release(lease))

    async def record_tokens(self, n: int) -> None:
        """Count `n` tokens the backend reported against `tokens_per_minute` (every process's)."""
        if not self.tokens_per_minute or n <= 0:
            return
        import redis

        self._fallback.record_tokens(n)
        if not self._usable():
            return
        try:
            await self._run("tokens", uuid.uuid4().hex, n)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return
        self._ok()

    async def aclose(self) -> None:
        """Close the Redis connection (a later use opens a new one)."""
        if self._redis is not None:
            redis_conn, self._redis, self._script = self._redis, None, None
            await redis_conn.aclose()
            await redis_conn.connection_pool.disconnect()


AnyLimits = Limits | SharedLimits
