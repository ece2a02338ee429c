"""Run config -> TRL `SFTConfig` / `DPOConfig` and PEFT `LoraConfig`.

What differs from TRL's defaults, and why:
- precision `auto`: on CPU bf16 autocast when the CPU has native bf16 (AVX512-BF16/AMX), fp32
  otherwise (emulated bf16 is 2.6-4.8x slower); bf16 on a GPU that supports it (fp16 otherwise).
  TRL's default is bf16 everywhere, and refuses to start on a CPU without `use_cpu`;
- gradient checkpointing is off unless `training.gradient_checkpointing` (TRL defaults it on:
  ~20% slower, only worth it when memory is short);
- `batch_size` is the effective batch: per-device batch x gradient accumulation x processes;
- checkpoints every `training.checkpoint_steps` into the job's work folder, the last two kept;
- our own progress reporting replaces tqdm; the tracker is TensorBoard (offline) by default.
"""

from __future__ import annotations

import logging
from typing import Any

from selfreward.config import DPOConfig, LoraConfig, SFTConfig, TrainingConfig
from selfreward.errors import ConfigError

from .request import TrainRequest

log = logging.getLogger(__name__)


def resolve_device(training: TrainingConfig) -> str:
    import torch

    if training.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["training.device: 'cuda' requested but no CUDA device is visible"], "train")
    if training.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return training.device


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls in hardware (without them bf16 is emulated and slow)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def resolve_precision(training: TrainingConfig, device: str) -> str:
    """fp32 | bf16 | fp16 (mixed precision: weights stay fp32 on CPU, autocast does the rest).

    auto: on CPU bf16 when the CPU has native bf16 (measured on a 2-core AVX512-BF16 EPYC:
    SmolLM2-135M LoRA SFT 4.3-5.0 s/step against 7.7-7.9 s/step in fp32), fp32 otherwise
    (AVX2-only CPUs emulate bf16: 2.6-4.8x slower than fp32); on GPU bf16 where supported,
    fp16 otherwise.
    """
    import torch

    if training.precision != "auto":
        if training.precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
            log.warning(
                "training.precision=bf16 on a CPU without native bf16: several times slower than fp32"
            )
        if training.precision == "fp16" and device == "cpu":
            raise ConfigError(
                ["training.precision: fp16 mixed precision needs a GPU (use fp32 or bf16)"], "train"
            )
        return training.precision
    if device == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def accumulation_steps(section: SFTConfig | DPOConfig, world_size: int, name: str) -> int:
    """batch_size = per_device_batch_size x accumulation x world_size, exactly."""
    per_step = section.per_device_batch_size * world_size
    if section.batch_size % per_step:
        raise ConfigError(
            [
                f"{name}.batch_size={section.batch_size} is not a multiple of {name}.per_device_batch_size="
                f"{section.per_device_batch_size} x {world_size} process(es) = {per_step}"
            ],
            "train",
        )
    return section.batch_size // per_step


def report_to(training: TrainingConfig) -> list[str]:
    """Trackers handled by transformers' own callbacks (TensorBoard gets its own writer, see trainers)."""
    return [] if training.tracker in ("tensorboard", "none") else [training.tracker]


def _common(request: TrainRequest, world_size: int) -> dict[str, Any]:
    config, section = request.config, request.section
    training = config.training
    device = resolve_device(training)
    precision = resolve_precision(training, device)
    return {
        "output_dir": str(request.checkpoint_dir),
        "run_name": f"{config.name}/{request.name}",
        "seed": config.seed,
        "data_seed": config.seed,
        "learning_rate": section.learning_rate,
        "lr_scheduler_type": section.lr_scheduler,
        "warmup_steps": section.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        "num_train_epochs": section.epochs,
        "max_steps": section.max_steps if section.max_steps is not None else -1,
        "per_device_train_batch_size": section.per_device_batch_size,
        "gradient_accumulation_steps": accumulation_steps(section, world_size, request.kind),
        "max_length": section.max_length,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": device == "cpu",
        "gradient_checkpointing": training.gradient_checkpointing,
        "logging_steps": training.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": training.checkpoint_steps,
        "save_total_limit": 2,
        "report_to": report_to(training),
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
    }


def sft_arguments(request: TrainRequest, world_size: int = 1):  # -> trl.SFTConfig
    from trl import SFTConfig as TRLSFTConfig

    return TRLSFTConfig(**_common(request, world_size), completion_only_loss=True, packing=False)


# the label smoothing of the "robust" term of the soft-target loss (any value in (0, 0.5) works)
SOFT_TARGET_SMOOTHING = 0.25


def dpo_loss(loss_type: str, confidence: float | None) -> dict[str, Any]:
    """TRL's loss arguments: `loss_type` alone, or with a preference trusted to `confidence` C
    (cream) the soft-target loss C * -log s(bh) + (1 - C) * -log s(-bh) exactly.

    TRL 1.x has no soft target: its "sigmoid" loss ignores `label_smoothing`, its "robust" loss
    with smoothing e is ((1 - e) * -log s(bh) - e * -log s(-bh)) / (1 - 2e). With e = 1/4,
    sigmoid weighted 1 + 2(1 - C) plus robust weighted -2(1 - C) is the soft target (the
    identity is tested on TRL's own loss in tests/test_train_inputs.py)."""
    if confidence is None or confidence >= 1.0:
        return {"loss_type": [loss_type]}
    if loss_type != "sigmoid":
        raise ConfigError(
            [f"dpo.loss_type: a preference confidence needs the sigmoid loss (got {loss_type!r})"], "train"
        )
    doubt = 1.0 - confidence
    return {
        "loss_type": ["sigmoid", "robust"],
        "loss_weights": [1.0 + 2.0 * doubt, -2.0 * doubt],
        "label_smoothing": SOFT_TARGET_SMOOTHING,
    }


def dpo_arguments(request: TrainRequest, world_size: int = 1):  # -> trl.DPOConfig
    from trl import DPOConfig as TRLDPOConfig

    dpo = request.config.dpo
    return TRLDPOConfig(
        **_common(request, world_size),
        beta=dpo.beta,
        **dpo_loss(dpo.loss_type, request.preference_confidence),
        precompute_ref_log_probs=dpo.precompute_ref_log_probs,
    )


def lora_config(lora: LoraConfig):  # -> peft.LoraConfig
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
