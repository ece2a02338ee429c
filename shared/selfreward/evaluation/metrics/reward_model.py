"""Reward-modeling ability: how well a judge's 0-5 scores agree with a reference.

Two references (exact definitions in docs/evaluation.md; the tests check each against
hand-computed values):

1. Human ranks (`compare_with_human`): EFT-eval records (`selfreward.schemas.EFTEvalRecord`,
   rank 0 = best) and the judge's scores of every reply. Metrics of Yuan et al. (2024):
   pairwise accuracy over the pairs of a prompt's replies that humans order (judge ties =
   disagreement; a second figure counts them as half), 5-best, exact match, and Spearman /
   Kendall tau-b between the score and the human order, per prompt averaged and pooled.
2. A reference judge's scores (`compare_with_reference`): metrics exactly as the seed study
   computed them: score equality per response ("pairwise accuracy"), 5-best, all-equal per
   prompt (exact match), Spearman and Kendall tau-b over all scores pooled.

Scores file format (both cases; `read_scores`): JSONL of
`{"prompt_id": ..., "prompt": ..., "completion": {"0": {"content": ..., "score": s}, ...}}`,
where s is a number in [0, 5] (a mean of K verdicts may be fractional) or -1 (or null) for
an unparseable verdict. For human ranks, prompt_id is the EFT-eval record id and the
completion key is the reply's position in the record's `replies` list.

Every result has two tables: `all` uses the scores as recorded, an unparseable score being
the value -1 (below every real score), as the seed study did; `excluding_unparseable` drops
each response whose score (or reference score) is unparseable. The parse-failure rate is
always reported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from selfreward.errors import InputError
from selfreward.schemas import EFTEvalRecord
from selfreward.storage import read_jsonl

UNPARSEABLE = -1.0
MAX_SCORE = 5.0
EQUAL_TOL = 1e-9


# ------------------------------------------------------------------ input


@dataclass(frozen=True)
class ScoredResponse:
    key: str
    content: str | None
    score: float | None  # None: unparseable (-1 in the file)
    message_id: str | None = None

    @property
    def value(self) -> float:
        """The recorded value: the score, or -1 when unparseable (table `all`)."""
        return UNPARSEABLE if self.score is None else self.score


@dataclass(frozen=True)
class ScoredPrompt:
    prompt_id: str
    prompt: str | None
    responses: dict[str, ScoredResponse]
    where: str  # file:line


def _parse_score(raw: Any, where: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or math.isnan(raw):
        raise InputError(f"{where}: expected a number in [0, 5] or -1 (unparseable), got {raw!r}")
    value = float(raw)
    if value == UNPARSEABLE:
        return None
    if not 0.0 <= value <= MAX_SCORE:
        raise InputError(f"{where}: score {raw!r} is outside [0, 5] (use -1 for an unparseable verdict)")
    return value


def parse_scored_record(record: Mapping[str, Any], where: str) -> ScoredPrompt:
    """Validate one scores record; errors name file:line, the prompt id and the field."""
    pid = record.get("prompt_id")
    if isinstance(pid, bool) or not isinstance(pid, str | int) or pid == "":
        raise InputError(f"{where}: field 'prompt_id' must be a non-empty string or integer, got {pid!r}")
    pid = str(pid)
    at = f"{where} (prompt_id {pid})"
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"{at}: field 'prompt' must be a string")
    completion = record.get("completion")
    if not isinstance(completion, dict) or not completion:
        raise InputError(f"{at}: field 'completion' must be a non-empty object {{\"0\": {{...}}, ...}}")
    responses: dict[str, ScoredResponse] = {}
    for key, entry in completion.items():
        field_at = f"{at}: field 'completion.{key}"
        if not isinstance(entry, dict):
            raise InputError(f"{field_at}' must be an object with 'score'")
        if "score" not in entry:
            raise InputError(f"{field_at}.score' is missing")
        content = entry.get("content")
        if content is not None and not isinstance(content, str):
            raise InputError(f"{field_at}.content' must be a string")
        mid = entry.get("message_id")
        responses[str(key)] = ScoredResponse(
            str(key),
            content,
            _parse_score(entry["score"], f"{field_at}.score'"),
            None if mid is None else str(mid),
        )
    return ScoredPrompt(pid, prompt, responses, where)


def read_scores(path: str | Path) -> dict[str, ScoredPrompt]:
    """Read a scores JSONL file (format in the module docstring), keyed by prompt_id."""
    out: dict[str, ScoredPrompt] = {}
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        sp = parse_scored_record(record, where)
        if sp.prompt_id in out:
            raise InputError(
                f"{where}: duplicate prompt_id {sp.prompt_id!r} (first at {out[sp.prompt_id].where})"
            )
        out[sp.prompt_id] = sp
    if not out:
        raise InputError(f"{path}: no records")
    return out


def scores_record(
    prompt_id: str, prompt: str, responses: Sequence[Mapping[str, Any]], **extra: Any
) -> dict[str, Any]:
    """One record of the scores format. `responses`, in key order, are mappings with `content`
    and `score` (None = unparseable, written as -1) and any other fields to keep."""
    completion = {}
    for i, resp in enumerate(responses):
        score = resp.get("score")
        completion[str(i)] = {**resp, "score": UNPARSEABLE if score is None else score}
    return {"prompt_id": prompt_id, "prompt": prompt, "completion": completion, **extra}


# ------------------------------------------------------------------ helpers


def _equal(a: float, b: float) -> bool:
    return abs(a - b) <= EQUAL_TOL


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def _correlations(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """(Spearman rho, Kendall tau-b); None where undefined (fewer than 2 values, a constant side)."""
    from scipy import stats

    if len(x) < 2:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(stats.spearmanr(x, y).statistic)
        tau = float(stats.kendalltau(x, y, variant="b").statistic)
    return (None if math.isnan(rho) else rho), (None if math.isnan(tau) else tau)


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


# ------------------------------------------------------------------ alignment


@dataclass
class Alignment:
    """Which prompts and responses the two files share."""

    prompts_compared: int = 0
    prompt_ids_only_in_scores: list[str] = field(default_factory=list)
    prompt_ids_only_in_reference: list[str] = field(default_factory=list)
    responses_compared: int = 0
    responses_only_in_scores: int = 0
    responses_only_in_reference: int = 0


# ------------------------------------------------------------------ reference judge


@dataclass
class ReferenceTable:
    """Agreement with a reference judge over one set of responses (seed-study definitions)."""

    pairwise_accuracy: float | None  # share of responses with score == reference score
    five_best: float | None  # of responses the judge scored 5, share the reference scored 5
    exact_match: float | None  # share of prompts whose scores all equal the reference's
    spearman: float | None  # pooled over all responses
    kendall_tau: float | None  # tau-b, pooled
    responses: int
    prompts: int
    judge_fives: int


def _reference_table(pairs_by_prompt: Mapping[str, list[tuple[float, float]]]) -> ReferenceTable:
    pooled = [p for pairs in pairs_by_prompt.values() for p in pairs]
    prompts = [pairs for pairs in pairs_by_prompt.values() if pairs]
    equal = sum(_equal(s, r) for s, r in pooled)
    fives = [(s, r) for s, r in pooled if _equal(s, MAX_SCORE)]
    five_agree = sum(_equal(r, MAX_SCORE) for _, r in fives)
    exact = sum(all(_equal(s, r) for s, r in pairs) for pairs in prompts)
    rho, tau = _correlations([s for s, _ in pooled], [r for _, r in pooled])
    return ReferenceTable(
        pairwise_accuracy=_ratio(equal, len(pooled)),
        five_best=_ratio(five_agree, len(fives)),
        exact_match=_ratio(exact, len(prompts)),
        spearman=rho,
        kendall_tau=tau,
        responses=len(pooled),
        prompts=len(prompts),
        judge_fives=len(fives),
    )


def _check_same_content(a: ScoredResponse, b: ScoredResponse, where_a: str, where_b: str, pid: str) -> None:
    if a.content is not None and b.content is not None and a.content != b.content:
        raise InputError(
            f"{where_a}: prompt_id {pid!r} response {a.key!r}: content differs from the reference's "
            f"({where_b}); both files must score the same responses"
        )


# ------------------------------------------------------------------ human ranks


@dataclass
class HumanTable:
    """Agreement with human ranks over one set of responses (Yuan et al. 2024 metrics)."""

    pairwise_accuracy: float | None  # judge ties count as disagreement
    pairwise_accuracy_ties_half: float | None  # judge ties count as half
    five_best: float | None  # of responses the judge scored 5, share ranked best by humans
    exact_match: float | None  # prompts whose judge order equals the human order, strictly
    spearman: float | None  # per prompt, averaged over prompts where defined
    kendall_tau: float | None  # tau-b, per prompt, averaged
    spearman_pooled: float | None
    kendall_tau_pooled: float | None
    pairs: int
    judge_ties: int
    prompts: int  # prompts with at least one human-ordered pair
    responses: int
    judge_fives: int
    correlation_prompts: int  # prompts (>= 2 responses) where the per-prompt correlation is defined
    correlation_undefined_prompts: int  # >= 2 responses but constant scores or ranks


def _human_table(groups: Sequence[Sequence[tuple[float, int]]]) -> HumanTable:
    """`groups`: per prompt, (judge score, human rank) of each response; rank 0 = best."""
    pairs = agree = ties = exact = ordered_prompts = 0
    fives = five_best = 0
    rhos: list[float] = []
    taus: list[float] = []
    undefined = 0
    pooled_s: list[float] = []
    pooled_h: list[float] = []
    for group in groups:
        if not group:
            continue
        best = min(h for _, h in group)
        for s, h in group:
            pooled_s.append(s)
            pooled_h.append(-float(h))
            if _equal(s, MAX_SCORE):
                fives += 1
                five_best += h == best
        prompt_pairs = prompt_agree = 0
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                (si, hi), (sj, hj) = group[i], group[j]
                if hi == hj:
                    continue  # humans do not order this pair
                prompt_pairs += 1
                if _equal(si, sj):
                    ties += 1
                elif (si > sj) == (hi < hj):
                    prompt_agree += 1
        pairs += prompt_pairs
        agree += prompt_agree
        if prompt_pairs:
            ordered_prompts += 1
            exact += prompt_agree == prompt_pairs
        if len(group) >= 2:
            rho, tau = _correlations([s for s, _ in group], [-float(h) for _, h in group])
            if rho is None or tau is None:
                undefined += 1
            else:
                rhos.append(rho)
                taus.append(tau)
    rho_p, tau_p = _correlations(pooled_s, pooled_h)
    return HumanTable(
        pairwise_accuracy=_ratio(agree, pairs),
        pairwise_accuracy_ties_half=_ratio(agree + 0.5 * ties, pairs),
        five_best=_ratio(five_best, fives),
        exact_match=_ratio(exact, ordered_prompts),
        spearman=_mean(rhos),
        kendall_tau=_mean(taus),
        spearman_pooled=rho_p,
        kendall_tau_pooled=tau_p,
        pairs=pairs,
        judge_ties=ties,
        prompts=ordered_prompts,
        responses=len(pooled_s),
        judge_fives=fives,
        correlation_prompts=len(rhos),
        correlation_undefined_prompts=undefined,
    )


# ------------------------------------------------------------------ report


@dataclass
class RewardModelReport:
    reference: Literal["reference-judge", "human-ranks"]
    all: ReferenceTable | HumanTable
    excluding_unparseable: ReferenceTable | HumanTable
    parse_failure_rate: float | None  # share of the judge's compared scores that are unparseable
    parse_failures: int
    alignment: Alignment
    reference_parse_failure_rate: float | None = None  # reference judge only
    scores_path: str | None = None
    reference_path: str | None = None
    # score series for histograms (None = unparseable): judge/reference, or human-best/other replies
    score_series: dict[str, list[float | None]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Table `all` at the top level, `excluding_unparseable` nested, then rates and alignment."""
        a = self.alignment
        out: dict[str, Any] = {"reference": self.reference, **asdict(self.all)}
        out["excluding_unparseable"] = asdict(self.excluding_unparseable)
        out.update(
            parse_failure_rate=self.parse_failure_rate,
            parse_failures=self.parse_failures,
            prompts_compared=a.prompts_compared,
            prompts_only_in_scores=len(a.prompt_ids_only_in_scores),
            prompts_only_in_reference=len(a.prompt_ids_only_in_reference),
            prompt_ids_only_in_scores=a.prompt_ids_only_in_scores,
            prompt_ids_only_in_reference=a.prompt_ids_only_in_reference,
            responses_compared=a.responses_compared,
            responses_only_in_scores=a.responses_only_in_scores,
            responses_only_in_reference=a.responses_only_in_reference,
        )
        if self.reference == "reference-judge":
            out["reference_parse_failure_rate"] = self.reference_parse_failure_rate
        out["scores_path"] = self.scores_path
        out["reference_path"] = self.reference_path
        return out


