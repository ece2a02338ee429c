"""Training examples in TRL's conversational formats, checked before any model is loaded.

SFT examples are prompt/completion pairs (`{"prompt": [user], "completion": [assistant]}`), so TRL
puts the loss on the completion tokens only. IFT records become instruction -> answer, EFT records
become judge prompt -> justification + `Score: N` (`selfreward.data.chat` is the one definition of
both). DPO examples are TRL's conversational prompt/chosen/rejected, read from pairs.jsonl.

Rules (docs/training.md):
- a malformed line or record is an error naming file:line and the field;
- a missing or empty input file, or nothing left after the skips, is an error;
- counted skips: a chosen equal to its rejected (`chosen_equals_rejected`), a blank prompt or
  answer (`empty_text`; for EFT records: a blank instruction or judged response), a prompt that leaves no room for a single completion token within
  `max_length` (`prompt_too_long`: TRL would drop it silently, we count it);
- completions cut by `max_length` are kept and counted as `truncated`;
- DPO pairs are also counted per `kind` (read, kept, skipped by reason), and a kind of which no
  example is left (a method's judge pairs all longer than `dpo.max_length`, say) is a warning in
  the log and the stage summary, not a silent loss.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfreward.errors import EmptyResultError, InputError
from selfreward.schemas import EFTTrainRecord, IFTRecord, PairRecord, parse_record
from selfreward.storage import read_jsonl, sha256_file, sha256_text

Messages = list[dict[str, str]]


@dataclass
class TrainingData:
    """The examples of one job plus what was read, skipped and truncated."""

    kind: str
    examples: list[dict[str, Any]]
    files: dict[str, str]  # path -> sha256
    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0  # tokens of the kept examples after truncation (prompt + completion(s))
    per_file: dict[str, int] = field(default_factory=dict)  # examples kept per input file
    # DPO: per pair kind (PairRecord.kind: actor, judge, demonstration, ...), read/kept/skipped
    read_by_kind: Counter[str] = field(default_factory=Counter)
    examples_by_kind: Counter[str] = field(default_factory=Counter)
    skipped_by_kind: dict[str, Counter[str]] = field(default_factory=dict)

    def skip(self, reason: str, kind: str | None = None) -> None:
        self.skipped[reason] += 1
        if kind is not None:
            self.skipped_by_kind.setdefault(kind, Counter())[reason] += 1

    def lost_kinds(self) -> list[str]:
        """Kinds of pairs that were read but of which no example is left (e.g. all too long)."""
        return sorted(k for k, n in self.read_by_kind.items() if n and not self.examples_by_kind[k])

    @property
    def sha256(self) -> str:
        """One hash of every input file (order-independent)."""
        return sha256_text("\n".join(f"{Path(p).name}:{h}" for p, h in sorted(self.files.items())))

    def summary(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "sha256": self.sha256,
            "read": self.read,
            "examples": len(self.examples),
            "per_file": self.per_file,
            "skipped": dict(sorted(self.skipped.items())),
            "truncated": self.truncated,
            "tokens": self.tokens,
            **(
                {
                    "by_kind": {
                        kind: {
                            "read": self.read_by_kind[kind],
                            "examples": self.examples_by_kind[kind],
                            "skipped": dict(sorted(self.skipped_by_kind.get(kind, Counter()).items())),
                        }
                        for kind in sorted(self.read_by_kind)
                    }
                }
                if self.read_by_kind
                else {}
            ),
        }


def _chat_ids(tokenizer: Any, messages: Messages, *, generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _check_chat_template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{where}: the tokenizer has no chat template; set model.chat_template or prepare the base "
            "model with one"
        )


class _Lengths:
    """Token lengths as TRL computes them (prompt with the generation prompt, then prompt + answer)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def prompt(self, prompt: Messages) -> int:
        return len(_chat_ids(self.tokenizer, prompt, generation_prompt=True))

    def full(self, prompt: Messages, completion: Messages) -> int:
        return len(_chat_ids(self.tokenizer, prompt + completion, generation_prompt=False))


