"""The distributed mode on one machine: `selfreward stack up | status | down` (docs/api.md).

`up` starts, on loopback: Redis (append-only file under DIR/redis), the policy server (vLLM,
the config's model; or none with `policy_url`), the judge service, the coordinator (with a
generated API token) and stage workers for every queue (one for generate + judge + evaluate,
one for train), each in its own process group with its log in DIR/logs/. It waits until every
service answers, writes DIR/stack.json (each service's URL, PID, start time and log; the token)
and DIR/run.json (the config as the JSON body of POST /runs). `down` stops exactly the
processes stack.json names (a PID is only signalled while its start time matches, so a reused
PID is never touched): SIGTERM to the group, SIGKILL after a grace period. `status` says which
are alive and answering. A second `up` over a live stack changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from selfreward.config import RunConfig, load_config
from selfreward.errors import ConfigError, SelfRewardError
from selfreward.storage import atomic_write_text

STACK_FILE = "stack.json"
SELFREWARD = [sys.executable, "-m", "selfreward.cli.main"]
# the order `up` starts them in; `down` stops them in reverse
ORDER = ("redis", "policy", "judge", "coordinator", "worker-cpu", "worker-train")
WORKER_QUEUES = {"worker-cpu": ("generate", "judge", "evaluate"), "worker-train": ("train",)}


class StackError(SelfRewardError):
    pass


@dataclass
class Service:
    name: str
    pid: int
    create_time: float
    log: str
    command: list[str]
    url: str | None = None
    health: str | None = None  # the URL that answers 200 when the service is up

    def process(self) -> psutil.Process | None:
        """The service's process if it still runs (the same process: its start time matches)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.NoSuchProcess:
            return None


@dataclass
class Stack:
    dir: str
    config: str
    token: str
    artifact_root: str
    started_at: float
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.services["coordinator"].url or ""

    @property
    def redis_url(self) -> str:
        return self.services["redis"].url or ""

    def save(self) -> None:
        body = asdict(self)
        atomic_write_text(Path(self.dir) / STACK_FILE, json.dumps(body, indent=2) + "\n")
        os.chmod(Path(self.dir) / STACK_FILE, 0o600)  # it holds the API token

    @classmethod
    def load(cls, folder: Path) -> Stack | None:
        path = folder / STACK_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            services = {k: Service(**v) for k, v in raw.pop("services").items()}
            return cls(**raw, services=services)
        except (ValueError, TypeError, KeyError) as exc:
            raise StackError(f"{path}: not a stack file ({type(exc).__name__}: {exc}); remove it") from None


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(name: str, cmd: list[str], folder: Path, env: Mapping[str, str]) -> Service:
    log = folder / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,  # its own process group: `down` stops it with its children
        )
    return Service(name, proc.pid, psutil.Process(proc.pid).create_time(), str(log), cmd)


