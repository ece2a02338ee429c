"""Head-to-head win/tie/loss and AlpacaEval win rates against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from selfreward.errors import EmptyResultError, InputError
from selfreward.evaluation.metrics.alpaca import (
    AlpacaOutput,
    align_outputs,
    alpaca_win_rate,
    length_controlled_win_rate,
    read_difficulty,
    read_outputs,
    write_outputs,
)
from selfreward.evaluation.metrics.winrate import head_to_head


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=float)))


# ------------------------------------------------------------------ head-to-head


def test_head_to_head_counts_and_rates() -> None:
    h = head_to_head([1.0, 1.0, 0.5, 0.0, None], a="m2", b="m1", bootstrap_samples=200, seed=1)
    assert (h.n, h.wins, h.ties, h.losses, h.failures) == (4, 2, 1, 1, 1)
    assert (h.win, h.tie, h.loss) == (0.5, 0.25, 0.25)
    assert h.win_rate == pytest.approx((2 + 0.5) / 4)
    for stat, value in (("win", h.win), ("tie", h.tie), ("loss", h.loss), ("win_rate", h.win_rate)):
        lo, hi = h.intervals[stat]
        assert 0.0 <= lo <= value <= hi <= 1.0
    assert h.to_json()["intervals"]["win"] == list(h.intervals["win"])


def test_bootstrap_is_seeded_and_degenerate_cases_are_exact() -> None:
    prefs = [1.0, 0.0, 0.5] * 20
    assert head_to_head(prefs, seed=7).intervals == head_to_head(prefs, seed=7).intervals
    assert head_to_head(prefs, seed=7).intervals != head_to_head(prefs, seed=8).intervals
    all_wins = head_to_head([1.0] * 10)
    assert all_wins.intervals == {
        "win": (1.0, 1.0),
        "tie": (0.0, 0.0),
        "loss": (0.0, 0.0),
        "win_rate": (1.0, 1.0),
    }


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    """For n = 400 and a 60% win share the 95% interval is about 0.6 +- 1.96 * sqrt(0.24 / 400)."""
    prefs = [1.0] * 240 + [0.0] * 160
    h = head_to_head(prefs, bootstrap_samples=4000, seed=3)
    half = 1.96 * math.sqrt(0.6 * 0.4 / 400)
    lo, hi = h.intervals["win"]
    assert lo == pytest.approx(0.6 - half, abs=0.006) and hi == pytest.approx(0.6 + half, abs=0.006)


def test_head_to_head_needs_a_judged_prompt() -> None:
    with pytest.raises(EmptyResultError, match="2 of 2 failed"):
        head_to_head([None, None], a="x", b="y")


# ------------------------------------------------------------------ AlpacaEval win rate


def test_alpaca_win_rate_identical_count_half_and_standard_error() -> None:
    w = alpaca_win_rate([1.0, 0.0, 0.0, 1.0, None], identical=[False, False, True, False, False])
    # judged preferences 1, 0, 0.5 (identical), 1
    assert w.win_rate == pytest.approx(0.625)
    assert w.standard_error == pytest.approx(math.sqrt(0.6875 / 3) / 2)
    assert (w.n, w.n_wins, w.n_draws, w.n_losses, w.n_identical, w.failures) == (4, 2, 1, 1, 1, 1)


def test_outputs_round_trip_and_alignment(tmp_path: Path) -> None:
    outs = [AlpacaOutput("q1", "a1", "m2"), AlpacaOutput("q2", "a2", "m2", "oasst")]
    path = write_outputs(tmp_path / "model_outputs.json", outs)
    data = json.loads(path.read_text())
    assert data[0] == {"instruction": "q1", "output": "a1", "generator": "m2", "dataset": "selfreward"}
    assert read_outputs(path) == outs
    jsonl = tmp_path / "answers.jsonl"
    jsonl.write_text('{"instruction": "q3", "output": "x"}\n{"instruction": "q1", "output": "y"}\n')
    other = read_outputs(jsonl)
    assert other[0].generator == "answers"
    aligned = align_outputs(other, outs)
    assert [(m.output, r.output) for m, r in aligned.pairs] == [("y", "a1")]
    assert aligned.only_in_model == ["q3"] and aligned.only_in_reference == ["q2"]


def test_outputs_errors_name_the_item(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": 3}]))
    with pytest.raises(InputError, match=r"bad\.json: item 1: field 'output'"):
        read_outputs(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "b"}\n')
    with pytest.raises(InputError, match=r"dup\.jsonl:2: duplicate instruction \(first at .*dup\.jsonl:1\)"):
        read_outputs(dup)


# ------------------------------------------------------------------ length-controlled


def test_lc_without_length_differences_is_the_mean_preference() -> None:
    """All length differences equal: no length term, the intercept-only MLE gives sigmoid(theta) = mean(p)."""
    prefs = [1.0, 0.0, 1.0, 0.5, 1.0]
    lc = length_controlled_win_rate(prefs, [10] * 5, [4] * 5, l2=0.0)
    assert lc.win_rate == pytest.approx(0.7, abs=1e-8)
    assert lc.coefficients["phi"] == 0.0 and lc.length_sd == 0.0 and lc.converged
    assert "our implementation" in lc.label


def test_lc_recovers_known_parameters_from_soft_labels() -> None:
    rng = np.random.default_rng(0)
    model_len = rng.integers(50, 3000, size=300)
    ref_len = rng.integers(50, 3000, size=300)
    d = model_len - ref_len
    t = np.tanh(d / d.std(ddof=1))
    prefs = sigmoid(-0.4 + 1.5 * t)  # a length-biased judge of a slightly worse model
    lc = length_controlled_win_rate(prefs, model_len, ref_len, l2=0.0)
    assert lc.coefficients["theta"] == pytest.approx(-0.4, abs=1e-6)
    assert lc.coefficients["phi"] == pytest.approx(1.5, abs=1e-6)
    assert lc.win_rate == pytest.approx(float(sigmoid(-0.4)), abs=1e-7)
    # the default weak L2 penalty barely moves it
    assert length_controlled_win_rate(prefs, model_len, ref_len).win_rate == pytest.approx(
        float(sigmoid(-0.4)), abs=2e-3
    )


def test_lc_with_instruction_difficulty() -> None:
    rng = np.random.default_rng(1)
    model_len, ref_len = rng.integers(10, 900, size=200), rng.integers(10, 900, size=200)
    gamma = rng.normal(size=200)
    d = model_len - ref_len
    prefs = sigmoid(0.3 + 0.8 * gamma + 1.0 * np.tanh(d / d.std(ddof=1)))
    lc = length_controlled_win_rate(prefs, model_len, ref_len, difficulty=gamma, l2=0.0)
    assert lc.coefficients["psi"] == pytest.approx(0.8, abs=1e-6)
    assert lc.win_rate == pytest.approx(float(sigmoid(0.3 + 0.8 * gamma).mean()), abs=1e-7)


def test_read_difficulty_csv_by_reference_index(tmp_path: Path) -> None:
    ref = [AlpacaOutput("q0", "a", "gpt4"), AlpacaOutput("q1", "b", "gpt4")]
    csv = tmp_path / "instruction_difficulty.csv"
    csv.write_text(",instruction_difficulty\n0,-1.5\n1,0.25\n")
    assert read_difficulty(csv, ref) == {"q0": -1.5, "q1": 0.25}
    csv.write_text(",instruction_difficulty\n7,0.1\n")
    with pytest.raises(InputError, match=r"instruction_difficulty\.csv:2: index 7"):
        read_difficulty(csv, ref)


# ------------------------------------------------------------------ real AlpacaEval files


@pytest.mark.shared_data
def test_real_alpaca_eval_files_alignment_export_and_lc(shared_data: Path, tmp_path: Path) -> None:
    ref = read_outputs(shared_data / "alpaca_eval" / "gpt4_1106_preview.json")
    phi2 = read_outputs(shared_data / "alpaca_eval" / "phi-2.json")
    assert len(ref) == 805 and len(phi2) == 803
    assert {o.generator for o in ref} == {"gpt4_1106_preview"} and {o.generator for o in phi2} == {"phi-2"}
    aligned = align_outputs(phi2, ref)
    assert len(aligned.pairs) == 803 and len(aligned.only_in_reference) == 2 and not aligned.only_in_model
    assert all(m.dataset == r.dataset for m, r in aligned.pairs)
    # export round trip is byte-stable
    path = write_outputs(tmp_path / "model_outputs.json", [m for m, _ in aligned.pairs])
    assert read_outputs(path) == [m for m, _ in aligned.pairs]

    # synthetic judge on the real lengths: equal quality (theta = 0) but a strong length bias
    model_len = np.array([len(m.output) for m, _ in aligned.pairs])
    ref_len = np.array([len(r.output) for _, r in aligned.pairs])
    d = model_len - ref_len
    prefs = sigmoid(2.0 * np.tanh(d / d.std(ddof=1)))
    raw = alpaca_win_rate(list(prefs)).win_rate
    assert raw < 0.25  # phi-2's answers are much shorter than GPT-4 Turbo's
    lc = length_controlled_win_rate(prefs, model_len, ref_len, l2=0.0)
    assert lc.win_rate == pytest.approx(0.5, abs=1e-6)
    # with hard (sampled) preferences the estimate is close to 0.5
    sampled = (np.random.default_rng(5).random(len(prefs)) < prefs).astype(float)
    assert length_controlled_win_rate(sampled, model_len, ref_len).win_rate == pytest.approx(0.5, abs=0.08)
