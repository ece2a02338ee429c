"""`temporal`: Temporal Self-Rewarding Language Models (arXiv 2508.06026).

Self-rewarding's chosen and rejected answers drift together as the model improves, so their
gap, and DPO's signal, vanish. The paper decouples them in time (docs/methods.md has the rules
and where we simplify):
- **anchored rejection**: the candidates stage adds N answers of a fixed early model (the
  anchor: M1, the SFT model, or M0; `temporal.anchor`), generated once per prompt and cached in
  the run; M(t) judges them with its own candidates. Pairs (`anchored_pairs`): chosen = M(t)'s
  best answer, rejected = the anchor's worst when it scores below M(t)'s worst (`anchor`), else
  M(t)'s worst (`current`), so a rejected answer is never better than the one self-reward takes;
- **future-guided chosen**: a temporary future model M_f = DPO(M(t)) is trained on the
  anchored pairs (`future_train`), writes N answers to those prompts (`future_candidates`),
  which M(t) judges (`future_judgments`); the final pairs take M_f's best answer as chosen
  where it scores strictly higher than M(t)'s (`future`), else keep M(t)'s;
- M(t+1) = DPO(M(t)) on the final pairs; kinds `<chosen from>/<rejected from>`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from selfreward.config import RunConfig
from selfreward.methods.method import Method
from selfreward.schemas import CandidateRecord, JudgmentRecord, PairRecord

if TYPE_CHECKING:
    from selfreward.stages.stage import StageContext

STAGES = (
    "prompts",
    "candidates",
    "judgments",
    "anchored_pairs",
    "future_train",
    "future_candidates",
    "future_judgments",
    "pairs",
    "train",
    "publish",
    "evaluate",
)
ANCHORS = {"m0": 0, "m1": 1}


def future_model(t: int) -> str:
    """The name of iteration t's temporary future model M_f (models/m<t+1>-future/)."""
    return f"m{t + 1}-future"


def rules(config: RunConfig) -> list[str]:
    if config.policy.max_loras < 3:
        return [
            "policy.max_loras: temporal serves M(t), the anchor and the future model M_f at once: it "
            f"needs at least 3 (got {config.policy.max_loras})"
        ]
    return []


def _best(scored: list[tuple[float, int, CandidateRecord]]) -> tuple[float, int, CandidateRecord]:
    return max(scored, key=lambda s: (s[0], -s[1]))


def _worst(scored: list[tuple[float, int, CandidateRecord]]) -> tuple[float, int, CandidateRecord]:
    return min(scored, key=lambda s: (s[0], s[1]))


def _scored(
    candidates: list[CandidateRecord], judgments: list[JudgmentRecord]
) -> dict[str, list[tuple[float, int, CandidateRecord]]]:
    by_id = {c.id: c for c in candidates}
    out: dict[str, list[tuple[float, int, CandidateRecord]]] = defaultdict(list)
    for j in judgments:
        c = by_id.get(j.id)
        if c is not None and j.score is not None:
            out[c.prompt_id].append((j.score, c.index, c))
    return out


def _pair(
    chosen: tuple[float, int, CandidateRecord], rejected: tuple[float, int, CandidateRecord], **more: Any
):
    row = PairRecord(
        prompt_id=chosen[2].prompt_id,
        prompt=[{"role": "user", "content": chosen[2].prompt}],
        chosen=[{"role": "assistant", "content": chosen[2].text}],
        rejected=[{"role": "assistant", "content": rejected[2].text}],
        chosen_score=chosen[0],
        rejected_score=rejected[0],
        chosen_id=chosen[2].id,
        rejected_id=rejected[2].id,
    ).model_dump(mode="json")
    row.update(more)
    return row


