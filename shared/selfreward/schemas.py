"""Record formats of the artifact store (one JSON object per JSONL line).

Seed data (written by `selfreward data prepare`, docs/data.md):
    ift.jsonl        IFTRecord       instruction -> best human answer
    eft_train.jsonl  EFTTrainRecord  instruction + answer -> justification + "Score: N"
    eft_eval.jsonl   EFTEvalRecord   instruction + every ranked answer (human ranks)

One iteration (docs/architecture.md):
    prompts.jsonl    PromptRecord
    candidates.jsonl CandidateRecord   key: "<prompt_id>:<index>"
    judgments.jsonl  JudgmentRecord    key: candidate id
    pairs.jsonl      PairRecord        TRL's conversational prompt/chosen/rejected + scores
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfreward.errors import InputError
from selfreward.storage import read_jsonl


class Record(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


# ------------------------------------------------------------------ seed


class IFTRecord(Record):
    id: str
    tree_id: str
    prompt: str
    response: str
    response_id: str | None = None
    lang: str = "en"


class EFTTrainRecord(Record):
    id: str
    tree_id: str
    prompt_id: str | None = None  # the instruction's message id (rows of one prompt share it)
    prompt: str
    response: str
    response_id: str | None = None
    human_rank: int | None = None
    n_ranked: int | None = None
    score: int = Field(ge=0, le=5)
    justification: str
    targets: Literal["rank", "judge-filtered"] = "rank"


class RankedReply(BaseModel):
    model_config = ConfigDict(extra="allow")
    message_id: str
    text: str
    rank: int


class EFTEvalRecord(Record):
    id: str
    tree_id: str
    prompt: str
    replies: list[RankedReply]


# ------------------------------------------------------------------ loop


class PromptRecord(Record):
    id: str
    prompt: str
    source: Literal["self-instruct", "file", "ift", "seed-ift"] = "self-instruct"
    provenance: dict[str, Any] = {}


class CandidateRecord(Record):
    id: str  # "<prompt_id>:<index>"
    prompt_id: str
    prompt: str
    index: int
    text: str
    model: str
    finish_reason: str | None = None
    teacher: bool = False  # teacher-demo: the teacher's answer
    anchor: bool = False  # temporal: an answer of the fixed anchor model (indices n..2n-1)


class Verdict(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str
    score: float | None = None  # None: unparseable, see failure
    failure: str | None = None  # e.g. "unparseable", "truncated", "backend_error: ..."


class JudgmentRecord(Record):
    id: str  # candidate id
    prompt_id: str
    index: int
    judge: str
    template_sha256: str
    mode: Literal["sample", "logprob"]
    verdicts: list[Verdict]
    score: float | None  # mean of parsed scores; None when every verdict failed
    failures: int = 0
    truncated: bool = False


class PairRecord(Record):
    prompt_id: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    chosen_score: float | None = None
    rejected_score: float | None = None
    chosen_id: str | None = None
    rejected_id: str | None = None
    kind: str | None = None  # actor, demonstration, judge, ... (the method's kinds of pairs)


def candidate_id(prompt_id: str, index: int) -> str:
    return f"{prompt_id}:{index}"


R = TypeVar("R", bound=BaseModel)


def parse_record(model: type[R], record: dict[str, Any], where: str) -> R:
    """Validate one record; errors name the place (file:line or id) and the field."""
    try:
        return model.model_validate(record)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "(record)"
        rid = record.get("id") or record.get("prompt_id") or record.get("message_id")
        ident = f" (record {rid})" if rid else ""
        more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise InputError(f"{where}{ident}: field {field!r}: {e['msg']}{more}") from None


def read_records(path: str | Path, model: type[R]) -> list[R]:
    return [parse_record(model, rec, f"{path}:{lineno}") for lineno, rec in read_jsonl(path)]
