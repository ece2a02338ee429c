"""`selfreward policy ...`: prepare models, run vLLM's server, publish and manage adapters.

Settings come from a run config (`--config`, else defaults and SELFREWARD_* variables) and
command-line options override them. docs/policy.md has the details.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import typer

from selfreward.cli.ui import RichProgressSink, console, err_console, friendly_errors, print_table

app = typer.Typer(
    help="The policy service: vLLM's OpenAI-compatible server, models and adapters (docs/policy.md).",
    no_args_is_help=True,
)
adapters_app = typer.Typer(help="LoRA adapters of a running policy server.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

CONFIG_HELP = "run config YAML (default: built-in defaults + SELFREWARD_* variables)"


def _config(config_path: Path | None, **updates: dict[str, Any]) -> Any:
    """The run config with per-section command-line overrides (None values are not overrides)."""
    from selfreward.config import command_config

    return command_config(config_path, **updates)


def _url(url: str | None, config_path: Path | None) -> str:
    return url or _config(config_path).services.policy_url


@app.command("prepare")
@friendly_errors
def prepare(
    model: str = typer.Argument(
        ..., help="built-in alias (smollm2-135m-instruct), a .gguf file, a model folder, or a hub id"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="prepared folder (default: the cache, by content hash)"
    ),
    config_path: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
    chat_template: Path | None = typer.Option(
        None, "--chat-template", help="Jinja file replacing the template"
    ),
    revision: str | None = typer.Option(None, "--revision", help="hub revision (hub ids only)"),
) -> None:
    """Turn MODEL into a servable folder (safetensors, tokenizer, chat template); print its path."""
    from selfreward.policy.prepare import prepare_model
    from selfreward.progress import Progress
    from selfreward.storage import RunLayout

    config = _config(config_path)
    template = chat_template or config.model.chat_template
    cache = RunLayout(config.artifact_root, config.name).cache_dir
    with RichProgressSink(transient=True) as sink:
        path = prepare_model(
            model, cache, out=out, chat_template=template, revision=revision, progress=Progress(sink)
        )
    console.print(str(path), markup=False, highlight=False, soft_wrap=True)


@app.command("serve")
@friendly_errors
def serve(
    model_dir: Path | None = typer.Option(
        None, "--model", help="prepared model folder (default: prepare the config's model.base)"
    ),
    config_path: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
    adapters: list[str] = typer.Option(
        [], "--adapters", help="NAME=PATH of a LoRA adapter to serve (repeatable)"
    ),
    device: str | None = typer.Option(None, "--device", help="cpu | cuda (policy.device)"),
    host: str | None = typer.Option(None, "--host", help="policy.host"),
    port: int | None = typer.Option(None, "--port", help="policy.port (0: a free port)"),
    served_name: str | None = typer.Option(None, "--served-name", help="model.served_name"),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="model.max_model_len"),
) -> None:
    """Run vLLM's OpenAI-compatible server in the foreground until Ctrl-C or SIGTERM."""
    from selfreward.policy.launcher import Adapter, PolicyServer
    from selfreward.policy.prepare import prepare_model
    from selfreward.progress import Progress
    from selfreward.storage import RunLayout

    config = _config(
        config_path,
        policy={"device": device, "host": host, "port": port},
        model={"served_name": served_name, "max_model_len": max_model_len},
    )
    if model_dir is None:
        with RichProgressSink(transient=True) as sink:
            model_dir = prepare_model(
                config.model.base,
                RunLayout(config.artifact_root, config.name).cache_dir,
                chat_template=config.model.chat_template,
                progress=Progress(sink),
            )
    server = PolicyServer.from_config(config, model_dir, adapters=[Adapter.parse(a) for a in adapters])

    def forward(signum: int, _frame: Any) -> None:
        err_console.print(
            f"{signal.Signals(signum).name}: stopping the policy server", highlight=False, soft_wrap=True
        )
        server.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        err_console.print(
            f"starting vLLM ({config.policy.device}); log: {server.log_path}", highlight=False, soft_wrap=True
        )
        server.wait_ready()
        console.print(
            f"serving {server.model!r} from {model_dir} at {server.url}/v1",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        code = server.wait()
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        err_console.print(
            f"the policy server exited with status {code}; log: {server.log_path}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


@app.command("publish")
@friendly_errors
def publish(
    adapter_dir: Path = typer.Argument(..., help="adapter folder with manifest.json (fingerprint)"),
    name: str | None = typer.Option(None, "--name", help="served name stem (default: the folder's name)"),
    parent: str | None = typer.Option(
        None, "--parent", help="served model it must differ from (default: base)"
    ),
    url: str | None = typer.Option(None, "--url", help="policy server (default: services.policy_url)"),
    pool: str | None = typer.Option(
        None,
        "--pool",
        help="publish to every replica HOST:PORT[,...] resolves to (default: services.policy_pool, "
        "unless --url names one server)",
    ),
    tolerance: float | None = typer.Option(
        None, "--tolerance", help="policy.fingerprint_tolerance (default by device)"
    ),
    allow_unchanged: bool = typer.Option(
        False, "--allow-unchanged", help="skip the differs-from-parent check"
    ),
    config_path: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Load an adapter as NAME-<sha256 prefix> and verify the server reproduces its fingerprint
    (on every replica of a pool; linked for their LoRA resolver when services.policy_lora_dir is set)."""
    import asyncio

    from selfreward.config import ServicesConfig
    from selfreward.policy.pool import publish_to_policy
    from selfreward.policy.publish import tolerance_for

    config = _config(config_path, policy={"fingerprint_tolerance": tolerance})
    services = ServicesConfig.model_validate(
        {
            **config.services.model_dump(),
            "policy_url": url or config.services.policy_url,
            "policy_pool": pool or (None if url else config.services.policy_pool),
        }
    )

    async def go() -> dict[str, Any]:
        return await publish_to_policy(
            services,
            adapter_dir,
            name=name,
            parent=parent,
            tol=tolerance_for(config.policy),
            require_change=not allow_unchanged,
        )

    result = asyncio.run(go())
    console.print(json.dumps(result, indent=2), markup=False, highlight=False)


@app.command("fingerprint")
@friendly_errors
def fingerprint(
    adapter_dir: Path = typer.Argument(..., help="PEFT adapter folder"),
    base: Path = typer.Option(..., "--base", help="the prepared base model folder it was trained on"),
) -> None:
    """Compute an adapter's fingerprint (transformers + PEFT, fp32) into its manifest.json."""
    from selfreward.fingerprint import adapter_manifest_fields, fingerprint_model_dir
    from selfreward.storage import read_manifest, write_manifest

    fields = adapter_manifest_fields(adapter_dir, fingerprint_model_dir(base, adapter_dir), base)
    manifest = read_manifest(adapter_dir / "manifest.json") or {"name": adapter_dir.name}
    manifest.update(fields)
    write_manifest(adapter_dir / "manifest.json", manifest)
    console.print(
        f"{adapter_dir / 'manifest.json'}: adapter_sha256 {fields['adapter_sha256'][:12]}", highlight=False
    )


@adapters_app.command("list")
@friendly_errors
def adapters_list(
    url: str | None = typer.Option(None, "--url", help="policy server (default: services.policy_url)"),
    config_path: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Models the server serves: the base and every LoRA adapter."""
    import asyncio

    from selfreward.llm.openai import OpenAICompatClient

    async def go() -> list[dict[str, Any]]:
        async with OpenAICompatClient(_url(url, config_path), max_retries=1) as client:
            return await client.models()

    rows = [
        (m["id"], _lineage_parent(m), m.get("parent") or "", m.get("root") or "") for m in asyncio.run(go())
    ]
    print_table("served models", ["name", "trained from", "served on", "path"], rows)


def _lineage_parent(model: dict[str, Any]) -> str:
    """The model an adapter was trained from, from its manifest beside the adapter (vLLM's
    `parent` is only the base the adapter is served on); `?` where the folder is not readable."""
    from selfreward.storage import read_manifest

    if not model.get("parent"):
        return "(base)"
    root = Path(str(model.get("root") or ""))
    for path in (root / "manifest.json", root.parent / "manifest.json"):
        try:
            manifest = read_manifest(path)
        except Exception:
            manifest = None
        if manifest is not None and "name" in manifest:
            parent = manifest.get("parent") or {}
            return str(parent.get("name") or "(base)") if isinstance(parent, dict) else str(parent)
    return "?"


@adapters_app.command("load")
@friendly_errors
def adapters_load(
    name: str = typer.Argument(..., help="served name"),
    path: Path = typer.Argument(..., help="adapter folder (as the server sees it)"),
    url: str | None = typer.Option(None, "--url", help="policy server (default: services.policy_url)"),
    config_path: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Load an adapter without verification (`publish` verifies)."""
    import asyncio

    from selfreward.llm.openai import OpenAICompatClient

    async def go() -> None:
        async with OpenAICompatClient(_url(url, config_path), max_retries=1) as client:
            await client.load_adapter(name, str(path.resolve()))

    asyncio.run(go())
    console.print(f"loaded {name}", highlight=False)


@adapters_app.command("unload")
@friendly_errors
def adapters_unload(
    name: str = typer.Argument(..., help="served name"),
    url: str | None = typer.Option(None, "--url", help="policy server (default: services.policy_url)"),
    config_path: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Stop serving an adapter."""
    import asyncio

    from selfreward.llm.openai import OpenAICompatClient
    from selfreward.policy.publish import unpublish_adapter

    async def go() -> None:
        async with OpenAICompatClient(_url(url, config_path), max_retries=1) as client:
            await unpublish_adapter(client, name)

    asyncio.run(go())
    console.print(f"unloaded {name}", highlight=False)
