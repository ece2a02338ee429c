"""Stage execution, shared by the embedded runner (`selfreward run`) and the coordinator's RQ jobs.

`execute_stage(ctx, stage)` runs one stage of iteration ctx.t unless its manifest exists,
then writes the manifest (counts, config hash, seed, input and output hashes, timing). Every
stage resumes from what it already wrote (see each stage module), so calling it again after
a crash finishes the work without redoing it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfreward.clients.openai_compat import OpenAICompatClient
from selfreward.config import RunConfig
from selfreward.errors import EmptyResultError, SelfRewardError, StageError
from selfreward.loop import plan
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.schemas import CandidateRecord, JudgmentRecord, PromptRecord, read_records
from selfreward.storage import (
    RunLayout,
    read_manifest,
    sha256_file,
    sha256_text,
    write_jsonl_atomic,
    write_manifest,
)


@dataclass
class StageContext:
    config: RunConfig
    layout: RunLayout
    t: int
    progress: Progress = NULL_PROGRESS
    policy_url: str | None = None  # default: config.services.policy_url
    redis_url: str | None = None  # verdict cache of in-process judges; None = in-process only

    @property
    def url(self) -> str:
        return self.policy_url or self.config.services.policy_url

    def client(self) -> OpenAICompatClient:
        s = self.config.services
        return OpenAICompatClient(self.url, concurrency=s.concurrency, timeout_s=s.request_timeout_s)

    def file(self, stage: str) -> Path:
        return self.layout.stage_file(self.t, stage)

    def manifest_of(self, t: int, stage: str) -> dict[str, Any]:
        m = read_manifest(self.layout.stage_manifest(t, stage))
        if m is None:
            raise StageError(stage, f"needs stage {stage!r} of iteration {t}, which has not run")
        return m


StageFn = Callable[[StageContext], dict[str, Any]]


def _hash_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def execute_stage(ctx: StageContext, stage: str) -> dict[str, Any]:
    """Run `stage` of iteration ctx.t unless done; return its manifest."""
    if stage not in plan.stages_of(ctx.t):
        raise StageError(
            stage, f"not a stage of iteration {ctx.t} (stages: {', '.join(plan.stages_of(ctx.t))})"
        )
    path = ctx.layout.stage_manifest(ctx.t, stage)
    done = read_manifest(path)
    if done is not None:
        return done
    fn = STAGES[stage]
    started = time.time()
    try:
        counts = fn(ctx)
    except StageError:
        raise
    except SelfRewardError as exc:
        raise StageError(stage, str(exc)) from exc
    output = ctx.file(stage)
    manifest = {
        "stage": stage,
        "iteration": ctx.t,
        "run": ctx.layout.run,
        "variant": ctx.config.variant,
        "seed": ctx.config.seed,
        "config_sha256": sha256_text(ctx.config.model_dump_json()),
        "started_at": started,
        "seconds": round(time.time() - started, 2),
        **counts,
    }
    if output.is_file():
        manifest["outputs"] = {output.name: sha256_file(output)}
    write_manifest(path, manifest)
    return manifest


# ---------------------------------------------------------------- stage 0: set-up


def _prepare(ctx: StageContext) -> dict[str, Any]:
    from selfreward.data.seed import prepare_seed
    from selfreward.policy.prepare import prepare_model

    cfg = ctx.config
    base = prepare_model(
        cfg.model.base,
        ctx.layout.cache_dir,
        chat_template=cfg.model.chat_template,
        progress=ctx.progress,
    )
    judge = None
    if cfg.data.eft_targets == "judge-filtered":
        from selfreward.data.eft_judge import eft_judge_for

        judge = eft_judge_for(cfg, policy_url=ctx.url, redis_url=ctx.redis_url)
    seed = prepare_seed(cfg.data, ctx.layout.seed_dir, ctx.progress, judge=judge)
    return {
        "base_model_dir": str(base.resolve()),
        "base_served_name": cfg.model.served_name,
        "seed_dir": str(ctx.layout.seed_dir.resolve()),
        "seed_counts": seed.counts,
    }


def _base_dir(ctx: StageContext) -> Path:
    return Path(ctx.manifest_of(0, "prepare")["base_model_dir"])


def _train_result(manifest: dict[str, Any]) -> dict[str, Any]:
    """The stage manifest's view of a trainer manifest (models/<name>/manifest.json has it all)."""
    training = manifest.get("training", {})
    return {
        "model": manifest.get("name"),
        "adapter_sha256": manifest.get("adapter_sha256"),
        "parent": (manifest.get("parent") or {}).get("name"),
        "steps": training.get("global_step"),
        "precision": training.get("precision"),
        "examples": (manifest.get("data") or {}).get("examples"),
        "skipped": (manifest.get("data") or {}).get("skipped"),
        "metrics": manifest.get("metrics", {}),
    }


