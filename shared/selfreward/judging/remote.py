"""`RemoteJudge`: a `Judge` (selfreward.judging.protocol) answered by the judge service.

The loop's judgment stage uses it when `services.judge_url` is set, so judging scales with the
service's replicas; every other caller of a Judge may use it too. `policy:self` is resolved
here to the stage's model (the service's own self model is fixed at its start). The service
must use the run's templates: every answer is checked against them, so a service configured
differently fails loudly instead of mixing verdicts of two templates in one file. Requests are
retried by the project's policy (selfreward.llm.retry); the service's 4xx/5xx answers become a
`ServiceError` naming the service.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from selfreward.config import JudgeConfig
from selfreward.errors import ServiceError
from selfreward.judging.protocol import CompareResult, ConfiguredJudge, ScoreResult
from selfreward.llm.http import bearer, build_http_client
from selfreward.llm.retry import HTTPStatusError, is_transient, with_retries
from selfreward.llm.specs import read_spec
from selfreward.prompts import Template


class RemoteJudge(ConfiguredJudge):
    def __init__(
        self,
        base_url: str,
        spec: str,
        config: JudgeConfig,
        *,
        self_model: str | None = None,
        api_token: str | None = None,
    ) -> None:
        self.spec = read_spec(spec).with_self(self_model).name
        self.base_url = base_url.rstrip("/")
        self.config = config
        self._load_templates()
        self._api_token = api_token
        self._name: str | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def name(self) -> str:
        return self._name or self.spec

    def _client(self) -> httpx.AsyncClient:
        if self._http is None or self._http.is_closed:
            self._http = build_http_client(
                base_url=self.base_url,
                headers=bearer(self._api_token),
                timeout_s=self.config.timeout_s * (self.config.max_retries + 2),
                concurrency=self.config.concurrency,
            )
        return self._http

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            return HTTPStatusError.check(await self._client().post(path, json=body)).json()

        try:
            return await with_retries(once, self.config.max_retries)
        except HTTPStatusError as exc:
            raise ServiceError(f"judge service {self.base_url}: {exc}") from exc
        except httpx.HTTPError as exc:
            if is_transient(exc):
                raise ServiceError(f"judge service {self.base_url} unreachable: {exc}") from exc
            raise

    def _check_template(self, got: object, mine: Template, field: str) -> None:
        if got != mine.sha256:
            raise ServiceError(
                f"judge service {self.base_url} uses judge template {str(got)[:12]}, this run's is "
                f"{mine.version} ({getattr(self.config, field)}): configure the service with the run's "
                f"judge.{field}"
            )

    async def score(
        self, instruction: str, responses: Sequence[str], samples: int | None = None
    ) -> list[ScoreResult]:
        body: dict[str, Any] = {
            "instruction": instruction,
            "responses": list(responses),
            "judge": self.spec,
            "samples": samples or self.config.samples,
            "mode": self.config.mode,
        }
        data = await self._post("/v1/score", body)
        self._check_template(data.get("template_sha256"), self.template, "template")
        self._name = data.get("judge", self._name)
        return [ScoreResult.model_validate(r) for r in data["results"]]

    async def compare(self, instruction: str, response_a: str, response_b: str) -> CompareResult:
        body = {
            "instruction": instruction,
            "response_a": response_a,
            "response_b": response_b,
            "judge": self.spec,
            "mode": self.config.mode,
        }
        result = CompareResult.model_validate(await self._post("/v1/compare", body))
        self._check_template(result.template_sha256, self.compare_template, "compare_template")
        self._name = result.judge
        return result

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
