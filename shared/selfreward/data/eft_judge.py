"""The judge of the judge-filtered EFT mode, built from a run config over `selfreward.judging`.

`data.eft_judge` names the backend (`policy:<served-model>`, `policy:self` = M0 here,
`gemini:<model>`, `openai:<base_url>#<model>`); the `judge` section gives the template and
sampling, the `teacher` section the Gemini key and endpoint. Each reply gets ONE sampled verdict
(sample mode, K=1, whatever judge.mode and judge.samples say): the EFT target is that verdict's
own justification and score, so they must come from the same sample.

A backend error (a verdict whose failure is `backend_error`) stops the stage instead of being
recorded as unparseable: the verdicts written so far are kept, and the next run resumes.
"""

from __future__ import annotations

from typing import Any

from selfreward.config import RunConfig
from selfreward.data.targets import JudgeVerdict
from selfreward.errors import ConfigError, ServiceError
from selfreward.llm.openai import OpenAICompatClient


class JudgingEFTJudge:
    """An `EFTJudge` over a `selfreward.judging.Judge` (async; closed by the stage's event loop)."""

    def __init__(self, judge: Any) -> None:
        self.judge = judge
        c = judge.config
        self.name = (
            f"{judge.name}|template={judge.template.version}|T={c.temperature}|top_p={c.top_p}"
            f"|max_tokens={c.max_tokens}"
        )

    async def __call__(self, prompt: str, response: str) -> JudgeVerdict:
        from selfreward.judging.judge import failure_kind

        (result,) = await self.judge.score(prompt, [response], samples=1)
        verdict = result.verdicts[0]
        if verdict.failure is not None and failure_kind(verdict.failure) == "backend_error":
            raise ServiceError(f"judge {self.judge.name}: {verdict.failure}")
        return JudgeVerdict(verdict.text, verdict.score)

    async def aclose(self) -> None:
        await self.judge.aclose()


def eft_judge_for(
    run: RunConfig,
    *,
    policy_url: str | None = None,
    redis_url: str | None = None,
    client: OpenAICompatClient | None = None,
) -> JudgingEFTJudge:
    """The judge named by `data.eft_judge`, configured by the run's judge/teacher/services sections
    (`policy_url` in place of services.policy_url; `redis_url`: the verdict cache, else in-process)."""
    from selfreward.judging import make_run_judge

    spec = run.data.eft_judge
    if not spec:
        raise ConfigError(["data.eft_judge is required when data.eft_targets is 'judge-filtered'"], "data")
    config = run.judge.model_copy(update={"mode": "sample", "samples": 1})
    judge = make_run_judge(
        spec,
        run,
        policy_url=policy_url,
        self_model=run.model.served_name,
        redis_url=redis_url,
        judge_config=config,
        client=client,
    )
    return JudgingEFTJudge(judge)
