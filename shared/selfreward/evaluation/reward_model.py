"""Reward-modeling evaluation: score EFT-eval replies with a judge (`Judge.score`), then compare
the scores with human ranks or with a reference judge's scores (selfreward.evaluation.metrics.reward_model).

`score_eft` writes the scores format (one record per EFT-eval record: prompt_id = record id,
completion key = the reply's position in `replies`, with its message_id, content and score,
-1 when every verdict was unparseable). It is resumable (`selfreward.judging.rows.judge_rows`): records already written are kept.
A record with a reply left unscored only by transient failures (backend errors after the
judge's retries) is not written, so a re-run scores it again; until then the comparison
counts that prompt as present only in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from selfreward.errors import ServiceError
from selfreward.evaluation.metrics.reward_model import (
    RewardModelReport,
    compare_with_human,
    compare_with_reference,
    read_scores,
    scores_record,
)
from selfreward.judging.protocol import Judge, is_transient
from selfreward.judging.rows import Judged, judge_rows
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.reports.files import write_report
from selfreward.reports.markdown import reward_model_markdown
from selfreward.reports.plots import score_histograms
from selfreward.schemas import EFTEvalRecord, read_records
from selfreward.shards import Sharding, pick, store_file
from selfreward.storage import ResumableJsonl


@dataclass
class ScoredEft:
    path: Path
    written: int  # records in the scores file
    retry_later: list[str]  # "<record id>: <failure>" of records left for a re-run (transient failures)


async def score_eft(
    judge: Judge,
    records: Sequence[EFTEvalRecord],
    *,
    judge_name: str,
    out_path: Path,
    samples: int | None = None,
    progress: Progress = NULL_PROGRESS,
    sharding: Sharding | None = None,
) -> ScoredEft:
    """Score every reply of every EFT-eval record with `judge` into `out_path` (scores JSONL);
    a shard job (`sharding`) its records into its shard file (`selfreward.shards`).

    Raises ServiceError when no record at all could be scored (every one hit transient
    failures), naming the first failure.
    """

    async def one(unit: list[EFTEvalRecord]) -> list[Judged]:
        (rec,) = unit
        results = await judge.score(rec.prompt, [r.text for r in rec.replies], samples=samples)
        responses = [
            {
                "content": reply.text,
                "message_id": reply.message_id,
                "score": res.score,
                "verdicts": len(res.verdicts),
                "failures": res.failures,
                "truncated": res.truncated,
            }
            for reply, res in zip(rec.replies, results, strict=True)
        ]
        transient = next(
            (
                next(v.failure for v in res.verdicts if v.failure)
                for res in results
                if res.score is None and res.verdicts and all(is_transient(v.failure) for v in res.verdicts)
            ),
            None,
        )
        return [Judged(rec.id, scores_record(rec.id, rec.prompt, responses, judge=judge_name), transient)]

    retry_later: list[str] = []

    def note(judged: Judged) -> dict[str, int]:
        if judged.transient is not None:
            retry_later.append(f"{judged.key}: {judged.transient}")
        return {"retry_later": len(retry_later)}

    out_path = store_file(out_path, sharding, [r.id for r in records], lambda r: str(r["prompt_id"]))
    records = pick(records, sharding, lambda r: r.id)
    with ResumableJsonl(out_path, key=lambda r: str(r["prompt_id"])) as store:
        done = sum(1 for r in records if r.id in store)
        task = progress.task(f"scoring EFT eval ({judge_name})", len(records), done=done)
        await judge_rows(
            list(records),
            key=lambda r: r.id,
            judge=one,
            store=store,
            concurrency=max(2, judge.concurrency * 2),
            task=task,
            on_result=note,
        )
        task.close()
        written = len(store)
    if written == 0 and retry_later:
        raise ServiceError(
            f"judge {judge_name}: no EFT-eval record could be scored ({len(retry_later)} with transient "
            f"failures, e.g. {retry_later[0]})"
        )
    return ScoredEft(out_path, written, retry_later)


def reward_model_eval(
    scores_path: Path, *, reference_path: Path | None = None, human_path: Path | None = None
) -> RewardModelReport:
    """Compare a scores file with a reference judge's scores file or with EFT-eval human ranks."""
    if (reference_path is None) == (human_path is None):
        raise ValueError("give exactly one of reference_path (a reference judge) or human_path (EFT eval)")
    scores = read_scores(scores_path)
    if reference_path is not None:
        return compare_with_reference(
            scores,
            read_scores(reference_path),
            scores_path=str(scores_path),
            reference_path=str(reference_path),
        )
    assert human_path is not None
    return compare_with_human(
        scores,
        read_records(human_path, EFTEvalRecord),
        scores_path=str(scores_path),
        reference_path=str(human_path),
    )


def reward_model_plot(report: RewardModelReport, judge_label: str = "judge") -> bytes:
    series = dict(report.score_series)
    if "judge" in series:
        series = {judge_label: series["judge"], "reference": series["reference"]}
    title = "Judge scores by human rank" if report.reference == "human-ranks" else "Judge vs reference scores"
    return score_histograms(series, title)


def reward_model_report(out_dir: Path, report: RewardModelReport) -> dict[str, Path]:
    """Write report.json, report.md and score_histogram.png for one reward-model evaluation."""
    data = {"kind": "reward-model", **report.to_json()}
    md = "# Reward-modeling evaluation\n\n" + reward_model_markdown(data, "## Agreement")
    md += "\n![scores](score_histogram.png)\n"
    return write_report(out_dir, data, md, {"score_histogram.png": reward_model_plot(report)})
