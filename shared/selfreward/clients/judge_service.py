"""Client of the judge service (selfreward.api.judge) with the interface of an in-process `Judge`,
so the loop's judgment stage (`selfreward.judging.ajudge_candidates`) runs unchanged against
either. The service must use the same judge template (the run config's); every answer is
checked against it, so a judge service configured differently fails loudly instead of mixing
verdicts of two templates in one judgments file.
"""

from __future__ import annotations

from typing import Any

import httpx

from selfreward.config import JudgeConfig
from selfreward.errors import ServiceError
from selfreward.judging import ScoreResult
from selfreward.llm.http import bearer, build_http_client
from selfreward.llm.retry import HTTPStatusError, is_transient, with_retries
from selfreward.llm.specs import read_spec
from selfreward.prompts import Template, load_template


class RemoteJudge:
    def __init__(
        self,
        base_url: str,
        spec: str,
        config: JudgeConfig,
        *,
        self_model: str | None = None,
        api_token: str | None = None,
    ) -> None:
        # resolve policy:self here: the service's own self_model is fixed at its start
        self.spec = read_spec(spec).with_self(self_model).name
        self.base_url = base_url.rstrip("/")
        self.config = config
        self.template: Template = load_template(config.template, kind="score")
        self._api_token = api_token
        self._name: str | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def name(self) -> str:
        return self._name or self.spec

    @property
    def mode(self) -> str:
        return self.config.mode

    def _client(self) -> httpx.AsyncClient:
        if self._http is None or self._http.is_closed:
            self._http = build_http_client(
                base_url=self.base_url,
                headers=bearer(self._api_token),
                timeout_s=self.config.timeout_s * (self.config.max_retries + 2),
                concurrency=self.config.concurrency,
            )
        return self._http

    async def score(
        self, instruction: str, responses: list[str], samples: int | None = None
    ) -> list[ScoreResult]:
        body: dict[str, Any] = {
            "instruction": instruction,
            "responses": responses,
            "judge": self.spec,
            "samples": samples or self.config.samples,
            "mode": self.config.mode,
        }

        async def once() -> dict[str, Any]:
            return HTTPStatusError.check(await self._client().post("/v1/score", json=body)).json()

        try:
            data = await with_retries(once, self.config.max_retries)
        except HTTPStatusError as exc:
            raise ServiceError(f"judge service {self.base_url}: {exc}") from exc
        except httpx.HTTPError as exc:
            if is_transient(exc):
                raise ServiceError(f"judge service {self.base_url} unreachable: {exc}") from exc
            raise
        if data.get("template_sha256") != self.template.sha256:
            raise ServiceError(
                f"judge service {self.base_url} uses judge template {str(data.get('template_sha256'))[:12]}, "
                f"this run's is {self.template.version} ({self.config.template}): configure the service "
                "with the run's judge.template"
            )
        self._name = data.get("judge", self._name)
        return [ScoreResult.model_validate(r) for r in data["results"]]

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
