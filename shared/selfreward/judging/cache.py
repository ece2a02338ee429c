"""The verdict cache: Redis when configured (shared by every judge process, survives restarts),
else an in-process LRU.

One entry per verdict. The key is the sha256 of a canonical JSON of (backend spec with its
model, template sha256, task, sampling params, sample index, instruction, response(s)), so a
repeated request costs no model call and any change of template, model or parameters misses.
Verdicts that failed for a backend reason (unreachable server, 5xx after retries) are not
cached; unparseable verdicts are (they are what the model answered).

Redis is an optimisation, never a dependency: while it is unreachable the cache answers "miss"
and stores nothing (so judging goes on, slower), counts the errors (`errors`, `on_error`), says
so in `status()`, and tries Redis again every `RETRY_AFTER_S` seconds. Connections come from a
bounded pool that waits for a free connection (`MAX_CONNECTIONS`), are health-checked, and a
command on a connection that died (a restarted Redis) is retried once on a new one.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from selfreward.storage import sha256_text

KEY_PREFIX = "selfreward:judge:v1:"
log = logging.getLogger(__name__)


def cache_key(
    *,
    judge: str,
    template_sha256: str,
    task: str,
    params: Mapping[str, Any],
    sample: int | str,
    instruction: str,
    responses: Sequence[str],
) -> str:
    body = json.dumps(
        {
            "judge": judge,
            "template": template_sha256,
            "task": task,
            "params": dict(sorted(params.items())),
            "sample": sample,
            "instruction": instruction,
            "responses": list(responses),
        },
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return KEY_PREFIX + sha256_text(body)


MAX_CONNECTIONS = 16  # Redis connections per cache; more concurrent lookups wait for one
POOL_TIMEOUT_S = 10.0
RETRY_AFTER_S = 2.0  # after a Redis error, the cache is skipped this long before trying again


class VerdictCache:
    """get_many/put_many of JSON-able dicts; Redis (redis.asyncio) or an in-process LRU."""

    def __init__(
        self,
        redis_url: str | None = None,
        ttl_s: int | None = None,
        max_entries: int = 100_000,
        on_error: Callable[[BaseException], None] | None = None,
    ):
        self.redis_url = redis_url
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.on_error = on_error
        self.errors = 0
        self.down_since: float | None = None
        self.last_error: str | None = None
        self._local: OrderedDict[str, str] = OrderedDict()
        self._redis: Any = None  # opened on first use, in the event loop that uses it
        self._skip_until = 0.0

    @property
    def backend(self) -> str:
        return "redis" if self.redis_url else "memory"

    def status(self) -> dict[str, Any]:
        """What /healthz shows: the backend, whether it answers, errors so far (no URL, no secret)."""
        out: dict[str, Any] = {"backend": self.backend, "errors": self.errors}
        if self.redis_url:
            out["up"] = self.down_since is None
            if self.down_since is not None:
                out.update(
                    down_for_s=round(time.monotonic() - self.down_since, 1), last_error=self.last_error
                )
        return out

    def _conn(self) -> Any:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if self._redis is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.redis_url,
                max_connections=MAX_CONNECTIONS,
                timeout=POOL_TIMEOUT_S,
                socket_timeout=10,
                socket_connect_timeout=3,
                health_check_interval=10,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
            )
            self._redis = aioredis.Redis(connection_pool=pool)
        return self._redis

    def _usable(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = type(exc).__name__  # no message: it names hosts, and /healthz is public
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "verdict cache %s unavailable (%s); judging without it", _safe_url(self.redis_url), exc
            )
        self._skip_until = time.monotonic() + RETRY_AFTER_S
        if self.on_error is not None:
            self.on_error(exc)

    def _ok(self) -> None:
        if self.down_since is not None:
            log.warning("verdict cache %s is back", _safe_url(self.redis_url))
        self.down_since = None

    async def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        if not keys:
            return []
        if self.redis_url is None:
            out = []
            for k in keys:
                raw = self._local.get(k)
                if raw is not None:
                    self._local.move_to_end(k)
                out.append(json.loads(raw) if raw is not None else None)
            return out
        import redis

        if not self._usable():
            return [None] * len(keys)
        try:
            values = await self._conn().mget(list(keys))
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return [None] * len(keys)
        self._ok()
        return [json.loads(v) if v is not None else None for v in values]

    async def put_many(self, items: Mapping[str, dict[str, Any]]) -> None:
        if not items:
            return
        encoded = {k: json.dumps(v, ensure_ascii=False, sort_keys=True) for k, v in items.items()}
        if self.redis_url is None:
            for k, v in encoded.items():
                self._local[k] = v
                self._local.move_to_end(k)
            while len(self._local) > self.max_entries:
                self._local.popitem(last=False)
            return
        import redis

        if not self._usable():
            return
        try:
            async with self._conn().pipeline(transaction=False) as pipe:
                for k, v in encoded.items():
                    pipe.set(k, v, ex=self.ttl_s)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return
        self._ok()

    async def aclose(self) -> None:
        """Close the Redis connections (a later use opens new ones)."""
        if self._redis is not None:
            await self._redis.aclose()
            await self._redis.connection_pool.disconnect()
            self._redis = None


def _safe_url(url: str | None) -> str:
    """The URL without a password (redis://:secret@host -> redis://***@host)."""
    if not url or "@" not in url:
        return str(url)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
