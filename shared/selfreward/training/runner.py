"""Running one training job: checks, idempotence, resume, TRL training, the model folder.

Two layers:
- `run(request, progress)` is what the RQ job and the CLI call, once per job. It reads and checks
  the data with the tokenizer only (bad input fails before any model is loaded), returns the
  existing manifest when this exact job is already done, takes the job's lock, keeps or clears
  the checkpoints of an earlier attempt, then trains in-process or through `accelerate launch`
  (`training.accelerate_config`), and returns the manifest.
- `fit(request, progress)` trains, in this process or in every process `accelerate launch`
  starts: it resumes from the last complete checkpoint, and the main process writes
  runs/<run>/models/<name>/ (adapter, tokenizer, manifest.json) through a temporary folder that
  is renamed only when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from selfreward.errors import StageError
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.storage import (
    atomic_dir,
    atomic_write_json,
    read_manifest,
    sha256_dir,
    sha256_text,
    write_jsonl_atomic,
    write_manifest,
)

from .examples import TrainingData, load_dpo_data, load_sft_data
from .models import describe_reference, effective_lora, load_tokenizer
from .request import TrainRequest, base_model_sha256

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
STAGE_DIR = "final"
TRAINER_STATE = "trainer_state.json"


# ------------------------------------------------------------------ inputs and identity


def prepare(request: TrainRequest) -> tuple[Any, TrainingData]:
    """Tokenizer + checked examples: every input error surfaces here, before a model is loaded."""
    tokenizer = load_tokenizer(request)
    section = request.section
    if request.kind == "sft":
        data = load_sft_data(request.data, tokenizer, section.max_length, request.config.judge.template)
    else:
        data = load_dpo_data(request.data[0], tokenizer, section.max_length)
    if data.skipped:
        log.warning("%s: skipped %s of %d records", request.name, dict(data.skipped), data.read)
    for kind in data.lost_kinds():
        log.warning(
            "%s: none of the %d %r pairs is left to train on (skipped: %s); raise %s.max_length if they are too long",
            request.name,
            data.read_by_kind[kind],
            kind,
            dict(data.skipped_by_kind.get(kind, {})),
            request.kind,
        )
    return tokenizer, data


def job_identity(request: TrainRequest, data: TrainingData) -> dict[str, Any]:
    """Everything that decides the trained adapter; equal identities = the same job."""
    config = request.config
    parent = None
    if request.parent_dir is not None:
        parent_manifest = read_manifest(request.parent_dir / "manifest.json") or {}
        parent = {"name": request.parent, "adapter_sha256": parent_manifest.get("adapter_sha256")}
    identity = {
        "kind": request.kind,
        "base_model_sha256": base_model_sha256(request.base_model),
        "parent": parent,
        "data_sha256": data.sha256,
        "seed": config.seed,
        "lora": config.lora.model_dump(mode="json") if parent is None else "inherited",
        request.kind: request.section.model_dump(mode="json"),
        "precision": config.training.precision,
    }
    if request.preference_confidence is not None:  # only when set: earlier jobs keep their keys
        identity["preference_confidence"] = request.preference_confidence
    return identity


def job_key(identity: dict[str, Any]) -> str:
    return sha256_text(json.dumps(identity, sort_keys=True))


def _finished(request: TrainRequest, identity: dict[str, Any], key: str) -> dict[str, Any] | None:
    manifest = read_manifest(request.manifest_path)
    if manifest is None:
        return None
    if manifest.get("job_key") == key:
        return manifest
    before = manifest.get("identity") or {}
    changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
    raise StageError(
        "train",
        f"{request.model_dir} already holds a model trained from other inputs (changed: {', '.join(changed)}); "
        "remove that folder to retrain it, or choose another name",
    )


# ------------------------------------------------------------------ checkpoints


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last); torn ones are removed."""
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    for _, path in sorted(found, reverse=True):
        if (path / TRAINER_STATE).is_file():
            return path
        log.warning("removing incomplete checkpoint %s (interrupted while saving)", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def checkpoint_step(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    return int(state.get("global_step", 0))


@contextlib.contextmanager
def _job_lock(request: TrainRequest) -> Iterator[None]:
    lock_path = request.work_dir.with_name(f"{request.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(
                "train",
                f"another process is training {request.name!r} of run {request.config.name!r} ({lock_path})",
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _reset_stale_work(request: TrainRequest, key: str, identity: dict[str, Any]) -> None:
    """Keep the checkpoints of an interrupted attempt at this same job; drop those of another."""
    job_file = request.work_dir / JOB_FILE
    if job_file.is_file():
        previous = json.loads(job_file.read_text(encoding="utf-8")).get("key")
        if previous != key:
            log.warning("%s: discarding checkpoints of an earlier job with other inputs", request.work_dir)
            shutil.rmtree(request.work_dir)
    shutil.rmtree(request.work_dir / STAGE_DIR, ignore_errors=True)
    request.work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        job_file, {"key": key, "identity": identity, "request": request.model_dump(mode="json")}
    )


# ------------------------------------------------------------------ the outer layer


def trains_in_child(request: TrainRequest, embedded: bool = False) -> bool:
    """`training.subprocess`: on, off, or auto (= `embedded`: the caller is the embedded run)."""
    mode = request.config.training.subprocess
    return mode == "on" or (mode == "auto" and embedded)


def run(
    request: TrainRequest, progress: Progress = NULL_PROGRESS, *, embedded: bool = False
) -> dict[str, Any]:
    """Run (or resume, or skip as already done) one training job; return its manifest.

    `embedded`: called by the embedded run (`training.subprocess: auto` then trains in a child)."""
    tokenizer, data = prepare(request)
    identity = job_identity(request, data)
    key = job_key(identity)
    done = _finished(request, identity, key)
    if done is not None:
        log.info("%s: already trained (%s); nothing to do", request.name, request.manifest_path)
        return done
    with _job_lock(request):
        done = _finished(request, identity, key)  # finished by another process meanwhile
        if done is not None:
            return done
        _reset_stale_work(request, key, identity)
        if request.config.training.accelerate_config or trains_in_child(request, embedded):
            from .launch import run_in_child

            run_in_child(request, progress)
        else:
            fit(request, progress, prepared=(tokenizer, data))
        manifest = read_manifest(request.manifest_path)
        if manifest is None:
            raise StageError("train", f"training ended without writing {request.manifest_path}")
        if not request.config.training.keep_checkpoints:
            shutil.rmtree(request.work_dir, ignore_errors=True)
        return manifest


# ------------------------------------------------------------------ the inner layer


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_trainer(
    request: TrainRequest,
    tokenizer: Any,
    data: TrainingData,
    progress: Progress = NULL_PROGRESS,
    callbacks: Sequence[Any] = (),
):  # -> ResumableSFTTrainer | ResumableDPOTrainer
    """The TRL trainer of this job, model loaded, nothing trained yet."""
    import datasets
    import torch
    import transformers
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed

    from .arguments import dpo_arguments, lora_config, resolve_device, resolve_precision, sft_arguments
    from .callbacks import ProgressCallback, tensorboard_callback
    from .models import load_policy
    from .trainers import ResumableDPOTrainer, ResumableSFTTrainer

    datasets.disable_progress_bars()  # our own progress reporting replaces the libraries' bars
    transformers.utils.logging.disable_progress_bar()
    config = request.config
    device = resolve_device(config.training)
    if device == "cpu" and config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    precision = resolve_precision(config.training, device)
    args = (sft_arguments if request.kind == "sft" else dpo_arguments)(request, world_size())
    set_seed(config.seed)
    model = load_policy(request, precision, device)
    peft_config = lora_config(config.lora) if request.parent is None else None
    all_callbacks = [ProgressCallback(progress, f"{request.kind} {request.name}"), *callbacks]
    if config.training.tracker == "tensorboard" and int(os.environ.get("RANK", "0")) == 0:
        all_callbacks.append(tensorboard_callback(str(request.tensorboard_dir)))
    trainer_class = ResumableSFTTrainer if request.kind == "sft" else ResumableDPOTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data.examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=all_callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # logs go to the progress sinks, the tracker and our logger
    return trainer


def fit(
    request: TrainRequest,
    progress: Progress = NULL_PROGRESS,
    prepared: tuple[Any, TrainingData] | None = None,
) -> dict[str, Any] | None:
    """Train (resuming from the last complete checkpoint); the main process writes the model folder."""
    from .callbacks import ThroughputCallback

    tokenizer, data = prepared if prepared is not None else prepare(request)
    identity = job_identity(request, data)
    throughput = ThroughputCallback()
    trainer = build_trainer(request, tokenizer, data, progress, callbacks=[throughput])
    checkpoint = latest_checkpoint(request.checkpoint_dir)
    resumed_from = checkpoint_step(checkpoint)
    if checkpoint is not None:
        log.info("%s: resuming from %s (step %d)", request.name, checkpoint, resumed_from)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    stage = request.work_dir / STAGE_DIR
    trainer.save_model(str(stage))  # every process: DeepSpeed/FSDP gather the weights here
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    training = _training_facts(trainer, resumed_from, throughput, data)
    metrics = _final_metrics(trainer, result.metrics, throughput)
    with atomic_dir(request.model_dir) as tmp:
        for path in stage.iterdir():  # the trained adapter + tokenizer; not the frozen "ref/" copy
            if path.is_file() and path.name != "training_args.bin":
                shutil.copy2(path, tmp / path.name)
        write_log_history(tmp / LOG_HISTORY, trainer.state.log_history)
        adapter_sha256 = sha256_dir(tmp, include=lambda rel: rel.name.startswith("adapter_"))
        manifest = _manifest(request, data, identity, training, metrics, adapter_sha256, tmp)
        manifest.update(_publishing_fields(trainer, tokenizer, request, tmp, manifest))
        write_manifest(tmp / "manifest.json", manifest)
    log.info("%s: wrote %s (adapter sha256 %s)", request.name, request.model_dir, adapter_sha256[:12])
    return read_manifest(request.manifest_path)


LOG_HISTORY = "log_history.jsonl"


def write_log_history(path: Path, history: list[dict[str, Any]]) -> None:
    """The trainer's logged steps, one line each (step, loss, rewards/margins, ...): the training
    curves of the dashboard and the report. Restored from the checkpoint on a resume, so the
    file covers every step of the model, not only this session's."""
    rows = []
    for entry in history:
        if "loss" not in entry or "step" not in entry:
            continue  # the final train_runtime/train_loss summary entry
        row = {"step": int(entry["step"])}
        row.update({k: v for k, v in entry.items() if k != "step" and isinstance(v, int | float)})
        rows.append(row)
    write_jsonl_atomic(path, rows)


def _publishing_fields(
    trainer: Any, tokenizer: Any, request: TrainRequest, folder: Path, manifest: dict[str, Any]
) -> dict[str, Any]:
    """The fingerprint publishing checks the served adapter against (selfreward.fingerprint).

    Computed on the trained model in memory when it is whole and fp32; otherwise (DeepSpeed/FSDP
    shards, a bf16/fp16 base on GPU) from the saved folder, loaded in fp32 on CPU.
    """
    import torch

    from selfreward.fingerprint import adapter_manifest_fields, compute_fingerprint, fingerprint_model_dir

    # keep_fp32_wrapper=False: drop accelerate's autocast wrapper of forward (training is over), so
    # a bf16-autocast run is fingerprinted in fp32 like the served model
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    if sharded or next(model.parameters()).dtype != torch.float32:
        fingerprint = fingerprint_model_dir(request.base_model, folder)  # fp32, from the saved folder
    else:
        fingerprint = compute_fingerprint(model, tokenizer)
    fields = adapter_manifest_fields(folder, fingerprint, request.base_model)
    if fields["adapter_sha256"] != manifest["adapter_sha256"]:
        raise StageError("train", f"{folder}: adapter hash mismatch between storage and fingerprint helpers")
    fields["base_model"] = {**manifest["base_model"], **fields.get("base_model", {})}
    return fields


def _training_facts(trainer: Any, resumed_from: int, throughput: Any, data: TrainingData) -> dict[str, Any]:
    args = trainer.args
    return {
        "global_step": trainer.state.global_step,
        "total_steps": trainer.state.max_steps,
        "resumed_from_step": resumed_from,
        "epochs": trainer.state.epoch,
        "world_size": args.world_size,
        "device": str(args.device),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "per_device_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size,
        "session_steps": throughput.steps,
        "session_seconds": round(throughput.seconds, 3),
        "session_tokens": throughput.tokens,
    }


def _final_metrics(trainer: Any, train_metrics: dict[str, Any], throughput: Any) -> dict[str, Any]:
    history = [h for h in trainer.state.log_history if "loss" in h]
    metrics: dict[str, Any] = {}
    if history:
        metrics["first_loss"] = history[0]["loss"]
        metrics["last_loss"] = history[-1]["loss"]
        for key, value in history[-1].items():
            if key.startswith(("rewards/", "logps/", "mean_token_accuracy")):
                metrics[key] = value
    if "train_loss" in train_metrics:
        metrics["train_loss_session"] = train_metrics["train_loss"]
    batch = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    batch *= trainer.args.world_size
    if throughput.seconds > 0 and throughput.steps > 0:
        metrics["samples_per_s"] = round(throughput.steps * batch / throughput.seconds, 4)
        metrics["tokens_per_s"] = round(throughput.tokens / throughput.seconds, 2)
    metrics["input_tokens_seen"] = int(trainer.state.num_input_tokens_seen or 0)
    return metrics


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers
    import trl

    import selfreward

    return {
        "selfreward": selfreward.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
    }


def _manifest(
    request: TrainRequest,
    data: TrainingData,
    identity: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, Any],
    adapter_sha256: str,
    folder: Path,
) -> dict[str, Any]:
    config = request.config
    parent = None
    if request.parent_dir is not None:
        parent = {"name": request.parent, "path": str(request.parent_dir), **(identity["parent"] or {})}
    return {
        "name": request.name,
        "kind": request.kind,
        "run": config.name,
        "job_key": job_key(identity),
        "identity": identity,
        "base_model": {"path": str(request.base_model), "sha256": identity["base_model_sha256"]},
        "parent": parent,
        "reference_model": describe_reference(request),
        "data": data.summary(),
        "config": {
            "lora": effective_lora(request),
            request.kind: request.section.model_dump(mode="json"),
            "training": config.training.model_dump(mode="json"),
            "judge_template": config.judge.template if request.kind == "sft" else None,
        },
        "seed": config.seed,
        "versions": versions(),
        "training": training,
        "metrics": metrics,
        "adapter_sha256": adapter_sha256,
        "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
        "tracker": {
            "kind": config.training.tracker,
            "dir": str(request.tensorboard_dir) if config.training.tracker == "tensorboard" else None,
        },
    }
