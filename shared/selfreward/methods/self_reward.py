"""`self-reward`: the model judges its own answers (Yuan et al. 2024, Self-Rewarding Language Models).

M(t) writes N candidates per prompt and scores each with the additive 5-point LLM-as-a-Judge
prompt (K verdicts, mean); chosen = the best, rejected = the worst, ties dropped
(`selfreward.stages.pairs.reward_pairs`), optionally with length control.
"""

from __future__ import annotations

from selfreward.methods.method import Method
from selfreward.stages.pairs import scored_pairs

METHOD = Method(
    name="self-reward",
    summary="M(t) writes N answers and judges them itself; best vs worst, ties dropped",
    paper="Yuan et al. 2024, Self-Rewarding Language Models (arXiv 2401.10020)",
    build_pairs=scored_pairs,
    feedback_judge=lambda config: "policy:self",
)
