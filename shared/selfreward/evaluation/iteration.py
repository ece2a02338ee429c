"""Evaluation of one iteration: after iteration t trained and published M(t+1).

`evaluate_iteration` (async) writes `runs/<run>/eval/iter-<t>/`:
- head-to-head of the new model against the baseline (M(t)) and against the fixed baseline (M1
  by default, the same model every iteration) on the held-out `eval.prompts` (prompts that
  duplicate a training prompt are removed and counted, `evaluation.contamination`), judged in
  both orders by the run's evaluator (`evaluation.evaluator`: pinned, never the model under test
  unless self-evaluation is asked for); each with the summary rule (`metrics.winrate.evidence`);
- reward-modeling ability of the new model as a judge (`rm_judge`, normally
  `policy:<new model>`) against the human ranks of the run's EFT-eval split, when
  `eval.reward_model` is true;
- the judge benchmark (`eval.judge_bench`): the new model as a self-judge (`rm_judge`), the
  teacher where one is configured (its verdicts kept once per run in `eval/judge-bench/<set>/`,
  so later iterations reuse them) and the baselines (length:longer, length:shorter,
  random:<seed>) on a seeded sample of each set, in `eval/iter-<t>/judge-bench/<set>/`;
- report.json (machine-readable), report.md, and plots: win_tie_loss.png, rm_scores.png
  (the judge's scores of human-best vs other replies), trends.png (metrics of every
  evaluated model of the run so far).

Answers are kept per model in `eval/answers/` (a baseline's answers are generated once per
run and settings), verdicts and EFT scores in the iteration's folder, all resumable.

The loop's evaluate stage (selfreward.stages.evaluate) builds the judges and calls
`evaluate_iteration` with the stage's policy client.
"""

from __future__ import annotations

from typing import Any

from selfreward.config import RunConfig
from selfreward.errors import EmptyResultError
from selfreward.evaluation.answers import AnswerSide, GenerationSettings, safe_name
from selfreward.evaluation.contamination import check_contamination, training_prompts
from selfreward.evaluation.evaluator import SELF_NOTE, Evaluator
from selfreward.evaluation.head2head import run_head2head
from selfreward.evaluation.judge_health import judge_health
from selfreward.evaluation.metrics.reward_model import compare_with_human, read_scores
from selfreward.evaluation.metrics.winrate import evidence
from selfreward.evaluation.prompt_sets import load_prompt_set, seeded_subset
from selfreward.evaluation.reward_model import reward_model_plot, score_eft
from selfreward.judging.protocol import Judge
from selfreward.llm.openai import OpenAICompatClient
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.reports.files import write_report
from selfreward.reports.markdown import iteration_markdown
from selfreward.reports.plots import metric_trends, win_tie_loss_bars
from selfreward.reports.trends import eval_dir, iteration_reports, length_series, trend_series
from selfreward.schemas import EFTEvalRecord, read_records
from selfreward.shards import Sharding
from selfreward.storage import RunLayout


def generation_settings(config: RunConfig) -> GenerationSettings:
    return GenerationSettings(
        max_tokens=config.eval.max_tokens,
        temperature=config.eval.temperature,
        top_p=config.eval.top_p,
        seed=config.request_seed(config.seed),
    )


