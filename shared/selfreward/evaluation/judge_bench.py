"""The judge benchmark: any judge measured against a human-labelled preference set.

`run_bench_judge(bench, judge, mode=..., store_path=...)` judges every item of a `BenchSet`
(`selfreward.evaluation.bench_sets`) not yet in `store_path` and returns its verdicts and cost;
`bench_report` turns the verdicts of several judges into report.json's data
(`selfreward.evaluation.metrics.judge_bench` defines every metric); `write_bench_report` writes
report.json, report.md and the plots. `selfreward eval judge` and the evaluate stage
(`eval.judge_bench`) use them.

Judges:
- a model judge (`Judge`: policy:, gemini:, openai:) in `pointwise` mode scores both responses
  with the 5-point prompt (`Judge.score`, K verdicts each, their mean): higher wins, equal scores
  are a judge tie, a response without a parsed score makes the item a failure; in `pairwise`
  mode it compares them with the pairwise prompt in both orders (`Judge.compare`): the orders
  agreeing name the winner, disagreeing orders are a tie, an order that failed makes the item a
  failure;
- baselines, no model: `length:longer` / `length:shorter` prefer the longer / shorter response
  (Python `len` of the string; equal lengths are a tie), `random:<seed>` picks a or b with
  `random.Random(f"{seed}:{item id}")` (the same pick for an item however the set is cut).

Verdicts are appended to `store_path` one fsynced line per item (`judging.rows.judge_rows`): a
rerun judges only what is missing, and a backend failure is not written (the next run retries
it); the model judges' verdict cache (Redis or in-process) answers repeated items. A store
written by another judge (identity: spec, template version, mode, sampling) is refused.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from selfreward.errors import ConfigError, InputError
from selfreward.evaluation.answers import safe_name
from selfreward.evaluation.bench_sets import BenchItem, BenchSet, rewardbench_sections
from selfreward.evaluation.metrics.judge_bench import ItemVerdict, bench_metrics
from selfreward.judging.protocol import Judge
from selfreward.judging.rows import Judged, judge_rows
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.shards import Sharding, pick, store_file
from selfreward.storage import ResumableJsonl

BenchMode = Literal["pointwise", "pairwise"]
BASELINE_KINDS = ("length:longer", "length:shorter", "random:<seed>")


@dataclass(frozen=True)
class BaselineJudge:
    """A judge that needs no model (see the module docstring)."""

    name: str

    @property
    def identity(self) -> str:
        return self.name

    def pick(self, item: BenchItem) -> Literal["a", "b", "tie"]:
        la, lb = len(item.response_a), len(item.response_b)
        if self.name in ("length:longer", "length:shorter"):
            if la == lb:
                return "tie"
            longer = "a" if la > lb else "b"
            return longer if self.name == "length:longer" else ("b" if longer == "a" else "a")
        seed = self.name.split(":", 1)[1]
        return "a" if random.Random(f"{seed}:{item.id}").random() < 0.5 else "b"


def baseline_judge(spec: str) -> BaselineJudge | None:
    """The baseline a spec names, None for a model judge spec; a malformed baseline is an error."""
    if spec in ("length:longer", "length:shorter"):
        return BaselineJudge(spec)
    if spec.startswith("length:"):
        raise ConfigError(
            [f"judge {spec!r}: the length baselines are length:longer and length:shorter"], "judge"
        )
    if spec.startswith("random:") or spec == "random":
        seed = spec.partition(":")[2]
        if not seed.lstrip("-").isdigit():
            raise ConfigError([f"judge {spec!r}: random baselines are random:<integer seed>"], "judge")
        return BaselineJudge(f"random:{int(seed)}")
    return None


def default_baselines(seed: int) -> list[BaselineJudge]:
    return [BaselineJudge("length:longer"), BaselineJudge("length:shorter"), BaselineJudge(f"random:{seed}")]


@dataclass
class BenchRun:
    """One judge's verdicts on one set and what they cost."""

    judge: str
    mode: str  # pointwise | pairwise | baseline
    identity: str
    records: list[dict[str, Any]]
    cost: dict[str, Any] = field(default_factory=dict)
    retry_later: list[str] = field(default_factory=list)  # items whose backend failed (not written)

    def verdicts(self) -> list[ItemVerdict]:
        return [
            ItemVerdict(
                human=r["human"],
                pick=r["pick"],
                len_a=r["len_a"],
                len_b=r["len_b"],
                subset=r.get("subset"),
                ab=r.get("ab"),
                ba=r.get("ba"),
                pairwise=r.get("mode") == "pairwise",
            )
            for r in self.records
        ]


