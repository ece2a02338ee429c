"""AlpacaEval: outputs in AlpacaEval's format, win rate against reference outputs, and a
length-controlled win rate.

Format: a JSON list of `{"instruction", "output", "generator", "dataset"}` records, what
the official `alpaca_eval` tool reads (`alpaca_eval --model_outputs model_outputs.json`).

Win rate (`alpaca_win_rate`): one preference per instruction, p = 1 when the model's output
is preferred to the reference output, 0 when the reference's is, 0.5 for a tie; identical
outputs count half without being judged. Win rate = mean(p); standard error = sample
standard deviation of p (ddof=1) / sqrt(n), as AlpacaEval reports it.

Length-controlled win rate (`length_controlled_win_rate`): OUR IMPLEMENTATION of the idea of
Dubois et al. (2024), not the official numbers. A logistic regression of the preference
   logit P(model preferred) = theta + phi * tanh(d / sd(d)) [+ psi * difficulty(x)]
where d = len(model output) - len(reference output) in characters and sd(d) its sample
standard deviation over the instructions, is fitted by maximum likelihood with soft labels
(p itself is the target, so ties weigh half on each side) and a weak L2 penalty
(l2 / 2 * ||beta||^2, l2 = 0.01 by default, scikit-learn's C = 100); the LC win rate is the
model's prediction at zero length difference, averaged over the instructions:
   LC = mean_x sigmoid(theta [+ psi * difficulty(x)]).
Differences from the official `alpaca_eval` GLM: the official fit uses an L1 penalty with
5-fold cross-validation, regularises toward annotations of deliberately verbose/concise
"gamed" baselines, and uses instruction difficulties estimated from the leaderboard's many
models (downloaded from the hub). Here the difficulty term is used only when the user
supplies difficulties; otherwise the model has the intercept and the length term.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from selfreward.errors import EmptyResultError, InputError
from selfreward.storage import atomic_write_json, read_jsonl

LC_LABEL = (
    "length-controlled win rate (our implementation of Dubois et al. 2024, not the official alpaca_eval)"
)
DEFAULT_L2 = 0.01


# ------------------------------------------------------------------ format


@dataclass(frozen=True)
class AlpacaOutput:
    instruction: str
    output: str
    generator: str
    dataset: str = "selfreward"

    def to_json(self) -> dict[str, str]:
        return {
            "instruction": self.instruction,
            "output": self.output,
            "generator": self.generator,
            "dataset": self.dataset,
        }


def read_json_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) of each object in a JSON list or a JSONL file; `where` is file:line or item."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        out = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise InputError(f"{path}: item {i}: expected a JSON object, got {type(rec).__name__}")
            out.append((f"{path}: item {i}", rec))
        return out
    return [(f"{path}:{lineno}", rec) for lineno, rec in read_jsonl(path)]


def read_outputs(path: str | Path, generator: str | None = None) -> list[AlpacaOutput]:
    """Read model outputs: a JSON list or JSONL of {instruction, output[, generator, dataset]}.

    `generator` fills records that lack one (default: the file's stem). Instructions must be
    unique within a file.
    """
    path = Path(path)
    default_gen = generator or path.stem
    out: list[AlpacaOutput] = []
    seen: dict[str, str] = {}
    for where, rec in read_json_records(path):
        for name in ("instruction", "output"):
            if not isinstance(rec.get(name), str):
                raise InputError(f"{where}: field {name!r} must be a string, got {rec.get(name)!r}")
        instruction = rec["instruction"]
        if instruction in seen:
            raise InputError(f"{where}: duplicate instruction (first at {seen[instruction]})")
        seen[instruction] = where
        gen = rec.get("generator", default_gen)
        dataset = rec.get("dataset", "selfreward")
        out.append(AlpacaOutput(instruction, rec["output"], str(gen), str(dataset)))
    if not out:
        raise InputError(f"{path}: no records")
    return out


def write_outputs(path: str | Path, outputs: Sequence[AlpacaOutput]) -> Path:
    """Write outputs as AlpacaEval's model_outputs.json (a JSON list), atomically."""
    return atomic_write_json(path, [o.to_json() for o in outputs])


@dataclass
class AlignedOutputs:
    pairs: list[tuple[AlpacaOutput, AlpacaOutput]]  # (model, reference), in reference order
    only_in_model: list[str] = field(default_factory=list)  # instructions
    only_in_reference: list[str] = field(default_factory=list)


def align_outputs(model: Sequence[AlpacaOutput], reference: Sequence[AlpacaOutput]) -> AlignedOutputs:
    """Pair outputs by identical instruction text (AlpacaEval's own join key)."""
    by_instr = {o.instruction: o for o in model}
    ref_instr = {o.instruction for o in reference}
    pairs = [(by_instr[r.instruction], r) for r in reference if r.instruction in by_instr]
    return AlignedOutputs(
        pairs=pairs,
        only_in_model=[o.instruction for o in model if o.instruction not in ref_instr],
        only_in_reference=[r.instruction for r in reference if r.instruction not in by_instr],
    )


# ------------------------------------------------------------------ win rate


@dataclass
class AlpacaWinRate:
    win_rate: float
    standard_error: float | None
    n: int
    n_wins: int
    n_draws: int
    n_losses: int
    n_identical: int
    failures: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def alpaca_win_rate(
    preferences: Sequence[float | None], identical: Sequence[bool] | None = None
) -> AlpacaWinRate:
    """Win rate of the model against the reference outputs (None = judging failed, excluded)."""
    identical = list(identical) if identical is not None else [False] * len(preferences)
    if len(identical) != len(preferences):
        raise ValueError("identical must have one flag per preference")
    prefs = [0.5 if same else p for p, same in zip(preferences, identical, strict=True)]
    judged = np.asarray([p for p in prefs if p is not None], dtype=float)
    failures = len(prefs) - len(judged)
    if len(judged) == 0:
        raise EmptyResultError(f"AlpacaEval win rate: no judged instruction ({failures} failed)")
    if ((judged < 0) | (judged > 1)).any():
        raise ValueError("preferences must lie in [0, 1]")
    n = len(judged)
    se = float(judged.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return AlpacaWinRate(
        win_rate=float(judged.mean()),
        standard_error=se,
        n=n,
        n_wins=int((judged > 0.5).sum()),
        n_draws=int((judged == 0.5).sum()),
        n_losses=int((judged < 0.5).sum()),
        n_identical=sum(identical),
        failures=failures,
    )


# ------------------------------------------------------------------ length-controlled


@dataclass
class LengthControlled:
    win_rate: float  # predicted at zero length difference, averaged over instructions
    coefficients: dict[str, float]  # theta (intercept), phi (length), psi (difficulty, when used)
    n: int
    length_sd: float  # sd of the character-length difference used to normalise it
    uses_difficulty: bool
    l2: float
    converged: bool
    label: str = LC_LABEL

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def fit_soft_logistic(x: np.ndarray, p: np.ndarray, l2: float) -> tuple[np.ndarray, bool]:
    """Maximum-likelihood logistic regression with soft targets p in [0, 1] and an L2 penalty.

    Minimises sum_i -[p_i log s(x_i b) + (1 - p_i) log(1 - s(x_i b))] + l2/2 ||b||^2 with
    scipy's trust-region Newton method (exact gradient and Hessian; the problem is convex).
    """
    from scipy.optimize import minimize

    def fun(beta: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ beta
        # -[p log s(z) + (1-p) log s(-z)] = logaddexp(0, z) - p z
        loss = float(np.sum(np.logaddexp(0.0, z) - p * z) + 0.5 * l2 * beta @ beta)
        grad = x.T @ (_sigmoid(z) - p) + l2 * beta
        return loss, grad

    def hess(beta: np.ndarray) -> np.ndarray:
        s = _sigmoid(x @ beta)
        return (x * (s * (1 - s))[:, None]).T @ x + l2 * np.eye(x.shape[1])

    res = minimize(
        fun, np.zeros(x.shape[1]), jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-10}
    )
    return res.x, bool(res.success)


def length_controlled_win_rate(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    reference_lengths: Sequence[int],
    difficulty: Sequence[float] | None = None,
    l2: float = DEFAULT_L2,
) -> LengthControlled:
    """LC win rate: our implementation of Dubois et al. 2024 (see the module docstring)."""
    p = np.asarray(preferences, dtype=float)
    n = len(p)
    if not (len(model_lengths) == len(reference_lengths) == n):
        raise ValueError("preferences, model_lengths and reference_lengths must have the same length")
    if difficulty is not None and len(difficulty) != n:
        raise ValueError("difficulty must have one value per preference")
    if n < 2:
        raise EmptyResultError(f"length-controlled win rate needs at least 2 judged instructions, got {n}")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("preferences must lie in [0, 1]")
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(reference_lengths, dtype=float)
    sd = float(delta.std(ddof=1))
    columns = [np.ones(n)]
    names = ["theta"]
    if sd > 0:
        columns.append(np.tanh(delta / sd))
        names.append("phi")
    if difficulty is not None:
        columns.append(np.asarray(difficulty, dtype=float))
        names.append("psi")
    x = np.column_stack(columns)
    beta, converged = fit_soft_logistic(x, p, l2)
    coefficients = dict(zip(names, (float(b) for b in beta), strict=True))
    coefficients.setdefault("phi", 0.0)
    # prediction with the length term at zero: drop its column
    keep = [i for i, name in enumerate(names) if name != "phi"]
    lc = float(_sigmoid(x[:, keep] @ beta[keep]).mean())
    return LengthControlled(
        win_rate=lc,
        coefficients=coefficients,
        n=n,
        length_sd=sd,
        uses_difficulty=difficulty is not None,
        l2=l2,
        converged=converged,
    )


def read_difficulty(path: str | Path, reference: Sequence[AlpacaOutput]) -> dict[str, float]:
    """Instruction difficulties, keyed by instruction.

    Accepts AlpacaEval's `instruction_difficulty.csv` (first column: the instruction's index
    in the reference file; column `instruction_difficulty`) or a JSON object
    {instruction: difficulty}.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping):
            raise InputError(f"{path}: expected a JSON object {{instruction: difficulty}}")
        return {str(k): float(v) for k, v in data.items()}
    out: dict[str, float] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or "instruction_difficulty" not in header:
            raise InputError(f"{path}:1: expected a header with an 'instruction_difficulty' column")
        col = header.index("instruction_difficulty")
        for lineno, row in enumerate(reader, start=2):
            try:
                index, value = int(row[0]), float(row[col])
            except (ValueError, IndexError):
                raise InputError(
                    f"{path}:{lineno}: expected '<index>,...,<difficulty>', got {row!r}"
                ) from None
            if not 0 <= index < len(reference):
                raise InputError(
                    f"{path}:{lineno}: index {index} is outside the reference's {len(reference)} rows"
                )
            out[reference[index].instruction] = value
    return out
