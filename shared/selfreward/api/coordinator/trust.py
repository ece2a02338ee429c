"""What a run posted over REST may choose: only what the deployment allows (docs/api.md, trust model).

A client holding the API token may start work, but it must not be able to make a worker send the
deployment's secrets somewhere, or read a file and send it in a prompt. So a posted run is
checked, before anything is stored, against the deployment's settings (the coordinator's
environment):

- **Deployment-owned fields** (`artifact_root`, `services.policy_url`, `services.policy_pool`,
  `services.policy_lora_dir`, `services.judge_url`, `services.redis_url`, `teacher.api_key_env`,
  `teacher.api_key_file`) keep the deployment's
  value: API keys come only from the deployment's own secrets, requests go only to its
  services. Where the deployment sets one (its `SELFREWARD_*` override), a posted value is
  replaced by it and the answer lists it under `replaced`; where it does not, a posted run may
  only name the default (another value is refused).
- **Backends** (`teacher.backend`, `data.eft_judge`, `eval.judge`): `policy:<name>` (the
  deployment's policy service) always; anything else only when it matches a pattern of
  `SELFREWARD_ALLOWED_BACKENDS` (comma-separated fnmatch patterns, e.g.
  `gemini:*,openai:http://teacher:8000/v1#*`; default none).
- **Endpoints**: `teacher.gemini_base_url` only from `SELFREWARD_ALLOWED_GEMINI_BASE_URLS`
  (default none: Google's endpoint).
- **Paths** (`model.base` when it names a file or folder, `model.chat_template`, `data.source`,
  `prompts.file`, `judge.template`, `judge.compare_template`, `meta.template`, `eval.prompts`,
  `eval.judge_bench[].set`, `training.accelerate_config`): absolute, and inside the artifact root or a folder of
  `SELFREWARD_ALLOWED_PATHS` (`:`-separated, e.g. the mounted `/etc/selfreward/configs`); built-in names
  (`builtin:<template>` and `builtin:<prompt set>`, `demo`, `hf:<repo>`, `ift-eval`, shipped accelerate configs, hub ids,
  the built-in model alias) are always allowed. Symbolic links are resolved first.

A field the deployment sets itself (any `SELFREWARD_*` override, e.g. `model.base` and its chat
template) is trusted while it holds the deployment's value; any other value is checked. Every violation is one 422 entry
naming the field. The embedded CLI (`selfreward run`) is not checked: its user owns the machine.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfreward.config import RunConfig, deep_merge, env_overrides

OWNED = (
    ("artifact_root",),
    ("services", "policy_url"),
    ("services", "policy_pool"),  # where publish loads adapters
    ("services", "policy_lora_dir"),  # where publish writes links
    ("services", "judge_url"),
    ("services", "redis_url"),
    ("teacher", "api_key_env"),
    ("teacher", "api_key_file"),
)
BACKEND_FIELDS = (("teacher", "backend"), ("data", "eft_judge"), ("eval", "judge"))


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (value or "").replace(";", ",").split(",") if x.strip())


def _leaves(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            out += _leaves(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


def _present(data: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = data
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _raw(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for part in path:
        node = node[part]
    return node


def _get(config: RunConfig, path: tuple[str, ...]) -> Any:
    value: Any = config
    for part in path:
        value = value[int(part)] if isinstance(value, list) else getattr(value, part)
    return value


@dataclass(frozen=True)
class Deployment:
    """The deployment's settings a posted run is checked against."""

    defaults: RunConfig  # what the deployment sets (its overrides over the built-in defaults)
    overridden: frozenset[tuple[str, ...]] = frozenset()  # the owned fields its overrides set
    deployment_set: frozenset[tuple[str, ...]] = frozenset()  # every field its overrides set
    backends: tuple[str, ...] = ()
    gemini_base_urls: tuple[str, ...] = ()
    path_roots: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Deployment:
        env = os.environ if environ is None else environ
        overrides = env_overrides(env)
        defaults = RunConfig.model_validate(deep_merge({}, overrides))
        overridden = frozenset(f for f in OWNED if _present(overrides, f))
        deployment_set = frozenset(_leaves(overrides))
        extra = [p for p in (env.get("SELFREWARD_ALLOWED_PATHS") or "").split(os.pathsep) if p.strip()]
        roots = [defaults.artifact_root, *map(Path, extra)]
        return cls(
            defaults=defaults,
            overridden=overridden,
            deployment_set=deployment_set,
            backends=_split(env.get("SELFREWARD_ALLOWED_BACKENDS")),
            gemini_base_urls=_split(env.get("SELFREWARD_ALLOWED_GEMINI_BASE_URLS")),
            path_roots=tuple(Path(r).expanduser().resolve() for r in roots),
        )

    def backend_allowed(self, spec: str) -> bool:
        return spec.startswith("policy:") or any(fnmatch.fnmatchcase(spec, p) for p in self.backends)

    def path_allowed(self, value: str | Path) -> bool:
        path = Path(value).expanduser()
        if not path.is_absolute():
            return False
        real = path.resolve()
        return any(real == root or real.is_relative_to(root) for root in self.path_roots)

    def replaced(self, body: Mapping[str, Any]) -> list[str]:
        """The owned fields a posted body names that the deployment's overrides replace."""
        out = []
        for field in sorted(self.overridden):
            if _present(body, field) and str(_raw(body, field)) != str(_get(self.defaults, field)):
                out.append(".".join(field))
        return out

    def check(self, config: RunConfig) -> list[dict[str, Any]]:
        """Every way `config` (a posted run, overrides applied) leaves what the deployment allows."""
        problems: list[dict[str, Any]] = []

        def refuse(field: tuple[str, ...], value: Any, why: str) -> None:
            shown = str(value)
            problems.append(
                {
                    "loc": ["body", *field],
                    "field": ".".join(field),
                    "msg": why,
                    "type": "not_allowed",
                    "input": shown if len(shown) <= 200 else shown[:200] + "...",
                }
            )

        for field in OWNED:
            mine, theirs = _get(self.defaults, field), _get(config, field)
            if theirs != mine:
                refuse(field, theirs, f"set by the deployment ({mine}); a posted run cannot change it")
        for field in BACKEND_FIELDS:
            spec = _get(config, field)
            if self._deployments_own(config, field):
                continue
            if spec is not None and not self.backend_allowed(spec):
                refuse(
                    field,
                    spec,
                    "this deployment allows policy:<model> and "
                    + (", ".join(self.backends) if self.backends else "no other backend")
                    + " (SELFREWARD_ALLOWED_BACKENDS)",
                )
        url = config.teacher.gemini_base_url
        if self._deployments_own(config, ("teacher", "gemini_base_url")):
            url = None
        if url is not None and url not in self.gemini_base_urls:
            refuse(
                ("teacher", "gemini_base_url"),
                url,
                "not an endpoint this deployment allows (SELFREWARD_ALLOWED_GEMINI_BASE_URLS)",
            )
        for field, value in self.paths_named(config):
            if self._deployments_own(config, field):  # e.g. the model folder it mounts
                continue
            if not self.path_allowed(value):
                roots = ", ".join(str(r) for r in self.path_roots)
                refuse(field, value, f"a path of a posted run must be absolute and inside {roots}")
        return problems

    def _deployments_own(self, config: RunConfig, field: tuple[str, ...]) -> bool:
        """The field holds the value the deployment's own overrides gave it."""
        return field in self.deployment_set and _get(config, field) == _get(self.defaults, field)

    @staticmethod
    def paths_named(config: RunConfig) -> list[tuple[tuple[str, ...], str | Path]]:
        """The file paths `config` names (built-in names and hub ids are not paths)."""
        from selfreward.policy.prepare import BUILTIN_MODELS, HUB_ID

        out: list[tuple[tuple[str, ...], str | Path]] = []
        base = config.model.base
        if base not in BUILTIN_MODELS and (
            base.startswith(("/", ".", "~")) or not HUB_ID.match(base) or Path(base).exists()
        ):
            out.append((("model", "base"), base))
        if config.model.chat_template is not None:
            out.append((("model", "chat_template"), config.model.chat_template))
        if config.data.source != "demo" and not config.data.source.startswith("hf:"):
            out.append((("data", "source"), config.data.source))
        if config.prompts.file is not None:
            out.append((("prompts", "file"), config.prompts.file))
        for name in ("template", "compare_template"):
            spec = getattr(config.judge, name)
            if not spec.startswith("builtin:"):
                out.append((("judge", name), spec))
        if not config.meta.template.startswith("builtin:"):
            out.append((("meta", "template"), config.meta.template))
        prompts = config.eval.prompts
        if prompts != "ift-eval" and not prompts.startswith("builtin:"):
            out.append((("eval", "prompts"), prompts.split(":", 1)[1] if ":" in prompts else prompts))
        for i, bench in enumerate(config.eval.judge_bench):
            if not bench.set.startswith("hf:"):
                out.append((("eval", "judge_bench", str(i), "set"), bench.set))
        accel = config.training.accelerate_config
        if accel is not None:
            from selfreward.training.launch import shipped_configs

            if accel.removesuffix(".yaml") not in shipped_configs():
                out.append((("training", "accelerate_config"), accel))
        return out