def summary_metrics(data: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an iteration's evaluation, flat (for the stage manifest and status)."""
    out: dict[str, Any] = {}
    h = data.get("head2head")
    if h:
        out.update(
            win_rate=h["win_rate"],
            win_rate_ci=h["intervals"]["win_rate"],
            wins=h["wins"],
            ties=h["ties"],
            losses=h["losses"],
            judge_failures=h["failures"],
            prompts=h["n"],
        )
        if h.get("summary"):
            out["evidence"] = h["summary"]["evidence"]
    f = data.get("head2head_fixed")
    if f:
        out.update(
            fixed_baseline=f["b"],
            fixed_win_rate=f["win_rate"],
            fixed_win_rate_ci=f["intervals"]["win_rate"],
            fixed_wins=f["wins"],
            fixed_ties=f["ties"],
            fixed_losses=f["losses"],
            fixed_evidence=(f.get("summary") or {}).get("evidence"),
        )
    ev = data.get("evaluator")
    if ev:
        out.update(
            evaluator=ev.get("judge") or ev.get("spec"), self_evaluation=bool(ev.get("self_evaluation"))
        )
    c = data.get("contamination")
    if c:
        out.update(contaminated_prompts=c["exact_duplicates"] + c["near_duplicates"])
    health = data.get("judge_health")
    if health:
        out.update(
            judge_top_score=health.get("top_score"),
            judge_top_share=health.get("top_share"),
            judge_entropy_bits=health.get("entropy_bits"),
            judge_parse_failure_rate=health.get("parse_failure_rate"),
            judge_collapsed=health.get("collapsed"),
            chosen_length=health.get("chosen_length"),
            rejected_length=health.get("rejected_length"),
        )
    bench = data.get("judge_bench")
    if bench:
        out["judge_bench_accuracy"] = {
            name: {j["role"]: j["metrics"]["accuracy"] for j in report["judges"]}
            for name, report in bench.items()
        }
    rm = data.get("reward_model")
    if rm:
        out.update(
            rm_pairwise_accuracy=rm["pairwise_accuracy"],
            rm_exact_match=rm["exact_match"],
            rm_five_best=rm["five_best"],
            rm_spearman=rm["spearman"],
            rm_kendall_tau=rm["kendall_tau"],
            rm_parse_failure_rate=rm["parse_failure_rate"],
        )
    return out


async def evaluate_iteration(
    config: RunConfig,
    layout: RunLayout,
    t: int,
    new_model: str,
    baseline_model: str | None,
    judge: Judge | None,
    client: OpenAICompatClient,
    progress: Progress = NULL_PROGRESS,
    *,
    judge_name: str | None = None,
    rm_judge: Judge | None = None,
    rm_judge_name: str | None = None,
    teacher_judge: Judge | None = None,
    fixed_baseline_model: str | None = None,
    evaluator: Evaluator | None = None,
    sharding: Sharding | None = None,
) -> dict[str, Any]:
    """Evaluate M(t+1) = `new_model` (served name) after iteration t; returns report.json's data.

    `judge` is the run's evaluator (`evaluator` says which and with what weights); M(t+1) is
    compared with `baseline_model` (M(t) by default) and with `fixed_baseline_model` (M1 by
    default: the same for every iteration) on the held-out evaluation prompts.

    Sharded (`selfreward.shards`): a shard job answers, judges and scores its part of every
    prompt set into shard files and returns only its counts (`{"shard": [i, n], ...}`, no
    report); the stage's own job merges every shard file as it opens each store, does what is
    missing, and writes the report."""
    shard_job = sharding is not None and sharding.is_shard
    shard_counts: dict[str, Any] = {}
    out = eval_dir(layout, t)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "kind": "iteration",
        "run": layout.run,
        "iteration": t,
        "model": new_model,
        "baseline": baseline_model,
        "fixed_baseline": fixed_baseline_model,
        "judge": judge_name or (judge.name if judge is not None else None),
        "evaluator": evaluator.model_dump(mode="json") if evaluator is not None else None,
        "self_evaluation": SELF_NOTE if evaluator is not None and evaluator.self_evaluation else None,
        "prompts": config.eval.prompts,
        "contamination": None,
        "head2head": None,
        "head2head_fixed": None,
        "reward_model": None,
        "judge_health": judge_health(layout, t, config.eval.collapse_threshold),
        "judge_bench": None,
    }
    plots: dict[str, bytes] = {}
    baselines = [b for b in dict.fromkeys((baseline_model, fixed_baseline_model)) if b is not None]
    if baselines and judge is not None:
        prompts = load_prompt_set(
            config.eval.prompts,
            seed_dir=layout.seed_dir,
            max_prompts=config.eval.max_prompts,
            seed=config.seed,
        )
        prompts, contamination = check_contamination(
            prompts, training_prompts(layout, t), config.prompts.dedup_threshold, config.eval.contamination
        )
        data["contamination"] = contamination.to_json()
        if not prompts:
            raise EmptyResultError(
                f"every evaluation prompt duplicates a training prompt ({contamination.to_json()['examples'][:3]}); "
                "choose other eval.prompts, or eval.contamination: report"
            )
        results: dict[str, dict[str, Any]] = {}
        for base in baselines:
            h2h = await run_head2head(
                AnswerSide(new_model),
                AnswerSide(base),
                prompts,
                judge=judge,
                judge_name=data["judge"],
                client=client,
                work_dir=out,
                answers_dir=layout.eval_dir / "answers",  # a baseline answers once per run and settings
                settings=generation_settings(config),
                bootstrap_samples=config.eval.bootstrap_samples,
                seed=config.seed,
                prompts_spec=config.eval.prompts,
                progress=progress,
                sharding=sharding,
                answer_concurrency=config.eval.concurrency,
            )
            if shard_job:
                shard_counts[f"head2head {base}"] = h2h["judged"]
            else:
                h2h["summary"] = evidence(h2h, config.eval.min_prompts)
                results[base] = h2h
        if results:
            if baseline_model is not None:
                data["head2head"] = results[baseline_model]
            if fixed_baseline_model is not None:
                data["head2head_fixed"] = results[fixed_baseline_model]
            plots["win_tie_loss.png"] = win_tie_loss_bars(
                list(results.values()), f"{new_model} against its baselines"
            )
    if config.eval.reward_model and rm_judge is not None:
        eft_path = layout.seed_dir / "eft_eval.jsonl"
        records = seeded_subset(read_records(eft_path, EFTEvalRecord), config.eval.max_prompts, config.seed)
        name = rm_judge_name or rm_judge.name
        scored = await score_eft(
            rm_judge,
            records,
            judge_name=name,
            out_path=out / f"rm-scores-{safe_name(name)}.jsonl",
            progress=progress,
            sharding=sharding,
        )
        if shard_job:
            shard_counts["reward_model"] = scored.written
        else:
            report = compare_with_human(
                read_scores(scored.path), records, scores_path=str(scored.path), reference_path=str(eft_path)
            )
            data["reward_model"] = {"judge": name, **report.to_json(), "retry_later": scored.retry_later}
            plots["rm_scores.png"] = reward_model_plot(report)
    if config.eval.judge_bench:
        data["judge_bench"] = await iteration_judge_bench(
            config, layout, t, rm_judge, teacher_judge, progress, self_name=rm_judge_name, sharding=sharding
        )
    if shard_job:
        assert sharding is not None and sharding.i is not None
        return {"shard": [sharding.i, sharding.n], **shard_counts, "judge_bench": data["judge_bench"]}
    data["metrics"] = summary_metrics(data)
    previous = [r for r in iteration_reports(layout) if r.get("iteration") != t]
    labels, series = trend_series([*previous, data])
    if series:
        lengths = length_series([*previous, data])
        plots["trends.png"] = metric_trends(labels, series, f"Run {layout.run}: metrics by model", lengths)
    write_report(out, data, iteration_markdown({**data, "plots": sorted(plots)}), plots)
    return data


