"""Self-judging against the real policy service: vLLM on CPU serving a tiny random Llama.

The tiny model's free text is noise, which is the point: constrained decoding must still
yield verdicts that parse, unconstrained noise must be recorded as failures (never as
scores), and the logprob modes must return a proper distribution over 0..5.

The tiny model's 512-token BPE needs about 1000 tokens for the built-in Yuan et al. prompt,
the whole context of the shared test server, so these tests use a compact judge template of
their own (a user-replaceable template file, as `judge.template` allows); the benchmark
(bench/judge_modes.py) runs the built-in prompt on SmolLM2.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from selfreward.config import JudgeConfig
from selfreward.errors import ConfigError
from selfreward.judging import JudgeObserver, make_judge, parse_score

INSTRUCTION = "Explain how photosynthesis works in simple terms."
ANSWERS = [
    "Plants use light, water and carbon dioxide to make sugar and oxygen.",
    "Write a short poem about the sea at night.",
]


class Calls(JudgeObserver):
    def __init__(self) -> None:
        self.calls = 0

    def backend_call(self, backend: str, seconds: float, ok: bool) -> None:
        self.calls += 1


COMPACT_SCORE = """Rate the response to the question from 0 to 5.
Question: {instruction}
Response: {response}
Justify briefly, then end with the line "Score: <0-5>"."""
COMPACT_PAIR = """Which output answers the instruction better?
Instruction: {instruction}
Output m: {output_1}
Output M: {output_2}
Answer m or M only."""


@pytest.fixture(scope="module")
def policy(policy_server: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[str, str]]:
    """(base URL, served name of the tiny model, compact template settings) of the session's vLLM."""
    folder = tmp_path_factory.mktemp("judge-templates")
    (folder / "score.txt").write_text(COMPACT_SCORE)
    (folder / "pair.txt").write_text(COMPACT_PAIR)
    templates = {"template": str(folder / "score.txt"), "compare_template": str(folder / "pair.txt")}
    return policy_server.url, policy_server.model, templates


def run(
    policy: tuple[str, str, dict[str, str]],
    coro_fn: Any,
    spec: str = "policy:self",
    redis_url: str | None = None,
    **cfg: Any,
):
    url, model, templates = policy
    observer = Calls()

    async def go() -> Any:
        judge = make_judge(
            spec,
            JudgeConfig(**{"max_tokens": 16, **templates, **cfg}),
            policy_url=url,
            self_model=model,
            redis_url=redis_url,
            observer=observer,
        )
        try:
            return await coro_fn(judge)
        finally:
            await judge.aclose()

    return asyncio.run(go()), observer.calls


def test_constrained_self_judging_always_parses(policy: tuple[str, str, dict[str, str]]) -> None:
    results, calls = run(policy, lambda j: j.score(INSTRUCTION, ANSWERS, 3), samples=3)
    assert calls == 2  # one request per response, n=K
    for res in results:
        assert res.judge == f"policy:{policy[1]}" and res.mode == "sample"
        assert len(res.verdicts) == 3 and res.failures == 0
        for v in res.verdicts:
            assert v.model_extra["constrained"] is True
            assert v.text.rstrip().splitlines()[-1] in {f"Score: {d}" for d in range(6)}
            assert v.score == parse_score(v.text)[0]
        assert res.score == pytest.approx(sum(v.score for v in res.verdicts) / 3)


def test_unconstrained_noise_is_recorded_as_failures(policy: tuple[str, str, dict[str, str]]) -> None:
    [res], _ = run(policy, lambda j: j.score(INSTRUCTION, ANSWERS[:1], 4), structured=False)
    assert len(res.verdicts) == 4
    for v in res.verdicts:
        score, failure = parse_score(v.text)
        assert (v.score, v.failure) == (score, failure) and v.model_extra["constrained"] is False
    parsed = [v.score for v in res.verdicts if v.score is not None]
    assert res.failures == 4 - len(parsed)
    assert res.score == (sum(parsed) / len(parsed) if parsed else None)


def test_logprob_prefill_is_an_exact_distribution(policy: tuple[str, str, dict[str, str]]) -> None:
    results, calls = run(policy, lambda j: j.score(INSTRUCTION, ANSWERS), mode="logprob")
    assert calls == 2
    for res in results:
        [v] = res.verdicts
        extra = v.model_extra
        assert extra["source"] == "prefill" and v.text.startswith("Score: ")
        # vLLM returned the logprob of every digit token (logprob_token_ids), not a top-k cut
        assert set(extra["probs"]) == {str(d) for d in range(6)}
        assert sum(extra["probs"].values()) == pytest.approx(1.0)
        assert 0.0 < extra["digit_mass"] <= 1.0
        assert v.score == pytest.approx(sum(int(d) * p for d, p in extra["probs"].items()))
        assert 0.0 <= res.score <= 5.0


