"""Iteration stage `candidates`: N samples per prompt from M(t) through the policy service.

Requests go out concurrently (the client bounds how many are in flight, so vLLM batches
them); each prompt's samples are appended to candidates.jsonl as soon as they arrive, keyed
"<prompt_id>:<index>". A resumed stage asks only for the samples still missing. Requests
are seeded from (run seed, t, prompt id) where policy.seeded_requests allows (GPU by default),
so a re-run on the same server repeats itself.

The run's method (selfreward.methods) says how many samples the student writes per prompt and
whether the teacher writes one more (teacher-demo), recorded with `teacher: true` and index -1,
and whether a fixed anchor model adds as many answers (temporal: `anchor: true`, indices
n..2n-1, generated once per prompt and cached in runs/<run>/anchors/m<k>.jsonl).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from selfreward.config import CandidatesConfig
from selfreward.errors import EmptyResultError
from selfreward.llm.openai import OpenAICompatClient
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.schemas import CandidateRecord, PromptRecord, candidate_id, read_records
from selfreward.stages.prompts import derived_seed
from selfreward.stages.stage import Stage, StageContext, StageResult
from selfreward.storage import ResumableJsonl

TEACHER_INDEX = -1

# (prompt text, seed) -> the teacher's answer
TeacherWriter = Callable[[str, int], Awaitable[str]]


def chat_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def generate_candidates(
    client: OpenAICompatClient,
    model: str,
    prompts: list[PromptRecord],
    cfg: CandidatesConfig,
    out_path: Path,
    *,
    samples: int,
    run_seed: int,
    t: int,
    teacher: TeacherWriter | None = None,
    teacher_name: str | None = None,
    progress: Progress = NULL_PROGRESS,
    seeded: bool = True,
) -> dict[str, Any]:
    out = ResumableJsonl(out_path, key=lambda r: r["id"])
    finish: dict[str, int] = {}
    try:
        total = len(prompts) * (samples + (1 if teacher else 0))
        task = progress.task(f"candidates (iter {t})", total, done=len(out))

        async def student(p: PromptRecord) -> None:
            have = sorted(
                r["index"]
                for k, r in out.records.items()
                if k.startswith(f"{p.id}:") and 0 <= r["index"] < samples
            )
            missing = [i for i in range(samples) if i not in have]
            if not missing:
                return
            gen = await client.chat(
                model,
                chat_messages(p.prompt),
                n=len(missing),
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                seed=derived_seed(run_seed, t, p.id, len(have)) if seeded else None,
            )
            for i, choice in zip(missing, gen.choices, strict=True):
                rec = CandidateRecord(
                    id=candidate_id(p.id, i),
                    prompt_id=p.id,
                    prompt=p.prompt,
                    index=i,
                    text=choice.text,
                    model=model,
                    finish_reason=choice.finish_reason,
                )
                out.append(rec.model_dump())
                finish[choice.finish_reason or "none"] = finish.get(choice.finish_reason or "none", 0) + 1
            task.advance(len(missing))

        async def teacher_answer(p: PromptRecord) -> None:
            assert teacher is not None
            cid = candidate_id(p.id, TEACHER_INDEX)
            if cid in out:
                return
            text = await teacher(p.prompt, derived_seed(run_seed, t, p.id, "teacher"))
            rec = CandidateRecord(
                id=cid,
                prompt_id=p.id,
                prompt=p.prompt,
                index=TEACHER_INDEX,
                text=text,
                model=teacher_name or "teacher",
                teacher=True,
            )
            out.append(rec.model_dump())
            task.advance(1)

        jobs = [student(p) for p in prompts]
        if teacher is not None:
            jobs += [teacher_answer(p) for p in prompts]
        await asyncio.gather(*jobs)
        task.close()
        n_student = sum(1 for r in out.records.values() if not r.get("teacher") and not r.get("anchor"))
        n_teacher = sum(1 for r in out.records.values() if r.get("teacher"))
    finally:
        out.close()
    empty = sum(1 for r in out.records.values() if not r["text"].strip())
    return {
        "prompts": len(prompts),
        "candidates": n_student,
        "teacher_answers": n_teacher,
        "samples_per_prompt": samples,
        "empty_candidates": empty,
        "finish_reasons_this_run": finish,
        "model": model,
    }


def anchor_key(prompt: str, j: int) -> str:
    """The anchor cache's key of answer j to `prompt` (by text: any iteration's prompt finds it)."""
    from selfreward.storage import sha256_text

    return f"{sha256_text(prompt)}:{j}"


async def add_anchor_answers(
    client: OpenAICompatClient,
    model: str,
    prompts: list[PromptRecord],
    cfg: CandidatesConfig,
    out_path: Path,
    cache_path: Path,
    *,
    samples: int,
    run_seed: int,
    seeded: bool = True,
    progress: Progress = NULL_PROGRESS,
) -> dict[str, Any]:
    """`samples` answers of the anchor model per prompt, appended to the candidates file as
    indices samples..2*samples-1 with `anchor: true`. Each is generated once per prompt text and
    cached in `cache_path` (keyed `anchor_key`): a later iteration, a resumed stage or another
    prompt file with the same prompt reuses it (the anchor is fixed, so its answers are too)."""
    cache = ResumableJsonl(cache_path, key=lambda r: r["key"])
    out = ResumableJsonl(out_path, key=lambda r: r["id"])
    generated = reused = 0
    try:
        task = progress.task("anchor answers", len(prompts) * samples)

        async def one(p: PromptRecord) -> None:
            nonlocal generated, reused
            missing = [j for j in range(samples) if anchor_key(p.prompt, j) not in cache]
            if missing:
                gen = await client.chat(
                    model,
                    chat_messages(p.prompt),
                    n=len(missing),
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_tokens=cfg.max_tokens,
                    seed=derived_seed(run_seed, 0, p.prompt, "anchor", len(missing)) if seeded else None,
                )
                for j, choice in zip(missing, gen.choices, strict=True):
                    cache.append(
                        {
                            "key": anchor_key(p.prompt, j),
                            "text": choice.text,
                            "model": model,
                            "finish_reason": choice.finish_reason,
                        }
                    )
                generated += len(missing)
            for j in range(samples):
                cid = candidate_id(p.id, samples + j)
                if cid in out:
                    continue
                hit = cache.records[anchor_key(p.prompt, j)]
                reused += int(j not in missing)
                rec = CandidateRecord(
                    id=cid,
                    prompt_id=p.id,
                    prompt=p.prompt,
                    index=samples + j,
                    text=hit["text"],
                    model=hit["model"],
                    finish_reason=hit.get("finish_reason"),
                    anchor=True,
                )
                out.append(rec.model_dump())
            task.advance(samples)

        await asyncio.gather(*(one(p) for p in prompts))
        task.close()
        written = sum(1 for r in out.records.values() if r.get("anchor"))
    finally:
        out.close()
        cache.close()
    return {"anchor_answers": written, "anchor_generated": generated, "anchor_from_cache": reused}


class CandidatesResult(StageResult):
    prompts: int
    candidates: int
    teacher_answers: int = 0
    model: str

    def summary(self) -> str:
        extra = f" teacher={self.teacher_answers}" if self.teacher_answers else ""
        return f"candidates={self.candidates}{extra}"


async def run(ctx: StageContext) -> CandidatesResult:
    cfg = ctx.config
    prompts = read_records(ctx.file("prompts"), PromptRecord)
    if not prompts:
        raise EmptyResultError(f"{ctx.file('prompts')}: no prompts to answer")
    from selfreward.methods import method_of

    method = method_of(cfg)
    model = await ctx.served()
    teacher = None
    if method.teacher_answers:
        from selfreward.teacher import make_teacher

        teacher = make_teacher(cfg, policy_url=ctx.url, redis_url=ctx.redis_url)
    try:
        counts = await generate_candidates(
            ctx.policy,
            model,
            prompts,
            cfg.candidates,
            ctx.file("candidates"),
            samples=method.samples(cfg),
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
    k = method.anchor_model(cfg)
    if k is not None:
        from selfreward.stages.stage import model_name

        counts.update(
            await add_anchor_answers(
                ctx.policy,
                await ctx.served(k),
                prompts,
                cfg.candidates,
                ctx.file("candidates"),
                ctx.layout.run_dir / "anchors" / f"{model_name(k)}.jsonl",
                samples=method.samples(cfg),
                run_seed=cfg.seed,
                seeded=cfg.request_seed(0) is not None,
                progress=ctx.progress,
            ),
            anchor_model=model_name(k),
        )
    return CandidatesResult(**counts)


STAGE = Stage(
    name="candidates",
    run=run,
    queue="generate",
    result=CandidatesResult,
    description="N samples per prompt from M(t) (and the teacher's answer in teacher-demo)",
)
