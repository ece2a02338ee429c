"""Pure rules of the judge: verdict parsing, logprob expectation, truncation, specs, keys, templates."""

from __future__ import annotations

import math

import pytest

from selfreward.config import JudgeConfig, TeacherConfig
from selfreward.errors import ConfigError
from selfreward.judging import (
    TRUNCATION_MARK,
    cache_key,
    expected_score,
    parse_score,
    parse_winner,
)
from selfreward.judging.judge import CompareResult, PairVerdict, _preference, score_regex
from selfreward.judging.parsing import label_distribution, score_position
from selfreward.judging.truncation import cut_text, shrink_for_overflow, truncate_chars
from selfreward.llm.specs import parse_spec, resolve_api_key
from selfreward.prompts import load_template


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is fine.\nScore: 4", (4.0, None)),
        ("Score: 0", (0.0, None)),
        ("Score: 5.", (5.0, None)),  # sentence-final period
        ("**Score:** 3", (3.0, None)),
        ("**Score**: 2", (2.0, None)),
        ("score: 1", (1.0, None)),  # the label's case does not matter
        ("Total score: 3 points", (3.0, None)),
        ("Score: **4**", (4.0, None)),
        # several labels: the last one decides, even against an earlier valid one
        ("Score: 2\nOn reflection, more.\nScore: 4", (4.0, None)),
        ("Score: 4\nScore: five", (None, "not_a_number")),
        ("Score: 4\nScore:", (None, "no_value")),
        ("Score: 4.5", (None, "not_an_integer")),
        ("Score: 3.0", (None, "not_an_integer")),
        ("score: five", (None, "not_a_number")),
        ("Score: 4/5", (None, "not_a_number")),
        ("Score: 7", (None, "out_of_range")),
        ("Score: -1", (None, "out_of_range")),
        ("I would give it four points.", (None, "no_score")),
        ("Scores: 4", (None, "no_score")),
        ("", (None, "empty")),
        ("   \n", (None, "empty")),
    ],
)
def test_parse_score(text: str, expected: tuple[float | None, str | None]) -> None:
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m", (1, None)),
        ("M", (2, None)),
        (" M\n", (2, None)),
        ("Mm", (None, "unparseable")),
        ("", (None, "empty")),
    ],
)
def test_parse_winner(text: str, expected: tuple[int | None, str | None]) -> None:
    assert parse_winner(text) == expected


def test_expected_score_renormalises_over_digits_and_merges_space_variants() -> None:
    top = {"3": math.log(0.4), " 3": math.log(0.1), "4": math.log(0.25), "The": math.log(0.2), "x": -math.inf}
    score, probs, mass = expected_score(top)
    assert mass == pytest.approx(0.75)
    assert probs == pytest.approx({"3": 0.5 / 0.75, "4": 0.25 / 0.75})
    assert score == pytest.approx((3 * 0.5 + 4 * 0.25) / 0.75)
    assert expected_score({"The": -0.1}) == (None, {}, 0.0)
    probs, mass = label_distribution({"m": math.log(0.3), "M": math.log(0.1), "mm": -0.1}, ("m", "M"))
    assert probs == pytest.approx({"M": 0.25, "m": 0.75}) and mass == pytest.approx(0.4)


def test_score_position_finds_the_digit_after_the_last_label() -> None:
    tokens = ["Good", ".", " Score", ":", " 2", " no", "\n", "Score", ":", " ", "4"]
    assert score_position(tokens) == 10
    assert score_position(["Score", ":", " five"]) is None
    assert score_position(["no", " label"]) is None


def test_score_regex_accepts_only_verdicts_ending_in_a_score_line() -> None:
    import re

    rx = re.compile(score_regex(20))
    for ok in ("short reason\nScore: 4", "Score: 0", "a\nScore: 1\nScore: 5"):
        assert rx.fullmatch(ok) and parse_score(ok)[0] is not None, ok
    assert not rx.fullmatch("short reason\nScore: 6")
    assert not rx.fullmatch("glued onScore: 3")  # the label must start its line
    assert not rx.fullmatch("x" * 21 + "\nScore: 3")  # the justification is bounded


def test_truncation_rule() -> None:
    text = "word " * 100  # 500 chars
    cut, flagged = truncate_chars(text, 100)
    assert flagged and cut.endswith(TRUNCATION_MARK)
    body = cut.removesuffix(TRUNCATION_MARK)
    assert len(body) <= 100 and text.startswith(body) and not body.endswith(" ")
    assert truncate_chars("short", 100) == ("short", False)
    # no whitespace in the last 10%: a hard cut at the limit
    assert cut_text("a" * 300, 100) == "a" * 100 + TRUNCATION_MARK
    # the token rule removes about the overflow, in proportion to each text's length
    a, b = shrink_for_overflow(["x " * 300, "y " * 100], prompt_chars=1000, prompt_tokens=500, budget=400)
    removed_a, removed_b = (
        600 - len(a.removesuffix(TRUNCATION_MARK)),
        200 - len(b.removesuffix(TRUNCATION_MARK)),
    )
    assert removed_a > removed_b > 0
    assert shrink_for_overflow(["abc"], 10, 5, 10) == ["abc"]


