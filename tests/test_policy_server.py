"""The policy service as clients see it: one real vLLM server (CPU, fp32) on a tiny random Llama.

Generation with n samples, logprobs (chat and completions, token ids), structured output
(regex and JSON schema), runtime LoRA adapters (load, use, list, unload), through the
project's client (`selfreward.llm.openai`).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from selfreward.llm.openai import OpenAICompatClient, token_id
from selfreward.llm.retry import HTTPStatusError

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea at night."}]


def call(server: Any, fn: Any) -> Any:
    async def go() -> Any:
        async with OpenAICompatClient(server.url, max_retries=1, initial_backoff_s=0.05) as client:
            return await fn(client)

    return asyncio.run(go())


def test_chat_n_samples_are_independent_and_seeded(policy_server: Any) -> None:
    async def go(client: OpenAICompatClient) -> Any:
        a = await client.chat(policy_server.model, MESSAGES, n=4, temperature=1.0, max_tokens=12, seed=7)
        b = await client.chat(policy_server.model, MESSAGES, n=4, temperature=1.0, max_tokens=12, seed=7)
        return a, b

    a, b = call(policy_server, go)
    assert len(a.choices) == 4 and a.model == policy_server.model
    texts = [c.text for c in a.choices]
    assert len(set(texts)) > 1, "n samples at temperature 1 must differ"
    assert texts == [c.text for c in b.choices], "the same seed must give the same samples"
    assert all(c.finish_reason in ("length", "stop") for c in a.choices)
    assert a.usage["completion_tokens"] <= 4 * 12


def test_chat_greedy_with_top_logprobs(policy_server: Any) -> None:
    gen = call(
        policy_server,
        lambda c: c.chat(policy_server.model, MESSAGES, temperature=0.0, max_tokens=6, top_logprobs=3),
    )
    choice = gen.choices[0]
    assert choice.top_logprobs is not None and choice.tokens is not None
    assert len(choice.top_logprobs) == len(choice.tokens) == gen.usage["completion_tokens"]
    for token, tops in zip(choice.tokens, choice.top_logprobs, strict=True):
        assert len(tops) == 3 and all(v <= 0.0 for v in tops.values())
        # greedy: the chosen token is the most likely one
        assert max(tops, key=tops.__getitem__) == token


def test_completion_logprobs_with_token_ids(policy_server: Any, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("Explain how photosynthesis works", add_special_tokens=False)["input_ids"]
    gen = call(
        policy_server,
        lambda c: c.complete(
            policy_server.model,
            ids,
            max_tokens=3,
            temperature=0.0,
            logprobs=5,
            prompt_logprobs=2,
            return_tokens_as_token_ids=True,
        ),
    )
    choice = gen.choices[0]
    assert gen.usage["prompt_tokens"] == len(ids)
    assert choice.tokens is not None and all(t.startswith("token_id:") for t in choice.tokens)
    generated = [token_id(t) for t in choice.tokens]
    assert tok.decode(generated) == choice.text
    assert choice.top_logprobs is not None and all(len(d) == 5 for d in choice.top_logprobs)
    assert choice.prompt_logprobs is not None and len(choice.prompt_logprobs) == len(ids)
    assert choice.prompt_logprobs[0] is None
    for pos, row in enumerate(choice.prompt_logprobs[1:], start=1):
        assert row is not None and ids[pos] in row  # the prompt's own token is always reported
        assert 2 <= len(row) <= 3


def test_completion_n_with_text_prompt(policy_server: Any) -> None:
    gen = call(
        policy_server,
        lambda c: c.complete(
            policy_server.model, "Score: ", n=3, temperature=0.9, top_p=0.9, max_tokens=5, seed=1
        ),
    )
    assert len(gen.choices) == 3 and all(isinstance(c.text, str) for c in gen.choices)


def test_structured_output_regex_constrains_every_sample(policy_server: Any) -> None:
    gen = call(
        policy_server,
        lambda c: c.chat(
            policy_server.model,
            [{"role": "user", "content": "Rate the answer."}],
            n=5,
            temperature=1.0,
            max_tokens=10,
            seed=3,
            structured={"regex": "Score: [0-5]"},
        ),
    )
    assert [bool(re.fullmatch(r"Score: [0-5]", c.text)) for c in gen.choices] == [True] * 5


def test_structured_output_json_schema(policy_server: Any) -> None:
    schema = {
        "type": "object",
        "properties": {
            "verdict": {"enum": ["good", "bad"]},
            "score": {"type": "integer", "enum": [0, 1, 2, 3, 4, 5]},
        },
        "required": ["verdict", "score"],
        "additionalProperties": False,
    }
    gen = call(
        policy_server,
        lambda c: c.chat(
            policy_server.model,
            [{"role": "user", "content": "Rate the answer as JSON."}],
            n=3,
            temperature=1.0,
            seed=5,
            # the grammar allows whitespace between tokens and a random model uses plenty
            max_tokens=400,
            extra={
                "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}
            },
        ),
    )
    assert [c.finish_reason for c in gen.choices] == ["stop"] * 3
    for choice in gen.choices:
        value = json.loads(choice.text)
        assert set(value) == {"verdict", "score"} and value["verdict"] in ("good", "bad")
        assert isinstance(value["score"], int)


def test_adapter_load_use_list_unload(policy_server: Any, tiny_lora_dir: Path) -> None:
    name = "adapter-roundtrip"
    prompt = [{"role": "user", "content": "What are three tips for learning a new language?"}]

    async def go(client: OpenAICompatClient) -> dict[str, Any]:
        base = await client.chat(policy_server.model, prompt, temperature=0.0, max_tokens=16, top_logprobs=1)
        await client.load_adapter(name, str(tiny_lora_dir))
        listed = await client.adapters()
        tuned = await client.chat(name, prompt, temperature=0.0, max_tokens=16, top_logprobs=1)
        await client.unload_adapter(name)
        after = await client.model_names()
        with pytest.raises(HTTPStatusError) as gone:
            await client.chat(name, prompt, max_tokens=2)
        return {"base": base, "listed": listed, "tuned": tuned, "after": after, "gone": gone.value}

    out = call(policy_server, go)
    entry = next(m for m in out["listed"] if m["id"] == name)
    assert entry["parent"] == policy_server.model and Path(entry["root"]) == tiny_lora_dir
    assert out["tuned"].model == name
    assert out["tuned"].choices[0].top_logprobs != out["base"].choices[0].top_logprobs
    assert name not in out["after"] and policy_server.model in out["after"]
    assert out["gone"].status == 404 and name in out["gone"].body


def test_loading_a_missing_adapter_is_a_clear_error_without_retries(
    policy_server: Any, tmp_path: Path
) -> None:
    retries: list[BaseException] = []

    async def go() -> HTTPStatusError:
        async with OpenAICompatClient(policy_server.url, max_retries=3, on_retry=retries.append) as client:
            with pytest.raises(HTTPStatusError) as err:
                await client.load_adapter("missing", str(tmp_path / "nothing-here"))
            return err.value

    err = asyncio.run(go())
    assert err.status == 404 and "missing" in str(err)
    assert retries == []
