"""A pool of policy replicas: every adapter published to, and verified on, each replica.

Several real vLLM servers are too heavy for the test machine: the replicas here are real HTTP
servers on loopback (`selfreward.testing.fake_vllm`) that speak the vLLM endpoints publishing
uses and answer from the adapters' fingerprints, one of them wrongly when a test says so. A
pool name resolves to several loopback addresses on one port, as a headless Service's name
resolves to its pods (the lookup itself is replaced only for that name). The resolver folder is
checked with vLLM's own FilesystemResolver, and with the real vLLM server of the test session.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from selfreward.config import RunConfig, ServicesConfig
from selfreward.errors import InputError, ServiceError
from selfreward.fingerprint import FINGERPRINT_FORMAT, adapter_sha256
from selfreward.llm.openai import OpenAICompatClient
from selfreward.policy.pool import (
    link_for_resolver,
    pool_entries,
    publish_to_policy,
    publish_to_replicas,
    replica_urls,
)
from selfreward.policy.publish import FingerprintMismatch, served_name_for
from selfreward.stages import publish as publish_stage
from selfreward.stages.stage import StageContext, execute
from selfreward.storage import RunLayout, write_manifest
from selfreward.testing.fake_vllm import FakeVLLM, fake_vllm
from selfreward.testing.servers import free_port

POOL_HOST = "policy-pool.selfreward.svc.cluster.local"


def make_adapter(folder: Path, seed: int, base: str = "/trainer/saw/this/base") -> Path:
    """A LoRA adapter folder as the trainer leaves it: adapter files, manifest with fingerprint."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": base, "r": 8, "lora_alpha": 16}
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(rng.randbytes(256))
    probes = []
    for p in range(2):
        ids = [1 + p, 7, 9, 11, 13, 15]
        rows = []
        for pos in range(3, 7):
            values = sorted((round(-rng.uniform(0.1, 6.0), 4) for _ in range(3)), reverse=True)
            rows.append({"pos": pos, "top": [[rng.randrange(500), v] for v in values]})
        probes.append({"input_ids": ids, "positions": rows})
    fingerprint = {"format": FINGERPRINT_FORMAT, "top_k": 3, "positions": 4, "probes": probes}
    manifest = {"name": folder.name, "adapter_sha256": adapter_sha256(folder), "fingerprint": fingerprint}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.fixture()
