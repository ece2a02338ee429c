"""Iteration stage `pairs`: preference pairs, and the per-iteration feedback report.

The run's method (`selfreward.methods`) builds the pairs; the builders of the scored methods
and of teacher demonstrations are here.

Scored methods (self-reward, teacher-reward, meta-reward's actor pairs; `kind: actor`): per
prompt, among the candidates with a score (the mean of their parsed verdicts), chosen = the
highest score, rejected = the lowest (the lowest candidate index wins a tie for either place,
so the choice is deterministic). With `pairs.length_control` (Meta-Rewarding's rule, Wu et al.
2024), chosen = the shortest candidate (in characters) scoring at least
(1 - rho) S_max + rho S_min and rejected = the longest scoring at most (1 - rho) S_min + rho S_max,
rho = `pairs.length_rho`. The pair is dropped as a tie when chosen - rejected <= pairs.min_margin
(with the default 0, only equal scores are ties).
Prompts with fewer than two scored candidates are dropped and counted.

SPIN (`kind: spin`): chosen = the human answer of a seed IFT prompt, rejected = M(t)'s sample
with index 0; answers equal to the human one are dropped as `identical_to_human`.

teacher-demo (`kind: demonstration`): chosen = the teacher's answer, rejected = the student's
sample with index 0 (the student writes one sample in this method). Empty answers are dropped
and counted.

Output: pairs.jsonl in TRL's conversational prompt/chosen/rejected format plus the row's kind,
scores and candidate ids, sorted by prompt id (byte-identical on re-run). The manifest records
the method's report, `pairs_by_kind`, `dropped_by_reason` and the mean lengths (characters) of
chosen and rejected answers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from selfreward.errors import EmptyResultError
from selfreward.schemas import (
    CandidateRecord,
    IFTRecord,
    JudgmentRecord,
    PairRecord,
    PromptRecord,
    read_records,
)
from selfreward.stages.stage import Stage, StageContext, StageResult, never
from selfreward.storage import write_jsonl_atomic


def _messages(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def score_histogram(judgments: list[JudgmentRecord]) -> dict[str, int]:
    """Counts of the candidates' mean scores rounded half up to an integer, plus 'unscored'."""
    hist: Counter[str] = Counter()
    for j in judgments:
        hist["unscored" if j.score is None else str(int(j.score + 0.5))] += 1
    return {k: hist[k] for k in [*map(str, range(6)), "unscored"] if hist[k]}


@dataclass(frozen=True)
class LengthControl:
    """Meta-Rewarding's length control (Wu et al. 2024), with S_max, S_min a prompt's scores:
    chosen = the shortest answer scoring >= (1 - rho) S_max + rho S_min, rejected = the longest
    scoring <= (1 - rho) S_min + rho S_max. rho = 0: the best and the worst, shortest and
    longest among equals."""

    rho: float


Scored = tuple[float, int, CandidateRecord]
Built = tuple[list[dict[str, Any]], dict[str, Any]]  # a pair builder's rows and report


def _chosen_rejected(scored: list[Scored], length: LengthControl | None) -> tuple[Scored, Scored]:
    if length is None:
        return max(scored, key=lambda s: (s[0], -s[1])), min(scored, key=lambda s: (s[0], s[1]))
    top = max(s[0] for s in scored)
    low = min(s[0] for s in scored)
    rho = length.rho
    high_band = [s for s in scored if s[0] >= (1 - rho) * top + rho * low - 1e-9]
    low_band = [s for s in scored if s[0] <= (1 - rho) * low + rho * top + 1e-9]
    chosen = min(high_band, key=lambda s: (len(s[2].text), -s[0], s[1]))
    rejected = max(low_band, key=lambda s: (len(s[2].text), -s[0], -s[1]))
    return chosen, rejected