def _sft(ctx: StageContext) -> dict[str, Any]:
    from selfreward.training.request import sft_request
    from selfreward.training.runner import run as run_training

    request = sft_request(
        ctx.config, name=plan.model_name(1), seed_dir=str(ctx.layout.seed_dir), base_model=str(_base_dir(ctx))
    )
    return _train_result(run_training(request, ctx.progress))


def _publish(ctx: StageContext) -> dict[str, Any]:
    from selfreward.policy.publish import publish_adapter, tolerance_for

    name = plan.model_name(ctx.t + 1)
    parent = plan.served_name(ctx.layout, ctx.t)
    tol = tolerance_for(ctx.config.policy)

    async def go() -> dict[str, Any]:
        async with ctx.client() as client:
            return await publish_adapter(
                client, ctx.layout.model_dir(name), name=name, parent=parent, tol=tol
            )

    result = asyncio.run(go())
    return {"model": name, **result}


# ---------------------------------------------------------------- iteration t >= 1


async def ensure_served(client: OpenAICompatClient, layout: RunLayout, t: int, tol: float) -> str:
    """M(t)'s served name, publishing it again if the policy server lost it (a restarted vLLM
    forgets adapters loaded at run time); the fingerprint is checked again (within `tol`)."""
    name = plan.served_name(layout, t)
    if t == 0 or name in await client.model_names():
        return name
    from selfreward.policy.publish import publish_adapter

    parent = await ensure_served(client, layout, t - 1, tol)
    record = await publish_adapter(
        client, layout.model_dir(plan.model_name(t)), name=plan.model_name(t), parent=parent, tol=tol
    )
    if record["served_name"] != name:
        raise StageError(
            "publish",
            f"{plan.model_name(t)} changed since it was published as {name!r} (now {record['served_name']!r})",
        )
    return name


def _policy_model(ctx: StageContext, t: int | None = None) -> str:
    """The served name of M(t) (default: the context's iteration), made sure to be served."""

    from selfreward.policy.publish import tolerance_for

    async def go() -> str:
        async with ctx.client() as client:
            return await ensure_served(
                client, ctx.layout, ctx.t if t is None else t, tolerance_for(ctx.config.policy)
            )

    return asyncio.run(go())


def _prompts(ctx: StageContext) -> dict[str, Any]:
    from selfreward.loop.prompts_stage import Example, read_prompt_file, self_instruct
    from selfreward.schemas import IFTRecord

    cfg = ctx.config.prompts
    out_dir = ctx.layout.iter_dir(ctx.t)
    if cfg.source == "file":
        assert cfg.file is not None
        records = read_prompt_file(cfg.file, cfg.num_prompts)
        write_jsonl_atomic(ctx.file("prompts"), [r.model_dump() for r in records])
        return {"prompts": len(records), "source": "file", "file": str(cfg.file)}
    ift = read_records(ctx.layout.seed_dir / "ift.jsonl", IFTRecord)
    seed_examples = [Example(r.id, r.prompt) for r in ift]
    earlier = []
    for tt in range(1, ctx.t):
        path = ctx.layout.stage_file(tt, "prompts")
        if path.is_file():
            earlier += [Example(r.id, r.prompt) for r in read_records(path, PromptRecord)]
    model = cfg.model or _policy_model(ctx)

    async def go() -> dict[str, Any]:
        async with ctx.client() as client:
            return await self_instruct(
                client,
                model,
                cfg,
                seed_examples,
                earlier,
                out_dir,
                ctx.t,
                ctx.config.seed,
                concurrency=ctx.config.services.concurrency,
                progress=ctx.progress,
                seeded=ctx.config.request_seed(0) is not None,
            )

    return {"source": "self-instruct", **asyncio.run(go())}


