"""Layering: the judge service, the coordinator and the stage worker of the generate, judge and
evaluate queues import no torch, transformers, TRL, PEFT or vLLM (they run from the torch-free
install); the library never imports a service."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "trl", "peft", "vllm", "accelerate")

# what each torch-free deployable imports, its stages' lazy imports included
ENTRY_POINTS = {
    "judge service": ["selfreward.api.judge.app", "selfreward.cli.main"],
    "coordinator": ["selfreward.api.coordinator.app", "selfreward.cli.main"],
    "stage worker (generate, judge, evaluate)": [
        "selfreward.drivers.worker",
        "selfreward.drivers.rq",
        "selfreward.stages.plan",
        # what the stages of those queues import when they run
        "selfreward.policy.publish",
        "selfreward.policy.pool",
        "selfreward.judging",
        "selfreward.teacher",
        "selfreward.evaluation.iteration",
        "selfreward.data.eft_judge",
    ],
}


def imported_after(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("service", list(ENTRY_POINTS))
def test_torch_free_services_import_no_heavy_library(service: str) -> None:
    loaded = imported_after(ENTRY_POINTS[service])
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"the {service} imports {heavy[:8]}"
