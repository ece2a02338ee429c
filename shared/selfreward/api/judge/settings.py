"""Settings of the judge service, from the environment.

SELFREWARD_CONFIG        run config YAML (judge and teacher sections); default: built-in defaults
                         (SELFREWARD_<SECTION>__<FIELD> overrides apply either way)
REDIS_URL                verdict cache shared by replicas and restarts, and each backend's limits
                         shared by replicas and stage workers; unset = in-process cache and limits
POLICY_URL               the policy service for policy:* judges; default services.policy_url
SELFREWARD_SELF_MODEL    the served name `policy:self` resolves to (M(t))
SELFREWARD_DEFAULT_JUDGE judge of requests that name none; default: the config's feedback judge
SELFREWARD_API_TOKEN     when set, /v1/* require `Authorization: Bearer <token>`
SELFREWARD_ALLOWED_BACKENDS  comma-separated fnmatch patterns of the judges requests may name
                         besides policy:<model> and the default judge (e.g. gemini:*)
SELFREWARD_MAX_JUDGES    judges (specs) kept at once, least recently used closed first (32)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from selfreward.config import RunConfig, build_config, load_config


@dataclass
class JudgeSettings:
    config: RunConfig = field(default_factory=RunConfig)
    redis_url: str | None = None
    policy_url: str | None = None
    self_model: str | None = None
    default_judge: str | None = None
    api_token: str | None = None
    allowed_backends: tuple[str, ...] = ()
    max_judges: int = 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JudgeSettings:
        env = os.environ if environ is None else environ
        path = env.get("SELFREWARD_CONFIG")
        config = load_config(Path(path), env) if path else build_config({}, env, source="environment")
        default = env.get("SELFREWARD_DEFAULT_JUDGE") or None
        if default is None:
            spec = config.feedback_judge() or config.teacher.backend
            if spec != "policy:self" or env.get("SELFREWARD_SELF_MODEL"):
                default = spec
        return cls(
            config=config,
            redis_url=env.get("REDIS_URL") or None,
            policy_url=env.get("POLICY_URL") or config.services.policy_url,
            self_model=env.get("SELFREWARD_SELF_MODEL") or None,
            default_judge=default,
            api_token=env.get("SELFREWARD_API_TOKEN") or None,
            allowed_backends=tuple(
                x.strip() for x in (env.get("SELFREWARD_ALLOWED_BACKENDS") or "").split(",") if x.strip()
            ),
            max_judges=max(1, int(env.get("SELFREWARD_MAX_JUDGES") or 32)),
        )
