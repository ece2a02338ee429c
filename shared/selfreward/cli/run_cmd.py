"""`selfreward run CONFIG`: the embedded mode (one machine, stages in this process)."""

from __future__ import annotations

from pathlib import Path

import typer

from selfreward.cli.ui import RichProgressSink, console, friendly_errors, print_table


@friendly_errors
def run(
    config_file: Path = typer.Argument(..., help="run config YAML (e.g. configs/quickstart.yaml)"),
    iterations: int | None = typer.Option(
        None, "--iterations", "-n", help="default: the config's iterations"
    ),
    policy_url: str | None = typer.Option(
        None,
        "--policy-url",
        help="use this running vLLM server (base served as model.served_name) instead of starting one",
    ),
) -> None:
    """Run the set-up (SFT -> M1) and the iterations of a config on this machine, resumably.

    Starts a vLLM policy server on the prepared base model, runs every stage in this process
    (the same stage code the coordinator's workers run), and prints a summary. Running the
    same command again resumes at the first unfinished stage. Outputs: <artifact_root>/runs/<name>/.
    """
    from selfreward.config import load_config
    from selfreward.drivers.embedded import run_embedded
    from selfreward.memory import GB
    from selfreward.progress import Progress

    config = load_config(config_file)
    console.print(
        f"[bold]run[/] {config.name}: {config.variant}, M0 = {config.model.base}, "
        f"{config.iterations if iterations is None else iterations} iteration(s) -> "
        f"{config.artifact_root / 'runs' / config.name}"
    )

    def show(outcome) -> None:  # type: ignore[no-untyped-def]
        mark = "[green]done[/]" if outcome.status == "ran" else "[dim]already done[/]"
        peak = "" if outcome.peak_rss_bytes is None else f", peak {outcome.peak_rss_bytes / GB:.1f} GB"
        console.print(f"  iter {outcome.t} {outcome.stage:<10} {mark} ({outcome.seconds:.0f} s{peak})")

    with RichProgressSink(transient=True) as sink:
        result = run_embedded(
            config, Progress(sink), iterations=iterations, policy_url=policy_url, on_stage=show
        )
    from selfreward.stages.plan import stage_named

    rows = [
        (
            o.t,
            o.stage,
            o.status,
            f"{o.seconds:.1f}",
            "" if o.peak_rss_bytes is None else f"{o.peak_rss_bytes / GB:.2f}",
            stage_named(o.stage).result_of(o.manifest).summary(),
        )
        for o in result.outcomes
    ]
    print_table("summary", ["iter", "stage", "status", "seconds", "peak GB", "result"], rows)
    from selfreward.reports.run_report import build_run_report
    from selfreward.storage import RunLayout

    page = build_run_report(RunLayout(config.artifact_root, config.name))
    console.print(
        f"total {result.seconds / 60:.1f} min, peak memory {result.peak_rss_bytes / GB:.2f} GB "
        f"(resident, this process and its children: vLLM, the trainer); artifacts in {result.run_dir}"
    )
    console.print(f"report: {page}")
    from selfreward.cli.dashboard_cmd import open_command

    # one line, never wrapped: a command to copy
    console.print(
        f"dashboard: {open_command(config.artifact_root)}  (then open http://127.0.0.1:8765/ui/)",
        soft_wrap=True,
        markup=False,
    )
    if result.stopped:
        console.print(f"[bold red]stopped[/]: {result.stopped}")
        raise typer.Exit(1)