async def iteration_judge_bench(
    config: RunConfig,
    layout: RunLayout,
    t: int,
    self_judge: Judge | None,
    teacher_judge: Judge | None,
    progress: Progress = NULL_PROGRESS,
    *,
    self_name: str | None = None,
    sharding: Sharding | None = None,
) -> dict[str, Any]:
    """Every `eval.judge_bench` set: per set report.json's data, each judge with its `role`
    (self, teacher, baseline); the teacher's and the baselines' verdicts are kept once per run."""
    from selfreward.evaluation.bench_sets import load_bench_set
    from selfreward.evaluation.judge_bench import (
        bench_judges,
        default_baselines,
        store_name,
        write_bench_report,
    )

    results: dict[str, Any] = {}
    for spec in config.eval.judge_bench:
        bench = load_bench_set(spec.set, spec.format, spec.name)
        run_dir = layout.eval_dir / "judge-bench" / safe_name(bench.name)
        roles: dict[str, str] = {}
        judges: list[Any] = []
        if self_judge is not None:
            judges.append(self_judge)
            roles[self_judge.name] = "self"
        stores = {}
        if teacher_judge is not None:
            judges.append(teacher_judge)
            roles[teacher_judge.name] = "teacher"
            stores[teacher_judge.name] = run_dir / "verdicts" / store_name(teacher_judge, spec.mode)
        for baseline in default_baselines(config.seed):
            judges.append(baseline)
            roles[baseline.name] = baseline.name
            stores[baseline.name] = run_dir / "verdicts" / store_name(baseline, spec.mode)
        out = eval_dir(layout, t) / "judge-bench" / safe_name(bench.name)
        report = await bench_judges(
            bench,
            judges,
            mode=spec.mode,
            out_dir=out,
            limit=spec.limit,
            seed=config.seed,
            bootstrap_samples=config.eval.bootstrap_samples,
            progress=progress,
            stores=stores,
            sharding=sharding,
        )
        if sharding is not None and sharding.is_shard:
            results[bench.name] = report
            continue
        for j in report["judges"]:
            j["role"] = roles.get(j["judge"], "judge")
        if self_name is not None:
            report["self_judge"] = self_name
        write_bench_report(out, report)
        results[bench.name] = report
    return results
