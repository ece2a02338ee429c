"""EFT targets: the score and justification a judge is trained to write for a human reply.

Two modes (docs/data.md):

`rank` - scores from the human ranks. In a group whose replies have k distinct human ranks,
the reply at position p (0 = best) gets

    score = 5 - round_half_up(3 * p / (k - 1))

so the best reply gets 5, the worst 2, linearly between (k=2: 5 2; k=3: 5 3 2; k=4: 5 4 3 2;
k=5: 5 4 3 3 2). Why: OASST replies were written and ranked by people; a ranked reply is
almost always relevant and answers part of the question, the additive rubric's first two
points, so the worst of a set gets 2 rather than 0; the best of a human-ranked set is the best
evidence of quality the data holds, so it gets the top score; a linear spread keeps the
human order strictly for up to 4 replies and maximises the gap the judge learns between
better and worse answers. The justification is the rubric's wording for that score
(`RANK_JUSTIFICATIONS`), never a mention of the ranking, which a judge cannot see.

`judge-filtered` - the method of Yuan et al. (2024): a judge model writes a verdict
(justification + "Score: N") for every reply of a group. The group is kept only when the
judge's scores agree with the human ranking: every reply has a parsed integer score 0-5 and,
for every two replies with different human ranks, the better-ranked one has the strictly
higher score (replies with equal human ranks are not compared). Then the most frequent
score is downsampled, over all kept rows, to the count of the second most frequent: the rows
kept are those with the smallest sha256(f"{salt}:{reply_id}"), so the choice is seeded by
the split salt and reproducible.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfreward.data.chat import justification_of
from selfreward.errors import ServiceError
from selfreward.judging.protocol import Judge
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.storage import ResumableJsonl, sha256_text

RANK_TOP, RANK_BOTTOM = 5, 2

RANK_JUSTIFICATIONS: dict[int, str] = {
    5: "The response is relevant and answers the question completely and directly. It is well organized, "
    "written from an AI assistant's perspective, reflects expert knowledge and has no extraneous "
    "content, so it earns all five points.",
    4: "The response is relevant, covers the question and answers its basic elements usefully. It is "
    "clearly written and well organized from an assistant's perspective, with slight room for "
    "improvement in clarity, conciseness or focus, so it earns four points.",
    3: "The response is relevant, addresses a substantial part of the question and answers its basic "
    "elements in a useful way, but it is not comprehensive, direct or well organized enough for a "
    "fourth point.",
    2: "The response is relevant and addresses part of the question, but it does not answer its basic "
    "elements in a useful way or give a direct answer, so it earns two points.",
}


@dataclass(frozen=True)
class EFTReply:
    id: str
    text: str
    rank: int  # the human rank as published (0 = best)


@dataclass(frozen=True)
class EFTGroup:
    """A first-turn prompt and its ranked replies (two or more distinct ranks), best first."""

    id: str  # the prompt's message id
    tree_id: str
    prompt: str
    replies: tuple[EFTReply, ...]

    @property
    def distinct_ranks(self) -> list[int]:
        return sorted({r.rank for r in self.replies})


def rank_score(position: int, k: int) -> int:
    """Score of the reply at `position` (0 = best) among `k` distinct human ranks (k >= 2)."""
    if k < 2 or not 0 <= position < k:
        raise ValueError(f"rank_score needs 0 <= position < k and k >= 2, got position={position}, k={k}")
    drop = (RANK_TOP - RANK_BOTTOM) * position / (k - 1)
    return RANK_TOP - int(drop + 0.5)


def _row(group: EFTGroup, reply: EFTReply, score: int, justification: str, mode: str) -> dict[str, Any]:
    return {
        "id": reply.id,
        "prompt_id": group.id,
        "tree_id": group.tree_id,
        "prompt": group.prompt,
        "response": reply.text,
        "response_id": reply.id,
        "human_rank": reply.rank,
        "n_ranked": len(group.replies),
        "score": score,
        "justification": justification,
        "targets": mode,
    }


def rank_targets(group: EFTGroup) -> list[dict[str, Any]]:
    ranks = group.distinct_ranks
    rows = []
    for reply in group.replies:
        score = rank_score(ranks.index(reply.rank), len(ranks))
        rows.append(_row(group, reply, score, RANK_JUSTIFICATIONS[score], "rank"))
    return rows


# ------------------------------------------------------------------ judge-filtered


@dataclass(frozen=True)
class JudgeVerdict:
    """A judge's answer for one (prompt, response): its text and the parsed score (None: unparseable)."""

    text: str
    score: float | None


def _integer_score(score: float | None) -> int | None:
    if score is None or isinstance(score, bool):
        return None
    if float(score).is_integer() and 0 <= score <= 5:
        return int(score)
    return None


def agrees_with_humans(ranks: Sequence[int], scores: Sequence[int]) -> bool:
    """True when, for every two replies with different human ranks, the better-ranked one (lower
    rank) has the strictly higher score."""
    items = list(zip(ranks, scores, strict=True))
    for i, (rank_a, score_a) in enumerate(items):
        for rank_b, score_b in items[i + 1 :]:
            if rank_a == rank_b:
                continue
            better, worse = (score_a, score_b) if rank_a < rank_b else (score_b, score_a)
            if better <= worse:
                return False
    return True