def _tail(path: str, n: int = 30) -> str:
    p = Path(path)
    if not p.is_file():
        return "(no log)"
    return "\n".join(p.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


def healthy(service: Service, redis_url: str | None = None) -> bool:
    """Alive and answering: Redis answers PING, a worker is registered in Redis (RQ's worker
    key), a server answers GET on its health URL."""
    if service.process() is None:
        return False
    if service.name == "redis" or service.name.startswith("worker"):
        import redis

        try:
            conn = redis.Redis.from_url(
                (service.url if service.name == "redis" else redis_url) or "", socket_timeout=2
            )
            if service.name == "redis":
                return bool(conn.ping())
            return bool(conn.exists(f"rq:worker:{service.health}"))
        except redis.RedisError:
            return False
    try:
        return httpx.get(service.health or "", timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_healthy(
    service: Service, timeout_s: float, say: Callable[[str], None], redis_url: str | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process() is None:
            raise StackError(
                f"{service.name} exited before it answered; its log ({service.log}):\n{_tail(service.log)}"
            )
        if healthy(service, redis_url):
            say(f"{service.name} up ({service.url or 'pid ' + str(service.pid)})")
            return
        time.sleep(0.5)
    raise StackError(
        f"{service.name} did not answer within {timeout_s:.0f} s; its log ({service.log}):\n{_tail(service.log)}"
    )


def up(
    config_path: Path,
    folder: Path,
    *,
    policy_url: str | None = None,
    policy_timeout_s: float = 900.0,
    say: Callable[[str], None] = print,
    environ: Mapping[str, str] | None = None,
) -> Stack:
    """Start the stack (see the module's docstring); return it once every service answers."""
    folder = folder.resolve()
    existing = Stack.load(folder)
    if existing is not None:
        dead = [s.name for s in existing.services.values() if s.process() is None]
        if not dead:
            say(f"the stack in {folder} is already up")
            return existing
        raise StackError(
            f"the stack in {folder} is partly down ({', '.join(dead)} not running): "
            f"run `selfreward stack down --dir {folder}` first"
        )
    if shutil.which("redis-server") is None:
        raise StackError("redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server)")
    config_path = config_path.resolve()
    base_env = dict(os.environ if environ is None else environ)
    config: RunConfig = load_config(config_path, environ=base_env)
    artifact_root = Path(config.artifact_root).expanduser()
    if not artifact_root.is_absolute():
        artifact_root = (Path.cwd() / artifact_root).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    stack = Stack(
        dir=str(folder),
        config=str(config_path),
        token=secrets.token_urlsafe(24),
        artifact_root=str(artifact_root),
        started_at=time.time(),
    )
    try:
        _up(stack, config, config_path, folder, base_env, policy_url, policy_timeout_s, say)
    except BaseException:
        say("stopping what was started")
        down(folder, stack=stack, say=lambda _m: None)
        raise
    return stack


def _up(
    stack: Stack,
    config: RunConfig,
    config_path: Path,
    folder: Path,
    base_env: dict[str, str],
    policy_url: str | None,
    policy_timeout_s: float,
    say: Callable[[str], None],
) -> None:
    env = {**base_env, "PYTHONUNBUFFERED": "1", "SELFREWARD_ARTIFACT_ROOT": stack.artifact_root}

    def started(service: Service, timeout_s: float) -> None:
        stack.services[service.name] = service
        stack.save()  # every PID is on disk before the next one starts: `down` finds them all
        _wait_healthy(service, timeout_s, say, stack.services["redis"].url)

    # Redis, persistent under DIR/redis
    port = _free_port()
    redis_dir = folder / "redis"
    redis_dir.mkdir(exist_ok=True)
    cmd = [
        str(shutil.which("redis-server")),
        "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
        "--dir", str(redis_dir), "--appendonly", "yes", "--daemonize", "no",
    ]  # fmt: skip
    service = _start("redis", cmd, folder, env)
    service.url = f"redis://127.0.0.1:{port}/0"
    started(service, 30)
    env["REDIS_URL"] = stack.redis_url

    def server(name: str, args: list[str], health: str, service_env: Mapping[str, str]) -> Service:
        """A selfreward HTTP server on a free loopback port (`args` after `selfreward`)."""
        port = _free_port()
        cmd = [*SELFREWARD, *args, "--host", "127.0.0.1", "--port", str(port)]
        service = _start(name, cmd, folder, service_env)
        service.url = f"http://127.0.0.1:{port}"
        service.health = f"{service.url}{health}"
        return service

    # the policy server (vLLM), unless one is given
    if policy_url is None:
        service = server("policy", ["policy", "serve", "--config", str(config_path)], "/v1/models", env)
        say(f"policy server starting ({config.model.base}; vLLM takes a minute or more on CPU)")
        started(service, policy_timeout_s)
        policy_url = service.url or ""
    policy_url = policy_url.rstrip("/")

    # the judge service
    judge_args = ["serve", "judge", "--config", str(config_path)]
    started(server("judge", judge_args, "/healthz", {**env, "POLICY_URL": policy_url}), 120)

    # the coordinator: runs posted to it use this policy server and this judge service, and may
    # name files under the config's folder, the artifact root and DIR
    coord_env = {
        **env,
        "SELFREWARD_API_TOKEN": stack.token,
        "SELFREWARD_SERVICES__POLICY_URL": policy_url,
        "SELFREWARD_SERVICES__JUDGE_URL": stack.services["judge"].url or "",
        "SELFREWARD_ALLOWED_PATHS": os.pathsep.join(
            [
                str(config_path.parent),
                stack.artifact_root,
                str(folder),
                *_named_folders(config),
                *_extra_paths(base_env),
            ]
        ),
    }
    started(server("coordinator", ["serve", "coordinator"], "/healthz", coord_env), 120)

    # stage workers for every queue
    for name, queues in WORKER_QUEUES.items():
        worker_name = f"stack-{name}-{secrets.token_hex(4)}"
        cmd = [
            *SELFREWARD,
            "worker",
            "start",
            *(a for q in queues for a in ("--queue", q)),
            "--name",
            worker_name,
        ]
        service = _start(name, cmd, folder, env)
        service.health = worker_name
        started(service, 120)
    _write_run_body(config, config_path, folder)


def _named_folders(config: RunConfig) -> list[str]:
    """The folders of the files the stack's own config names (the model folder, templates,
    prompt files): runs posted to this stack may name them, as the config itself does."""
    from selfreward.api.coordinator.trust import Deployment

    out = []
    for _field, value in Deployment.paths_named(config):
        path = Path(value).expanduser().resolve()
        out.append(str(path if path.is_dir() else path.parent))
    return out


def _extra_paths(env: Mapping[str, str]) -> list[str]:
    return [p for p in (env.get("SELFREWARD_ALLOWED_PATHS") or "").split(os.pathsep) if p.strip()]


def _write_run_body(config: RunConfig, config_path: Path, folder: Path) -> None:
    """DIR/run.json: the config file's content as the JSON body of POST /runs."""
    import yaml

    from selfreward.api.coordinator.trust import Deployment

    try:
        body = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    # a posted run names files by absolute paths: relative ones are made so (from this folder)
    for where, value in Deployment.paths_named(config):
        node: Any = body
        for key in where[:-1]:
            node = (
                node[int(key)]
                if isinstance(node, list)
                else node.get(key, {})
                if isinstance(node, dict)
                else {}
            )
        raw = node.get(where[-1]) if isinstance(node, dict) else None
        if raw == str(value) and not Path(raw).expanduser().is_absolute():
            node[where[-1]] = str(Path(raw).expanduser().resolve())
    atomic_write_text(folder / "run.json", json.dumps(body, indent=2) + "\n")


def down(
    folder: Path,
    *,
    stack: Stack | None = None,
    grace_s: float = 30.0,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Stop every process of the stack in `folder` (workers first, Redis last); return the names
    of those that were running. stack.json is removed once none is left."""
    folder = folder.resolve()
    stack = stack or Stack.load(folder)
    if stack is None:
        say(f"no stack in {folder}")
        return []
    stopped = []
    for name in reversed(ORDER):
        service = stack.services.get(name)
        if service is None:
            continue
        proc = service.process()
        if proc is None:
            continue
        _stop_group(proc, grace_s)
        stopped.append(name)
        say(f"{name} stopped (pid {service.pid})")
    left = [s.name for s in stack.services.values() if s.process() is not None]
    if left:
        raise StackError(f"still running after SIGKILL: {', '.join(left)}")
    (folder / STACK_FILE).unlink(missing_ok=True)
    return stopped


def _stop_group(proc: psutil.Process, grace_s: float) -> None:
    """SIGTERM the process's group (it leads one: start_new_session), then SIGKILL what is left
    of it, children included."""
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(members, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=10)


def status(folder: Path) -> list[dict[str, Any]]:
    """Each service of the stack in `folder`: name, pid, url, running, answering, log."""
    stack = Stack.load(folder.resolve())
    if stack is None:
        return []
    out = []
    for name in ORDER:
        service = stack.services.get(name)
        if service is None:
            continue
        running = service.process() is not None
        out.append(
            {
                "service": name,
                "pid": service.pid,
                "url": service.url,
                "running": running,
                "answering": running and healthy(service, stack.redis_url),
                "log": service.log,
            }
        )
    return out


__all__ = ["Stack", "StackError", "down", "status", "up"]