def compare_with_reference(
    scores: Mapping[str, ScoredPrompt],
    reference: Mapping[str, ScoredPrompt],
    *,
    scores_path: str | None = None,
    reference_path: str | None = None,
) -> RewardModelReport:
    """A judge's scores against a reference judge's scores on the same responses.

    Prompts are aligned by prompt_id and responses by completion key; those present on one
    side only are counted (and listed for prompts), not compared.
    """
    al = Alignment()
    al.prompt_ids_only_in_scores = sorted(set(scores) - set(reference))
    al.prompt_ids_only_in_reference = sorted(set(reference) - set(scores))
    table_all: dict[str, list[tuple[float, float]]] = {}
    table_parsed: dict[str, list[tuple[float, float]]] = {}
    failures = ref_failures = 0
    judge_scores: list[float | None] = []
    ref_scores: list[float | None] = []
    for pid in sorted(set(scores) & set(reference)):
        sp, rp = scores[pid], reference[pid]
        keys = [k for k in sp.responses if k in rp.responses]
        al.responses_only_in_scores += len(sp.responses) - len(keys)
        al.responses_only_in_reference += len(rp.responses) - len(keys)
        if not keys:
            continue
        al.prompts_compared += 1
        rows_all = table_all.setdefault(pid, [])
        rows_parsed = table_parsed.setdefault(pid, [])
        for key in keys:
            s, r = sp.responses[key], rp.responses[key]
            _check_same_content(s, r, sp.where, rp.where, pid)
            al.responses_compared += 1
            failures += s.score is None
            ref_failures += r.score is None
            rows_all.append((s.value, r.value))
            judge_scores.append(s.score)
            ref_scores.append(r.score)
            if s.score is not None and r.score is not None:
                rows_parsed.append((s.score, r.score))
    if al.prompts_compared == 0:
        raise InputError(
            f"{scores_path or 'scores'} and {reference_path or 'reference'} share no prompt_id with a "
            "common response key: nothing to compare"
        )
    n = al.responses_compared
    return RewardModelReport(
        reference="reference-judge",
        all=_reference_table(table_all),
        excluding_unparseable=_reference_table(table_parsed),
        parse_failure_rate=_ratio(failures, n),
        parse_failures=failures,
        reference_parse_failure_rate=_ratio(ref_failures, n),
        alignment=al,
        scores_path=scores_path,
        reference_path=reference_path,
        score_series={"judge": judge_scores, "reference": ref_scores},
    )