def downsample_most_frequent(rows: list[dict[str, Any]], salt: str) -> tuple[list[dict[str, Any]], int]:
    """Cut the most frequent score to the count of the second most frequent; return (rows, removed)."""
    counts = Counter(r["score"] for r in rows).most_common()
    if len(counts) < 2 or counts[0][1] == counts[1][1]:
        return rows, 0
    top, keep = counts[0][0], counts[1][1]
    ranked = sorted((r for r in rows if r["score"] == top), key=lambda r: sha256_text(f"{salt}:{r['id']}"))
    kept_ids = {r["id"] for r in ranked[:keep]}
    out = [r for r in rows if r["score"] != top or r["id"] in kept_ids]
    return out, len(rows) - len(out)


@dataclass
class JudgeFilterStats:
    groups: int = 0
    groups_unparseable: int = 0
    groups_disagree: int = 0
    groups_kept: int = 0
    rows_before_downsampling: int = 0
    rows_downsampled: int = 0
    scores_before: dict[str, int] = field(default_factory=dict)
    scores_after: dict[str, int] = field(default_factory=dict)


def _verdict_key(judge_name: str, prompt: str, response: str) -> str:
    return sha256_text(json.dumps([judge_name, prompt, response], ensure_ascii=False))


async def judge_verdicts(
    groups: Sequence[EFTGroup],
    judge: Judge,
    cache_path: Path,
    concurrency: int = 4,
    progress: Progress = NULL_PROGRESS,
) -> tuple[dict[str, JudgeVerdict], int]:
    """A verdict for every reply (by reply id): ONE sampled verdict each (`judge.score` with K=1),
    whose text and score become the EFT target. Verdicts are appended to `cache_path` as they
    come (keyed by the judge's identity, prompt and response) through
    `selfreward.judging.rows.judge_rows`, so an interrupted run asks the judge only for the
    missing ones. A verdict that failed for a backend reason is not kept: the others are, and a
    ServiceError counts the missing ones (run again to judge them). Returns (verdicts, number
    of new judge calls)."""
    from selfreward.judging.rows import Judged, judge_rows

    wanted: dict[str, tuple[str, str, list[str]]] = {}  # key -> (prompt, response, reply ids)
    for g in groups:
        for r in g.replies:
            key = _verdict_key(judge.identity, g.prompt, r.text)
            wanted.setdefault(key, (g.prompt, r.text, []))[2].append(r.id)

    async def one(unit: list[str]) -> list[Judged]:
        (key,) = unit
        prompt, response, reply_ids = wanted[key]
        (result,) = await judge.score(prompt, [response], samples=1)
        verdict = result.verdicts[0]
        record = {
            "key": key,
            "judge": judge.identity,
            "reply_ids": reply_ids,
            "text": verdict.text,
            "score": verdict.score,
        }
        return [Judged(key, record, result.transient_failure)]

    with ResumableJsonl(cache_path, key=lambda rec: rec["key"]) as store:
        todo = [key for key in wanted if key not in store]
        with progress.task("judge EFT replies", len(todo)) as task:
            report = await judge_rows(
                list(wanted), key=lambda k: k, judge=one, store=store, concurrency=concurrency, task=task
            )
    if report.transient:
        first = report.transient[0]
        raise ServiceError(
            f"judge {judge.name}: {len(report.transient)} EFT repl(ies) got no verdict because the judge "
            f"backend failed (first: {first.transient}); the {len(report.written)} others are kept in "
            f"{cache_path}: run again to judge the rest"
        )
    by_key = {k: JudgeVerdict(r["text"], r["score"]) for k, r in report.records.items() if k in wanted}
    verdicts = {rid: by_key[key] for key, (_, _, ids) in wanted.items() for rid in ids}
    return verdicts, len(report.new)


def judge_filtered_targets(
    groups: Sequence[EFTGroup],
    verdict_of: Callable[[str], JudgeVerdict],
    salt: str,
) -> tuple[list[dict[str, Any]], JudgeFilterStats]:
    """Rows of the groups whose judge scores agree with the human ranking, most frequent score
    downsampled. `verdict_of(reply_id)` gives each reply's verdict."""
    stats = JudgeFilterStats(groups=len(groups))
    rows: list[dict[str, Any]] = []
    for g in groups:
        verdicts = [verdict_of(r.id) for r in g.replies]
        scores = [_integer_score(v.score) for v in verdicts]
        if any(s is None for s in scores):
            stats.groups_unparseable += 1
            continue
        ints = [s for s in scores if s is not None]
        if not agrees_with_humans([r.rank for r in g.replies], ints):
            stats.groups_disagree += 1
            continue
        stats.groups_kept += 1
        for reply, verdict, score in zip(g.replies, verdicts, ints, strict=True):
            rows.append(_row(g, reply, score, justification_of(verdict.text), "judge-filtered"))
    stats.rows_before_downsampling = len(rows)
    stats.scores_before = _histogram(rows)
    rows, stats.rows_downsampled = downsample_most_frequent(rows, salt)
    stats.scores_after = _histogram(rows)
    return rows, stats


def _histogram(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(r["score"] for r in rows)
    return {str(s): counts[s] for s in sorted(counts)}
