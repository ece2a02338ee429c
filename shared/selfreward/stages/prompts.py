"""Iteration stage `prompts`: self-instruct new prompts with M(t) (or a fixed prompt model), or read a file.

Self-instruct (Yuan et al. 2024, following Wang et al. 2023): each attempt shows the model
`few_shot` example tasks, `few_shot_generated` of them from prompts generated in earlier
iterations once they exist and the rest from the seed IFT prompts, and asks for one new task
(T=0.6, top_p=0.9 by default), as a raw-text continuation of the numbered list by default
(`prompts.request`). Attempts are generated in batches sized by the acceptance so far
(`batch_size`), so that few are generated after the last prompt needed. The answer is extracted, length-filtered and deduplicated
(exact and ROUGE-L near-duplicates against the seed prompts, earlier iterations and this one).

Resumability: every attempt, accepted or not, is appended to `prompts.attempts.jsonl` in
attempt order (a batch is generated concurrently, then written in order), with its raw text,
the few-shot ids and the verdict. A resumed stage replays that file and continues at the
next attempt. Few-shot choices are seeded from (run seed, t, attempt); sampling too where
policy.seeded_requests allows (GPU by default).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfreward.config import PromptsConfig
from selfreward.dedup import NearDuplicateIndex
from selfreward.errors import EmptyResultError, InputError
from selfreward.llm.openai import OpenAICompatClient
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.prompts import SELF_INSTRUCT_TEMPLATE, load_template
from selfreward.schemas import IFTRecord, PromptRecord, read_records
from selfreward.stages.stage import Stage, StageContext, StageResult
from selfreward.storage import ResumableJsonl, read_jsonl, write_jsonl_atomic

_TASK_LABEL = re.compile(r"^\s*(?:task\s*\d*\s*[:.)-]\s*)", re.IGNORECASE)
_NEXT_TASK = re.compile(r"\n\s*task\s*\d+\s*[:.)]", re.IGNORECASE)


# one task per answer: stop where a model starts the next one (saves most of the tokens)
STOP = ["\nTask ", "\n\n"]


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from the parts (Python's hash() is salted per process)."""
    import hashlib

    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def batch_size(needed: int, reasons: Counter[str], concurrency: int) -> int:
    """Attempts to generate next: about what the acceptance so far says `needed` more prompts
    take (all of them while nothing is judged yet), at most `concurrency`. Attempts beyond the
    last needed prompt are generated for nothing (the quickstart's last batch of 16 had 13)."""
    judged = sum(v for k, v in reasons.items() if k != "not_needed")
    rate = reasons["accepted"] / judged if judged else 1.0
    return max(1, min(concurrency, math.ceil(needed / max(rate, 0.1))))


def extract_task(raw: str) -> str:
    """The first task in a model's answer: label stripped, cut before a following 'Task N:'."""
    text = raw.strip()
    text = _TASK_LABEL.sub("", text, count=1)
    m = _NEXT_TASK.search("\n" + text)
    if m:
        text = ("\n" + text)[: m.start()]
    text = text.strip().strip('"“”').strip()
    return " ".join(text.split())


def judge_task(text: str, cfg: PromptsConfig, index: NearDuplicateIndex) -> tuple[str | None, float]:
    """(rejection reason or None, best ROUGE-L against kept prompts)."""
    if not text:
        return "empty", 0.0
    n_words = len(text.split())
    if n_words < cfg.min_words:
        return "too_short", 0.0
    if n_words > cfg.max_words:
        return "too_long", 0.0
    return index.check(text)


def read_prompt_file(path: Path, limit: int | None = None) -> list[PromptRecord]:
    """A prompt file: JSONL rows with `prompt` or `instruction` (and optional `id`)."""
    out: list[PromptRecord] = []
    seen: set[str] = set()
    for lineno, rec in read_jsonl(path):
        text = rec.get("prompt", rec.get("instruction"))
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{lineno}: needs a non-empty 'prompt' or 'instruction' field")
        pid = str(rec.get("id", f"file-{lineno:05d}"))
        if pid in seen:
            raise InputError(f"{path}:{lineno}: duplicate prompt id {pid!r}")
        seen.add(pid)
        out.append(
            PromptRecord(
                id=pid, prompt=text.strip(), source="file", provenance={"file": str(path), "line": lineno}
            )
        )
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise EmptyResultError(f"{path}: no prompts")
    return out


@dataclass
class Example:
    id: str
    text: str


