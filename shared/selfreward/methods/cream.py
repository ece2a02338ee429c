"""`cream`: Consistency Regularized Self-Rewarding (Wang et al. 2024, arXiv 2410.12735).

Per iteration t (docs/methods.md has the rules and where we differ from the paper):
- M(t) samples N candidates per prompt and judges them (the judgments stage), as self-reward;
- the reference_judgments stage judges the same candidates with the previous judge M(t-1)
  (iteration 1: M0, or the teacher with `cream.first_reference: teacher`);
- per prompt, the two judges' rankings of the candidates scored by both are compared with
  Kendall's tau-b (ties counted, scipy.stats.kendalltau): C_x = (tau + 1) / 2 in [0, 1]; a judge
  that gave every candidate one score has no ranking (tau undefined): C_x = 0.5, no information;
  prompts with fewer than two candidates scored by both have none and are left out of the mean;
- pairs as self-reward's (chosen = the best score of M(t), rejected = the worst; `kind: cream`,
  each with its prompt's C_x), and the iteration's consistency rate C = the mean C_x;
- the DPO loss is CREAM's consistency-regularised one,
  C * -log sigma(beta h) + (1 - C) * -log sigma(-beta h), h the DPO margin of (chosen, rejected):
  the preference is trusted as much as the two judges agree. `pairs.manifest.json` holds C as
  `preference_confidence`, which the train stage passes to the trainer
  (`selfreward.training.arguments.dpo_loss`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from selfreward.config import RunConfig
from selfreward.methods.method import Method
from selfreward.schemas import JudgmentRecord

if TYPE_CHECKING:
    from selfreward.stages.stage import StageContext

STAGES = (
    "prompts",
    "candidates",
    "judgments",
    "reference_judgments",
    "pairs",
    "train",
    "publish",
    "evaluate",
)


def rules(config: RunConfig) -> list[str]:
    problems = []
    if config.dpo.loss_type != "sigmoid":
        problems.append(
            f"dpo.loss_type: cream's consistency-regularised loss is built on DPO's sigmoid loss "
            f"(got {config.dpo.loss_type!r})"
        )
    if config.cream.first_reference == "teacher" and not config.teacher.backend:
        problems.append("cream.first_reference: 'teacher' needs teacher.backend (the judge of iteration 1)")
    if config.iterations >= 2 and config.policy.max_loras < 2:
        problems.append(
            f"policy.max_loras: cream judges with M(t) and M(t-1) at once, both adapters served: "
            f"it needs at least 2 (got {config.policy.max_loras})"
        )
    return problems


def prompt_consistency(current: list[float], reference: list[float]) -> float | None:
    """C_x = (Kendall tau-b of the two judges' scores + 1) / 2 for one prompt's candidates
    (scores in the same candidate order); 0.5 when a judge gave one score to all (no ranking);
    None with fewer than two candidates."""
    if len(current) != len(reference):
        raise ValueError("both judges must score the same candidates")
    if len(current) < 2:
        return None
    if len(set(current)) == 1 or len(set(reference)) == 1:
        return 0.5
    from scipy.stats import kendalltau

    tau = float(kendalltau(current, reference, variant="b").statistic)
    return 0.5 if math.isnan(tau) else (tau + 1.0) / 2.0


def consistency(
    current: list[JudgmentRecord], reference: list[JudgmentRecord]
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Per prompt C_x (see `prompt_consistency`) over the candidates both judges scored, and the
    report: mean (the iteration's consistency rate C), min, max and the counts."""
    ref = {j.id: j.score for j in reference if j.score is not None}
    per_prompt: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    prompts = set()
    for j in current:
        prompts.add(j.prompt_id)
        if j.score is not None and ref.get(j.id) is not None:
            per_prompt[j.prompt_id].append((j.index, j.score, ref[j.id]))
    rates: dict[str, float | None] = {}
    one_score = 0
    for pid in sorted(prompts):
        scored = sorted(per_prompt.get(pid, []))
        cur, prev = [s[1] for s in scored], [s[2] for s in scored]
        rates[pid] = prompt_consistency(cur, prev)
        if rates[pid] is not None and (len(set(cur)) == 1 or len(set(prev)) == 1):
            one_score += 1
    values = [v for v in rates.values() if v is not None]
    report = {
        "mean": round(sum(values) / len(values), 6) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "prompts": len(values),
        "prompts_one_score": one_score,
        "prompts_without": len(rates) - len(values),
    }
    return rates, report


def build_pairs(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from selfreward.schemas import CandidateRecord, read_records
    from selfreward.stages.pairs import length_control_of, reward_pairs

    cfg = ctx.config
    candidates = read_records(ctx.file("candidates"), CandidateRecord)
    judgments = read_records(ctx.file("judgments"), JudgmentRecord)
    reference = read_records(ctx.file("reference_judgments"), JudgmentRecord)
    pairs, report = reward_pairs(candidates, judgments, cfg.pairs.min_margin, length_control_of(cfg))
    rates, summary = consistency(judgments, reference)
    summary["reference_judge"] = reference[0].judge if reference else None
    for p in pairs:
        p["kind"] = "cream"
        p["consistency"] = rates.get(p["prompt_id"])
    return pairs, {**report, "consistency": summary, "preference_confidence": summary["mean"]}


METHOD = Method(
    name="cream",
    summary="self-reward pairs, trusted as much as M(t)'s and M(t-1)'s judges agree on their ranking",
    paper="CREAM, Consistency Regularized Self-Rewarding (Wang et al. 2024, arXiv 2410.12735)",
    build_pairs=build_pairs,
    feedback_judge=lambda config: "policy:self",
    stages=STAGES,
    rules=rules,
    config_fields=("cream",),
)