def test_logprob_from_a_constrained_verdict_through_the_openai_spec(
    policy: tuple[str, str, dict[str, str]],
) -> None:
    url, model, _ = policy
    spec = f"openai:{url}/v1#{model}"
    [res], _ = run(
        policy,
        lambda j: j.score(INSTRUCTION, ANSWERS[:1]),
        spec=spec,
        mode="logprob",
        logprob_source="verdict",
    )
    [v] = res.verdicts
    assert res.judge == spec and v.failure is None and v.model_extra["source"] == "verdict"
    assert v.text.rstrip().splitlines()[-1].startswith("Score: ")
    assert math.isclose(sum(v.model_extra["probs"].values()), 1.0, rel_tol=1e-6)


def test_compare_on_the_policy(policy: tuple[str, str, dict[str, str]]) -> None:
    comp, calls = run(policy, lambda j: j.compare(INSTRUCTION, ANSWERS[0], ANSWERS[1]))
    assert calls == 2 and comp.failure is None
    assert comp.ab.text in {"m", "M"} and comp.ba.text in {"m", "M"}  # constrained to the identifiers
    expected = 0.5 if comp.ab.winner != comp.ba.winner else (1.0 if comp.ab.winner == "A" else 0.0)
    assert comp.preference == expected
    comp, _ = run(policy, lambda j: j.compare(INSTRUCTION, ANSWERS[0], ANSWERS[1]), mode="logprob")
    assert comp.failure is None and 0.0 <= comp.ab.p_a <= 1.0 and 0.0 <= comp.ba.p_a <= 1.0
    same_side = (comp.ab.p_a - 0.5) * (comp.ba.p_a - 0.5) > 0
    assert comp.preference == pytest.approx((comp.ab.p_a + comp.ba.p_a) / 2 if same_side else 0.5)


def test_response_longer_than_the_context_is_cut_to_fit(policy: tuple[str, str, dict[str, str]]) -> None:
    long = "Photosynthesis happens in the leaves of green plants. " * 400  # ~21k chars, > the context
    [res], calls = run(policy, lambda j: j.score(INSTRUCTION, [long], 1), max_response_chars=100_000)
    assert res.truncated and res.failures == 0 and calls == 1
    assert res.verdicts[0].model_extra["context_cut"] is True


def test_a_prompt_that_cannot_fit_is_a_failure_without_a_model_call(
    policy: tuple[str, str, dict[str, str]], tmp_path: Path
) -> None:
    huge = tmp_path / "huge.txt"
    huge.write_text("Read these rules carefully. " * 2000 + COMPACT_SCORE)  # ~56k chars of template
    [res], calls = run(policy, lambda j: j.score(INSTRUCTION, ANSWERS[:1], 2), template=str(huge))
    assert calls == 0 and res.score is None and res.failures == 2
    assert all(v.failure.startswith("context_overflow") for v in res.verdicts)


def test_cache_and_unknown_model(
    policy: tuple[str, str, dict[str, str]], redis_url: str, redis_conn: Any
) -> None:
    _, first = run(policy, lambda j: j.score(INSTRUCTION, ANSWERS, 2), redis_url=redis_url)
    results, second = run(policy, lambda j: j.score(INSTRUCTION, ANSWERS, 2), redis_url=redis_url)
    assert first == 2 and second == 0 and [r.cached for r in results] == [2, 2]
    with pytest.raises(ConfigError, match="serves"):
        run(policy, lambda j: j.score(INSTRUCTION, ANSWERS, 1), spec="policy:no-such-adapter")


def test_a_served_lora_adapter_judges_by_name(
    policy: tuple[str, str, dict[str, str]], tiny_lora_dir: Path
) -> None:
    """Self-reward with M(t) = an adapter: policy:self resolves to the adapter's served name."""
    import uuid

    from selfreward.llm.openai import OpenAICompatClient

    url, _, templates = policy
    name = f"judge-lora-{uuid.uuid4().hex[:8]}"

    async def go() -> Any:
        async with OpenAICompatClient(url) as client:
            await client.load_adapter(name, str(tiny_lora_dir))
            try:
                judge = make_judge(
                    "policy:self",
                    JudgeConfig(max_tokens=16, **templates),
                    policy_url=url,
                    self_model=name,
                )
                try:
                    return await judge.score(INSTRUCTION, ANSWERS[:1], 2)
                finally:
                    await judge.aclose()
            finally:
                await client.unload_adapter(name)

    [res] = asyncio.run(go())
    assert res.judge == f"policy:{name}" and res.failures == 0 and len(res.verdicts) == 2
    assert all(v.model_extra["constrained"] for v in res.verdicts)
