"""`selfreward train sft|dpo`: the trainer's jobs in-process (no Redis); `selfreward worker train`.

The commands run exactly what the RQ jobs run (`selfreward.training.runner.run`), with a
progress bar instead of job meta. Re-running a finished job prints its manifest and trains
nothing; re-running an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from selfreward.cli.ui import RichProgressSink, console, friendly_errors, print_table

app = typer.Typer(
    help="Train adapters: SFT (M0 -> M1) and DPO (M(t) -> M(t+1)), in-process.", no_args_is_help=True
)
worker_app = typer.Typer(help="Run RQ workers.", no_args_is_help=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("selfreward").setLevel(logging.INFO)


def _run(request: Any) -> dict[str, Any]:
    from selfreward.progress import Progress
    from selfreward.training.runner import run

    with RichProgressSink() as sink:
        return run(request, Progress(sink))


def _summary(manifest: dict[str, Any]) -> None:
    training, metrics, data = manifest["training"], manifest["metrics"], manifest["data"]
    nan = float("nan")
    rows: list[tuple[str, Any]] = [
        ("model", f"{manifest['name']} ({manifest['kind']})"),
        ("parent", (manifest.get("parent") or {}).get("name", "M0 (base)")),
        ("reference", manifest["reference_model"]),
        (
            "steps",
            f"{training['global_step']}/{training['total_steps']} (resumed from {training['resumed_from_step']})",
        ),
        ("examples", f"{data['examples']} of {data['read']} read; skipped {data['skipped'] or 'none'}"),
        ("truncated", data["truncated"]),
        (
            "loss first -> last",
            f"{metrics.get('first_loss', nan):.4g} -> {metrics.get('last_loss', nan):.4g}",
        ),
    ]
    if "rewards/margins" in metrics:
        rows.append(("rewards/margins", metrics["rewards/margins"]))
    if "tokens_per_s" in metrics:
        rows.append(("tokens/s, samples/s", f"{metrics['tokens_per_s']:.1f}, {metrics['samples_per_s']:.3g}"))
    rows.append(("adapter sha256", manifest["adapter_sha256"]))
    print_table(f"{manifest['run']}/{manifest['name']}", ["", "value"], rows)


@app.command("sft")
@friendly_errors
def sft(
    config: Path = typer.Option(..., "--config", "-c", help="run config YAML"),
    seed_dir: Path | None = typer.Option(
        None, help="seed folder (ift.jsonl, eft_train.jsonl); default runs/<run>/seed"
    ),
    name: str = typer.Option("m1", help="model name: runs/<run>/models/<name>/"),
    base_model: Path | None = typer.Option(
        None, help="prepared M0 folder; default: model.base (prepared when needed)"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every logged step"),
) -> None:
    """M0 + seed data (IFT, and EFT when data.eft_in_sft) -> LoRA adapter NAME."""
    from selfreward.config import load_config
    from selfreward.training.request import sft_request

    _setup_logging(verbose)
    request = sft_request(load_config(config), name=name, seed_dir=seed_dir, base_model=base_model)
    manifest = _run(request)
    _summary(manifest)
    console.print(f"model: {request.model_dir}")


@app.command("dpo")
@friendly_errors
def dpo(
    config: Path = typer.Option(..., "--config", "-c", help="run config YAML"),
    pairs: Path = typer.Option(..., help="pairs.jsonl (TRL conversational prompt/chosen/rejected)"),
    name: str = typer.Option(..., help="model name of M(t+1)"),
    parent: str | None = typer.Option(
        None, help="M(t): the model trained further and the reference; default M0"
    ),
    base_model: Path | None = typer.Option(
        None, help="prepared M0 folder; default: model.base (prepared when needed)"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every logged step"),
) -> None:
    """M(t) + preference pairs -> LoRA adapter NAME = M(t+1), DPO against M(t)."""
    from selfreward.config import load_config
    from selfreward.training.request import dpo_request

    _setup_logging(verbose)
    request = dpo_request(load_config(config), pairs=pairs, name=name, parent=parent, base_model=base_model)
    manifest = _run(request)
    _summary(manifest)
    console.print(f"model: {request.model_dir}")


@worker_app.command("train")
def worker_train(
    redis_url: str = typer.Option(..., help="redis://host:port/db"),
    queue: list[str] = typer.Option(["train"], help="queue(s) to listen on"),
    burst: bool = typer.Option(False, help="exit when the queues are empty"),
    with_scheduler: bool = typer.Option(False, help="also run RQ's scheduler (retries with an interval)"),
    name: str | None = typer.Option(None, help="worker name"),
) -> None:
    """Run a stage worker on the `train` queue (forks one process per job; see docs/training.md)."""
    from selfreward.drivers.worker import start_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    start_worker(redis_url, queue, burst=burst, name=name, with_scheduler=with_scheduler)


@worker_app.command("start")
def worker_start(
    queue: list[str] = typer.Option(
        ..., "--queue", help="queue(s) to serve: generate, judge, train, evaluate"
    ),
    redis_url: str = typer.Option(..., envvar="REDIS_URL", help="redis://host:port/db (default $REDIS_URL)"),
    burst: bool = typer.Option(False, help="exit when the queues are empty"),
    with_scheduler: bool = typer.Option(True, help="also run RQ's scheduler (stage retries use intervals)"),
    name: str | None = typer.Option(None, help="worker name"),
) -> None:
    """Run an RQ worker for the loop's stage jobs on the given queues (docs/architecture.md).

    Any queue mix works: a GPU host serves `train`, a CPU host `generate`, `judge` and `evaluate`.
    """
    from selfreward.drivers.worker import start_worker
    from selfreward.stages.stage import QUEUES

    unknown = sorted(set(queue) - set(QUEUES))
    if unknown:
        raise typer.BadParameter(f"unknown queue(s) {unknown}; queues: {list(QUEUES)}", param_hint="--queue")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    start_worker(redis_url, queue, burst=burst, name=name, with_scheduler=with_scheduler)
