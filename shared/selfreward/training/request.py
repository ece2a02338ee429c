"""What one training job is asked to do, resolved and checked before any model is loaded.

A `TrainRequest` is built by the RQ job functions, the CLI and the accelerate entry point alike
(it travels to `accelerate launch` workers as JSON). Building one checks everything that needs
no model: the base model folder, the input files, the parent adapter and its base.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from selfreward.config import DPOConfig, RunConfig, SFTConfig
from selfreward.errors import ConfigError, InputError
from selfreward.storage import RunLayout, read_manifest, sha256_dir

Kind = Literal["sft", "dpo"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
WORK_DIR = ".work"


class TrainRequest(BaseModel):
    """One SFT or DPO job: the run config, the model to write, its inputs and its lineage."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    kind: Kind
    config: RunConfig
    name: str = Field(pattern=NAME_PATTERN, description="model name: runs/<run>/models/<name>/")
    base_model: Path = Field(description="prepared M0 folder (HF format with tokenizer and chat template)")
    data: list[Path] = Field(description="sft: ift.jsonl [+ eft_train.jsonl]; dpo: pairs.jsonl")
    parent: str | None = Field(
        None, pattern=NAME_PATTERN, description="adapter trained further (dpo: M(t)); None = fresh LoRA on M0"
    )
    preference_confidence: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="dpo: how far the pairs' preferences are trusted (cream's consistency rate C): the "
        "loss is C * DPO(chosen > rejected) + (1 - C) * DPO(rejected > chosen); None = 1, plain DPO",
    )

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.config.artifact_root, self.config.name)

    @property
    def model_dir(self) -> Path:
        return self.layout.model_dir(self.name)

    @property
    def manifest_path(self) -> Path:
        return self.layout.model_manifest(self.name)

    @property
    def parent_dir(self) -> Path | None:
        return None if self.parent is None else self.layout.model_dir(self.parent)

    @property
    def work_dir(self) -> Path:
        """Checkpoints, the job key and the staging folder; outside models/<name>/ and removed when done."""
        return self.layout.models_dir / WORK_DIR / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return self.layout.logs_dir / "tb" / self.name

    @property
    def log_file(self) -> Path:
        return self.layout.logs_dir / "train" / f"{self.name}.log"

    @property
    def section(self) -> SFTConfig | DPOConfig:
        return self.config.sft if self.kind == "sft" else self.config.dpo


# ------------------------------------------------------------------ resolution


def _check_model_folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{what} not found: {path} (a folder in Hugging Face format is expected)")
    if not (path / "config.json").is_file():
        raise InputError(f"{what} {path} has no config.json: not a Hugging Face model folder")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise InputError(f"{what} {path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return path.resolve()


def resolve_base_model(config: RunConfig, base_model: str | Path | None) -> Path:
    """The prepared M0 folder: `base_model` when given, `model.base` when it is a model folder,
    else `model.base` prepared by the policy service (GGUF, alias or hub id; cached by content
    hash under <artifact_root>/cache, so only the first job converts it)."""
    if base_model is not None:
        return _check_model_folder(Path(base_model), "base model")
    candidate = Path(config.model.base).expanduser()
    if (candidate / "config.json").is_file():
        return _check_model_folder(candidate, "base model (model.base)")
    from selfreward.policy.prepare import prepare_model

    layout = RunLayout(config.artifact_root, config.name)
    prepared = prepare_model(config.model.base, layout.cache_dir, chat_template=config.model.chat_template)
    return _check_model_folder(prepared, f"base model (model.base {config.model.base!r}, prepared)")


def _check_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    return path.resolve()


def sft_request(
    config: RunConfig,
    *,
    name: str = "m1",
    seed_dir: str | Path | None = None,
    base_model: str | Path | None = None,
) -> TrainRequest:
    """M0 + seed data (ift.jsonl, and eft_train.jsonl when `data.eft_in_sft`) -> adapter `name`."""
    seed = Path(seed_dir) if seed_dir is not None else RunLayout(config.artifact_root, config.name).seed_dir
    files = [_check_file(seed / "ift.jsonl", "IFT seed file")]
    if config.data.eft_in_sft:
        files.append(_check_file(seed / "eft_train.jsonl", "EFT seed file (data.eft_in_sft is true)"))
    return TrainRequest(
        kind="sft", config=config, name=name, base_model=resolve_base_model(config, base_model), data=files
    )


def dpo_request(
    config: RunConfig,
    *,
    pairs: str | Path,
    name: str,
    parent: str | None = None,
    base_model: str | Path | None = None,
    preference_confidence: float | None = None,
) -> TrainRequest:
    """M(t) (`parent`, or M0 when None) + pairs.jsonl -> adapter `name`; the reference model is M(t).
    `preference_confidence`: see TrainRequest (cream)."""
    request = TrainRequest(
        kind="dpo",
        config=config,
        name=name,
        base_model=resolve_base_model(config, base_model),
        data=[_check_file(Path(pairs), "pairs file")],
        parent=parent,
        preference_confidence=preference_confidence,
    )
    if parent is not None:
        check_parent(request)
    return request


def check_parent(request: TrainRequest) -> dict:
    """The parent adapter exists, is complete, and was trained on the same base model."""
    assert request.parent_dir is not None
    if request.parent == request.name:
        raise ConfigError([f"parent and name are both {request.name!r}"], "train")
    manifest = read_manifest(request.parent_dir / "manifest.json")
    if manifest is None:
        raise InputError(
            f"parent model {request.parent!r} not found at {request.parent_dir} "
            "(no manifest.json: train it first, or check the run name)"
        )
    if not (request.parent_dir / "adapter_config.json").is_file():
        raise InputError(
            f"parent model {request.parent!r} at {request.parent_dir} has no adapter_config.json"
        )
    parent_base = manifest.get("base_model", {}).get("sha256")
    ours = base_model_sha256(request.base_model)
    if parent_base != ours:
        raise InputError(
            f"parent adapter {request.parent!r} was trained on base {manifest.get('base_model', {}).get('path')} "
            f"(sha256 {str(parent_base)[:12]}), but this job's base model is {request.base_model} "
            f"(sha256 {ours[:12]}): an adapter only applies to its own base"
        )
    return manifest


def _file_stats(path: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    )


@functools.lru_cache(maxsize=8)
def _sha256_dir_cached(path: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    return sha256_dir(path)


def base_model_sha256(path: Path) -> str:
    """sha256 of the base model folder (cached in-process while its files are unchanged)."""
    return _sha256_dir_cached(os.fspath(path), _file_stats(path))
