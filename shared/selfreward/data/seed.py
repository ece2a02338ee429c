"""Seed data from OASST: IFT, EFT-train and EFT-eval files, a manifest, counts of what was dropped.

`prepare_seed(config, out_dir)` is the stage (the CLI's `selfreward data prepare` and the
coordinator both call it). Rules (docs/data.md has the user-facing version):

- Only first-turn prompts (tree roots) are used; later turns are counted, never prompts.
- A prompt is kept when it passes, in this order: role is `prompter`, not deleted, review not
  failed (`review_result` false; null or absent passes), not synthetic, non-empty text, `lang`
  in `languages`. Its first-level replies pass the same checks with role `assistant`; a reply
  without a rank is usable for neither file.
- Split: `selfreward.data.split` (a salted hash of the tree id). IFT and EFT-train come from
  train trees only, EFT-eval from eval trees only, so IFT and EFT-eval never share a tree.
- IFT: a kept train prompt and its rank-0 reply (when that reply passed the reply checks).
- EFT: a kept prompt with replies of two or more distinct human ranks. EFT-train has one row
  per reply with a score and justification (`selfreward.data.targets`); EFT-eval one row per
  prompt with every reply and its human rank.
- Records are ordered by the split hash of their tree (then rank), so outputs do not depend
  on the input's order or format, and a cap keeps a reproducible pseudo-random subset.
- Idempotent: a manifest whose key (input hash + settings + format version) matches and whose
  output hashes match means the stage is done; it is not run again.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from selfreward.config import DataConfig
from selfreward.data.oasst import (
    EXAMPLE_IDS,
    ROLES,
    Forest,
    Message,
    Source,
    build_forest,
    open_source,
    tree_id,
)
from selfreward.data.split import split_key
from selfreward.data.targets import (
    RANK_BOTTOM,
    RANK_TOP,
    EFTGroup,
    EFTReply,
    judge_filtered_targets,
    judge_verdicts,
    rank_score,
    rank_targets,
)
from selfreward.errors import ConfigError, EmptyResultError
from selfreward.judging.protocol import Judge
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.schemas import EFTEvalRecord, EFTTrainRecord, IFTRecord
from selfreward.storage import read_manifest, sha256_file, sha256_text, write_jsonl_atomic, write_manifest

FORMAT_VERSION = 1  # bump when the same input and settings would give different outputs
IFT_FILE, EFT_TRAIN_FILE, EFT_EVAL_FILE = "ift.jsonl", "eft_train.jsonl", "eft_eval.jsonl"
MANIFEST_FILE = "manifest.json"
VERDICTS_FILE = "eft_judgments.jsonl"
OUTPUT_FILES = (IFT_FILE, EFT_TRAIN_FILE, EFT_EVAL_FILE)

Unit = Literal["message", "prompt", "reply", "row"]


@dataclass(frozen=True)
class DropReason:
    key: str
    unit: Unit
    what: str


# every reason a row can be dropped for, in the order the checks run
CHECKS = ("role", "deleted", "review_failed", "synthetic", "empty_text", "lang")
_CHECK_WHAT = {
    "role": "role is not {role} (unknown roles included)",
    "deleted": "deleted",
    "review_failed": "review_result is false",
    "synthetic": "synthetic (model-written)",
    "empty_text": "empty text",
    "lang": "lang not in data.languages",
}
DROP_REASONS: tuple[DropReason, ...] = (
    DropReason("tree.orphaned", "message", "parent_id names no message (an orphan, or below one)"),
    DropReason("tree.in_cycle", "message", "on a cycle of parent_ids, or below one"),
    DropReason("tree.later_turn", "message", "below a first-level reply (later turns are not used)"),
    *(DropReason(f"prompt.{c}", "prompt", _CHECK_WHAT[c].format(role="prompter")) for c in CHECKS),
    *(DropReason(f"reply.{c}", "reply", _CHECK_WHAT[c].format(role="assistant")) for c in CHECKS),
    DropReason("reply.unranked", "reply", "no human rank"),
    DropReason("ift.no_rank0_reply", "prompt", "train prompt without a usable rank-0 reply"),
    DropReason("ift.over_max", "row", "beyond data.max_ift"),
    DropReason(
        "eft.fewer_than_2_ranks", "prompt", "fewer than two distinct human ranks among usable replies"
    ),
    DropReason("eft_train.judge_unparseable", "prompt", "a reply's verdict had no integer score 0-5"),
    DropReason("eft_train.judge_disagrees", "prompt", "judge scores disagree with the human ranking"),
    DropReason("eft_train.downsampled", "row", "most frequent judge score downsampled"),
    DropReason("eft_train.over_max", "row", "beyond data.max_eft_train"),
    DropReason("eft_eval.over_max", "prompt", "beyond data.max_eft_eval"),
)
REASONS = {r.key: r for r in DROP_REASONS}


class OutputInfo(BaseModel):
    records: int
    sha256: str


class SeedManifest(BaseModel):
    """`manifest.json` of a seed folder; its presence with matching hashes means the stage is done."""

    model_config = ConfigDict(extra="ignore")

    stage: Literal["seed"] = "seed"
    format_version: int
    key: str
    source: dict[str, Any]
    settings: dict[str, Any]
    split: dict[str, Any]
    eft_targets: dict[str, Any]
    counts: dict[str, int]
    dropped: dict[str, int]
    languages: dict[str, int]
    unknown_roles: dict[str, int]
    orphans: dict[str, Any]
    cycles: dict[str, Any]
    outputs: dict[str, OutputInfo]
    warnings: list[str] = []
    written_at: str | None = None
    reused: bool = Field(False, exclude=True)  # True when prepare_seed found this already done


# ------------------------------------------------------------------ checks


def failed_check(m: Message, role: str, languages: set[str]) -> str | None:
    """The first check the message fails (see CHECKS), or None when it passes them all."""
    if m.role != role:
        return "role"
    if m.deleted:
        return "deleted"
    if m.review_result is False:
        return "review_failed"
    if m.synthetic:
        return "synthetic"
    if not m.text.strip():
        return "empty_text"
    if m.lang not in languages:
        return "lang"
    return None


@dataclass
class _Prompt:
    """A kept first-turn prompt and its usable ranked replies (best first)."""

    root: Message
    tree: str
    key: float  # split hash
    eval: bool
    replies: list[Message]

    def sort_key(self) -> tuple[float, str, str]:
        return (self.key, self.tree, self.root.id)


def _settings(config: DataConfig) -> dict[str, Any]:
    """The settings that decide the outputs (eft_in_sft only matters to the trainer)."""
    settings = config.model_dump(mode="json", exclude={"eft_in_sft"})
    if config.eft_targets == "rank":
        settings.pop("eft_judge")
    return settings


def _stage_key(config: DataConfig, source_sha256: str, judge: Judge | None) -> str:
    body = {
        "format_version": FORMAT_VERSION,
        "source_sha256": source_sha256,
        "settings": _settings(config),
        "judge": judge.identity if judge is not None and config.eft_targets == "judge-filtered" else None,
    }
    return sha256_text(json.dumps(body, sort_keys=True))


def _done(out_dir: Path, key: str) -> SeedManifest | None:
    data = read_manifest(out_dir / MANIFEST_FILE)
    if data is None or data.get("key") != key:
        return None
    manifest = SeedManifest.model_validate(data)
    for name, info in manifest.outputs.items():
        path = out_dir / name
        if not path.is_file() or sha256_file(path) != info.sha256:
            return None
    manifest.reused = True
    return manifest


# ------------------------------------------------------------------ the stage


def prepare_seed(
    config: DataConfig,
    out_dir: Path,
    progress: Progress = NULL_PROGRESS,
    judge: Judge | None = None,
    judge_concurrency: int = 4,
    force: bool = False,
) -> SeedManifest:
    """Write ift.jsonl, eft_train.jsonl, eft_eval.jsonl and manifest.json into `out_dir`.

    `judge` (any `selfreward.judging.Judge`) is required when `config.eft_targets` is
    "judge-filtered" (`selfreward.data.eft_judge.eft_judge_for` builds it from the run config). Returns the manifest; `manifest.reused` is True when
    the folder already held this exact result (same input hash and settings) and nothing ran.
    Synchronous (one event loop of its own); `aprepare_seed` is the same inside a running loop.
    """
    return asyncio.run(aprepare_seed(config, out_dir, progress, judge, judge_concurrency, force))


async def aprepare_seed(
    config: DataConfig,
    out_dir: Path,
    progress: Progress = NULL_PROGRESS,
    judge: Judge | None = None,
    judge_concurrency: int = 4,
    force: bool = False,
) -> SeedManifest:
    """`prepare_seed` in the caller's event loop (the prepare stage's)."""
    out_dir = Path(out_dir)
    if config.eft_targets == "judge-filtered" and judge is None:
        raise ConfigError(
            [
                "data.eft_targets: 'judge-filtered' needs a judge (data.eft_judge="
                f"{config.eft_judge!r}); pass one to prepare_seed(judge=...) or use eft_targets 'rank'"
            ],
            "data",
        )
    opened = open_source(config.source)
    key = _stage_key(config, opened.sha256, judge)
    if not force:
        done = _done(out_dir, key)
        if done is not None:
            return done
    source = opened.read(progress)
    forest = build_forest(source.messages)
    return await _build(config, out_dir, source, forest, key, judge, judge_concurrency, progress)


async def _build(
    config: DataConfig,
    out_dir: Path,
    source: Source,
    forest: Forest,
    key: str,
    judge: Judge | None,
    judge_concurrency: int,
    progress: Progress,
) -> SeedManifest:
    languages = set(config.languages)
    dropped: Counter[str] = Counter()
    dropped["tree.orphaned"] = forest.orphaned
    dropped["tree.in_cycle"] = forest.in_cycles
    lang_counts = Counter(m.lang or "(none)" for m in source.messages)
    unknown_roles = Counter(m.role for m in source.messages if m.role not in ROLES)

    prompts: list[_Prompt] = []
    with progress.task("select prompts and replies", len(forest.roots)) as task:
        for root in forest.roots:
            for reply in root.children:
                dropped["tree.later_turn"] += _descendants(reply)
            task.advance(1)
            check = failed_check(root, "prompter", languages)
            if check is not None:
                dropped[f"prompt.{check}"] += 1
                continue
            usable: list[Message] = []
            for reply in root.children:
                check = failed_check(reply, "assistant", languages)
                if check is None and reply.rank is None:
                    check = "unranked"
                if check is not None:
                    dropped[f"reply.{check}"] += 1
                    continue
                usable.append(reply)
            usable.sort(key=lambda r: (r.rank, r.id))
            tid = tree_id(root)
            k = split_key(config.split_salt, tid)
            prompts.append(_Prompt(root, tid, k, k < config.eval_fraction, usable))
    prompts.sort(key=_Prompt.sort_key)
    train = [p for p in prompts if not p.eval]
    evals = [p for p in prompts if p.eval]

    # IFT
    ift: list[dict[str, Any]] = []
    for p in train:
        best = next((r for r in p.replies if r.rank == 0), None)
        if best is None:
            dropped["ift.no_rank0_reply"] += 1
            continue
        ift.append(
            IFTRecord(
                id=p.root.id,
                tree_id=p.tree,
                prompt=p.root.text,
                response=best.text,
                response_id=best.id,
                lang=p.root.lang or "",
            ).model_dump(mode="json")
        )
    if not ift:
        raise EmptyResultError(_why_no_ift(config, source, forest, dropped, len(prompts), len(train)))
    ift = _cap(ift, config.max_ift, "ift.over_max", dropped)

    # EFT groups
    def group(p: _Prompt) -> EFTGroup | None:
        if len({r.rank for r in p.replies}) < 2:
            dropped["eft.fewer_than_2_ranks"] += 1
            return None
        replies = tuple(EFTReply(r.id, r.text, r.rank) for r in p.replies if r.rank is not None)
        return EFTGroup(p.root.id, p.tree, p.root.text, replies)

    train_groups = [g for g in map(group, train) if g is not None]
    eval_groups = [g for g in map(group, evals) if g is not None]

    targets_info: dict[str, Any] = {"mode": config.eft_targets}
    if config.eft_targets == "rank":
        rows = [row for g in train_groups for row in rank_targets(g)]
        targets_info["mapping"] = (
            f"score = {RANK_TOP} - round_half_up({RANK_TOP - RANK_BOTTOM} * position / (k - 1)), "
            "position 0 = best of k distinct human ranks"
        )
        targets_info["examples"] = {f"k={k}": [rank_score(p, k) for p in range(k)] for k in range(2, 7)}
    else:
        assert judge is not None
        verdicts, new_calls = await judge_verdicts(
            train_groups, judge, out_dir / VERDICTS_FILE, judge_concurrency, progress
        )
        rows, stats = judge_filtered_targets(train_groups, verdicts.__getitem__, config.split_salt)
        dropped["eft_train.judge_unparseable"] = stats.groups_unparseable
        dropped["eft_train.judge_disagrees"] = stats.groups_disagree
        dropped["eft_train.downsampled"] = stats.rows_downsampled
        targets_info.update(
            judge=judge.identity,
            judge_backend=config.eft_judge,
            new_judge_calls=new_calls,
            verdicts_file=VERDICTS_FILE,
            **asdict(stats),
        )
    eft_train = [EFTTrainRecord.model_validate(r).model_dump(mode="json") for r in rows]
    eft_train = _cap(eft_train, config.max_eft_train, "eft_train.over_max", dropped)
    eft_eval = [
        EFTEvalRecord(
            id=g.id,
            tree_id=g.tree_id,
            prompt=g.prompt,
            replies=[{"message_id": r.id, "text": r.text, "rank": r.rank} for r in g.replies],
        ).model_dump(mode="json")
        for g in eval_groups
    ]
    eft_eval = _cap(eft_eval, config.max_eft_eval, "eft_eval.over_max", dropped)

    warnings = []
    if not eft_train:
        warnings.append("eft_train.jsonl is empty: M1 learns no judging from the seed data")
    if not eft_eval:
        warnings.append("eft_eval.jsonl is empty: the reward-model evaluation has no human ranks to use")

    outputs = {}
    for name, records in ((IFT_FILE, ift), (EFT_TRAIN_FILE, eft_train), (EFT_EVAL_FILE, eft_eval)):
        path = write_jsonl_atomic(out_dir / name, records)
        outputs[name] = OutputInfo(records=len(records), sha256=sha256_file(path))

    n_roots = len(forest.roots)
    manifest = SeedManifest(
        format_version=FORMAT_VERSION,
        key=key,
        source={
            "spec": source.spec,
            "description": source.description,
            "format": source.format,
            "sha256": source.sha256,
        },
        settings=_settings(config),
        split={
            "rule": "eval when int(sha256(f'{split_salt}:{tree_id}')[:16], 16) / 2**64 < eval_fraction",
            "split_salt": config.split_salt,
            "eval_fraction": config.eval_fraction,
            "train_trees": len({p.tree for p in train}),
            "eval_trees": len({p.tree for p in evals}),
        },
        eft_targets=targets_info,
        counts={
            "messages": forest.messages,
            "first_turn_prompts": n_roots,
            "prompts_kept": len(prompts),
            "prompts_train": len(train),
            "prompts_eval": len(evals),
            "ift": len(ift),
            "eft_train": len(eft_train),
            "eft_train_prompts": len({r["prompt_id"] for r in eft_train}),
            "eft_eval": len(eft_eval),
            "eft_eval_replies": sum(len(r["replies"]) for r in eft_eval),
        },
        dropped={r.key: dropped[r.key] for r in DROP_REASONS},
        languages=dict(sorted(lang_counts.items())),
        unknown_roles=dict(sorted(unknown_roles.items())),
        orphans={
            "messages": len(forest.orphans),
            "below_orphans": forest.orphaned - len(forest.orphans),
            "examples": sorted(forest.orphans)[:EXAMPLE_IDS],
        },
        cycles={
            "count": len(forest.cycles),
            "messages": forest.in_cycles,
            "examples": forest.cycles[:EXAMPLE_IDS],
        },
        outputs=outputs,
        warnings=warnings,
    )
    written = write_manifest(
        out_dir / MANIFEST_FILE, manifest.model_dump(mode="json", exclude={"written_at"})
    )
    manifest.written_at = json.loads(written.read_text(encoding="utf-8"))["written_at"]
    return manifest


def _descendants(m: Message) -> int:
    return sum(1 + _descendants(c) for c in m.children)


def _cap(
    records: list[dict[str, Any]], limit: int | None, reason: str, dropped: Counter[str]
) -> list[dict[str, Any]]:
    if limit is None or len(records) <= limit:
        return records
    dropped[reason] += len(records) - limit
    return records[:limit]


def _why_no_ift(
    config: DataConfig, source: Source, forest: Forest, dropped: Counter[str], kept: int, train: int
) -> str:
    head = f"no IFT rows from {source.description}: "
    if not forest.roots:
        return head + (
            f"the input has no first-turn prompts ({forest.messages} messages; {forest.orphaned} orphaned, "
            f"{forest.in_cycles} in cycles)"
        )
    remaining = len(forest.roots)
    for check in CHECKS:
        removed = dropped[f"prompt.{check}"]
        if removed and removed == remaining:
            detail = ""
            if check == "lang":
                seen = Counter(r.lang or "(none)" for r in forest.roots).most_common(5)
                detail = f" (data.languages={config.languages}; first-turn languages seen: {dict(seen)})"
            return (
                head
                + f"the prompt filter {check!r} removed all {removed} remaining first-turn prompts{detail}"
            )
        remaining -= removed
    if train == 0:
        return head + (
            f"all {kept} kept prompts fell in the eval split (data.eval_fraction={config.eval_fraction}, "
            f"data.split_salt={config.split_salt!r})"
        )
    reply_drops = {k: v for k, v in dropped.items() if k.startswith("reply.") and v}
    return head + (
        f"the filter 'rank-0 reply' removed all {train} train prompts: none has a rank-0 assistant reply "
        f"passing the reply checks (replies dropped: {reply_drops or 'none'})"
    )


def drop_table(manifest: SeedManifest) -> list[tuple[str, str, int, str]]:
    """(reason, unit, count, what) for every reason that dropped something."""
    return [
        (k, REASONS[k].unit, n, REASONS[k].what) for k, n in manifest.dropped.items() if n and k in REASONS
    ]
