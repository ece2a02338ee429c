"""Start and stop vLLM's OpenAI-compatible server: the policy service.

`vllm_command` builds the command line for a device (docs/policy.md explains each flag):
- cpu: `--dtype float32` (no native bf16 on most CPUs: slow and different greedy outputs),
  `--enforce-eager` unless `policy.enforce_eager` is false (compiling takes 3-4 minutes at
  every start), KV cache size from `policy.cpu_kvcache_gib` (env VLLM_CPU_KVCACHE_SPACE), the
  model in the engine-core process (`policy.cpu_one_worker_process`: VLLM_ENABLE_V1_MULTIPROCESSING=0);
- cuda: `--dtype auto`, `--gpu-memory-utilization`, `--tensor-parallel-size`, CUDA graphs
  unless `policy.enforce_eager` is true;
- `sleep_mode` (the policy sleeps during training, selfreward.policy.sleep: the embedded driver
  and `from_config` resolve it from the run config): `--enable-sleep-mode` and
  VLLM_SERVER_DEV_MODE=1 (the /sleep and /wake_up endpoints);
- both: LoRA enabled (`--max-lora-rank`, `--max-loras`), runtime adapter loading
  (VLLM_ALLOW_RUNTIME_LORA_UPDATING), `--max-logprobs`, sampling defaults from vLLM rather
  than from the model's generation_config.json (requests carry their own parameters).

`vllm_env` passes the caller's environment on: with VLLM_PLUGINS=lora_filesystem_resolver and
VLLM_LORA_RESOLVER_CACHE_DIR (a pool's replicas, selfreward.policy.pool) vLLM serves the adapters
linked in that folder on first request; the folder is created when missing (vLLM refuses to
start without it), and the variable dropped when it cannot be.

`PolicyServer` runs that command as a child process (its own process group, output in a log
file under the artifact root), waits until `/health` answers, and stops it (SIGTERM, then
SIGKILL of the whole group). It is a context manager for tests and the embedded mode;
`selfreward policy serve` runs it in the foreground and forwards SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfreward.config import PolicyServerConfig, RunConfig
from selfreward.errors import ConfigError, InputError, ServiceError
from selfreward.processes import term_with_parent

from . import cpu_lora, vllm_main
from .prepare import check_causal_lm
from .sleep import server_flags

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
LOG_TAIL_LINES = 40
SMALL_MACHINE_CORES = 4  # up to this many cores, vLLM's compute threads get them all


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter served from the start (`--lora-modules name=path`)."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> Adapter:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InputError(f"adapter {text!r}: expected NAME=PATH")
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise InputError(
                f"adapter {name!r}: {folder} is not a PEFT adapter folder (no adapter_config.json)"
            )
        return cls(name, folder.resolve())


def check_policy_config(policy: PolicyServerConfig) -> None:
    problems = []
    if policy.max_lora_rank not in VLLM_LORA_RANKS:
        problems.append(
            f"policy.max_lora_rank: vLLM accepts {list(VLLM_LORA_RANKS)} (got {policy.max_lora_rank})"
        )
    if policy.device == "cpu" and float(policy.cpu_kvcache_gib) != int(policy.cpu_kvcache_gib):
        problems.append(f"policy.cpu_kvcache_gib: vLLM takes whole GiB (got {policy.cpu_kvcache_gib})")
    if problems:
        raise ConfigError(problems, "policy")


def vllm_command(
    model_dir: str | Path,
    *,
    served_name: str,
    policy: PolicyServerConfig,
    max_model_len: int,
    port: int,
    adapters: Sequence[Adapter] = (),
    sleep_mode: bool = False,
) -> list[str]:
    """The full command line (interpreter, entry point, flags) for `policy.device`; with
    `sleep_mode` (the policy sleeps during training: selfreward.policy.sleep) vLLM's sleep mode."""
    check_policy_config(policy)
    python = policy.python or sys.executable
    cmd = [
        python,
        # a file path, not `-m`: the entry point needs only the standard library and vLLM, so
        # the server may run from another environment (`policy.python`)
        str(Path(vllm_main.__file__).resolve()),
        "serve",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        policy.host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        str(policy.max_lora_rank),
        "--max-loras",
        str(policy.max_loras),
        "--max-logprobs",
        str(policy.max_logprobs),
        "--generation-config",
        "vllm",
    ]
    if policy.device == "cpu":
        cmd += ["--dtype", "float32"]
        if policy.enforce_eager is not False:
            cmd.append("--enforce-eager")
    else:
        cmd += [
            "--dtype",
            "auto",
            "--gpu-memory-utilization",
            str(policy.gpu_memory_utilization),
            "--tensor-parallel-size",
            str(policy.tensor_parallel_size),
        ]
        if policy.enforce_eager:
            cmd.append("--enforce-eager")
    if not policy.access_log:
        cmd.append("--disable-uvicorn-access-log")
    if adapters:
        cmd += ["--lora-modules", *(f"{a.name}={a.path}" for a in adapters)]
    cmd += server_flags(sleep_mode)[0]  # --enable-sleep-mode
    cmd += list(policy.extra_args)
    return cmd


LORA_RESOLVER_DIR_ENV = "VLLM_LORA_RESOLVER_CACHE_DIR"


