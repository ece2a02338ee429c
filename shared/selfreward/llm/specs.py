"""Backend specs: which model answers (a judge, the teacher), through which backend, with which key.

    policy:<served-name>        a model (or LoRA adapter) served by the policy service (vLLM)
    policy:self                 the current model M(t): resolved to `self_model` by the caller
    gemini:<model>              Google's Gemini API through the google-genai SDK
    openai:<base_url>#<model>   any OpenAI-compatible server (vLLM, OpenAI, ...)

API keys (never logged, never part of a cache key or record):
- the key of `teacher.backend` is read from `teacher.api_key_file` when set, else from the
  environment variable `teacher.api_key_env`; it is used only for specs that talk to the same
  endpoint as `teacher.backend` (any `gemini:` spec when the teacher is Gemini or unset; an
  `openai:` spec with the same base URL as the teacher);
- otherwise a `gemini:` spec reads GEMINI_API_KEY, then GOOGLE_API_KEY, and an `openai:`
  spec is sent without a key (a key configured for one host is never sent to another).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from selfreward.config import BACKEND_PATTERN, TeacherConfig
from selfreward.errors import ConfigError

BackendKind = Literal["policy", "gemini", "openai"]
SELF = "self"


@dataclass(frozen=True)
class BackendSpec:
    kind: BackendKind
    model: str  # policy: the served name, or "self" until resolved
    base_url: str | None = None  # openai: the server; policy: the policy service once resolved

    @property
    def name(self) -> str:
        """The spec string recorded in verdicts and cache keys (resolved: no "self")."""
        if self.kind == "openai":
            return f"openai:{self.base_url}#{self.model}"
        return f"{self.kind}:{self.model}"

    def with_self(self, self_model: str | None) -> BackendSpec:
        """`policy:self` as `policy:<self_model>` (other specs unchanged)."""
        if self.kind != "policy" or self.model != SELF:
            return self
        if not self_model:
            raise ConfigError(
                ["judge 'policy:self' needs the served name of the current model (self_model)"], "judge"
            )
        return BackendSpec("policy", self_model, self.base_url)


def read_spec(spec: str) -> BackendSpec:
    """A spec as written: checked, not resolved (a policy: spec has no URL, `self` stays)."""
    spec = spec.strip()
    if not BACKEND_PATTERN.match(spec):
        raise ConfigError(
            [
                f"judge {spec!r}: expected 'policy:<served-model>' (policy:self = the current model), "
                "'gemini:<model>' or 'openai:<base_url>#<model>'"
            ],
            "judge",
        )
    kind, rest = spec.split(":", 1)
    if kind == "policy":
        return BackendSpec("policy", rest)
    if kind == "gemini":
        return BackendSpec("gemini", rest)
    base_url, model = rest.split("#", 1)
    return BackendSpec("openai", model, base_url.rstrip("/"))


def parse_spec(spec: str, *, self_model: str | None = None, policy_url: str | None = None) -> BackendSpec:
    """Read and resolve a spec: `policy:self` becomes `policy:<self_model>`, a policy spec gets
    the policy service's URL."""
    read = read_spec(spec).with_self(self_model)
    if read.kind != "policy":
        return read
    if not policy_url:
        raise ConfigError([f"judge {spec.strip()!r} needs the policy service URL (policy_url)"], "judge")
    return BackendSpec("policy", read.model, policy_url.rstrip("/"))


def _read_key_file(path: os.PathLike[str] | str) -> str:
    try:
        key = open(path, encoding="utf-8").read().strip()  # noqa: SIM115 - tiny file
    except OSError as exc:
        raise ConfigError([f"teacher.api_key_file: cannot read {path}: {exc.strerror}"], "teacher") from None
    if not key:
        raise ConfigError([f"teacher.api_key_file: {path} is empty"], "teacher")
    return key


def _teacher_owns(spec: BackendSpec, teacher: TeacherConfig) -> bool:
    if teacher.backend is None:
        return spec.kind == "gemini"
    owner = read_spec(teacher.backend)
    if owner.kind != spec.kind:
        return False
    return spec.kind == "gemini" or owner.base_url == spec.base_url


def resolve_api_key(spec: BackendSpec, teacher: TeacherConfig | None) -> str | None:
    """The key for `spec` by the rule in this module's docstring (None: send no key)."""
    teacher = teacher or TeacherConfig()
    if spec.kind == "policy":
        return None
    if _teacher_owns(spec, teacher):
        if teacher.api_key_file is not None:
            return _read_key_file(teacher.api_key_file)
        key = os.environ.get(teacher.api_key_env, "").strip()
        if key:
            return key
        if spec.kind == "openai":
            return None
        raise ConfigError(
            [
                f"judge {spec.name}: no API key: set the environment variable {teacher.api_key_env} "
                "or teacher.api_key_file (a mounted secret)"
            ],
            "teacher",
        )
    if spec.kind == "gemini":
        for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
            key = os.environ.get(var, "").strip()
            if key:
                return key
        raise ConfigError(
            [f"judge {spec.name}: no API key: set GEMINI_API_KEY (or configure teacher.api_key_env/file)"],
            "teacher",
        )
    return None