def compare_with_human(
    scores: Mapping[str, ScoredPrompt],
    eft_eval: Sequence[EFTEvalRecord],
    *,
    scores_path: str | None = None,
    reference_path: str | None = None,
) -> RewardModelReport:
    """A judge's scores of EFT-eval replies against the human ranks (rank 0 = best).

    Scores records are matched to EFT-eval records by prompt_id == record id, and responses
    by completion key == position in `replies`. A completion's `message_id` or `content`,
    when present, must match the reply's (a mismatch is an InputError: a stale scores file).
    """
    by_id: dict[str, EFTEvalRecord] = {}
    for rec in eft_eval:
        if rec.id in by_id:
            raise InputError(f"{reference_path or 'EFT eval'}: duplicate record id {rec.id!r}")
        by_id[rec.id] = rec
    al = Alignment()
    al.prompt_ids_only_in_scores = sorted(set(scores) - set(by_id))
    al.prompt_ids_only_in_reference = sorted(set(by_id) - set(scores))
    groups_all: list[list[tuple[float, int]]] = []
    groups_parsed: list[list[tuple[float, int]]] = []
    failures = 0
    series: dict[str, list[float | None]] = {"human-best replies": [], "other replies": []}
    for pid in sorted(set(scores) & set(by_id)):
        sp, rec = scores[pid], by_id[pid]
        replies = {str(i): r for i, r in enumerate(rec.replies)}
        keys = [k for k in sp.responses if k in replies]
        al.responses_only_in_scores += len(sp.responses) - len(keys)
        al.responses_only_in_reference += len(replies) - len(keys)
        if not keys:
            continue
        al.prompts_compared += 1
        g_all: list[tuple[float, int]] = []
        g_parsed: list[tuple[float, int]] = []
        best = min(replies[k].rank for k in keys)
        for key in keys:
            resp, reply = sp.responses[key], replies[key]
            if resp.message_id is not None and resp.message_id != reply.message_id:
                raise InputError(
                    f"{sp.where}: prompt_id {pid!r} response {key!r}: message_id {resp.message_id!r} is not "
                    f"reply {key}'s ({reply.message_id!r}) in {reference_path or 'the EFT eval file'}"
                )
            if resp.content is not None and resp.content != reply.text:
                raise InputError(
                    f"{sp.where}: prompt_id {pid!r} response {key!r}: content differs from reply {key} of "
                    f"{reference_path or 'the EFT eval file'}; the scores file is for other data"
                )
            al.responses_compared += 1
            failures += resp.score is None
            g_all.append((resp.value, reply.rank))
            series["human-best replies" if reply.rank == best else "other replies"].append(resp.score)
            if resp.score is not None:
                g_parsed.append((resp.score, reply.rank))
        groups_all.append(g_all)
        groups_parsed.append(g_parsed)
    if al.prompts_compared == 0:
        raise InputError(
            f"{scores_path or 'scores'} and {reference_path or 'EFT eval'} share no record id with a scored "
            "reply: nothing to compare"
        )
    return RewardModelReport(
        reference="human-ranks",
        all=_human_table(groups_all),
        excluding_unparseable=_human_table(groups_parsed),
        parse_failure_rate=_ratio(failures, al.responses_compared),
        parse_failures=failures,
        alignment=al,
        scores_path=scores_path,
        reference_path=reference_path,
        score_series=series,
    )