def test_parse_spec_forms_and_errors() -> None:
    assert parse_spec("policy:m1", policy_url="http://h:8000/").name == "policy:m1"
    assert parse_spec("policy:self", self_model="m2", policy_url="http://h:8000").model == "m2"
    spec = parse_spec("openai:http://127.0.0.1:9000/v1#teacher-7b")
    assert (spec.kind, spec.base_url, spec.model) == ("openai", "http://127.0.0.1:9000/v1", "teacher-7b")
    assert parse_spec("gemini:gemini-2.0-flash").name == "gemini:gemini-2.0-flash"
    with pytest.raises(ConfigError, match="self_model"):
        parse_spec("policy:self", policy_url="http://h")
    with pytest.raises(ConfigError, match="policy_url"):
        parse_spec("policy:m1")
    with pytest.raises(ConfigError, match="expected"):
        parse_spec("claude:opus")


def test_api_key_rule(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    gem = parse_spec("gemini:g")
    other = parse_spec("openai:http://other:1#m")
    mine = parse_spec("openai:http://teacher:1#m")
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
        resolve_api_key(gem, TeacherConfig())
    monkeypatch.setenv("GEMINI_API_KEY", "gk")
    assert resolve_api_key(gem, TeacherConfig()) == "gk"
    secret = tmp_path / "key"
    secret.write_text("file-key\n")
    assert resolve_api_key(gem, TeacherConfig(api_key_file=secret)) == "file-key"
    # the teacher's key goes only to the teacher's endpoint
    monkeypatch.setenv("TEACHER_KEY", "tk")
    teacher = TeacherConfig(backend="openai:http://teacher:1#m", api_key_env="TEACHER_KEY")
    assert resolve_api_key(mine, teacher) == "tk"
    assert resolve_api_key(other, teacher) is None
    assert resolve_api_key(gem, teacher) == "gk"  # not the teacher: GEMINI_API_KEY
    with pytest.raises(ConfigError, match="api_key_file"):
        resolve_api_key(gem, TeacherConfig(api_key_file=tmp_path / "missing"))


def test_cache_key_changes_with_every_part() -> None:
    base = dict(
        judge="gemini:g",
        template_sha256="t1",
        task="score",
        params={"mode": "sample", "temperature": 0.7},
        sample=0,
        instruction="q",
        responses=["a"],
    )
    key = cache_key(**base)
    assert key == cache_key(**{**base, "params": {"temperature": 0.7, "mode": "sample"}})  # order-free
    for change in (
        {"judge": "gemini:h"},
        {"template_sha256": "t2"},
        {"task": "compare"},
        {"params": {"mode": "sample", "temperature": 0.8}},
        {"sample": 1},
        {"instruction": "q2"},
        {"responses": ["b"]},
    ):
        assert cache_key(**{**base, **change}) != key, change


def test_templates_and_config() -> None:
    score = load_template(JudgeConfig().template, kind="score")
    pair = load_template(JudgeConfig().compare_template, kind="compare")
    assert "Score: <total points>" in score.text
    assert pair.fields == {"instruction", "output_1", "output_2"}
    prompt = pair.render(instruction="I", output_1="{output_2}", output_2="B")
    assert '"output": """{output_2}"""' in prompt  # filled-in text is never substituted again
    assert "m or M" in pair.text


def test_position_swap_rule() -> None:
    def pv(
        order: str, winner: str | None, p_a: float | None = None, failure: str | None = None
    ) -> PairVerdict:
        return PairVerdict(order=order, text="", winner=winner, p_a=p_a, failure=failure)

    assert _preference(pv("ab", "A"), pv("ba", "A"), "sample") == (1.0, None)
    assert _preference(pv("ab", "B"), pv("ba", "B"), "sample") == (0.0, None)
    assert _preference(pv("ab", "A"), pv("ba", "B"), "sample") == (0.5, None)  # disagreement = tie
    pref, failure = _preference(pv("ab", "A"), pv("ba", None, failure="unparseable"), "sample")
    assert pref == 0.5 and failure == "ba: unparseable"
    assert _preference(pv("ab", "A", 0.9), pv("ba", "A", 0.7), "logprob")[0] == pytest.approx(0.8)
    assert _preference(pv("ab", "A", 0.9), pv("ba", "B", 0.2), "logprob") == (0.5, None)
    assert CompareResult.model_fields.keys() >= {"preference", "ab", "ba", "failure"}
