"""Human-labelled preference sets for the judge benchmark, in their published formats.

A set is read from a local file (a JSON list or JSONL), a folder of such files (LLMBar's
`Natural/` and `Adversarial/*/` folders: the subset is the file's folder), or `hf:<repo>`
(`hf:<repo>[@<config>][:<split>]`, through `datasets`). Formats (`detect_format` reads the
keys of the first record that is an object; `--format` overrides):

- `llmbar`: `{input, output_1, output_2, label}`, label 1 or 2 (Zeng et al. 2024);
- `pandalm`: `{instruction, input, response1, response2, annotator1..3}`, labels 0 (tie), 1, 2;
  the human label is the majority of the three (no majority: `no_majority`; a tie majority:
  `human_tie`); the instruction is `instruction` followed by `input` when that is not blank;
- `rewardbench`: `{prompt, chosen, rejected, subset}`: chosen is the human-preferred response A;
- `mtbench`: MT-bench human judgments `{question_id, model_a, model_b, winner, conversation_a,
  conversation_b, turn}`; winner `model_a | model_b | tie | tie (bothbad)`; turn 1 only (the judge
  compares two answers to one instruction; second-turn answers follow different first answers):
  other turns are `other_turn`;
- `generic`: `{instruction, response_a, response_b, label}` with label `a`, `b` or `tie`, optional
  `subset` and `id`.

Every record is either an item to judge or counted under one named reason (`excluded`):
`invalid_record` (a missing field, a field of the wrong type or an unknown label: each listed in
`problems` with its index and field), `human_tie`, `no_majority`, `other_turn`,
`identical_responses` (A and B are the same text: nothing to judge). Labels given as numeric
strings or floats ("1", 1.0), and texts given as numbers (an answer `144` that a JSON reader
decoded), are accepted and counted in `coerced` per field.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from selfreward.errors import ConfigError, InputError

Label = Literal["a", "b"]
FORMATS = ("llmbar", "pandalm", "rewardbench", "mtbench", "generic")
MAX_PROBLEMS = 50  # problems listed in full; all are counted

# RewardBench's sections and weights (allenai/reward-bench, rewardbench/constants.py
# SUBSET_MAPPING and EXAMPLE_COUNTS): a section's score is the mean of its subsets' accuracies
# weighted by the full set's item counts, math-prm counted as 984 (its 447 items upweighted to
# equal the six hep-* code subsets together), as the leaderboard computes it.
REWARDBENCH_SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
REWARDBENCH_WEIGHTS: dict[str, int] = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "math-prm": 984,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}


@dataclass(frozen=True)
class BenchItem:
    """One judgeable item: the human prefers `human` of response_a / response_b."""

    id: str
    instruction: str
    response_a: str
    response_b: str
    human: Label
    subset: str | None = None


@dataclass
class BenchSet:
    name: str
    source: str
    format: str
    items: list[BenchItem] = field(default_factory=list)
    records: int = 0  # records read, whatever became of them
    excluded: Counter[str] = field(default_factory=Counter)
    problems: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_PROBLEMS
    coerced: Counter[str] = field(default_factory=Counter)

    def problem(self, index: str, field_name: str, error: str) -> None:
        self.excluded["invalid_record"] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append({"index": index, "field": field_name, "error": error})

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "format": self.format,
            "records": self.records,
            "items": len(self.items),
            "excluded": dict(sorted(self.excluded.items())),
            "problems": self.problems,
            "problems_listed": len(self.problems),
            "coerced": dict(sorted(self.coerced.items())),
            "subsets": dict(sorted(Counter(i.subset or "all" for i in self.items).items())),
        }


class _Bad(Exception):
    def __init__(self, field_name: str, error: str) -> None:
        super().__init__(error)
        self.field = field_name
        self.error = error


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _text(raw: Mapping[str, Any], name: str, coerced: Counter[str] | None = None) -> str:
    """A text field; with `coerced`, a number (e.g. an answer "144" that a JSON reader such as
    `datasets` decoded into an int) is taken as its text and counted there."""
    if name not in raw or raw[name] is None:
        raise _Bad(name, "missing")
    value = raw[name]
    if coerced is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        coerced[name] += 1
        return str(value)
    if not isinstance(value, str):
        raise _Bad(name, f"must be a string, got {type(value).__name__}")
    return value


def _int_label(raw: Mapping[str, Any], name: str, allowed: tuple[int, ...], coerced: Counter[str]) -> int:
    if name not in raw or raw[name] is None:
        raise _Bad(name, "missing")
    value = raw[name]
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value.strip())
    if number is None or number not in allowed:
        raise _Bad(name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
    if not isinstance(value, int):
        coerced[name] += 1
    return number


# ---------------------------------------------------------------- one parser per format
# Each returns (instruction, response_a, response_b, human label, subset) or raises _Bad/_Skip.

Parsed = tuple[str, str, str, Label, str | None]


def _llmbar(raw: Mapping[str, Any], coerced: Counter[str]) -> Parsed:
    instruction, a, b = (
        _text(raw, "input", coerced),
        _text(raw, "output_1", coerced),
        _text(raw, "output_2", coerced),
    )
    label = _int_label(raw, "label", (1, 2), coerced)
    return instruction, a, b, "a" if label == 1 else "b", None


def _pandalm(raw: Mapping[str, Any], coerced: Counter[str]) -> Parsed:
    instruction = _text(raw, "instruction", coerced)
    extra = raw.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _Bad("input", f"must be a string, got {type(extra).__name__}")
    if extra and extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    a, b = _text(raw, "response1", coerced), _text(raw, "response2", coerced)
    votes = Counter(_int_label(raw, f"annotator{i}", (0, 1, 2), coerced) for i in (1, 2, 3))
    label, count = votes.most_common(1)[0]
    if count < 2:
        raise _Skip("no_majority")
    if label == 0:
        raise _Skip("human_tie")
    return instruction, a, b, "a" if label == 1 else "b", None


def _rewardbench(raw: Mapping[str, Any], coerced: Counter[str]) -> Parsed:
    prompt, chosen, rejected = (
        _text(raw, "prompt", coerced),
        _text(raw, "chosen", coerced),
        _text(raw, "rejected", coerced),
    )
    subset = raw.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise _Bad("subset", f"must be a string, got {type(subset).__name__}")
    return prompt, chosen, rejected, "a", subset


def _turn(conversation: Any, name: str, turn: int) -> tuple[str, str]:
    if not isinstance(conversation, list):
        raise _Bad(name, f"must be a list of messages, got {type(conversation).__name__}")
    if len(conversation) < 2 * turn:
        raise _Bad(name, f"has {len(conversation)} messages, turn {turn} needs {2 * turn}")
    pair = conversation[2 * turn - 2 : 2 * turn]
    for i, (message, role) in enumerate(zip(pair, ("user", "assistant"), strict=True)):
        if not isinstance(message, Mapping) or message.get("role") != role:
            raise _Bad(name, f"message {2 * turn - 2 + i} must be a {role} message")
        if not isinstance(message.get("content"), str):
            raise _Bad(name, f"message {2 * turn - 2 + i}: content must be a string")
    return pair[0]["content"], pair[1]["content"]


MTBENCH_WINNERS = {"model_a": "a", "model_b": "b", "tie": None, "tie (bothbad)": None}


def _mtbench(raw: Mapping[str, Any], coerced: Counter[str]) -> Parsed:
    turn = _int_label(raw, "turn", (1, 2), coerced) if "turn" in raw else 1
    winner = _text(raw, "winner")
    if winner not in MTBENCH_WINNERS:
        raise _Bad("winner", f"must be one of {', '.join(MTBENCH_WINNERS)}, got {winner!r}")
    question, a = _turn(raw.get("conversation_a"), "conversation_a", 1)
    question_b, b = _turn(raw.get("conversation_b"), "conversation_b", 1)
    if question_b != question:
        raise _Bad("conversation_b", "asks another question than conversation_a")
    if turn != 1:
        raise _Skip("other_turn")
    label = MTBENCH_WINNERS[winner]
    if label is None:
        raise _Skip("human_tie")
    category = raw.get("category")
    return question, a, b, "a" if label == "a" else "b", category if isinstance(category, str) else None


def _generic(raw: Mapping[str, Any], coerced: Counter[str]) -> Parsed:
    instruction, a, b = (
        _text(raw, "instruction", coerced),
        _text(raw, "response_a", coerced),
        _text(raw, "response_b", coerced),
    )
    label = _text(raw, "label").strip().lower()
    if label not in ("a", "b", "tie"):
        raise _Bad("label", f"must be a, b or tie, got {raw['label']!r}")
    if label != raw["label"]:
        coerced["label"] += 1
    if label == "tie":
        raise _Skip("human_tie")
    subset = raw.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise _Bad("subset", f"must be a string, got {type(subset).__name__}")
    return instruction, a, b, "a" if label == "a" else "b", subset


PARSERS: dict[str, Callable[[Mapping[str, Any], Counter[str]], Parsed]] = {
    "llmbar": _llmbar,
    "pandalm": _pandalm,
    "rewardbench": _rewardbench,
    "mtbench": _mtbench,
    "generic": _generic,
}

# the keys that tell a format (all present in its records)
SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("mtbench", frozenset({"conversation_a", "conversation_b", "winner"})),
    ("pandalm", frozenset({"response1", "response2", "annotator1"})),
    ("llmbar", frozenset({"output_1", "output_2", "label"})),
    ("rewardbench", frozenset({"prompt", "chosen", "rejected"})),
    ("generic", frozenset({"response_a", "response_b", "label"})),
)


def detect_format(records: Iterable[Any], source: str) -> str:
    """The format whose keys the first object record has (see SIGNATURES)."""
    for raw in records:
        if isinstance(raw, Mapping):
            keys = set(raw)
            for name, signature in SIGNATURES:
                if signature <= keys:
                    return name
            raise InputError(
                f"{source}: cannot tell the format from the first record's keys ({', '.join(sorted(keys)[:12])}); "
                f"pass --format (one of {', '.join(FORMATS)})"
            )
    raise InputError(f"{source}: no records")


# ---------------------------------------------------------------- reading


def _read_file(path: Path) -> list[Any]:
    """A JSON list (or an object holding one list) or JSONL; records keep their order."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return list(data)
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if lineno == 1 and stripped.startswith("{"):
                try:  # one JSON object holding the list (e.g. {"data": [...]})
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    pass
                else:
                    lists = (
                        [v for v in whole.values() if isinstance(v, list)] if isinstance(whole, dict) else []
                    )
                    if len(lists) == 1:
                        return list(lists[0])
            records.append(_Unreadable(f"line {lineno}: not valid JSON ({exc.msg})"))
    return records


