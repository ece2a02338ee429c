"""Loading the tokenizer and the policy, and the LoRA lineage.

Lineage (docs/training.md): every model is one LoRA adapter on the same base M0.
- SFT: M1 = a fresh adapter (`lora.*`) on M0.
- DPO with a parent M(t): M(t)'s adapter is loaded as a trainable `PeftModel` and trained further
  into M(t+1); TRL adds a frozen copy of it named "ref", so the reference model is exactly M(t).
  The adapter's rank and targets are M(t)'s (`lora.*` does not apply).
- DPO without a parent: a fresh adapter on M0; the reference is M0 (adapters disabled).
One adapter per model, all on one base, is what vLLM's runtime LoRA loading serves side by side.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from selfreward.errors import InputError

from .request import TrainRequest

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_tokenizer(request: TrainRequest):  # -> PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.base_model)
    template = request.config.model.chat_template
    if template is not None:
        if not Path(template).is_file():
            raise InputError(f"model.chat_template: file not found: {template}")
        tokenizer.chat_template = Path(template).read_text(encoding="utf-8")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(request: TrainRequest, precision: str, device: str):  # -> PreTrainedModel | PeftModel
    """The model the trainer trains: the base, or the base with the parent adapter (trainable).

    On GPU the frozen base is loaded in the training precision (memory); on CPU it stays fp32
    and mixed precision is autocast (as fast here, and the in-memory model is the fp32 model
    the fingerprint and the fp32 policy server use).
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else getattr(torch, DTYPES[precision])
    try:
        model = AutoModelForCausalLM.from_pretrained(request.base_model, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as exc:  # a corrupt weights file: SafetensorError
        raise InputError(
            f"base model {request.base_model}: cannot be loaded as a causal LM ({exc})"
        ) from None
    if request.parent_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(request.parent_dir), is_trainable=True)


def effective_lora(request: TrainRequest) -> dict[str, Any]:
    """The LoRA settings the new adapter has: `lora.*` for a fresh one, the parent's otherwise."""
    if request.parent_dir is None:
        return request.config.lora.model_dump(mode="json")
    cfg = json.loads((request.parent_dir / "adapter_config.json").read_text(encoding="utf-8"))
    inherited = {
        "r": cfg.get("r"),
        "alpha": cfg.get("lora_alpha"),
        "dropout": cfg.get("lora_dropout"),
        "target_modules": cfg.get("target_modules"),
    }
    ours = request.config.lora.model_dump(mode="json")
    if any(ours[k] != inherited[k] for k in ("r", "alpha")):
        log.warning(
            "lora.r/alpha (%s/%s) differ from parent %s's adapter (%s/%s): the parent's adapter is trained "
            "further, so its settings apply",
            ours["r"],
            ours["alpha"],
            request.parent,
            inherited["r"],
            inherited["alpha"],
        )
    return {**inherited, "inherited_from": request.parent}


def describe_reference(request: TrainRequest) -> str:
    if request.kind == "sft":
        return "none (SFT)"
    if request.parent is None:
        return "M0: the base model with adapters disabled"
    return f"{request.parent}: a frozen copy of the parent adapter (TRL's 'ref' adapter)"
