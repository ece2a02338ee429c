"""The embedded mode: a whole run on one machine, in this process, with a vLLM server it starts.

`run_embedded(config)` executes the set-up (iteration 0) and iterations 1..config.iterations
with the same stages the RQ driver runs as jobs: for each t it runs `plan.pending(layout, t, method)`
in order, each with `stage.run_stage` (one event loop per stage). It starts the policy server
(selfreward.policy.launcher.PolicyServer) on the prepared base model when the first stage that
needs it (`Stage.needs_policy`) runs, with every adapter already published by this run, and
stops it at the end. With `policy.sleep_during_training` resolving on (a policy on cuda,
training on the same GPU: selfreward.policy.sleep), the policy sleeps while each training stage
runs and is woken after it, also when the training fails; with `policy.stop_during_training`
the server this run started is stopped before each training stage and started again, with the
published adapters, by the next stage that needs it (the trainer and vLLM never hold memory at
the same time). Training stages run in a child process (`training.subprocess: auto`). Finished
stages are skipped (their manifests exist), so running the same
command again after a crash or Ctrl-C resumes at the first unfinished stage. There is no Redis
in this mode: the judges a stage builds cache their verdicts in-process, and the stage files
are the resume state.

For the dashboard (`selfreward ui`), a running stage's progress is written to
`iter-<t>/<stage>.progress.json` (at most once a second) and a failed stage's error to
`iter-<t>/<stage>.error.json` (stage, record, message), removed when the stage succeeds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfreward.config import RunConfig, dump_config
from selfreward.errors import ConfigError, StageError, named_record
from selfreward.evaluation.judge_health import collapse_stop
from selfreward.memory import TreeMemory
from selfreward.progress import NULL_PROGRESS, Progress, file_sink
from selfreward.stages import plan
from selfreward.stages.stage import Stage, StageContext, model_name, run_stage
from selfreward.storage import RunLayout, atomic_write_json, atomic_write_text, read_manifest, write_manifest

# fields that may differ between two invocations of the same run (where, not what)
LOCATION_FIELDS = ("artifact_root",)


@dataclass
class StageOutcome:
    t: int
    stage: str
    status: str  # "ran" | "done before"
    seconds: float
    manifest: dict[str, Any]
    peak_rss_bytes: int | None = None  # the process tree's peak while the stage ran (selfreward.memory)


@dataclass
class RunResult:
    run_dir: str
    outcomes: list[StageOutcome] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None  # why the run stopped before its last iteration (a judge collapse)
    peak_rss_bytes: int = 0  # the process tree's peak over this invocation (selfreward.memory)


def check_run_config(layout: RunLayout, config: RunConfig) -> None:
    """Write runs/<run>/config.yaml, or check that a resumed run has the same config."""
    text = dump_config(config)
    if layout.config_path.is_file():
        old = yaml.safe_load(layout.config_path.read_text(encoding="utf-8")) or {}
        new = yaml.safe_load(text)
        for f in LOCATION_FIELDS:
            old.pop(f, None)
            new.pop(f, None)
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(
                [
                    f"run {config.name!r} already exists in {layout.run_dir} with another config "
                    f"(sections that differ: {', '.join(changed)}); resume it with the same config, "
                    "or give this one another name"
                ],
                str(layout.config_path),
            )
        return
    atomic_write_text(layout.config_path, text)


def stage_error(stage: str, t: int, exc: BaseException) -> dict[str, Any]:
    """What `<stage>.error.json` holds: the stage, the record the error names (if any), the message."""
    message = str(exc) or type(exc).__name__
    return {
        "stage": stage,
        "t": t,
        "record": named_record(message),
        "message": message[:4000],
        "type": type(exc).__name__,
        "user_error": isinstance(exc, StageError),
        "failed_at": time.time(),
    }


def run_stage_with_files(ctx: StageContext, stage: Any) -> dict[str, Any]:
    """`run_stage` with the dashboard's files: progress while it runs, the error if it fails."""
    layout, t = ctx.layout, ctx.t
    error_path = layout.stage_error(t, stage.name)
    sink = file_sink(layout.stage_progress(t, stage.name), stage=stage.name, t=t)
    ctx.progress = Progress(*ctx.progress.sinks, sink)
    try:
        manifest = run_stage(ctx, stage)
    except Exception as exc:
        atomic_write_json(error_path, stage_error(stage.name, t, exc))
        raise
    error_path.unlink(missing_ok=True)
    return manifest