@dataclass(frozen=True)
class _Unreadable:
    error: str


def _path_subset(path: Path, relative: Path | None) -> str | None:
    """The subset a file's place names: LLMBar's `Natural` or `Adversarial/<name>` anywhere in its
    path, else (in a folder of files) its folder or name relative to that folder."""
    parts = list(path.resolve().parent.parts)
    for anchor in ("Natural", "Adversarial"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) - 1 :])
    if relative is None:
        return None
    return relative.parent.as_posix() if relative.parent != Path(".") else relative.stem


def _hf_records(spec: str) -> tuple[list[Any], str]:
    """`hf:<repo>[@<config>][:<split>]` through `datasets` (a hub repo or a local dataset folder)."""
    target = spec.removeprefix("hf:")
    split: str | None = None
    if ":" in target and not Path(target).exists():
        target, split = target.rsplit(":", 1)
    config: str | None = None
    if "@" in target:
        target, config = target.split("@", 1)
    try:
        import datasets
    except ImportError:
        raise ConfigError([f"{spec}: reading hf: sets needs the `datasets` package"], "bench") from None
    try:
        loaded = datasets.load_dataset(target, config)
    except Exception as exc:
        raise InputError(f"{spec}: cannot load the dataset ({type(exc).__name__}: {exc})") from None
    splits = list(loaded)
    if split is None:
        if len(splits) != 1:
            raise InputError(
                f"{spec}: the dataset has splits {', '.join(splits)}: name one (hf:{target}:<split>)"
            )
        split = splits[0]
    if split not in loaded:
        raise InputError(f"{spec}: no split {split!r} (splits: {', '.join(splits)})")
    return [dict(row) for row in loaded[split]], split


