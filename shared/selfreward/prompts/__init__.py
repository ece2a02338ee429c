"""Prompt templates: versioned text files with `{placeholder}` fields.

A template is named `builtin:<name>` (a file shipped in selfreward/prompts/templates) or is a
path to a user's file. Its version is the sha256 of its text: judge verdicts and caches
record it, so editing a template never reuses verdicts made with another text.

Placeholders are replaced literally (no str.format), so braces elsewhere in a template or in
the filled-in text are safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from selfreward.errors import ConfigError
from selfreward.storage import sha256_text

TEMPLATE_DIR = Path(__file__).parent / "templates"
PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")

JUDGE_TEMPLATE = "builtin:yuan2024-additive"
SELF_INSTRUCT_TEMPLATE = "builtin:self-instruct"
META_JUDGE_TEMPLATE = "builtin:meta-judge"  # Wu et al. 2024, Meta-Rewarding, Fig. 2

# the fields each kind of template must contain
REQUIRED_FIELDS: dict[str, set[str]] = {
    "score": {"instruction", "response"},
    "compare": {"instruction", "output_1", "output_2"},
    "self-instruct": {"examples", "next_index"},
    "meta": {"instruction", "response", "judgment_a", "judgment_b"},
}


@dataclass(frozen=True)
class Template:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return sha256_text(self.text)

    @property
    def version(self) -> str:
        """Short form of the hash, for names and logs."""
        return self.sha256[:12]

    @property
    def fields(self) -> set[str]:
        return set(PLACEHOLDER.findall(self.text))

    def render(self, **values: str) -> str:
        missing = self.fields - values.keys()
        if missing:
            raise ValueError(f"template {self.name}: no value for {sorted(missing)}")
        # one pass, so a value containing "{response}" is never substituted again
        return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), self.text)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


@lru_cache(maxsize=64)
def _load(spec: str) -> Template:
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        path = TEMPLATE_DIR / f"{name}.txt"
        if not path.is_file():
            raise ConfigError([f"unknown builtin template {spec!r}; builtins: {builtin_names()}"], "template")
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError([f"template file not found: {spec}"], "template")
    return Template(spec, path.read_text(encoding="utf-8").rstrip("\n"))


def load_template(spec: str, kind: str | None = None) -> Template:
    """Load a template; with `kind`, check it has the placeholders that kind needs."""
    template = _load(spec)
    if kind is not None:
        missing = REQUIRED_FIELDS[kind] - template.fields
        if missing:
            raise ConfigError(
                [f"template {spec!r} lacks the placeholder(s) {sorted('{' + m + '}' for m in missing)}"],
                "template",
            )
    return template
