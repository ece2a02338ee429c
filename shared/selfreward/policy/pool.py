"""A pool of policy replicas: every published adapter is loaded, and verified, on each of them.

Several vLLM servers behind one Service (Kubernetes) or service name (compose) share the
generation and the policy judges' load; a request can land on any of them, so each must serve
every published adapter under its served name. Two mechanisms keep it so:

- **Publishing to every replica** (`services.policy_pool`): `HOST:PORT` entries, comma-separated;
  each entry is resolved (`getaddrinfo`) to every address of the name, one replica per address:
  a Kubernetes headless Service answers with the address of each ready pod, Docker's DNS with
  each container of a scaled service. A name with IPv4 addresses gives only those (a dual-stack
  name would list each pod twice), otherwise its IPv6 ones. `publish_to_replicas` loads the
  adapter on each and checks the fingerprint there (`policy.publish.publish_adapter`); a
  mismatch on any replica fails the publish naming that replica, and unloads the adapter again
  from the replicas this publish loaded it on, so the pool never serves a name on only some
  replicas. `stages.publish.ensure_served` checks every replica and publishes (verified) on those
  that lost the adapter.
- **A replica that starts later** serves the published adapters without being told: vLLM's
  filesystem LoRA resolver (`VLLM_PLUGINS=lora_filesystem_resolver`,
  `VLLM_LORA_RESOLVER_CACHE_DIR=<folder>`, with runtime LoRA updating on; vLLM 0.32's
  `vllm/plugins/lora_resolvers/filesystem_resolver.py`) answers a request for an unknown model
  name by loading `<folder>/<name>/` when its adapter_config.json is a LoRA whose
  `base_model_name_or_path` equals the model the server was started with.
  `link_for_resolver` makes that folder for each verified adapter (`services.policy_lora_dir`,
  the same path in the worker and the policy): relative symbolic links to the adapter's files
  and a copy of adapter_config.json with `base_model_name_or_path` set to the served model's
  `root` (what vLLM compares; the trainer records its own path to the base there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from selfreward.config import ServicesConfig
from selfreward.errors import InputError, SelfRewardError, ServiceError
from selfreward.fingerprint import DEFAULT_TOLERANCE
from selfreward.llm.openai import OpenAICompatClient

ADAPTER_CONFIG = "adapter_config.json"


def pool_entries(pool: str) -> list[tuple[str, int]]:
    """`HOST:PORT[,HOST:PORT...]` (an `http://` prefix and `[v6]:PORT` accepted) -> (host, port)s."""
    entries = []
    for raw in pool.split(","):
        text = raw.strip()
        if not text:
            continue
        parts = urlsplit(text if "://" in text else f"//{text}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("", "http") or not parts.hostname or port is None or parts.path:
            raise ValueError(f"{text!r}: expected HOST:PORT (a policy replica, or a name resolving to all)")
        entries.append((parts.hostname, port))
    if not entries:
        raise ValueError("expected HOST:PORT[,HOST:PORT...]")
    return entries


def _url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


async def replica_urls(pool: str) -> list[str]:
    """The base URL of every replica `pool` names (services.policy_pool), in a stable order.

    Raises ServiceError when a name does not resolve, or the pool resolves to nothing."""
    loop = asyncio.get_running_loop()
    urls: list[str] = []
    for host, port in pool_entries(pool):
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ServiceError(f"policy pool {pool!r}: cannot resolve {host!r} ({exc})") from None
        v4 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET})
        v6 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET6})
        for address in v4 or v6:
            url = _url(address, port)
            if url not in urls:
                urls.append(url)
    if not urls:
        raise ServiceError(f"policy pool {pool!r} resolves to no address: no replica is ready")
    return urls


def replica_client(url: str, services: ServicesConfig | None = None) -> OpenAICompatClient:
    timeout = services.request_timeout_s if services is not None else 300.0
    return OpenAICompatClient(url, timeout_s=timeout)


async def served_names(url: str, services: ServicesConfig | None = None) -> set[str]:
    """The model names one replica serves now (GET /v1/models, not cached)."""
    async with replica_client(url, services) as client:
        return {str(m["id"]) for m in await client.models(fresh=True)}


def _combine(records: Sequence[dict[str, Any]], urls: Sequence[str]) -> dict[str, Any]:
    """One publication record for the pool: the worst replica's numbers, and each replica's."""
    first = records[0]
    bases = {str(r["base_model"]) for r in records}
    if len(bases) > 1:
        by_url = ", ".join(f"{u}: {r['base_model']!r}" for u, r in zip(urls, records, strict=True))
        raise InputError(f"the policy replicas serve different base models ({by_url})")
    return {
        **first,
        "max_abs_diff": max(r["max_abs_diff"] for r in records),
        "mean_abs_diff": max(r["mean_abs_diff"] for r in records),
        "top1_agreement": min(r["top1_agreement"] for r in records),
        "parent_max_abs_diff": min(r["parent_max_abs_diff"] for r in records),
        "already_loaded": all(r["already_loaded"] for r in records),
        "replicas": [
            {"url": u, "max_abs_diff": r["max_abs_diff"], "already_loaded": r["already_loaded"]}
            for u, r in zip(urls, records, strict=True)
        ],
    }


async def publish_to_replicas(
    urls: Sequence[str],
    adapter_dir: str | Path,
    *,
    name: str | None = None,
    parent: str | None = None,
    tol: float = DEFAULT_TOLERANCE,
    require_change: bool = True,
    services: ServicesConfig | None = None,
) -> dict[str, Any]:
    """`publish_adapter` on every replica (concurrently); the combined publication record.

    A replica that fails (fingerprint mismatch, refused adapter, unreachable) fails the whole
    publish, with a message naming each failed replica; the adapter is unloaded again from the
    replicas this publish loaded it on. The error is a FingerprintMismatch when any replica
    mismatched (details per replica URL), else the first failure's kind (InputError or
    ServiceError)."""
    from selfreward.policy.publish import FingerprintMismatch, publish_adapter

    if not urls:
        raise ServiceError("no policy replica to publish to")

    async def one(url: str) -> dict[str, Any]:
        async with replica_client(url, services) as client:
            return await publish_adapter(
                client, adapter_dir, name=name, parent=parent, tol=tol, require_change=require_change
            )

    results = await asyncio.gather(*(one(u) for u in urls), return_exceptions=True)
    failures = [(u, r) for u, r in zip(urls, results, strict=True) if isinstance(r, BaseException)]
    loaded = [
        (u, r) for u, r in zip(urls, results, strict=True) if isinstance(r, dict) and not r["already_loaded"]
    ]

    async def unload_again() -> None:  # the pool serves a name on every replica or on none
        for url, record in loaded:
            with contextlib.suppress(SelfRewardError, OSError):
                async with replica_client(url, services) as client:
                    await client.unload_adapter(str(record["served_name"]))

    if not failures:
        try:
            return _combine([r for r in results if isinstance(r, dict)], urls)
        except InputError:
            await unload_again()
            raise
    await unload_again()
    for _, exc in failures:
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, cancellation
    head = f"publishing {Path(adapter_dir)} failed on {len(failures)} of {len(urls)} policy replicas" + (
        f" (unloaded again from {', '.join(u for u, _ in loaded)})" if loaded else ""
    )
    text = head + ":\n" + "\n".join(f"- policy replica {u}: {exc}" for u, exc in failures)
    mismatched = {u: exc.details for u, exc in failures if isinstance(exc, FingerprintMismatch)}
    if mismatched:
        raise FingerprintMismatch(text, {"replicas": mismatched})
    first = failures[0][1]
    if isinstance(first, InputError):
        raise InputError(text) from first
    raise ServiceError(text) from first


def link_for_resolver(
    lora_dir: str | Path, served_name: str, adapter_dir: str | Path, base_root: str
) -> Path:
    """`<lora_dir>/<served_name>/` for vLLM's filesystem LoRA resolver: relative links to the
    adapter's files and adapter_config.json naming `base_root` (the served model's /v1/models
    root) as its base. Idempotent; written to a temporary folder and renamed into place."""
    if not served_name or "/" in served_name or served_name.startswith("."):
        raise InputError(f"served name {served_name!r} cannot name a folder of {lora_dir}")
    lora_dir, adapter_dir = Path(lora_dir).resolve(), Path(adapter_dir).resolve()
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_root
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    final = lora_dir / served_name
    files = sorted(p.name for p in adapter_dir.iterdir() if p.is_file() and p.name != ADAPTER_CONFIG)

    def current() -> bool:
        if not (final / ADAPTER_CONFIG).is_file():
            return False
        if (final / ADAPTER_CONFIG).read_text(encoding="utf-8") != config_text:
            return False
        return all((final / f).resolve() == adapter_dir / f for f in files)

    if current():
        return final
    lora_dir.mkdir(parents=True, exist_ok=True)
    tmp = lora_dir / f".{served_name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        for f in files:
            (tmp / f).symlink_to(os.path.relpath(adapter_dir / f, final))
        (tmp / ADAPTER_CONFIG).write_text(config_text, encoding="utf-8")
        if current():  # another publisher linked it meanwhile
            return final
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.is_dir():
            shutil.rmtree(final)  # made for another base (or broken): replaced
        try:
            os.rename(tmp, final)
        except OSError:
            if not current():  # not another publisher's identical folder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


async def publish_to_policy(
    services: ServicesConfig,
    adapter_dir: str | Path,
    *,
    client: OpenAICompatClient | None = None,
    name: str | None = None,
    parent: str | None = None,
    tol: float = DEFAULT_TOLERANCE,
    require_change: bool = True,
) -> dict[str, Any]:
    """Publish to the deployment's policy: every replica of `services.policy_pool` when it is
    set, else `client` (or services.policy_url); then, when `services.policy_lora_dir` is set,
    link the verified adapter there for the replicas' LoRA resolver (the record's `resolver_dir`)."""
    from selfreward.policy.publish import publish_adapter

    if services.policy_pool:
        record = await publish_to_replicas(
            await replica_urls(services.policy_pool),
            adapter_dir,
            name=name,
            parent=parent,
            tol=tol,
            require_change=require_change,
            services=services,
        )
    elif client is not None:
        record = await publish_adapter(
            client, adapter_dir, name=name, parent=parent, tol=tol, require_change=require_change
        )
    else:
        async with replica_client(services.policy_url, services) as own:
            record = await publish_adapter(
                own, adapter_dir, name=name, parent=parent, tol=tol, require_change=require_change
            )
    if services.policy_lora_dir and record.get("base_root"):
        folder = link_for_resolver(
            services.policy_lora_dir, str(record["served_name"]), adapter_dir, str(record["base_root"])
        )
        record["resolver_dir"] = str(folder)
    return record
