"""The teacher as a writer of answers (teacher-demo variant): the same backends as the judge
(selfreward.judging.backends: Gemini through google-genai, any OpenAI-compatible server), so
keys, concurrency, rate limits and retries follow one set of rules."""

from __future__ import annotations

from dataclasses import dataclass

from selfreward.config import RunConfig
from selfreward.errors import ConfigError
from selfreward.judging.backends import Backend, GeminiBackend, OpenAICompatBackend
from selfreward.judging.specs import parse_spec, resolve_api_key


@dataclass
class Teacher:
    name: str
    backend: Backend
    temperature: float
    top_p: float
    max_tokens: int

    async def write(self, prompt: str, seed: int) -> str:
        """The teacher's answer to a user prompt ('' when the provider refused to answer)."""
        outputs = await self.backend.generate(
            prompt, n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens
        )
        out = outputs[0]
        return "" if out.blocked else out.text.strip()

    async def aclose(self) -> None:
        await self.backend.aclose()


def make_teacher(config: RunConfig, policy_url: str | None = None) -> Teacher:
    t = config.teacher
    if not t.backend:
        raise ConfigError(["teacher.backend: required to write demonstrations"], "teacher")
    spec = parse_spec(t.backend, policy_url=policy_url)
    backend: Backend
    if spec.kind == "gemini":
        key = resolve_api_key(spec, t)
        assert key is not None
        backend = GeminiBackend(spec, config.judge, t, key)
    else:
        backend = OpenAICompatBackend(spec, config.judge, resolve_api_key(spec, t))
    return Teacher(spec.name, backend, t.temperature, t.top_p, t.max_tokens)
