"""The verdict cache: Redis when configured (shared by every judge process, survives restarts),
else an in-process LRU.

One entry per verdict. The key is the sha256 of a canonical JSON of (backend spec with its
model, template sha256, task, sampling params, sample index, instruction, response(s)), so a
repeated request costs no model call and any change of template, model or parameters misses.
Verdicts that failed for a backend reason (unreachable server, 5xx after retries) are not
cached; unparseable verdicts are (they are what the model answered).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from selfreward.errors import ServiceError
from selfreward.storage import sha256_text

KEY_PREFIX = "selfreward:judge:v1:"


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


class VerdictCache:
    """get_many/put_many of JSON-able dicts; Redis (redis.asyncio) or an in-process LRU."""

    def __init__(self, redis_url: str | None = None, ttl_s: int | None = None, max_entries: int = 100_000):
        self.redis_url = redis_url
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._local: OrderedDict[str, str] = OrderedDict()
        self._redis: Any = None  # opened on first use, in the event loop that uses it

    @property
    def backend(self) -> str:
        return "redis" if self.redis_url else "memory"

    def _conn(self) -> Any:
        import redis.asyncio as aioredis

        if self._redis is None:
            self._redis = aioredis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5)
        return self._redis

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

        try:
            values = await self._conn().mget(list(keys))
        except redis.RedisError as exc:
            raise ServiceError(f"verdict cache {_safe_url(self.redis_url)}: {exc}") from exc
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

        try:
            async with self._conn().pipeline(transaction=False) as pipe:
                for k, v in encoded.items():
                    pipe.set(k, v, ex=self.ttl_s)
                await pipe.execute()
        except redis.RedisError as exc:
            raise ServiceError(f"verdict cache {_safe_url(self.redis_url)}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the Redis connection (a later use opens a new one)."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def _safe_url(url: str | None) -> str:
    """The URL without a password (redis://:secret@host -> redis://***@host)."""
    if not url or "@" not in url:
        return str(url)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