def headless(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names answered like a cluster DNS answers for a headless Service: name -> addresses (IPv4
    and IPv6 mixed as given); every other name is looked up for real."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host in answers:
            if not answers[host]:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            out = []
            for address in answers[host]:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sockaddr = (address, int(port), 0, 0) if family == socket.AF_INET6 else (address, int(port))
                out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
            return out
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


@pytest.fixture()
def replicas(headless: dict[str, list[str]]) -> Iterator[list[FakeVLLM]]:
    """Two replicas on one port at 127.0.0.1 and 127.0.0.2, both behind POOL_HOST (dual-stack:
    the name also answers an IPv6 address, which the pool must not count as a third replica)."""
    port = free_port()
    with ExitStack() as stack:
        fakes = [stack.enter_context(fake_vllm(host=h, port=port)) for h in ("127.0.0.1", "127.0.0.2")]
        headless[POOL_HOST] = ["127.0.0.2", "127.0.0.1", "fd00::7", "127.0.0.1"]
        yield fakes


def pool_services(port: int, lora_dir: Path | None = None) -> ServicesConfig:
    return ServicesConfig(
        policy_url=f"http://{POOL_HOST}:{port}",
        policy_pool=f"{POOL_HOST}:{port}",
        policy_lora_dir=str(lora_dir) if lora_dir else None,
    )


def completion(url: str, model: str) -> int:
    async def go() -> int:
        async with OpenAICompatClient(url, max_retries=0) as client:
            try:
                await client.complete(
                    model, [1, 7, 9], max_tokens=1, logprobs=3, return_tokens_as_token_ids=True
                )
            except ServiceError as exc:
                return int(getattr(exc, "status", 0))
            return 200

    return asyncio.run(go())


# ---------------------------------------------------------------- resolving the pool


def test_pool_entries_and_address_resolution(headless: dict[str, list[str]]) -> None:
    assert pool_entries("policy-pool:8000") == [("policy-pool", 8000)]
    assert pool_entries(" a:1 , http://b:2,[fd00::1]:3") == [("a", 1), ("b", 2), ("fd00::1", 3)]
    for bad in ("policy-pool", "a:notaport", "https://a:1", "a:1/v1", ",", ""):
        with pytest.raises(ValueError, match="HOST:PORT"):
            pool_entries(bad)
    with pytest.raises(ValueError, match="policy_pool"):  # refused when the config is read
        RunConfig.model_validate({"services": {"policy_pool": "nohost"}})
    # a real lookup: localhost is one replica (its IPv6 address, if any, is the same host)
    assert asyncio.run(replica_urls("localhost:8123")) == ["http://127.0.0.1:8123"]
    # a headless name: every pod's address, sorted, each once; IPv4 only when it has IPv4
    headless["policy-pool"] = ["10.0.0.9", "10.0.0.10", "fd00::9", "10.0.0.9"]
    assert asyncio.run(replica_urls("policy-pool:8000")) == ["http://10.0.0.10:8000", "http://10.0.0.9:8000"]
    headless["v6-pool"] = ["fd00::2", "fd00::1"]
    assert asyncio.run(replica_urls("v6-pool:8000,127.0.0.5:9")) == [
        "http://[fd00::1]:8000",
        "http://[fd00::2]:8000",
        "http://127.0.0.5:9",
    ]
    headless["gone"] = []
    with pytest.raises(ServiceError, match="cannot resolve 'gone'"):
        asyncio.run(replica_urls("gone:8000"))


# ---------------------------------------------------------------- publishing to every replica


def test_publish_loads_and_verifies_on_every_replica_and_links_for_the_resolver(
    replicas: list[FakeVLLM], tmp_path: Path
) -> None:
    adapter = make_adapter(tmp_path / "run" / "models" / "m1", seed=1)
    served = served_name_for("m1", adapter_sha256(adapter))
    lora_dir = tmp_path / "served-adapters"
    services = pool_services(replicas[0].port, lora_dir)
    record = asyncio.run(publish_to_policy(services, adapter, name="m1"))
    assert record["served_name"] == served and record["already_loaded"] is False
    assert [r["url"] for r in record["replicas"]] == [f.url for f in replicas]  # two, not three
    assert record["max_abs_diff"] == 0.0 and record["parent_max_abs_diff"] > 0.5
    for fake in replicas:
        assert fake.loads == [served] and fake.adapters[served] == str(adapter)
    # the resolver's folder: the adapter's files by relative link, its config naming the served base
    folder = Path(record["resolver_dir"])
    assert folder == lora_dir / served
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == replicas[0].base_root and config["peft_type"] == "LORA"
    weights = folder / "adapter_model.safetensors"
    assert weights.is_symlink() and not os.path.isabs(os.readlink(weights))
    assert weights.read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    # publishing again is a no-op on every replica
    again = asyncio.run(publish_to_policy(services, adapter, name="m1"))
    assert again["already_loaded"] is True and all(f.loads == [served] for f in replicas)
    # a replica that starts later serves it on first request, from the folder (vLLM's rule)
    with fake_vllm(host="127.0.0.3", port=replicas[0].port, resolver_dir=lora_dir) as late:
        assert served not in late.adapters
        assert completion(late.url, served) == 200
        assert late.resolved == [served] and late.loads == []
        # not for another base model, nor for a name nobody published
    with fake_vllm(resolver_dir=lora_dir, base_root="/models/other") as other:
        assert completion(other.url, served) == 404
        assert completion(other.url, "m9-000000000000") == 404


def test_a_replica_that_mismatches_fails_the_publish_naming_it(
    headless: dict[str, list[str]], tmp_path: Path
) -> None:
    adapter = make_adapter(tmp_path / "m1", seed=2)
    served = served_name_for("m1", adapter_sha256(adapter))
    port = free_port()
    with (
        fake_vllm(host="127.0.0.1", port=port) as good,
        fake_vllm(host="127.0.0.2", port=port, wrong_by=0.3) as bad,
    ):
        headless[POOL_HOST] = ["127.0.0.1", "127.0.0.2"]
        services = pool_services(port, tmp_path / "lora")
        with pytest.raises(FingerprintMismatch) as caught:
            asyncio.run(publish_to_policy(services, adapter, name="m1"))
        message = str(caught.value)
        assert "failed on 1 of 2 policy replicas" in message
        assert f"- policy replica {bad.url}: the server does not serve adapter" in message
        assert f"- policy replica {good.url}" not in message
        assert f"unloaded again from {good.url}" in message
        assert set(caught.value.details["replicas"]) == {bad.url}
        # served by none: the good replica unloaded it again, the bad one too; nothing linked
        assert served not in good.adapters and served not in bad.adapters
        assert good.loads == [served] and bad.loads == [served]
        assert not (tmp_path / "lora").exists()
    # an unreachable replica fails it too, by name
    dead = f"http://127.0.0.1:{free_port()}"
    with fake_vllm() as alive:
        with pytest.raises(ServiceError, match=f"policy replica {dead}"):
            asyncio.run(publish_to_replicas([alive.url, dead], adapter, name="m1"))
        assert served not in alive.adapters
    # replicas that serve different base models are not one pool
    with fake_vllm() as one, fake_vllm(base_name="other") as two:
        with pytest.raises(InputError, match="serve different base models"):
            asyncio.run(publish_to_replicas([one.url, two.url], adapter, name="m1"))
        assert served not in one.adapters and served not in two.adapters
    # an adapter every replica refuses is an InputError (a bad adapter, not a bad replica)
    with fake_vllm() as one:
        (tmp_path / "m1" / "manifest.json").write_text("{}")
        with pytest.raises(InputError, match="no manifest.json with a fingerprint"):
            asyncio.run(publish_to_replicas([one.url], adapter, name="m1"))


def test_publish_stage_and_ensure_served_keep_every_replica_serving(
    replicas: list[FakeVLLM], tmp_path: Path
) -> None:
    """The publish stage publishes M1 to the pool; a replica that restarted (lost its adapters,
    no resolver folder) gets M1 and M2 again from ensure_served, parents first; the others are
    not touched."""
    config = RunConfig.model_validate(
        {
            "name": "pool",
            "artifact_root": str(tmp_path),
            "services": pool_services(replicas[0].port).model_dump(),
        }
    )
    layout = RunLayout(tmp_path, "pool")
    write_manifest(
        layout.stage_manifest(0, "prepare"),
        {
            "stage": "prepare",
            "base_model_dir": "/models/base",
            "base_served_name": "m0",
            "seed_dir": "x",
            "seed_counts": {},
        },
    )
    m1 = make_adapter(layout.model_dir("m1"), seed=3)
    m2 = make_adapter(layout.model_dir("m2"), seed=4)
    names = {"m1": served_name_for("m1", adapter_sha256(m1)), "m2": served_name_for("m2", adapter_sha256(m2))}

    async def publish(t: int) -> dict[str, Any]:
        async with StageContext(config, layout, t) as ctx:
            return await execute(ctx, publish_stage.STAGE)

    first = asyncio.run(publish(0))
    assert first["served_name"] == names["m1"] and len(first["replicas"]) == 2
    second = asyncio.run(publish(1))  # parent M1 is checked on both replicas
    assert second["served_name"] == names["m2"] and second["parent"] == names["m1"]
    assert all(f.loads == [names["m1"], names["m2"]] for f in replicas)
    # replica 2 restarts: it serves only the base model now
    restarted = replicas[1]
    restarted.adapters.clear()
    restarted.tables.clear()

    async def served(t: int) -> str:
        async with StageContext(config, layout, t) as ctx:
            return await ctx.served()

    assert asyncio.run(served(2)) == names["m2"]
    assert restarted.loads == [names["m1"], names["m2"], names["m1"], names["m2"]]
    assert replicas[0].loads == [names["m1"], names["m2"]]
    assert set(restarted.adapters) == set(names.values())
    # nothing lost: nothing published
    assert asyncio.run(served(2)) == names["m2"]
    assert len(restarted.loads) == 4


def test_without_a_pool_publish_uses_the_one_server(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "m1", seed=5)
    with fake_vllm() as only:
        services = ServicesConfig(policy_url=only.url)
        record = asyncio.run(publish_to_policy(services, adapter, name="m1"))
        assert "replicas" not in record and "resolver_dir" not in record
        assert only.loads == [record["served_name"]]


# ---------------------------------------------------------------- the folder, read by vLLM itself


def test_vllms_filesystem_resolver_accepts_the_linked_folder(tmp_path: Path) -> None:
    """vLLM 0.32's own FilesystemResolver (the lora_filesystem_resolver plugin) resolves the served
    name to the linked folder on the served base, and nothing on another base."""
    adapter = make_adapter(tmp_path / "m1", seed=6)
    lora_dir = tmp_path / "lora"
    folder = link_for_resolver(lora_dir, "m1-abc", adapter, "microsoft/phi-2")
    assert link_for_resolver(lora_dir, "m1-abc", adapter, "microsoft/phi-2") == folder  # idempotent
    code = (
        "import asyncio, json, sys\n"
        "from vllm.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver\n"
        "r = FilesystemResolver(sys.argv[1])\n"
        "ok = asyncio.run(r.resolve_lora('microsoft/phi-2', 'm1-abc'))\n"
        "other = asyncio.run(r.resolve_lora('microsoft/phi-3', 'm1-abc'))\n"
        "none = asyncio.run(r.resolve_lora('microsoft/phi-2', 'm2-def'))\n"
        "print('RESULT ' + json.dumps([ok and ok.lora_path, other, none]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(lora_dir)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert result == [str(folder), None, None]
    with pytest.raises(InputError, match="cannot name a folder"):
        link_for_resolver(lora_dir, "../escape", adapter, "microsoft/phi-2")


def test_real_vllm_serves_a_linked_adapter_on_first_request(
    policy_server: Any, tiny_lora_dir: Path, lora_resolver_dir: Path
) -> None:
    """The session's vLLM runs with VLLM_PLUGINS=lora_filesystem_resolver: an adapter linked
    into its folder, never loaded, answers by name with its trained fingerprint."""
    from selfreward.policy.publish import publish_adapter

    served = "resolved-" + adapter_sha256(tiny_lora_dir)[:12]

    async def go() -> dict[str, Any]:
        async with OpenAICompatClient(policy_server.url, max_retries=1, initial_backoff_s=0.05) as client:
            base = next(m for m in await client.models(fresh=True) if not m.get("parent"))
            link_for_resolver(lora_resolver_dir, served, tiny_lora_dir, str(base["root"]))
            assert served not in await client.model_names()
            gen = await client.chat(served, [{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
            assert gen.model == served
            assert served in {m["id"] for m in await client.models(fresh=True)}
            # the resolver loaded it: publishing under that name verifies it, loads nothing
            record = await publish_adapter(client, tiny_lora_dir, name="resolved")
            await client.unload_adapter(served)
            return record

    record = asyncio.run(go())
    assert record["served_name"] == served and record["already_loaded"] is True
    assert record["max_abs_diff"] < 1e-3