def _few_shot(
    rng: random.Random, seed_examples: list[Example], generated: list[Example], cfg: PromptsConfig
) -> list[Example]:
    n_gen = min(cfg.few_shot_generated, len(generated)) if generated else 0
    n_seed = min(cfg.few_shot - n_gen, len(seed_examples))
    shots = rng.sample(seed_examples, n_seed) + rng.sample(generated, n_gen)
    rng.shuffle(shots)
    return shots


async def self_instruct(
    client: OpenAICompatClient,
    model: str,
    cfg: PromptsConfig,
    seed_examples: list[Example],
    earlier_generated: list[Example],
    out_dir: Path,
    t: int,
    run_seed: int,
    concurrency: int = 16,
    progress: Progress = NULL_PROGRESS,
    seeded: bool = True,
) -> dict[str, Any]:
    """Write iter-t prompts.jsonl (+ prompts.attempts.jsonl); return the stage counts.

    `seeded`: send a per-request sampling seed (RunConfig.request_seed decides).
    """
    if not seed_examples:
        raise EmptyResultError("self-instruct needs seed IFT prompts, and the seed has none")
    template = load_template(SELF_INSTRUCT_TEMPLATE, kind="self-instruct")
    index = NearDuplicateIndex(cfg.dedup_threshold)
    for ex in seed_examples + earlier_generated:
        index.add(ex.text)
    max_attempts = cfg.num_prompts * cfg.max_rounds
    reasons: Counter[str] = Counter()

    attempts = ResumableJsonl(out_dir / "prompts.attempts.jsonl", key=lambda r: str(r["attempt"]))
    prompts = ResumableJsonl(out_dir / "prompts.jsonl", key=lambda r: r["id"])
    try:
        # replay earlier attempts in order (the index must see them exactly as before)
        for a in range(len(attempts)):
            rec = attempts.records[str(a)]
            reasons[rec["status"]] += 1
            if rec["status"] == "accepted":
                index.add(rec["prompt"])
                if rec["id"] not in prompts:  # crashed between the two appends
                    prompts.append(_prompt_record(rec))
        task = progress.task(f"prompts (iter {t})", cfg.num_prompts, done=len(prompts))

        async def attempt(a: int) -> dict[str, Any]:
            rng = random.Random(derived_seed(run_seed, t, a, "few-shot"))
            shots = _few_shot(rng, seed_examples, earlier_generated, cfg)
            examples = "".join(f"Task {i}: {ex.text}\n" for i, ex in enumerate(shots, start=1))
            text = template.render(examples=examples, next_index=str(len(shots) + 1))
            sampling: dict[str, Any] = dict(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                stop=STOP,
                seed=derived_seed(run_seed, t, a, "sample") if seeded else None,
            )
            if cfg.request == "completion":  # the list continued as text: no chat template
                gen = await client.complete(model, text, **sampling)
            else:
                gen = await client.chat(model, [{"role": "user", "content": text}], **sampling)
            choice = gen.choices[0]
            return {
                "attempt": a,
                "raw": choice.text,
                "finish_reason": choice.finish_reason,
                "few_shot_ids": [ex.id for ex in shots],
                "model": model,
            }

        next_attempt = len(attempts)
        while len(prompts) < cfg.num_prompts and next_attempt < max_attempts:
            size = batch_size(cfg.num_prompts - len(prompts), reasons, concurrency)
            batch = range(next_attempt, min(max_attempts, next_attempt + size))
            results = await asyncio.gather(*(attempt(a) for a in batch))
            for rec in results:  # in attempt order: deterministic acceptance
                next_attempt = rec["attempt"] + 1
                if len(prompts) >= cfg.num_prompts:
                    rec["status"] = "not_needed"
                    attempts.append(rec)
                    continue
                text = extract_task(rec["raw"])
                reason, best = judge_task(text, cfg, index)
                rec.update(prompt=text, rouge_l_max=round(best, 4), status=reason or "accepted")
                reasons[rec["status"]] += 1
                if reason is None:
                    rec["id"] = f"t{t}-{rec['attempt']:05d}"
                    index.add(text)
                    attempts.append(rec)
                    prompts.append(_prompt_record(rec))
                    task.advance(1, attempts=next_attempt)
                else:
                    attempts.append(rec)
                    task.update(attempts=next_attempt)
        task.update(done=len(prompts), attempts=next_attempt)  # ends equal to the manifest's counts
        task.close()
        n = len(prompts)
    finally:
        attempts.close()
        prompts.close()
    if n == 0:
        top = ", ".join(f"{k}={v}" for k, v in reasons.most_common())
        raise EmptyResultError(
            f"self-instruct kept no prompt after {next_attempt} attempts (rejections: {top}); "
            "check the prompt model, prompts.min_words/max_words and prompts.dedup_threshold"
        )
    return {
        "prompts": n,
        "requested": cfg.num_prompts,
        "attempts": next_attempt,
        "rejected": {k: v for k, v in sorted(reasons.items()) if k not in ("accepted", "not_needed")},
        "short_of_target": max(0, cfg.num_prompts - n),
        "model": model,
    }