def _candidates(ctx: StageContext) -> dict[str, Any]:
    from selfreward.loop.candidates_stage import generate_candidates

    cfg = ctx.config
    prompts = read_records(ctx.file("prompts"), PromptRecord)
    if not prompts:
        raise EmptyResultError(f"{ctx.file('prompts')}: no prompts to answer")
    demo = cfg.variant == "teacher-demo"
    model = _policy_model(ctx)

    async def go() -> dict[str, Any]:
        teacher = None
        async with ctx.client() as client:
            if demo:
                from selfreward.loop.teacher import make_teacher

                teacher = make_teacher(cfg, policy_url=ctx.url)
            try:
                return await generate_candidates(
                    client,
                    model,
                    prompts,
                    cfg.candidates,
                    ctx.file("candidates"),
                    samples=1 if demo else cfg.candidates.n,
                    run_seed=cfg.seed,
                    t=ctx.t,
                    teacher=teacher.write if teacher else None,
                    teacher_name=teacher.name if teacher else None,
                    progress=ctx.progress,
                    seeded=cfg.request_seed(0) is not None,
                )
            finally:
                if teacher is not None:
                    await teacher.aclose()

    return asyncio.run(go())


def _judgments(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config
    if cfg.variant == "teacher-demo":
        return {"skipped": "teacher-demo pairs need no judge"}
    spec = cfg.feedback_judge()
    if cfg.services.judge_url:
        from selfreward.clients.judge_service import RemoteJudge

        judge = RemoteJudge(
            cfg.services.judge_url,
            spec,
            cfg.judge,
            self_model=_policy_model(ctx),
            # the judge service's bearer token, shared by the deployment's services
            api_token=os.environ.get("SELFREWARD_API_TOKEN") or None,
        )
    else:
        from selfreward.judging import make_run_judge

        judge = make_run_judge(
            spec, cfg, policy_url=ctx.url, self_model=_policy_model(ctx), redis_url=ctx.redis_url
        )
    from selfreward.judging import judge_candidates

    return judge_candidates(ctx.file("candidates"), ctx.file("judgments"), judge, ctx.progress)


def _pairs(ctx: StageContext) -> dict[str, Any]:
    from selfreward.loop.pairs_stage import demonstration_pairs, reward_pairs

    candidates = read_records(ctx.file("candidates"), CandidateRecord)
    if ctx.config.variant == "teacher-demo":
        pairs, report = demonstration_pairs(candidates)
    else:
        judgments = read_records(ctx.file("judgments"), JudgmentRecord)
        pairs, report = reward_pairs(candidates, judgments, ctx.config.pairs.min_margin)
    write_jsonl_atomic(ctx.file("pairs"), pairs)
    if not pairs:
        raise EmptyResultError(
            f"iteration {ctx.t}: no preference pair survived ({report}); "
            "with a small judge this usually means every verdict failed to parse or all scores tied"
        )
    return report


def _train(ctx: StageContext) -> dict[str, Any]:
    from selfreward.training.request import dpo_request
    from selfreward.training.runner import run as run_training

    request = dpo_request(
        ctx.config,
        pairs=str(ctx.file("pairs")),
        name=plan.model_name(ctx.t + 1),
        parent=plan.model_name(ctx.t),
        base_model=str(_base_dir(ctx)),
    )
    return _train_result(run_training(request, ctx.progress))


def _evaluate(ctx: StageContext) -> dict[str, Any]:
    from selfreward.evaluation.iteration import run_evaluate_stage

    cfg = ctx.config
    new = _policy_model(ctx, ctx.t + 1)
    against = cfg.eval.head2head_against
    baseline = None
    if against == "previous":
        baseline = _policy_model(ctx, ctx.t)
    elif against in ("m0", "m1"):
        baseline = _policy_model(ctx, int(against[1]))
    data = run_evaluate_stage(
        cfg, ctx.layout, ctx.t, new, baseline, ctx.progress, policy_url=ctx.url, redis_url=ctx.redis_url
    )
    return {"model": new, "baseline": baseline, "metrics": data.get("metrics", {})}


STAGES: dict[str, StageFn] = {
    "prepare": _prepare,
    "sft": _sft,
    "publish": _publish,
    "prompts": _prompts,
    "candidates": _candidates,
    "judgments": _judgments,
    "pairs": _pairs,
    "train": _train,
    "evaluate": _evaluate,
}
