"""The judge of the judge-filtered EFT mode, built from a run config over `selfreward.judging`.

`data.eft_judge` names the backend (`policy:<served-model>`, `policy:self` = M0 here,
`gemini:<model>`, `openai:<base_url>#<model>`); the `judge` section gives the template and
sampling, the `teacher` section the Gemini key and endpoint. Each reply gets ONE sampled verdict
(sample mode, K=1, whatever judge.mode and judge.samples say): the EFT target is that verdict's
own justification and score, so they must come from the same sample
(`selfreward.data.targets.judge_verdicts`).
"""

from __future__ import annotations

from selfreward.config import RunConfig
from selfreward.errors import ConfigError
from selfreward.judging.judge import LLMJudge
from selfreward.llm.openai import OpenAICompatClient


def eft_judge_for(
    run: RunConfig,
    *,
    policy_url: str | None = None,
    redis_url: str | None = None,
    client: OpenAICompatClient | None = None,
) -> LLMJudge:
    """The judge named by `data.eft_judge`, configured by the run's judge/teacher/services sections
    (`policy_url` in place of services.policy_url; `redis_url`: the verdict cache, else in-process;
    `client`: the stage's client of the policy service)."""
    from selfreward.judging import make_run_judge

    spec = run.data.eft_judge
    if not spec:
        raise ConfigError(["data.eft_judge is required when data.eft_targets is 'judge-filtered'"], "data")
    config = run.judge.model_copy(update={"mode": "sample", "samples": 1})
    return make_run_judge(
        spec,
        run,
        policy_url=policy_url,
        self_model=run.model.served_name,
        redis_url=redis_url,
        judge_config=config,
        client=client,
    )
