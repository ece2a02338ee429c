"""Seed records as chat examples: the one definition the SFT trainer and the judge share.

- IFT: user = the instruction, assistant = the best human answer.
- EFT: user = the judge template (`builtin:yuan2024-additive`) filled with the instruction and
  a response; assistant = the justification, a newline, and `Score: N`, which is exactly the
  verdict form the judge parses.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from selfreward.prompts import JUDGE_TEMPLATE, load_template
from selfreward.schemas import EFTTrainRecord, IFTRecord

ChatMessages = list[dict[str, str]]

# a "Score:" label, with the markdown emphasis judges put around it ("**Score:**")
_SCORE_LABEL = re.compile(r"(?i)(?:\*{1,2}|_{1,2})?\bscore(?:\*{1,2}|_{1,2})?\s*:")


def _fields(record: BaseModel | dict[str, Any]) -> dict[str, Any]:
    return record.model_dump() if isinstance(record, BaseModel) else record


def judge_target(justification: str, score: int) -> str:
    """What a judge writes for a response: its justification, then `Score: N` on the last line."""
    justification = justification.strip()
    return f"{justification}\nScore: {score}" if justification else f"Score: {score}"


def justification_of(verdict: str) -> str:
    """A verdict without its score: the text before its last "Score:" label (the label that
    decides the score), stripped."""
    labels = list(_SCORE_LABEL.finditer(verdict))
    return (verdict[: labels[-1].start()] if labels else verdict).strip()


def ift_messages(record: IFTRecord | dict[str, Any]) -> ChatMessages:
    r = _fields(record)
    return [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]


def eft_messages(record: EFTTrainRecord | dict[str, Any], template: str = JUDGE_TEMPLATE) -> ChatMessages:
    r = _fields(record)
    user = load_template(template, kind="score").render(instruction=r["prompt"], response=r["response"])
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": judge_target(r["justification"], int(r["score"]))},
    ]
