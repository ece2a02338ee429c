"""Schemathesis (the maintained OpenAPI fuzzer) against the coordinator and the judge service on
loopback, with and without the token: every check on, bounded (a fixed seed, few examples per
operation), so that no input gives a server error, an answer outside its schema, or a status
code the document does not list.

Positive data may still be refused where the schema cannot say why: a run config the deployment
does not allow or whose fields contradict each other (422), a run that exists (409), a judge the
deployment does not allow (403) or a spec the policy cannot serve (400, 502); those statuses are
the expected ones of `positive_data_acceptance`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings

from selfreward.testing.servers import free_port, wait_port

TOKEN = "fuzz-token"
EXAMPLES = 50

CONFIG = {
    "seed": 20261202,
    "generation": {"max-examples": EXAMPLES, "deterministic": True},
    "checks": {
        "enabled": True,
        "positive_data_acceptance": {
            "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "422", "502"]
        },
        "max_response_time": 30,
    },
}


@pytest.fixture(scope="module")
def _servers(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[dict[str, str]]:
    from selfreward.api.coordinator.app import create_app as coordinator_app
    from selfreward.api.judge.app import create_app as judge_app
    from selfreward.api.judge.settings import JudgeSettings
    from selfreward.testing.fake_gemini import fake_gemini

    root = tmp_path_factory.mktemp("fuzz")
    env = {"SELFREWARD_ARTIFACT_ROOT": str(root / "artifacts"), "GEMINI_API_KEY": "gk"}
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []
    with fake_gemini(api_key="gk", reply=lambda m, p, b: "Fine.\nScore: 3") as gemini:
        judge_env = {
            "SELFREWARD_API_TOKEN": TOKEN,
            "SELFREWARD_DEFAULT_JUDGE": "gemini:gemini-test",
            "SELFREWARD_TEACHER__GEMINI_BASE_URL": gemini.base_url,
            "SELFREWARD_JUDGE__SAMPLES": "1",
            "SELFREWARD_JUDGE__MAX_RETRIES": "0",
            "POLICY_URL": "http://127.0.0.1:9",  # no policy service: policy judges answer 502
            "GEMINI_API_KEY": "gk",
        }
        apps = {
            "coordinator": coordinator_app(redis_url=redis_url, api_token=TOKEN, environ=env),
            "judge": judge_app(JudgeSettings.from_env(judge_env)),
        }
        urls = {}
        for name, app in apps.items():
            port = free_port()
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            wait_port(port)
            servers.append((server, thread))
            urls[name] = f"http://127.0.0.1:{port}"
        import os

        os.environ.setdefault("GEMINI_API_KEY", "gk")
        try:
            yield urls
        finally:
            for server, thread in servers:
                server.should_exit = True
                thread.join(timeout=15)


def _schema(url: str) -> Any:
    from schemathesis.config import SchemathesisConfig

    return schemathesis.openapi.from_url(f"{url}/openapi.json", config=SchemathesisConfig.from_dict(CONFIG))


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fuzz(url: str) -> list[str]:
    """Every operation, positive and negative examples, each sent with and without the token;
    returns the failures (schemathesis' checks, all on), one line each."""
    from hypothesis import given, seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    failures: list[str] = []
    operations = [result.ok() for result in _schema(url).get_all_operations()]
    assert operations

    def runner(operation: Any, mode: Any) -> Any:
        label = f"{operation.label} [{mode.value}"

        @seed(CONFIG["seed"])
        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            for headers in (AUTH, {}):
                try:
                    case.call_and_validate(headers=headers, timeout=60)
                except (Exception, BaseExceptionGroup) as exc:  # one line per distinct failure
                    where = f"{label}, {'token' if headers else 'no token'}]"
                    failures.append(f"{where}: " + " ".join(str(exc).split())[:600])

        return run

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                runner(operation, mode)()
            except Unsatisfiable:
                # no invalid input exists for an operation without parameters or body
                assert mode is GenerationMode.NEGATIVE, operation.label
    return sorted(set(failures))


FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=EXAMPLES, database=None)


def test_coordinator_fuzz(_servers: dict[str, str]) -> None:
    failures = fuzz(_servers["coordinator"])
    assert not failures, "\n".join(failures)


def test_judge_fuzz(_servers: dict[str, str]) -> None:
    failures = fuzz(_servers["judge"])
    assert not failures, "\n".join(failures)