def reward_pairs(
    candidates: list[CandidateRecord],
    judgments: list[JudgmentRecord],
    min_margin: float,
    length: LengthControl | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    by_id = {c.id: c for c in candidates}
    per_prompt: dict[str, list[tuple[float, int, CandidateRecord]]] = defaultdict(list)
    verdicts = failures = truncated = 0
    for j in judgments:
        verdicts += len(j.verdicts)
        failures += sum(1 for v in j.verdicts if v.score is None)
        truncated += int(j.truncated)
        cand = by_id.get(j.id)
        if cand is None or j.score is None:
            continue
        per_prompt[cand.prompt_id].append((j.score, cand.index, cand))
    prompts = sorted({c.prompt_id for c in candidates})
    pairs: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for pid in prompts:
        scored = per_prompt.get(pid, [])
        if len(scored) < 2:
            dropped["fewer_than_two_scored"] += 1
            continue
        best, worst = _chosen_rejected(scored, length)
        if best[0] < worst[0]:  # length control's bands overlap (rho > 0.5) the wrong way round
            dropped["inverted"] += 1
            continue
        if best[0] - worst[0] <= min_margin:
            dropped["tie"] += 1
            continue
        chosen, rejected = best[2], worst[2]
        pairs.append(
            PairRecord(
                prompt_id=pid,
                prompt=_messages("user", chosen.prompt),
                chosen=_messages("assistant", chosen.text),
                rejected=_messages("assistant", rejected.text),
                chosen_score=best[0],
                rejected_score=worst[0],
                chosen_id=chosen.id,
                rejected_id=rejected.id,
                kind="actor",
            ).model_dump(mode="json")
        )
    with_two = len(prompts) - dropped["fewer_than_two_scored"]
    report = {
        "prompts": len(prompts),
        "candidates": len(candidates),
        "judged": len(judgments),
        "verdicts": verdicts,
        "parse_failures": failures,
        "parse_failure_rate": failures / verdicts if verdicts else 0.0,
        "truncated_responses": truncated,
        "tie_rate": dropped["tie"] / with_two if with_two else 0.0,
        "score_histogram": score_histogram(judgments),
        "pairs": len(pairs),
        "dropped": dict(sorted(dropped.items())),
        "mean_margin": (
            sum(p["chosen_score"] - p["rejected_score"] for p in pairs) / len(pairs) if pairs else None
        ),
    }
    if length is not None:
        report["length_control"] = {"rho": length.rho}
    return pairs, report


def demonstration_pairs(candidates: list[CandidateRecord]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    teacher = {c.prompt_id: c for c in candidates if c.teacher}
    student = {c.prompt_id: c for c in candidates if not c.teacher and c.index == 0}
    prompts = sorted({c.prompt_id for c in candidates})
    pairs: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for pid in prompts:
        t, s = teacher.get(pid), student.get(pid)
        if t is None or s is None:
            dropped["missing_answer"] += 1
            continue
        if not t.text.strip() or not s.text.strip():
            dropped["empty_answer"] += 1
            continue
        if t.text.strip() == s.text.strip():
            dropped["identical_answers"] += 1
            continue
        pairs.append(
            PairRecord(
                prompt_id=pid,
                prompt=_messages("user", t.prompt),
                chosen=_messages("assistant", t.text),
                rejected=_messages("assistant", s.text),
                chosen_id=t.id,
                rejected_id=s.id,
                kind="demonstration",
            ).model_dump(mode="json")
        )
    return pairs, _pairs_report(len(prompts), candidates, pairs, dropped)


def _pairs_report(
    prompts: int, candidates: list[CandidateRecord], pairs: list[dict[str, Any]], dropped: Counter[str]
) -> dict[str, Any]:
    """The report of the answer-pair builders (teacher demonstrations, SPIN)."""
    return {
        "prompts": prompts,
        "candidates": len(candidates),
        "pairs": len(pairs),
        "dropped": dict(sorted(dropped.items())),
    }


def human_pairs(
    prompts: list[PromptRecord], candidates: list[CandidateRecord], human: dict[str, str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SPIN's pairs (Chen et al. 2024): per prompt of the seed IFT split, chosen = the human
    answer (`human`: IFT id -> response), rejected = M(t)'s sample with index 0. A pair whose
    model answer equals the human one (whitespace aside) is dropped as `identical_to_human`;
    empty answers and prompts without an answer are dropped and counted."""
    student = {c.prompt_id: c for c in candidates if c.index == 0 and not c.teacher}
    pairs: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for p in sorted(prompts, key=lambda r: r.id):
        answer = human.get(str(p.provenance.get("ift_id")))
        s = student.get(p.id)
        if answer is None:
            dropped["no_human_answer"] += 1
            continue
        if s is None:
            dropped["missing_answer"] += 1
            continue
        if not answer.strip() or not s.text.strip():
            dropped["empty_answer"] += 1
            continue
        if " ".join(answer.split()) == " ".join(s.text.split()):
            dropped["identical_to_human"] += 1
            continue
        pairs.append(
            PairRecord(
                prompt_id=p.id,
                prompt=_messages("user", p.prompt),
                chosen=_messages("assistant", answer),
                rejected=_messages("assistant", s.text),
                chosen_id=f"human:{p.provenance.get('ift_id')}",
                rejected_id=s.id,
                kind="spin",
            ).model_dump(mode="json")
        )
    return pairs, _pairs_report(len(prompts), candidates, pairs, dropped)


def human_pairs_of(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pair builder of SPIN: the iteration's prompts and samples against the seed IFT split."""
    ift = read_records(ctx.layout.seed_dir / "ift.jsonl", IFTRecord)
    return human_pairs(
        read_records(ctx.file("prompts"), PromptRecord),
        read_records(ctx.file("candidates"), CandidateRecord),
        {r.id: r.response for r in ift},
    )


def mean_lengths(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean characters of the chosen and rejected answers (the last message of each)."""

    def mean(side: str) -> float | None:
        sizes = [len(r[side][-1]["content"]) for r in rows]
        return round(sum(sizes) / len(sizes), 1) if sizes else None

    return {"chosen": mean("chosen"), "rejected": mean("rejected")}


def length_control_of(config: Any) -> LengthControl | None:
    pairs = config.pairs
    return LengthControl(pairs.length_rho) if pairs.length_control else None


def scored_pairs(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pair builder of the scored methods: reward_pairs over the iteration's files."""
    candidates = read_records(ctx.file("candidates"), CandidateRecord)
    judgments = read_records(ctx.file("judgments"), JudgmentRecord)
    return reward_pairs(candidates, judgments, ctx.config.pairs.min_margin, length_control_of(ctx.config))


def demonstration_pairs_of(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pair builder of teacher demonstrations."""
    return demonstration_pairs(read_records(ctx.file("candidates"), CandidateRecord))


class PairsResult(StageResult):
    pairs: int
    dropped: dict[str, int] = Field(default_factory=dict)
    tie_rate: float | None = None
    parse_failure_rate: float | None = None
    pairs_by_kind: dict[str, int] = Field(default_factory=dict)

    def summary(self) -> str:
        kinds = ""
        if len(self.pairs_by_kind) > 1:
            kinds = " (" + ", ".join(f"{k}={v}" for k, v in self.pairs_by_kind.items()) + ")"
        return (
            f"pairs={self.pairs}{kinds} tie_rate={self.tie_rate or 0.0:.3g} "
            f"parse_failure_rate={self.parse_failure_rate or 0.0:.3g}"
        )


def pairs_stage(name: str, build: Callable[[StageContext], Built], description: str) -> Stage:
    """A stage writing `<name>.jsonl` from a pair builder (the pairs stage; temporal's
    anchored_pairs): sorted rows, the report with kinds and lengths, an error when none is left."""

    async def run(ctx: StageContext) -> PairsResult:
        from selfreward.methods.method import with_kinds

        pairs, report = build(ctx)
        write_jsonl_atomic(ctx.file(name), pairs)
        if not pairs:
            raise EmptyResultError(
                f"iteration {ctx.t}: no preference pair survived ({report}); "
                "with a small judge this usually means every verdict failed to parse or all scores tied"
            )
        return PairsResult(**with_kinds(pairs, report), mean_lengths=mean_lengths(pairs))

    return Stage(
        name=name, run=run, queue="judge", result=PairsResult, needs_policy=never, description=description
    )


def _method_pairs(ctx: StageContext) -> Built:
    from selfreward.methods import method_of

    return method_of(ctx.config).build_pairs(ctx)


STAGE = pairs_stage(
    "pairs", _method_pairs, "chosen/rejected pairs by the run's method (scored, demonstrations, judge pairs)"
)