def _base_record(item: BenchItem, judge: str, identity: str, mode: str) -> dict[str, Any]:
    return {
        "id": item.id,
        "subset": item.subset,
        "human": item.human,
        "judge": judge,
        "identity": identity,
        "mode": mode,
        "len_a": len(item.response_a),
        "len_b": len(item.response_b),
        "pick": None,
        "failure": None,
        "verdicts": 0,
        "cached": 0,
    }


def _check_store(store: ResumableJsonl, identity: str) -> None:
    for rec in store.records.values():
        if rec.get("identity") != identity:
            raise InputError(
                f"{store.path}: item {rec.get('id')!r} was judged by {rec.get('identity')!r}, this run judges "
                f"with {identity!r}: write to another --out folder or remove the file"
            )


def _usage(judge: Judge) -> dict[str, int] | None:
    backend = getattr(judge, "backend", None)
    usage = getattr(backend, "usage", None)
    return dict(usage) if usage is not None else None


def _item_id(rec: dict[str, Any]) -> str:
    return str(rec["id"])


async def run_bench_judge(
    bench: BenchSet,
    judge: Judge | BaselineJudge,
    *,
    mode: BenchMode = "pointwise",
    store_path: Path,
    items: Sequence[BenchItem] | None = None,
    samples: int | None = None,
    progress: Progress = NULL_PROGRESS,
    concurrency: int | None = None,
    sharding: Sharding | None = None,
) -> BenchRun:
    """Judge `items` (default: every item of the set) not yet in `store_path`; a shard job
    (`sharding`) judges its part of them into its shard file (`selfreward.shards`)."""
    todo_items = list(bench.items if items is None else items)
    store_path = store_file(store_path, sharding, [x.id for x in todo_items], _item_id)
    todo_items = pick(todo_items, sharding, lambda x: x.id)
    is_baseline = isinstance(judge, BaselineJudge)
    run_mode = "baseline" if is_baseline else mode
    identity = judge.identity if is_baseline else f"{judge.identity}|bench={mode}"
    name = judge.name
    counts = {"verdicts": 0, "cached": 0, "failures": 0}
    before = None if is_baseline else _usage(judge)
    started = time.monotonic()

    async def one(unit: list[BenchItem]) -> list[Judged]:
        (item,) = unit
        rec = _base_record(item, name, identity, run_mode)
        transient = None
        if isinstance(judge, BaselineJudge):
            rec["pick"] = judge.pick(item)
        elif mode == "pointwise":
            ra, rb = await judge.score(item.instruction, [item.response_a, item.response_b], samples)
            transient = ra.transient_failure or rb.transient_failure
            rec["scores"] = [ra.score, rb.score]
            rec["texts"] = [[v.text for v in ra.verdicts], [v.text for v in rb.verdicts]]
            rec["verdicts"] = len(ra.verdicts) + len(rb.verdicts)
            rec["cached"] = ra.cached + rb.cached
            rec["truncated"] = ra.truncated or rb.truncated
            if ra.score is None or rb.score is None:
                failed = [v.failure for r in (ra, rb) for v in r.verdicts if v.failure]
                rec["failure"] = failed[0] if failed else "unscored"
            else:
                rec["pick"] = "a" if ra.score > rb.score else "b" if ra.score < rb.score else "tie"
        else:
            res = await judge.compare(item.instruction, item.response_a, item.response_b)
            transient = res.transient_failure
            rec["ab"], rec["ba"] = res.ab.winner, res.ba.winner
            rec["texts"] = [res.ab.text, res.ba.text]
            rec["preference"] = res.preference
            rec["verdicts"] = 2
            rec["cached"] = int(res.ab.cached) + int(res.ba.cached)
            rec["truncated"] = res.truncated
            if res.failure is not None:
                rec["failure"] = res.failure
            else:
                rec["pick"] = "a" if res.preference > 0.5 else "b" if res.preference < 0.5 else "tie"
        if transient is None:
            counts["verdicts"] += rec["verdicts"]
            counts["cached"] += rec["cached"]
            counts["failures"] += int(rec["failure"] is not None)
        return [Judged(item.id, rec, transient)]

    store_path.parent.mkdir(parents=True, exist_ok=True)
    with ResumableJsonl(store_path, key=_item_id) as store:
        _check_store(store, identity)
        done = sum(1 for x in todo_items if x.id in store)
        task = progress.task(f"judge bench {bench.name}: {name}", len(todo_items), done=done)
        width = 64 if is_baseline else max(2, (concurrency or judge.concurrency))
        report = await judge_rows(
            todo_items,
            key=lambda x: x.id,
            judge=one,
            store=store,
            concurrency=width,
            task=task,
            on_result=lambda _: {"failures": counts["failures"]},
        )
        task.close()
        wanted = {x.id for x in todo_items}
        records = [store.records[x.id] for x in todo_items if x.id in store.records]
    after = None if is_baseline else _usage(judge)
    tokens = None
    if before is not None and after is not None:
        tokens = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    cost = {
        "items": len(wanted),
        "already_judged": report.already,
        "judged_now": len(report.written),
        "verdicts_now": counts["verdicts"],
        "cached_verdicts_now": counts["cached"],
        "verdicts_total": sum(int(r.get("verdicts", 0)) for r in records),
        "cached_verdicts_total": sum(int(r.get("cached", 0)) for r in records),
        "wall_s": round(time.monotonic() - started, 3),
        "tokens_now": tokens,  # None where the backend does not report tokens
    }
    return BenchRun(name, run_mode, identity, records, cost, [j.key for j in report.transient])