def published_adapters(layout: RunLayout) -> list[Any]:
    """Adapters published by earlier (finished) publish stages, to serve from the start."""
    from selfreward.policy.launcher import Adapter

    out = []
    t = 0
    while (m := read_manifest(layout.stage_manifest(t, "publish"))) is not None:
        out.append(Adapter(m["served_name"], layout.model_dir(model_name(t + 1)).resolve()))
        t += 1
    return out


def policy_asleep_for(
    config: RunConfig, stage: Stage, live_url: str | None, *, own_server: bool
) -> contextlib.AbstractContextManager[Any]:
    """The policy asleep while a training stage runs (policy.sleep_during_training), where a
    policy is up (`live_url`: the server this run started, or the one it was given; None before
    the first stage that needs one); a no-op for every other stage."""
    from selfreward.policy.sleep import asleep_while

    if not stage.trains or live_url is None:
        return contextlib.nullcontext()
    return asleep_while(config, live_url, own_server=own_server)


def run_embedded(
    config: RunConfig,
    progress: Progress = NULL_PROGRESS,
    *,
    iterations: int | None = None,
    policy_url: str | None = None,
    on_stage: Callable[[StageOutcome], None] | None = None,
) -> RunResult:
    """Run the set-up and iterations 1..`iterations` (default config.iterations) to completion.

    `policy_url`: use that running policy server (serving the base model as
    model.served_name, LoRA enabled) instead of starting one.
    """
    from selfreward.policy.launcher import PolicyServer
    from selfreward.policy.prepare import prepare_model
    from selfreward.policy.sleep import run_sleeps

    layout = RunLayout(config.artifact_root, config.name)
    check_run_config(layout, config)
    last = config.iterations if iterations is None else iterations
    result = RunResult(str(layout.run_dir))
    started = time.time()
    with contextlib.ExitStack() as stack:
        memory = stack.enter_context(TreeMemory())
        server: PolicyServer | None = None

        def server_url() -> str:
            nonlocal server
            if policy_url is not None:
                return policy_url
            if server is None:
                base = prepare_model(
                    config.model.base,
                    layout.cache_dir,
                    chat_template=config.model.chat_template,
                    progress=progress,
                )
                task = progress.task("start policy server (vLLM)", None)
                server = PolicyServer(
                    base,
                    served_name=config.model.served_name,
                    policy=config.policy,
                    max_model_len=config.model.max_model_len,
                    adapters=published_adapters(layout),
                    log_dir=layout.logs_dir / "policy",
                    sleep_mode=run_sleeps(config, own_server=True),  # this server, this machine's GPU
                )
                stack.enter_context(server)
                task.close()
            return server.url

        for t in range(0, last + 1):
            stop = collapse_stop(layout, t - 1, config)
            if stop is not None:
                result.stopped = stop
                break
            todo = {s.name for s in plan.pending(layout, t, config.variant)}
            for stage in plan.stages_of(t, config.variant):
                if stage.name not in todo:
                    done = read_manifest(layout.stage_manifest(t, stage.name)) or {}
                    outcome = StageOutcome(
                        t, stage.name, "done before", float(done.get("seconds", 0.0)), done
                    )
                else:
                    if stage.trains and server is not None and config.policy.stop_during_training:
                        # the next stage that needs the policy starts it again (published adapters)
                        server.stop()
                        server = None
                    url = server_url() if stage.needs_policy(config) else policy_url
                    ctx = StageContext(
                        config, layout, t, progress, policy_url=url, redis_url=None, embedded=True
                    )
                    t0 = time.time()
                    memory.start_window()
                    live = server.url if server is not None else policy_url
                    with policy_asleep_for(config, stage, live, own_server=policy_url is None):
                        manifest = run_stage_with_files(ctx, stage)
                    peak = memory.window_peak()
                    manifest = record_peak(layout.stage_manifest(t, stage.name), manifest, peak)
                    outcome = StageOutcome(t, stage.name, "ran", time.time() - t0, manifest, peak)
                result.outcomes.append(outcome)
                if on_stage is not None:
                    on_stage(outcome)
        memory.sample()
        result.peak_rss_bytes = memory.peak
    result.seconds = time.time() - started
    return result


def record_peak(path: Path, manifest: dict[str, Any], peak: int) -> dict[str, Any]:
    """The stage manifest with `peak_rss_bytes` (the process tree's peak while it ran), rewritten."""
    manifest = {**manifest, "peak_rss_bytes": peak}
    if path.is_file():
        write_manifest(path, manifest)
    return manifest