def _prompt_record(rec: dict[str, Any]) -> dict[str, Any]:
    return PromptRecord(
        id=rec["id"],
        prompt=rec["prompt"],
        source="self-instruct",
        provenance={
            "model": rec["model"],
            "attempt": rec["attempt"],
            "few_shot_ids": rec["few_shot_ids"],
            "rouge_l_max": rec["rouge_l_max"],
            "finish_reason": rec["finish_reason"],
        },
    ).model_dump()


def sample_seed_prompts(
    ift: list[IFTRecord], used: set[str], n: int, run_seed: int, t: int
) -> tuple[list[PromptRecord], bool]:
    """n prompts of the seed IFT split for iteration t (SPIN): a seeded sample of the records no
    earlier iteration used (`used`: their IFT ids); once those run out, a new pass over the split
    fills the rest. Returns the records and whether the split was exhausted."""
    rng = random.Random(derived_seed(run_seed, t, "seed-ift"))
    ordered = sorted(ift, key=lambda r: r.id)
    fresh = [r for r in ordered if r.id not in used]
    rng.shuffle(fresh)
    picked = fresh[:n]
    exhausted = len(picked) < n
    if exhausted:
        taken = {r.id for r in picked}
        rest = [r for r in ordered if r.id not in taken]
        rng.shuffle(rest)
        picked += rest[: n - len(picked)]
    records = [
        PromptRecord(id=f"ift-{r.id}", prompt=r.prompt, source="seed-ift", provenance={"ift_id": r.id})
        for r in picked
    ]
    return records, exhausted


class PromptsResult(StageResult):
    prompts: int
    source: str
    attempts: int | None = None
    rejected: dict[str, int] | None = None
    split_exhausted: bool | None = None

    def summary(self) -> str:
        return f"prompts={self.prompts} attempts={self.attempts} rejected={self.rejected or {}}"


async def run(ctx: StageContext) -> PromptsResult:
    cfg = ctx.config.prompts
    if cfg.source == "file":
        assert cfg.file is not None
        records = read_prompt_file(cfg.file, cfg.num_prompts)
        write_jsonl_atomic(ctx.file("prompts"), [r.model_dump() for r in records])
        return PromptsResult(prompts=len(records), source="file", file=str(cfg.file))
    ift = read_records(ctx.layout.seed_dir / "ift.jsonl", IFTRecord)
    if cfg.source == "seed-ift":
        used: set[str] = set()
        for tt in range(1, ctx.t):
            path = ctx.layout.stage_file(tt, "prompts")
            if path.is_file():
                used |= {str(r.provenance.get("ift_id")) for r in read_records(path, PromptRecord)}
        records, exhausted = sample_seed_prompts(ift, used, cfg.num_prompts, ctx.config.seed, ctx.t)
        if not records:
            raise EmptyResultError(f"{ctx.layout.seed_dir / 'ift.jsonl'}: the seed IFT split is empty")
        write_jsonl_atomic(ctx.file("prompts"), [r.model_dump() for r in records])
        return PromptsResult(prompts=len(records), source="seed-ift", split_exhausted=exhausted)
    seed_examples = [Example(r.id, r.prompt) for r in ift]
    earlier = []
    for tt in range(1, ctx.t):
        path = ctx.layout.stage_file(tt, "prompts")
        if path.is_file():
            earlier += [Example(r.id, r.prompt) for r in read_records(path, PromptRecord)]
    model = cfg.model or await ctx.served()
    counts = await self_instruct(
        ctx.policy,
        model,
        cfg,
        seed_examples,
        earlier,
        ctx.layout.iter_dir(ctx.t),
        ctx.t,
        ctx.config.seed,
        concurrency=ctx.config.services.concurrency,
        progress=ctx.progress,
        seeded=ctx.config.request_seed(0) is not None,
    )
    return PromptsResult(source="self-instruct", **counts)


STAGE = Stage(
    name="prompts",
    run=run,
    queue="generate",
    result=PromptsResult,
    description="new prompts by self-instruct with M(t), a prompt file, or the seed IFT split",
)
