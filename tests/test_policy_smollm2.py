"""The real small model end to end (slow): SmolLM2-135M-Instruct converted from the packaged GGUF,
served by `selfreward policy serve` (vLLM on CPU), answering in coherent English, reproducing
its transformers fingerprint, taking a verified adapter, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from selfreward.fingerprint import DEFAULT_TOLERANCE, compare_fingerprints, fingerprint_model_dir
from selfreward.llm.openai import OpenAICompatClient
from selfreward.policy.launcher import free_port, tail
from selfreward.policy.prepare import prepare_model, read_prepared_manifest
from selfreward.policy.publish import publish_adapter, served_fingerprint

pytestmark = pytest.mark.slow

COMMON_WORDS = {"the", "and", "to", "a", "of", "you", "your", "is", "in", "for", "it", "can", "are", "with"}


def test_alias_is_converted_once(smollm2_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    import json

    config = json.loads((smollm2_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["dtype"] == "float32" and "quantization_config" not in config
    manifest = read_prepared_manifest(smollm2_model_dir)
    assert manifest is not None and manifest["source"]["kind"] == "gguf"
    assert manifest["source"]["spec"] == "smollm2-135m-instruct"
    assert "<|im_start|>" in (smollm2_model_dir / "chat_template.jinja").read_text()
    started = time.monotonic()
    assert prepare_model("smollm2-135m-instruct", smollm2_model_dir.parent.parent) == smollm2_model_dir
    assert time.monotonic() - started < 5, "the second preparation is a cache hit"


def vllm_processes(port: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            is_vllm = any(arg.endswith(b"vllm_main.py") for arg in cmdline)
            if is_vllm and str(port).encode() in cmdline and b"--port" in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def smol_server(
    smollm2_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """`selfreward policy serve` in a subprocess, as a user runs it."""
    from selfreward.testing.tiny_model import build_tiny_lora

    root = tmp_path_factory.mktemp("smol-artifacts")
    boot_adapter = build_tiny_lora(smollm2_model_dir, root / "boot-lora", init_std=0.02, seed=4)
    port = free_port()
    env = {
        **os.environ,
        "SELFREWARD_ARTIFACT_ROOT": str(root),
        "SELFREWARD_POLICY__CPU_KVCACHE_GIB": "1",
    }
    cmd = [
        sys.executable, "-m", "selfreward.cli.main", "policy", "serve",
        "--model", str(smollm2_model_dir), "--port", str(port), "--served-name", "smol", "--max-model-len", "2048",
        "--adapters", f"boot={boot_adapter}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    info = {
        "url": url,
        "port": port,
        "proc": proc,
        "root": root,
        "model_dir": smollm2_model_dir,
        "boot": boot_adapter,
    }
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, (proc.stdout.read() if proc.stdout else b"").decode()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("SmolLM2 server did not start in 600 s")
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def ask(url: str, question: str) -> str:
    async def go() -> str:
        async with OpenAICompatClient(url, max_retries=1) as client:
            gen = await client.chat(
                "smol", [{"role": "user", "content": question}], temperature=0.0, max_tokens=64
            )
            return gen.choices[0].text

    return asyncio.run(go())


def test_chat_answers_are_coherent_english(smol_server: dict[str, Any]) -> None:
    capital = ask(smol_server["url"], "What is the capital of France?")
    assert "Paris" in capital
    tips = ask(smol_server["url"], "Give me three tips for staying healthy.")
    words = re.findall(r"[A-Za-z']+", tips)
    letters = sum(c.isascii() and (c.isalpha() or c in " .,;:'\"!?-()\n") for c in tips)
    assert len(words) >= 15, tips
    assert letters / max(1, len(tips)) > 0.85, tips
    assert len({w.lower() for w in words} & COMMON_WORDS) >= 3, tips
    assert len(set(words)) / len(words) > 0.4, f"repetitive: {tips}"


def test_adapters_given_at_start_are_served(smol_server: dict[str, Any]) -> None:
    async def go() -> list[dict[str, Any]]:
        async with OpenAICompatClient(smol_server["url"], max_retries=1) as client:
            return await client.adapters()

    assert [(a["id"], a["parent"], a["root"]) for a in asyncio.run(go())] == [
        ("boot", "smol", str(smol_server["boot"].resolve()))
    ]


def test_served_smollm2_reproduces_its_fingerprint_and_takes_a_verified_adapter(
    smol_server: dict[str, Any], tmp_path: Path
) -> None:
    from selfreward.testing.tiny_model import build_tiny_lora

    model_dir = smol_server["model_dir"]
    expected = fingerprint_model_dir(model_dir)
    # a small random adapter: rank 8, B ~ N(0, 0.02), like a short training run's drift
    adapter = build_tiny_lora(model_dir, tmp_path / "smol-lora", init_std=0.02, seed=3)

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with OpenAICompatClient(smol_server["url"], max_retries=1, timeout_s=300) as client:
            served = await served_fingerprint(client, "smol", expected)
            published = await publish_adapter(client, adapter, name="smol-lora")
            await client.unload_adapter(published["served_name"])
            return served, published

    served, published = asyncio.run(go())
    ok, details = compare_fingerprints(expected, served, DEFAULT_TOLERANCE)
    print(
        f"\nSmolLM2 base: max |dlogprob| {details['max_abs_diff']:.2e} mean {details['mean_abs_diff']:.2e}; "
        f"adapter: served vs trained {published['max_abs_diff']:.2e}, parent vs trained "
        f"{published['parent_max_abs_diff']:.3f}"
    )
    assert ok and details["top1_agreement"] == 1.0, details
    assert published["max_abs_diff"] < DEFAULT_TOLERANCE < published["parent_max_abs_diff"]


def test_sigterm_stops_the_server_and_every_worker(smol_server: dict[str, Any]) -> None:
    proc = smol_server["proc"]
    assert vllm_processes(smol_server["port"]), "the vLLM server runs"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert f"at {smol_server['url']}/v1" in output and "SIGTERM: stopping the policy server" in output
    time.sleep(1)
    assert vllm_processes(smol_server["port"]) == []
    logs = list((smol_server["root"] / "logs" / "policy").glob("smol-*.log"))
    assert len(logs) == 1 and "Application startup complete" in tail(logs[0], 400)
