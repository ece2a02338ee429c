"""The LLM layer: every call the project makes to a model goes through here.

- `openai`: the async client of OpenAI-compatible servers (vLLM's, any teacher's): chat,
  completions, /tokenize, adapters, health; `view()` shares one connection pool;
- `backend`: the `Backend` protocol of judges and the teacher (generate with n samples,
  logprobs, constraints, prefill; capabilities; token counts), `OpenAICompatBackend`, and
  `make_backend(spec, settings, ...)`, the one place a spec becomes a backend;
- `gemini`: Gemini through google-genai;
- `specs`: backend specs (`policy:`, `gemini:`, `openai:`) and the API-key rule;
- `retry`, `limits`, `http`: the retry policy, the per-backend limits (in-process, or shared
  through Redis by every process using a backend), the HTTP client builder.
"""

from selfreward.llm.backend import (
    Backend,
    BackendEvents,
    BackendSettings,
    Capabilities,
    Constraint,
    OpenAICompatBackend,
    Output,
    make_backend,
)
from selfreward.llm.openai import Choice, Generation, OpenAICompatClient, token_id
from selfreward.llm.retry import HTTPStatusError, is_transient, with_retries
from selfreward.llm.specs import BackendSpec, parse_spec, read_spec, resolve_api_key

__all__ = [
    "Backend",
    "BackendEvents",
    "BackendSettings",
    "BackendSpec",
    "Capabilities",
    "Choice",
    "Constraint",
    "Generation",
    "HTTPStatusError",
    "OpenAICompatBackend",
    "OpenAICompatClient",
    "Output",
    "is_transient",
    "make_backend",
    "parse_spec",
    "read_spec",
    "resolve_api_key",
    "token_id",
    "with_retries",
]
