"""Evaluation prompt sets.

Specs (`eval.prompts`, `--prompts`):
- `ift-eval`: the run's held-out seed prompts, i.e. the prompts of `seed/eft_eval.jsonl`
  (IFT is a training split only; the eval split's trees are never trained on);
- `alpaca_eval:<file>`: AlpacaEval's JSON list (`instruction`, `dataset`, ...), e.g. the
  805-instruction reference outputs file;
- `mt_bench:<file>`: MT-bench `question.jsonl`, first turn of each question;
- `builtin:everyday`: 48 everyday instructions shipped with the package (written for selfreward:
  writing, advice, explanation, lists, short reasoning, coding; 8 each, the category is the
  `dataset`): a held-out set that needs no download, the quickstart's;
- `<file>`: any JSONL (or JSON list) of records with `instruction` or `prompt` (and an
  optional `id`).

`max_prompts` keeps a seeded random subset (in file order), the same for every model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from selfreward.errors import ConfigError, InputError
from selfreward.evaluation.metrics.alpaca import read_json_records
from selfreward.storage import read_jsonl

T = TypeVar("T")
BUILTIN_DIR = Path(__file__).parent / "prompt_data"


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    instruction: str
    dataset: str


def _text(rec: dict[str, Any], where: str, *fields: str) -> str:
    for name in fields:
        value = rec.get(name)
        if isinstance(value, str) and value.strip():
            return value
    raise InputError(f"{where}: needs a non-empty string field {' or '.join(repr(f) for f in fields)}")


def _ift_eval(seed_dir: Path | None) -> list[EvalPrompt]:
    if seed_dir is None:
        raise ConfigError(["eval.prompts 'ift-eval' needs a run (its seed/eft_eval.jsonl)"], "eval.prompts")
    path = seed_dir / "eft_eval.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: not found; prepare the run's seed data first (eval.prompts: ift-eval)")
    return [
        EvalPrompt(str(rec.get("id") or f"line-{n}"), _text(rec, f"{path}:{n}", "prompt"), "ift-eval")
        for n, rec in read_jsonl(path)
    ]


def _alpaca(path: Path) -> list[EvalPrompt]:
    return [
        EvalPrompt(f"alpaca-{i}", _text(rec, where, "instruction"), str(rec.get("dataset", "alpaca_eval")))
        for i, (where, rec) in enumerate(read_json_records(path))
    ]


def _mt_bench(path: Path) -> list[EvalPrompt]:
    out = []
    for where, rec in read_json_records(path):
        turns = rec.get("turns")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise InputError(f"{where}: field 'turns' must be a non-empty list of strings")
        qid = rec.get("question_id")
        if qid is None:
            raise InputError(f"{where}: field 'question_id' is missing")
        out.append(EvalPrompt(f"mt-{qid}", turns[0], f"mt_bench:{rec.get('category', '')}"))
    return out


def _generic(path: Path) -> list[EvalPrompt]:
    return [
        EvalPrompt(
            str(rec["id"]) if rec.get("id") is not None else f"line-{i}",
            _text(rec, where, "instruction", "prompt"),
            str(rec.get("dataset", path.stem)),
        )
        for i, (where, rec) in enumerate(read_json_records(path))
    ]


def load_prompt_set(
    spec: str, *, seed_dir: Path | None = None, max_prompts: int | None = None, seed: int = 0
) -> list[EvalPrompt]:
    """Load an evaluation prompt set (see the module docstring); ids are unique."""
    if spec == "ift-eval":
        prompts = _ift_eval(seed_dir)
    elif spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        path = BUILTIN_DIR / f"{name}.jsonl"
        if not path.is_file():
            known = ", ".join(f"builtin:{p.stem}" for p in sorted(BUILTIN_DIR.glob("*.jsonl")))
            raise ConfigError([f"eval prompts {spec!r}: no such built-in set ({known})"], "eval.prompts")
        prompts = _generic(path)
    elif spec.startswith("alpaca_eval:"):
        prompts = _alpaca(Path(spec.removeprefix("alpaca_eval:")))
    elif spec.startswith("mt_bench:"):
        prompts = _mt_bench(Path(spec.removeprefix("mt_bench:")))
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                [
                    f"eval prompts {spec!r}: expected ift-eval, builtin:everyday, alpaca_eval:<file>, "
                    "mt_bench:<file> or a file"
                ],
                "eval.prompts",
            )
        prompts = _generic(path)
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise InputError(f"{spec}: duplicate prompt id {p.id!r}")
        seen.add(p.id)
    if not prompts:
        raise InputError(f"{spec}: no prompts")
    return seeded_subset(prompts, max_prompts, seed)


def seeded_subset(items: Sequence[T], max_items: int | None, seed: int) -> list[T]:
    """At most `max_items` items: a seeded random subset kept in the original order."""
    if max_items is None or len(items) <= max_items:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), max_items))
    return [items[i] for i in keep]
