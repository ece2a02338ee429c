from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfreward.cli.main import app
from selfreward.config import build_config, env_overrides, load_config
from selfreward.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["quickstart.yaml", "phi2-gemini.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(REPO / "configs" / name, environ={})
    assert cfg.name


def test_phi2_gemini_matches_the_study() -> None:
    cfg = load_config(REPO / "configs" / "phi2-gemini.yaml", environ={})
    assert cfg.model.base == "microsoft/phi-2"
    assert cfg.teacher.backend == "gemini:gemini-pro"
    assert (cfg.candidates.n, cfg.judge.samples) == (4, 3)
    assert (cfg.candidates.temperature, cfg.candidates.top_p) == (0.7, 0.9)
    assert cfg.dpo.beta == 0.1


def test_unknown_keys_are_errors_with_paths() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"dpo": {"betta": 0.1}, "nonsense": 1}, environ={})
    text = str(info.value)
    assert "dpo.betta: unknown setting" in text
    assert "nonsense: unknown setting" in text


def test_every_error_is_listed_with_value() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"candidates": {"n": 1}, "judge": {"samples": 0}, "variant": "x"}, environ={})
    problems = info.value.problems
    assert len(problems) == 3
    assert any(p.startswith("candidates.n:") and "(got 1)" in p for p in problems)
    assert any(p.startswith("judge.samples:") for p in problems)
    assert any(p.startswith("variant:") and "'x'" in p for p in problems)


def test_env_overrides_nested_and_typed() -> None:
    env = {
        "SELFREWARD_ARTIFACT_ROOT": "/tmp/somewhere",
        "SELFREWARD_DPO__BETA": "0.25",
        "SELFREWARD_DATA__LANGUAGES": "[en, de]",
        "SELFREWARD_API_TOKEN": "not-a-config-field",
        "OTHER": "x",
    }
    cfg = build_config({"dpo": {"beta": 0.1}}, environ=env)
    assert str(cfg.artifact_root) == "/tmp/somewhere"
    assert cfg.dpo.beta == 0.25
    assert cfg.data.languages == ["en", "de"]
    assert "api_token" not in env_overrides(env)


def test_env_override_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({}, environ={"SELFREWARD_DPO__BETAX": "1"})
    assert "dpo.betax: unknown setting" in str(info.value)


def test_teacher_variants_need_a_teacher() -> None:
    with pytest.raises(ConfigError, match="teacher.backend is required"):
        build_config({"variant": "teacher-demo"}, environ={})
    with pytest.raises(ConfigError, match="teacher.backend"):
        build_config({"variant": "teacher-reward", "teacher": {"backend": "bogus"}}, environ={})
    cfg = build_config(
        {"variant": "teacher-reward", "teacher": {"backend": "openai:http://127.0.0.1:9/v1#big"}}, environ={}
    )
    assert cfg.feedback_judge() == "openai:http://127.0.0.1:9/v1#big"


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndpo:\n  beta: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad, environ={})


def test_cli_validate_prints_resolved_config_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "validate", str(REPO / "configs" / "quickstart.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "variant: self-reward" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("variant: nope\nsft: {learning_rate: -1, foo: 2}\n")
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 2
    assert "sft.learning_rate" in res.output and "sft.foo: unknown setting" in res.output
    assert "variant" in res.output and "Traceback" not in res.output


def test_docs_configuration_reference_is_current() -> None:
    from selfreward.config import reference_markdown

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == reference_markdown(), "regenerate: selfreward config reference > docs/configuration.md"
