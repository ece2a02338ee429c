"""RQ job functions of the `train` queue, and helpers to enqueue them.

Signatures (the coordinator enqueues these by path):

    selfreward.training.jobs.sft_job(config, name="m1", seed_dir=None, base_model=None) -> dict
    selfreward.training.jobs.dpo_job(config, pairs, name, parent=None, base_model=None) -> dict

- `config`: the run config as a dict (`RunConfig.model_dump(mode="json")`); it is validated
  again here and SELFREWARD_* variables of the worker do not override it.
- `seed_dir`: folder with ift.jsonl and eft_train.jsonl (default runs/<run>/seed).
- `pairs`: pairs.jsonl of the iteration; `parent`: the model name trained further (M(t)),
  None = start from M0.
- `base_model`: the prepared M0 folder (default: `model.base` when it is a local folder).
- returns the model's manifest (also at runs/<run>/models/<name>/manifest.json).

Progress goes to `job.meta["progress"]`: task, step, total_steps (also as done/total), loss
(DPO: rewards/margins too), eta_s, elapsed_s, resumed_from_step (after a resume), finished.
A job whose manifest exists is a no-op returning it; a job killed mid-training and enqueued again
resumes from its last checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from selfreward.config import RunConfig, build_config
from selfreward.progress import NULL_PROGRESS, Progress, ProgressEvent, rq_meta_sink

from .request import dpo_request, sft_request
from .runner import run

QUEUE = "train"
DEFAULT_TIMEOUT_S = 48 * 3600


def _config(config: dict[str, Any] | RunConfig) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    return build_config(config, environ={}, source="job config")


def meta_sink(job: Any) -> Any:
    """`rq_meta_sink` with explicit `step` and `total_steps` keys (= done/total) in job.meta["progress"]."""
    inner = rq_meta_sink(job)

    def sink(event: ProgressEvent) -> None:
        inner(replace(event, fields={**event.fields, "step": event.done, "total_steps": event.total}))

    return sink


def _progress() -> Progress:
    from rq import get_current_job

    job = get_current_job()
    return Progress(meta_sink(job)) if job is not None else NULL_PROGRESS


def sft_job(
    config: dict[str, Any],
    name: str = "m1",
    seed_dir: str | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """M0 + seed data -> adapter `name` (SFT on IFT, plus EFT when data.eft_in_sft)."""
    request = sft_request(_config(config), name=name, seed_dir=seed_dir, base_model=base_model)
    return run(request, _progress())


def dpo_job(
    config: dict[str, Any],
    pairs: str,
    name: str,
    parent: str | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """M(t) = `parent` + pairs.jsonl -> adapter `name` = M(t+1); the reference model is M(t)."""
    request = dpo_request(_config(config), pairs=pairs, name=name, parent=parent, base_model=base_model)
    return run(request, _progress())


def job_id(run: str, name: str) -> str:
    """`train-<run>-<name>`, with characters RQ does not allow in ids replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"train-{run}-{name}")


def _absolute(config: RunConfig, **paths: str | None) -> dict[str, Any]:
    """Paths as the worker must see them: absolute (workers run elsewhere, with another cwd)."""
    from pathlib import Path

    resolved = config.model_copy(update={"artifact_root": config.artifact_root.resolve()})
    out: dict[str, Any] = {"config": resolved.model_dump(mode="json")}
    out.update({k: (str(Path(v).resolve()) if v is not None else None) for k, v in paths.items()})
    return out


def _enqueue(queue: Any, func: Any, kwargs: dict[str, Any], job_id: str, retries: int, timeout_s: int) -> Any:
    from rq import Retry

    return queue.enqueue(
        func,
        kwargs=kwargs,
        job_id=job_id,
        job_timeout=timeout_s,
        result_ttl=7 * 24 * 3600,
        failure_ttl=7 * 24 * 3600,
        retry=Retry(max=retries) if retries > 0 else None,
        description=f"{func.__name__} {kwargs.get('name')}",
    )


def enqueue_sft(
    queue: Any,
    config: RunConfig,
    *,
    name: str = "m1",
    seed_dir: str | None = None,
    base_model: str | None = None,
    retries: int = 2,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> Any:
    """Enqueue `sft_job` on an `rq.Queue` (job id: `job_id(run, name)`); returns the rq Job."""
    kwargs = {"name": name, **_absolute(config, seed_dir=seed_dir, base_model=base_model)}
    return _enqueue(queue, sft_job, kwargs, job_id(config.name, name), retries, timeout_s)


def enqueue_dpo(
    queue: Any,
    config: RunConfig,
    *,
    pairs: str,
    name: str,
    parent: str | None,
    base_model: str | None = None,
    retries: int = 2,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> Any:
    """Enqueue `dpo_job` on an `rq.Queue` (job id: `job_id(run, name)`); returns the rq Job."""
    kwargs = {"name": name, "parent": parent, **_absolute(config, pairs=pairs, base_model=base_model)}
    return _enqueue(queue, dpo_job, kwargs, job_id(config.name, name), retries, timeout_s)
