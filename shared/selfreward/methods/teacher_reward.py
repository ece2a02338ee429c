"""`teacher-reward`: a teacher LLM judges the model's answers (the study's Gemini setting).

As self-reward, but the judgment stage's judge is `teacher.backend` (Gemini through
google-genai, or any OpenAI-compatible endpoint).
"""

from __future__ import annotations

from selfreward.config import RunConfig
from selfreward.methods.method import Method
from selfreward.stages.pairs import scored_pairs


def needs_teacher(config: RunConfig) -> list[str]:
    return [] if config.teacher.backend else [f"teacher.backend is required for variant {config.variant!r}"]


METHOD = Method(
    name="teacher-reward",
    summary="M(t) writes N answers, a teacher LLM (Gemini, OpenAI-compatible) judges them",
    paper="the Self-Rewarding setting with an external judge (Yuan et al. 2024; RLAIF, Lee et al. 2023)",
    build_pairs=scored_pairs,
    feedback_judge=lambda config: config.teacher.backend,
    rules=needs_teacher,
    config_fields=("teacher",),
)
