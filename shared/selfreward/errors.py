"""Errors users see. Each names the record, field, file or setting at fault.

The CLI prints a `SelfRewardError` as one line (no traceback) and exits with status 2;
the HTTP services map them to 4xx/5xx bodies with the same message.
"""

from __future__ import annotations

import re


class SelfRewardError(Exception):
    """Base class of every error meant for a user, not a developer."""


class ConfigError(SelfRewardError):
    """A configuration value is missing, unknown or invalid."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} invalid setting(s):\n{lines}")


class InputError(SelfRewardError):
    """An input file or record is malformed (the message names file:line or the record id)."""


class EmptyResultError(SelfRewardError):
    """A stage produced nothing; the message says which filter removed everything."""


class ServiceError(SelfRewardError):
    """A service could not be reached or answered with an error."""


class StageError(SelfRewardError):
    """A stage of the loop failed; carries the stage name."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"stage {stage!r} failed: {message}")


# the record an error message names: "path/file.jsonl:12", or "record 'p:3'"
_RECORD = re.compile(r"(\S+\.jsonl?:\d+)|record '([^']+)'|record ([\w:.\-]+)")


def named_record(message: str) -> str | None:
    """The record an error message names ("path/file.jsonl:12", "record 'p:3'"), else None."""
    found = _RECORD.search(message)
    return next((g for g in found.groups() if g), None) if found else None
