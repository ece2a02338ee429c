"""The teacher as a writer of answers (teacher-demo variant): a backend of the LLM layer
(`selfreward.llm.make_backend`: Gemini through google-genai, any OpenAI-compatible server), so
keys, concurrency, rate limits and retries follow the judges' rules (the run's judge section);
with a `redis_url` its limits are shared with every judge and worker using that backend."""

from __future__ import annotations

from dataclasses import dataclass

from selfreward.config import RunConfig
from selfreward.errors import ConfigError
from selfreward.llm.backend import Backend, make_backend


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


def make_teacher(config: RunConfig, policy_url: str | None = None, redis_url: str | None = None) -> Teacher:
    """The run's teacher; `redis_url`: its backend's limits are kept there (shared), else in-process."""
    t = config.teacher
    if not t.backend:
        raise ConfigError(["teacher.backend: required to write demonstrations"], "teacher")
    backend = make_backend(t.backend, config.judge, teacher=t, policy_url=policy_url, redis_url=redis_url)
    return Teacher(backend.spec.name, backend, t.temperature, t.top_p, t.max_tokens)