def vllm_env(
    policy: PolicyServerConfig, base: Mapping[str, str] | None = None, sleep_mode: bool = False
) -> dict[str, str]:
    """The server's environment: the caller's, plus what the flags cannot say."""
    env = dict(os.environ if base is None else base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage reports to vLLM's servers
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(server_flags(sleep_mode)[1])  # VLLM_SERVER_DEV_MODE=1: the sleep endpoints
    resolver_dir = env.get(LORA_RESOLVER_DIR_ENV)
    if resolver_dir:
        try:
            Path(resolver_dir).mkdir(parents=True, exist_ok=True)
        except OSError:
            del env[LORA_RESOLVER_DIR_ENV]  # vLLM would refuse to start: serve without the resolver
    if policy.device == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env[cpu_lora.ENV] = "1" if policy.grouped_cpu_lora else "0"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(policy.cpu_kvcache_gib))
        if policy.cpu_one_worker_process:
            # the API server still runs its engine core in a process of its own (AsyncLLM); this
            # only keeps the model in that process (vllm/platforms/cpu.py picks the "mp" executor
            # when the variable is 1)
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        reserved = policy.cpu_reserved_cores
        if reserved is None and (os.cpu_count() or 1) <= SMALL_MACHINE_CORES:
            # vLLM keeps one core for its scheduler: half the machine on 2 cores (53 against
            # 90 tokens/s measured with SmolLM2-135M, docs/policy.md)
            reserved = 0
        if reserved is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
    return env


def port_in_use(host: str, port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log)"
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 64 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class PolicyServer:
    """One vLLM server process serving `model_dir` as `served_name` (plus LoRA adapters).

    Attributes once started: `url` (http://host:port, no /v1), `model` (the served name),
    `model_dir`, `port`, `log_path`, `process`. `policy.port == 0` picks a free port.
    On Linux the server gets SIGTERM when the thread that started it exits (PR_SET_PDEATHSIG):
    start it from a thread that lives as long as it should (normally the main thread).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        served_name: str = "m0",
        policy: PolicyServerConfig | None = None,
        max_model_len: int = 2048,
        adapters: Sequence[Adapter] = (),
        log_dir: str | Path = Path("artifacts") / "logs" / "policy",
        env: Mapping[str, str] | None = None,
        sleep_mode: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model = served_name
        self.policy = policy or PolicyServerConfig()
        self.max_model_len = max_model_len
        self.adapters = list(adapters)
        self.log_dir = Path(log_dir)
        self.base_env = env
        self.sleep_mode = sleep_mode
        self.port = self.policy.port
        self.process: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self.log_path: Path | None = None

    @classmethod
    def from_config(
        cls, config: RunConfig, model_dir: str | Path, adapters: Sequence[Adapter] = ()
    ) -> PolicyServer:
        """The server a run config describes, as a service (`selfreward policy serve`): sleep mode
        only where the runs sleep it during training, i.e. `policy.sleep_during_training: on`, or
        auto with `policy.shares_gpu_with_trainer` true; logs under `<artifact_root>/logs/policy/`."""
        from .sleep import run_sleeps

        return cls(
            model_dir,
            served_name=config.model.served_name,
            policy=config.policy,
            max_model_len=config.model.max_model_len,
            adapters=adapters,
            log_dir=config.artifact_root / "logs" / "policy",
            sleep_mode=run_sleeps(config, own_server=False),
        )

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.policy.host in ("0.0.0.0", "") else self.policy.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        return vllm_command(
            self.model_dir,
            served_name=self.model,
            policy=self.policy,
            max_model_len=self.max_model_len,
            port=self.port,
            adapters=self.adapters,
            sleep_mode=self.sleep_mode,
        )

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Check the inputs, then spawn vLLM (returns at once; see `wait_ready`)."""
        if self.process is not None:
            raise ServiceError("policy server already started")
        if not self.model_dir.is_dir():
            raise InputError(f"model folder not found: {self.model_dir}")
        check_causal_lm(self.model_dir)
        python = self.policy.python or sys.executable
        if self.policy.python and not Path(python).is_file():
            raise ConfigError([f"policy.python: no interpreter at {python}"], "policy")
        if self.port == 0:
            self.port = free_port(self.policy.host or "127.0.0.1")
        elif port_in_use(self.policy.host, self.port):
            raise ServiceError(
                f"port {self.port} on {self.policy.host} is already in use (another server running? "
                "stop it or choose another port: policy.port / --port)"
            )
        cmd = self.command()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.log_path = self.log_dir / f"{self.model}-{stamp}-{self.port}.log"
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=vllm_env(self.policy, self.base_env, self.sleep_mode),
                start_new_session=True,  # its own process group: stop() reaches every worker
                preexec_fn=term_with_parent,
            )

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until /health answers 200; a server that exits first raises with its log's tail."""
        import httpx

        assert self.process is not None and self.log_path is not None, "start() first"
        timeout_s = self.policy.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as http:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise ServiceError(
                        f"the policy server (vLLM) exited with status {code} during start-up; "
                        f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.url}/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServiceError(
                        f"the policy server did not answer {self.url}/health within {timeout_s:.0f} s "
                        f"(policy.startup_timeout_s); last lines of {self.log_path}:\n{tail(self.log_path)}"
                    )
                time.sleep(1.0)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signum)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the server, wait, then SIGKILL its whole process group; return its exit status.
        A second call only returns the status (the group's id may belong to another process by then)."""
        if self.process is None:
            return None
        proc = self.process
        if self._stopped:
            return proc.returncode
        self._stopped = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
        # whatever is left of the group (engine core, workers): nothing may outlive the server
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        return proc.returncode

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> PolicyServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def info(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "model_dir": str(self.model_dir),
            "log": str(self.log_path) if self.log_path else None,
            "pid": self.process.pid if self.process else None,
        }
