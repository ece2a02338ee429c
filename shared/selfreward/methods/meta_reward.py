"""`meta-reward`: the model is actor, judge and meta-judge (Wu et al. 2024, Meta-Rewarding).

Per iteration (docs/methods.md has the rules and where we differ from the paper):
- **actor pairs** (`kind: actor`) as in self-reward, with length control when `pairs.length_control`
  is on: chosen = the shortest answer of the top score band, rejected = the longest of the bottom
  band (`selfreward.stages.pairs.reward_pairs`);
- **judge pairs** (`kind: judge`): the meta_judgments stage has the model compare, in both
  orders, the K judgments of each prompt's most disputed candidate and gives them Elo scores;
  chosen = the best judgment, rejected = the worst, whose prompt is the judge prompt. Dropped and
  counted: equal Elo, the same score, a chosen judgment over `meta.max_judgment_chars`, and pairs
  whose chosen score already makes up `meta.max_score_share` of the judge pairs (NeMo-Aligner's
  rule against the judge drifting to one score);
- the two kinds mixed so that judge pairs are at most `meta.judge_pair_fraction` of the pairs
  (0.1 by default: NeMo-Aligner saw the judge answer 5 to everything above 0.15), in
  iterations 1..`meta.judge_iterations` (2, as the paper).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from selfreward.config import RunConfig
from selfreward.methods.method import Method
from selfreward.storage import sha256_text

if TYPE_CHECKING:
    from selfreward.stages.stage import StageContext

STAGES = ("prompts", "candidates", "judgments", "meta_judgments", "pairs", "train", "publish", "evaluate")
SCORES = range(6)


def needs_sampled_judgments(config: RunConfig) -> list[str]:
    j = config.judge
    if j.mode != "sample" or j.samples < 2:
        return [
            "meta-reward compares K judgments of one answer: it needs judge.mode: sample and "
            f"judge.samples >= 2 (got mode {j.mode}, samples {j.samples})"
        ]
    return []


def _order(seed: int, key: str) -> str:
    return sha256_text(f"{seed}:{key}")


def judge_pairs(
    records: list[dict[str, Any]],
    candidates: dict[str, Any],
    judge_prompt: Any,
    *,
    max_judgment_chars: int | None,
    max_score_share: float,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judge pairs from meta_judgments.jsonl records (see the module docstring).

    `judge_prompt(instruction, response)` renders the judge's prompt of a candidate."""
    dropped: Counter[str] = Counter()
    kept: list[dict[str, Any]] = []
    for rec in sorted(records, key=lambda r: _order(seed, r["prompt_id"])):
        judgments, scores = rec["judgments"], rec["elo"]
        if len(judgments) < 2:
            dropped["fewer_than_two_judgments"] += 1
            continue
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        chosen, rejected = judgments[best], judgments[worst]
        if abs(scores[best] - scores[worst]) < 1e-6:
            dropped["equal_elo"] += 1
            continue
        if chosen["score"] == rejected["score"]:
            dropped["same_score"] += 1
            continue
        if max_judgment_chars is not None and len(chosen["text"]) > max_judgment_chars:
            dropped["judgment_too_long"] += 1
            continue
        cand = candidates[rec["id"]]
        kept.append(
            {
                "prompt_id": rec["prompt_id"],
                "prompt": [{"role": "user", "content": judge_prompt(cand.prompt, cand.text)}],
                "chosen": [{"role": "assistant", "content": chosen["text"]}],
                "rejected": [{"role": "assistant", "content": rejected["text"]}],
                "chosen_score": chosen["score"],
                "rejected_score": rejected["score"],
                "chosen_id": f"{rec['id']}#v{chosen['verdict']}",
                "rejected_id": f"{rec['id']}#v{rejected['verdict']}",
                "kind": "judge",
                "chosen_elo": scores[best],
                "rejected_elo": scores[worst],
            }
        )
    # no score of chosen judgments reaches max_score_share of the judge pairs (counts start at 1)
    counts = [1] * len(SCORES)
    pairs = []
    for pair in kept:
        s = min(5, max(0, round(float(pair["chosen_score"]))))
        if counts[s] / sum(counts) >= max_score_share:
            dropped["score_share"] += 1
            continue
        counts[s] += 1
        pairs.append(pair)
    return pairs, {
        "meta_judged": len(records),
        "judge_pairs": len(pairs),
        "dropped": dict(sorted(dropped.items())),
    }


def mix(
    actor: list[dict[str, Any]], judge: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], int]:
    """Actor pairs and at most `fraction` of the mix as judge pairs (seeded choice); returns
    (pairs sorted by prompt id and kind, judge pairs left out)."""
    if fraction <= 0 or not judge:
        return actor, len(judge)
    room = round(fraction / (1.0 - fraction) * len(actor))
    chosen = sorted(judge, key=lambda p: _order(seed, p["prompt_id"] + "#judge"))[:room]
    return sorted([*actor, *chosen], key=lambda p: (p["prompt_id"], p["kind"])), len(judge) - len(chosen)


def build_pairs(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from selfreward.judging.truncation import truncate_chars
    from selfreward.prompts import load_template
    from selfreward.schemas import CandidateRecord, JudgmentRecord, read_records
    from selfreward.stages.pairs import length_control_of, reward_pairs
    from selfreward.storage import load_jsonl

    cfg = ctx.config
    candidates = read_records(ctx.file("candidates"), CandidateRecord)
    judgments = read_records(ctx.file("judgments"), JudgmentRecord)
    actor, report = reward_pairs(candidates, judgments, cfg.pairs.min_margin, length_control_of(cfg))
    meta_file = ctx.file("meta_judgments")
    if not meta_file.is_file():  # an iteration after meta.judge_iterations
        return actor, {**report, "judge_pairs": {"skipped": "no meta-judgments in this iteration"}}
    template = load_template(cfg.judge.template, kind="score")

    def judge_prompt(instruction: str, response: str) -> str:
        return template.render(
            instruction=instruction, response=truncate_chars(response, cfg.judge.max_response_chars)[0]
        )

    judged, judge_report = judge_pairs(
        load_jsonl(meta_file),
        {c.id: c for c in candidates},
        judge_prompt,
        max_judgment_chars=cfg.meta.max_judgment_chars,
        max_score_share=cfg.meta.max_score_share,
        seed=cfg.seed,
    )
    pairs, left_out = mix(actor, judged, cfg.meta.judge_pair_fraction, cfg.seed)
    if left_out:
        judge_report["dropped"] = {**judge_report["dropped"], "over_fraction": left_out}
    dropped = dict(report["dropped"])
    dropped.update({f"judge.{k}": v for k, v in judge_report["dropped"].items()})
    report = {
        **report,
        "pairs": len(pairs),
        "dropped": dict(sorted(dropped.items())),
        "judge_pairs": {**judge_report, "judge_pair_fraction": cfg.meta.judge_pair_fraction},
    }
    return pairs, report


METHOD = Method(
    name="meta-reward",
    summary="actor, judge and meta-judge: actor pairs with length control, plus judge pairs ranked by a meta-judge",
    paper="Wu et al. 2024, Meta-Rewarding Language Models (arXiv 2407.19594)",
    build_pairs=build_pairs,
    feedback_judge=lambda config: "policy:self",
    stages=STAGES,
    rules=needs_sampled_judgments,
    config_fields=("meta", "judge.samples", "judge.mode"),
)