def anchored_pairs(
    candidates: list[CandidateRecord], judgments: list[JudgmentRecord], min_margin: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per prompt: chosen = M(t)'s best scored answer; rejected = the anchor's worst if it scores
    below M(t)'s worst, else M(t)'s worst. Dropped and counted: `no_scored_answer` (M(t) has
    none), `fewer_than_two_scored` (one answer of M(t) and no lower anchor), `tie` (chosen -
    rejected <= min_margin)."""
    current = _scored([c for c in candidates if not c.anchor and not c.teacher], judgments)
    anchor = _scored([c for c in candidates if c.anchor], judgments)
    dropped: Counter[str] = Counter()
    pairs = []
    prompts = sorted({c.prompt_id for c in candidates})
    for pid in prompts:
        mine = current.get(pid, [])
        if not mine:
            dropped["no_scored_answer"] += 1
            continue
        best, worst = _best(mine), _worst(mine)
        theirs = anchor.get(pid, [])
        low = _worst(theirs) if theirs else None
        if low is not None and low[0] < worst[0]:
            rejected, source = low, "anchor"
        elif len(mine) >= 2:
            rejected, source = worst, "current"
        else:
            dropped["fewer_than_two_scored"] += 1
            continue
        if best[0] - rejected[0] <= min_margin:
            dropped["tie"] += 1
            continue
        pairs.append(
            _pair(best, rejected, kind=f"current/{source}", chosen_from="current", rejected_from=source)
        )
    sources = Counter(p["rejected_from"] for p in pairs)
    return pairs, {
        "prompts": len(prompts),
        "candidates": sum(1 for c in candidates if not c.anchor),
        "anchor_answers": sum(1 for c in candidates if c.anchor),
        "pairs": len(pairs),
        "rejected_from_anchor": sources["anchor"],
        "rejected_from_current": sources["current"],
        "dropped": dict(sorted(dropped.items())),
        "mean_margin": (
            sum(p["chosen_score"] - p["rejected_score"] for p in pairs) / len(pairs) if pairs else None
        ),
    }


def future_guided_pairs(
    anchored: list[dict[str, Any]], future: list[CandidateRecord], judgments: list[JudgmentRecord]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The anchored pairs with chosen = M_f's best answer where it scores strictly higher (by
    M(t)'s judge) than the pair's chosen one, `future_id` naming it; rejected unchanged."""
    best = {pid: _best(s) for pid, s in _scored(future, judgments).items()}
    pairs = []
    gains = []
    for row in sorted(anchored, key=lambda r: r["prompt_id"]):
        f = best.get(row["prompt_id"])
        row = dict(row)
        if f is not None and row["chosen_score"] is not None and f[0] > row["chosen_score"]:
            gains.append(f[0] - row["chosen_score"])
            row.update(
                chosen=[{"role": "assistant", "content": f[2].text}],
                chosen_score=f[0],
                chosen_id=f"future:{f[2].id}",
                chosen_from="future",
            )
        row["kind"] = f"{row['chosen_from']}/{row['rejected_from']}"
        pairs.append(row)
    return pairs, {
        "anchored_pairs": len(anchored),
        "future_answers": len(future),
        "future_scored_prompts": len(best),
        "pairs": len(pairs),
        "chosen_from_future": len(gains),
        "mean_future_gain": sum(gains) / len(gains) if gains else None,
        "dropped": {},
        "mean_margin": (
            sum(p["chosen_score"] - p["rejected_score"] for p in pairs) / len(pairs) if pairs else None
        ),
    }


def anchored_pairs_of(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from selfreward.schemas import read_records

    return anchored_pairs(
        read_records(ctx.file("candidates"), CandidateRecord),
        read_records(ctx.file("judgments"), JudgmentRecord),
        ctx.config.pairs.min_margin,
    )


def build_pairs(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from selfreward.schemas import read_records
    from selfreward.storage import load_jsonl

    return future_guided_pairs(
        load_jsonl(ctx.file("anchored_pairs")),
        read_records(ctx.file("future_candidates"), CandidateRecord),
        read_records(ctx.file("future_judgments"), JudgmentRecord),
    )


METHOD = Method(
    name="temporal",
    summary="rejected answers anchored to an early model, chosen ones guided by a future model M_f",
    paper="Temporal Self-Rewarding Language Models (arXiv 2508.06026)",
    build_pairs=build_pairs,
    feedback_judge=lambda config: "policy:self",
    stages=STAGES,
    rules=rules,
    anchor_model=lambda config: ANCHORS[config.temporal.anchor],
    config_fields=("temporal",),
)