def _blank(messages: Messages) -> bool:
    return not messages or any(not m["content"].strip() for m in messages)


def load_sft_data(files: list[Path], tokenizer: Any, max_length: int, judge_template: str) -> TrainingData:
    """ift.jsonl (and eft_train.jsonl) -> prompt/completion examples."""
    from selfreward.data.chat import eft_messages, ift_messages

    _check_chat_template(tokenizer, "SFT")
    lengths = _Lengths(tokenizer, max_length)
    data = TrainingData("sft", [], {str(f): sha256_file(f) for f in files})
    for path in files:
        eft = path.name == "eft_train.jsonl"  # the seed folder's names (sft_request)
        schema = EFTTrainRecord if eft else IFTRecord
        kept = 0
        for lineno, raw in read_jsonl(path):
            record = parse_record(schema, raw, f"{path}:{lineno}")
            data.read += 1
            if not record.prompt.strip() or not record.response.strip():
                data.skip("empty_text")
                continue
            messages = eft_messages(record, judge_template) if eft else ift_messages(record)
            prompt, completion = messages[:-1], messages[-1:]
            n_prompt = lengths.prompt(prompt)
            if n_prompt >= max_length:
                data.skip("prompt_too_long")
                continue
            n_full = lengths.full(prompt, completion)
            if n_full > max_length:
                data.truncated += 1
            data.tokens += min(n_full, max_length)
            data.examples.append({"prompt": prompt, "completion": completion})
            kept += 1
        data.per_file[str(path)] = kept
    _check_not_empty(data, files)
    return data


def load_dpo_data(pairs: Path, tokenizer: Any, max_length: int) -> TrainingData:
    """pairs.jsonl (`PairRecord`) -> TRL conversational prompt/chosen/rejected examples."""
    _check_chat_template(tokenizer, "DPO")
    lengths = _Lengths(tokenizer, max_length)
    data = TrainingData("dpo", [], {str(pairs): sha256_file(pairs)})
    for lineno, raw in read_jsonl(pairs):
        where = f"{pairs}:{lineno}"
        pair = parse_record(PairRecord, raw, where)
        data.read += 1
        kind = pair.kind or "unlabelled"
        data.read_by_kind[kind] += 1
        prompt = [m.model_dump() for m in pair.prompt]
        chosen = [m.model_dump() for m in pair.chosen]
        rejected = [m.model_dump() for m in pair.rejected]
        _check_pair_roles(prompt, chosen, rejected, where)
        if _blank(prompt) or _blank(chosen) or _blank(rejected):
            data.skip("empty_text", kind)
            continue
        if chosen == rejected:
            data.skip("chosen_equals_rejected", kind)
            continue
        if lengths.prompt(prompt) >= max_length:
            data.skip("prompt_too_long", kind)
            continue
        n_chosen, n_rejected = lengths.full(prompt, chosen), lengths.full(prompt, rejected)
        if max(n_chosen, n_rejected) > max_length:
            data.truncated += 1
        data.tokens += min(n_chosen, max_length) + min(n_rejected, max_length)
        data.examples.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        data.examples_by_kind[kind] += 1
    data.per_file[str(pairs)] = len(data.examples)
    _check_not_empty(data, [pairs])
    return data


def _check_pair_roles(prompt: Messages, chosen: Messages, rejected: Messages, where: str) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        raise InputError(f"{where}: field 'prompt': must be a non-empty conversation ending with a user turn")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or any(m["role"] != "assistant" for m in turns):
            raise InputError(f"{where}: field {name!r}: must be one or more assistant turns")


def _check_not_empty(data: TrainingData, files: list[Path]) -> None:
    names = ", ".join(str(f) for f in files)
    if data.read == 0:
        raise InputError(f"{names}: no records (empty input)")
    if not data.examples:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(data.skipped.items()))
        raise EmptyResultError(
            f"{names}: all {data.read} records were skipped ({reasons}); nothing to train on"
        )