def load_bench_set(source: str | Path, fmt: str | None = None, name: str | None = None) -> BenchSet:
    """Read a set (see the module docstring): every record an item or a counted reason."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError([f"format {fmt!r}: must be one of {', '.join(FORMATS)}"], "format")
    spec = str(source)
    chunks: list[tuple[str, list[Any], str | None]] = []  # (id prefix, records, subset from the path)
    if spec.startswith("hf:"):
        records, split = _hf_records(spec)
        chunks.append(("", records, None))
        default_name = spec.removeprefix("hf:").split(":")[0].replace("/", "-") + f"-{split}"
    else:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
            if not files:
                raise InputError(f"{path}: no .json or .jsonl files in this folder")
            for f in files:
                rel = f.relative_to(path)
                chunks.append((f"{rel.as_posix()}:", _read_file(f), _path_subset(f, rel)))
        elif path.is_file():
            chunks.append(("", _read_file(path), _path_subset(path, None)))
        else:
            raise InputError(f"{path}: no such file or folder")
        default_name = path.stem if path.is_file() else path.name
    first = (r for _, records, _ in chunks for r in records)
    fmt = fmt or detect_format(first, spec)
    bench = BenchSet(name or default_name, spec, fmt)
    parse = PARSERS[fmt]
    for prefix, records, path_subset in chunks:
        for index, raw in enumerate(records):
            bench.records += 1
            rid = f"{prefix}{index}"
            if isinstance(raw, _Unreadable):
                bench.problem(rid, "(record)", raw.error)
                continue
            if not isinstance(raw, Mapping):
                bench.problem(rid, "(record)", f"must be an object, got {type(raw).__name__}")
                continue
            try:
                instruction, a, b, human, subset = parse(raw, bench.coerced)
            except _Bad as bad:
                bench.problem(rid, bad.field, bad.error)
                continue
            except _Skip as skip:
                bench.excluded[skip.reason] += 1
                continue
            if a.strip() == b.strip():
                bench.excluded["identical_responses"] += 1
                continue
            if not instruction.strip():
                bench.problem(rid, "instruction", "blank")
                continue
            subset = subset or (path_subset if fmt == "llmbar" or len(chunks) > 1 else None)
            bench.items.append(BenchItem(rid, instruction, a, b, human, subset))
    return bench


def rewardbench_sections(per_subset: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """RewardBench's section scores from per-subset {"accuracy", "n"}: the REWARDBENCH_WEIGHTS-
    weighted mean over the section's subsets that were measured (a section none of whose subsets
    was measured is left out)."""
    sections: dict[str, dict[str, Any]] = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [s for s in subsets if (per_subset.get(s) or {}).get("accuracy") is not None]
        if not present:
            continue
        weight = sum(REWARDBENCH_WEIGHTS[s] for s in present)
        score = sum(float(per_subset[s]["accuracy"]) * REWARDBENCH_WEIGHTS[s] for s in present) / weight
        sections[section] = {
            "accuracy": score,
            "subsets": present,
            "n": sum(int(per_subset[s]["n"]) for s in present),
            "complete": len(present) == len(subsets),
        }
    return sections