def store_name(judge: Judge | BaselineJudge, mode: str) -> str:
    kind = "baseline" if isinstance(judge, BaselineJudge) else mode
    return f"{safe_name(judge.name)}-{kind}.jsonl"


def bench_report(
    bench: BenchSet,
    runs: Sequence[BenchRun],
    *,
    limit: int | None,
    sampled: int,
    bootstrap_samples: int,
    seed: int,
) -> dict[str, Any]:
    """report.json's data: the set (records, exclusions, problems), then per judge its metrics and cost."""
    judges = []
    for run in runs:
        metrics = bench_metrics(run.verdicts(), bootstrap_samples=bootstrap_samples, seed=seed)
        entry: dict[str, Any] = {
            "judge": run.judge,
            "mode": run.mode,
            "identity": run.identity,
            "metrics": metrics,
            "cost": run.cost,
            "retry_later": run.retry_later,
            "failure_kinds": _failure_kinds(run.records),
        }
        if bench.format == "rewardbench" and metrics["subsets"]:
            entry["rewardbench_sections"] = rewardbench_sections(metrics["subsets"])
        judges.append(entry)
    return {
        "kind": "judge_bench",
        "set": {**bench.summary(), "limit": limit, "sampled": sampled},
        "judges": judges,
    }


def _failure_kinds(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in records:
        if r.get("failure"):
            kind = str(r["failure"]).split(":", 1)[0].strip()
            kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def write_bench_report(out_dir: Path, data: dict[str, Any]) -> dict[str, Path]:
    from selfreward.reports.files import write_report
    from selfreward.reports.markdown import judge_bench_markdown
    from selfreward.reports.plots import bench_accuracy_bars, bench_length_bars

    plots = {"accuracy.png": bench_accuracy_bars(data)}
    if any(j["metrics"]["length"]["judge_picks_unequal"] for j in data["judges"]):
        plots["length_bias.png"] = bench_length_bars(data)
    return write_report(out_dir, data, judge_bench_markdown({**data, "plots": sorted(plots)}), plots)


async def bench_judges(
    bench: BenchSet,
    judges: Sequence[Judge | BaselineJudge],
    *,
    mode: BenchMode,
    out_dir: Path,
    limit: int | None,
    seed: int,
    bootstrap_samples: int,
    samples: int | None = None,
    progress: Progress = NULL_PROGRESS,
    stores: dict[str, Path] | None = None,
    sharding: Sharding | None = None,
) -> dict[str, Any]:
    """Every judge on the same seeded sample of at most `limit` items; returns report.json's data.

    A judge's verdicts go to `stores[judge.name]` when given (e.g. a teacher measured once per
    run), else `out_dir/verdicts/<judge>-<mode>.jsonl`. A shard job (`sharding.is_shard`) judges
    its part of the sample into shard files and returns only its counts (`{"judges": {name:
    judged now}}`): the report is the stage's own job's, after merging."""
    from selfreward.evaluation.prompt_sets import seeded_subset

    if not bench.items:
        raise InputError(
            f"{bench.source}: no judgeable item among its {bench.records} records "
            f"({', '.join(f'{k} {v}' for k, v in sorted(bench.excluded.items())) or 'empty'})"
        )
    items = seeded_subset(bench.items, limit, seed)
    runs = []
    for judge in judges:
        path = (stores or {}).get(judge.name) or out_dir / "verdicts" / store_name(judge, mode)
        runs.append(
            await run_bench_judge(
                bench,
                judge,
                mode=mode,
                store_path=path,
                items=items,
                samples=samples,
                progress=progress,
                sharding=sharding,
            )
        )
    if sharding is not None and sharding.is_shard:
        return {"judges": {r.judge: r.cost["judged_now"] for r in runs}}
    return bench_report(
        bench, runs, limit=limit, sampled=len(items), bootstrap_samples=bootstrap_samples, seed=seed
    )
