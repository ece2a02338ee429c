"""Publishing adapters into the real vLLM server, verified by fingerprint."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from selfreward.errors import InputError
from selfreward.fingerprint import DEFAULT_TOLERANCE, adapter_sha256
from selfreward.llm.openai import OpenAICompatClient
from selfreward.policy.publish import (
    FingerprintMismatch,
    publish_adapter,
    served_fingerprint,
    unpublish_adapter,
)
from selfreward.storage import sha256_dir
from selfreward.testing.tiny_model import build_tiny_llama, build_tiny_lora


def run(server: Any, fn: Any) -> Any:
    async def go() -> Any:
        async with OpenAICompatClient(server.url, max_retries=1, initial_backoff_s=0.05) as client:
            return await fn(client)

    return asyncio.run(go())


def served_adapters(server: Any) -> set[str]:
    return {m["id"] for m in run(server, lambda c: c.adapters())}


def test_publish_right_adapter_passes_and_is_idempotent(policy_server: Any, tiny_lora_dir: Path) -> None:
    sha = adapter_sha256(tiny_lora_dir)
    first = run(policy_server, lambda c: publish_adapter(c, tiny_lora_dir, name="m1"))
    assert first["served_name"] == f"m1-{sha[:12]}" and first["adapter_sha256"] == sha
    assert first["parent"] == policy_server.model and first["already_loaded"] is False
    # fp32 vLLM against fp32 transformers: far inside the tolerance; the parent: far outside
    assert first["max_abs_diff"] < 1e-3 and first["top1_agreement"] == 1.0
    assert first["parent_max_abs_diff"] > 10 * DEFAULT_TOLERANCE
    # ... computed by the grouped CPU LoRA ops (selfreward.policy.cpu_lora) in vLLM's engine
    from selfreward.policy.cpu_lora import IN_USE

    assert IN_USE in policy_server.log_path.read_text()
    # ... in the engine-core process itself (policy.cpu_one_worker_process): no worker process
    import psutil

    names = [p.name() for p in psutil.Process(policy_server.process.pid).children(recursive=True)]
    assert "VLLM::EngineCore" in names and "VLLM::Worker" not in names, names
    assert first["served_name"] in served_adapters(policy_server)
    again = run(policy_server, lambda c: publish_adapter(c, tiny_lora_dir, name="m1"))
    assert again["already_loaded"] is True and again["served_name"] == first["served_name"]
    # served by name: generation through the adapter works like any model
    gen = run(
        policy_server,
        lambda c: c.chat(
            first["served_name"], [{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        ),
    )
    assert gen.model == first["served_name"]
    run(policy_server, lambda c: unpublish_adapter(c, first["served_name"]))
    assert first["served_name"] not in served_adapters(policy_server)


def test_wrong_adapter_fails_with_both_fingerprints_and_is_unloaded(
    policy_server: Any, tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    # adapter B's weights under a manifest whose fingerprint is adapter A's: what a stale
    # copy or a mixed-up checkpoint looks like to the publisher
    other = build_tiny_lora(tiny_model_dir, tmp_path / "lora-b", seed=2)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = json.loads((tiny_lora_dir / "manifest.json").read_text())["fingerprint"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FingerprintMismatch) as err:
        run(policy_server, lambda c: publish_adapter(c, other, name="mixed"))
    text = str(err.value)
    assert "does not serve adapter" in text and "unloaded again" in text
    assert "trained top tokens" in text and "served top tokens" in text
    assert err.value.details["max_abs_diff"] > 10 * DEFAULT_TOLERANCE
    assert not any(n.startswith("mixed-") for n in served_adapters(policy_server))


def test_noop_adapter_cannot_be_told_from_its_parent(
    policy_server: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    noop = build_tiny_lora(tiny_model_dir, tmp_path / "noop", init_std=0.0)  # B = 0: the base model
    with pytest.raises(FingerprintMismatch, match="cannot be told apart from its parent 'tiny'"):
        run(policy_server, lambda c: publish_adapter(c, noop, name="noop"))
    assert not any(n.startswith("noop-") for n in served_adapters(policy_server))
    result = run(policy_server, lambda c: publish_adapter(c, noop, name="noop", require_change=False))
    assert result["parent_max_abs_diff"] < 1e-3
    run(policy_server, lambda c: unpublish_adapter(c, result["served_name"]))


def test_stale_or_missing_manifest(policy_server: Any, tiny_lora_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    shutil.copytree(tiny_lora_dir, stale)
    config = json.loads((stale / "adapter_config.json").read_text())
    config["lora_alpha"] = 32
    (stale / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="changed after its manifest was written"):
        run(policy_server, lambda c: publish_adapter(c, stale))
    (stale / "manifest.json").unlink()
    with pytest.raises(InputError, match="no manifest.json with a fingerprint"):
        run(policy_server, lambda c: publish_adapter(c, stale))
    with pytest.raises(InputError, match="adapter folder not found"):
        run(policy_server, lambda c: publish_adapter(c, tmp_path / "nope"))


def test_adapter_of_another_base_model(policy_server: Any, tmp_path: Path) -> None:
    # a different architecture size: vLLM refuses the weights
    wide = build_tiny_llama(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    wide_lora = build_tiny_lora(wide, tmp_path / "wide-lora")
    with pytest.raises(InputError, match="trained on another base model") as err:
        run(policy_server, lambda c: publish_adapter(c, wide_lora))
    assert "Server said:" in str(err.value)
    # same shapes, other weights: the manifest's base hash differs from the served folder's
    twin = build_tiny_llama(tmp_path / "twin", seed=5)
    twin_lora = build_tiny_lora(twin, tmp_path / "twin-lora")
    manifest = json.loads((twin_lora / "manifest.json").read_text())
    manifest["base_model"] = {"path": str(twin), "sha256": sha256_dir(twin)}
    (twin_lora / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"was trained on base model .*twin.* but the server serves 'tiny'"):
        run(policy_server, lambda c: publish_adapter(c, twin_lora))
    assert not any(n.startswith(("wide-lora-", "twin-lora-")) for n in served_adapters(policy_server))


def test_served_fingerprint_of_the_base_matches_transformers(
    policy_server: Any, tiny_model_dir: Path
) -> None:
    from selfreward.fingerprint import compare_fingerprints, fingerprint_model_dir

    expected = fingerprint_model_dir(tiny_model_dir)
    served = run(policy_server, lambda c: served_fingerprint(c, policy_server.model, expected))
    assert served["top_k"] == 2 * expected["top_k"]
    ok, details = compare_fingerprints(expected, served, DEFAULT_TOLERANCE)
    assert ok and details["max_abs_diff"] < 1e-3, details
