"""`spin`: Self-Play fIne-tuNing (Chen et al. 2024, arXiv 2401.01335).

No judge: the prompts stage samples prompts of the seed IFT split (`prompts.source: seed-ift`,
seeded, without repeats across iterations until the split is exhausted), M(t) writes one answer
to each, and the pair is chosen = the human answer, rejected = M(t)'s own
(`selfreward.stages.pairs.human_pairs`). DPO's reference is M(t), so iteration t + 1 plays
against the model iteration t produced, as in the paper (whose loss is DPO's with the logistic
loss; `dpo.beta` is its lambda).
"""

from __future__ import annotations

from selfreward.config import RunConfig
from selfreward.methods.method import Method
from selfreward.stages.pairs import human_pairs_of


def needs_seed_prompts(config: RunConfig) -> list[str]:
    if config.prompts.source != "seed-ift":
        return [
            f"prompts.source: variant 'spin' needs the seed IFT prompts (their human answers are the "
            f"chosen ones): set prompts.source: seed-ift (got {config.prompts.source!r})"
        ]
    return []


METHOD = Method(
    name="spin",
    summary="chosen = the human answer of a seed IFT prompt, rejected = M(t)'s own answer; no judge",
    paper="SPIN, Self-Play Fine-Tuning (Chen et al. 2024, arXiv 2401.01335)",
    build_pairs=human_pairs_of,
    feedback_judge=lambda config: None,
    samples=lambda config: 1,
    rules=needs_seed_prompts,
    config_fields=("prompts.source",),
)
