"""`selfreward run CONFIG`: the embedded mode (one machine, stages in this process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from selfreward.cli.ui import RichProgressSink, console, friendly_errors, print_table


def _num(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _result(stage: str, m: dict[str, Any]) -> str:
    """One line per stage for the summary table."""
    if stage == "prepare":
        c = m.get("seed_counts") or {}
        return f"seed: ift={c.get('ift')} eft_train={c.get('eft_train')} eft_eval={c.get('eft_eval')}"
    if stage in ("sft", "train"):
        met = m.get("metrics") or {}
        parts = [f"{m.get('model')} steps={m.get('steps')} examples={m.get('examples')}"]
        if "first_loss" in met and "last_loss" in met:
            parts.append(f"loss {_num(met['first_loss'])}->{_num(met['last_loss'])}")
        if "rewards/margins" in met:
            parts.append(f"margin={_num(met['rewards/margins'])} acc={_num(met.get('rewards/accuracies'))}")
        return " ".join(parts)
    if stage == "publish":
        return f"{m.get('served_name')} (fingerprint diff {_num(m.get('max_abs_diff'))})"
    if stage == "prompts":
        return f"prompts={m.get('prompts')} attempts={m.get('attempts')} rejected={m.get('rejected', {})}"
    if stage == "candidates":
        extra = f" teacher={m['teacher_answers']}" if m.get("teacher_answers") else ""
        return f"candidates={m.get('candidates')}{extra}"
    if stage == "judgments":
        if m.get("skipped"):
            return str(m["skipped"])
        return f"judged={m.get('judged')} parse_failures={m.get('parse_failures')} by {m.get('judge')}"
    if stage == "pairs":
        return (
            f"pairs={m.get('pairs')} tie_rate={_num(m.get('tie_rate', 0.0))} "
            f"parse_failure_rate={_num(m.get('parse_failure_rate', 0.0))}"
        )
    if stage == "evaluate":
        met = m.get("metrics") or {}
        parts = []
        if "wins" in met:
            lo, hi = met.get("win_rate_ci") or (None, None)
            parts.append(
                f"{m.get('model')} vs {m.get('baseline')}: w/t/l={met['wins']}/{met['ties']}/{met['losses']} "
                f"win_rate={_num(met['win_rate'])} [{_num(lo)}, {_num(hi)}]"
            )
        if "rm_pairwise_accuracy" in met:
            parts.append(f"judge vs humans: pairwise_acc={_num(met['rm_pairwise_accuracy'])}")
        return "; ".join(parts)
    return ""


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
    from selfreward.loop.embedded import run_embedded
    from selfreward.progress import Progress

    config = load_config(config_file)
    console.print(
        f"[bold]run[/] {config.name}: {config.variant}, M0 = {config.model.base}, "
        f"{config.iterations if iterations is None else iterations} iteration(s) -> "
        f"{config.artifact_root / 'runs' / config.name}"
    )

    def show(outcome) -> None:  # type: ignore[no-untyped-def]
        mark = "[green]done[/]" if outcome.status == "ran" else "[dim]already done[/]"
        console.print(f"  iter {outcome.t} {outcome.stage:<10} {mark} ({outcome.seconds:.0f} s)")

    with RichProgressSink(transient=True) as sink:
        result = run_embedded(
            config, Progress(sink), iterations=iterations, policy_url=policy_url, on_stage=show
        )
    rows = [
        (o.t, o.stage, o.status, f"{o.seconds:.1f}", _result(o.stage, o.manifest)) for o in result.outcomes
    ]
    print_table("summary", ["iter", "stage", "status", "seconds", "result"], rows)
    from selfreward.reports.run_report import build_run_report
    from selfreward.storage import RunLayout

    page = build_run_report(RunLayout(config.artifact_root, config.name))
    console.print(f"total {result.seconds / 60:.1f} min; artifacts in {result.run_dir}")
    console.print(f"report: {page}")
