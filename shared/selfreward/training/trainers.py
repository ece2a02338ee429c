"""TRL's trainers with two fixes: resuming a PEFT model that holds more than one adapter, and
scoring only the label positions of the fused LM head on CPU.

DPO from M(t) trains M(t)'s adapter ("default") against a frozen copy of it ("ref"). A checkpoint
then holds the trained adapter at its root and the copy in `ref/`. transformers 5.19's
`Trainer._load_from_checkpoint` loads only adapter sub-folders when there are any, so the
trained adapter was silently reset to M(t) on resume (measured: the loss jumped back to ln 2 at
the first resumed step). `_load_from_checkpoint` below loads the root adapter into the active
adapter as well, then every sub-folder adapter, frozen.

TRL 1.16's fused LM head (`trl.trainer.utils.add_fused_lm_head`, used by SFT and DPO) projects
only the positions whose label is not -100 on CUDA/XPU, but every position elsewhere, to keep tile
shapes fixed for Neuron's compiler. On CPU, eager shapes cost nothing, and with prompts masked the
head (576 x 49152 for SmolLM2, computed forward, recomputed and differentiated backward) was a
third of a step's matmul work spent on positions whose log-probs are thrown away.
`score_label_positions_only` makes CPU take the compact path: the same log-probs, loss and
gradients (tests/test_train_inputs.py compares both paths), measured on the quickstart's SFT
(per-device batch 1, 2-core AVX2 EPYC, fp32): 0.216 -> 0.304 samples/s, identical losses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trl
import trl.trainer.utils as trl_utils
from trl import DPOTrainer, SFTTrainer

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _load_peft_checkpoint(trainer: Any, checkpoint: str, model: Any) -> bool:
    """Load every adapter of a PEFT checkpoint; False when this is not such a checkpoint."""
    from accelerate.utils import is_peft_model

    root = Path(checkpoint)
    if not is_peft_model(model) or not any((root / f).is_file() for f in ADAPTER_FILES):
        return False
    active = model.active_adapters[0]
    model.load_adapter(str(root), active, is_trainable=True)
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name != active and any((sub / f).is_file() for f in ADAPTER_FILES):
            model.load_adapter(str(sub), sub.name, is_trainable=False)
    model.set_adapter(active)
    return True


def score_label_positions_only() -> bool:
    """Make TRL's fused LM head project only the label positions on CPU too (idempotent).

    False (and nothing changed) where this TRL has no such switch: training then runs TRL's own
    path, correct, only slower on CPU."""
    current: Callable[[Any], bool] | None = getattr(trl_utils, "_use_triton", None)
    if current is None or not hasattr(trl_utils, "add_fused_lm_head"):
        log.debug("trl %s: no fused LM head switch; every position is scored on CPU", trl.__version__)
        return False
    if getattr(current, "_selfreward_compact", False):
        return True

    def compact(device: Any) -> bool:
        return device.type == "cpu" or current(device)

    compact._selfreward_compact = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact  # the name trl.trainer.utils reads for `compact` only
    return True


score_label_positions_only()


class _AdapterResumeMixin:
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.model if model is None else model  # type: ignore[attr-defined]
        if not _load_peft_checkpoint(self, resume_from_checkpoint, target):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]


class ResumableSFTTrainer(_AdapterResumeMixin, SFTTrainer):
    """TRL's SFTTrainer (single adapter; the fix is a no-op there but keeps both paths alike)."""


class ResumableDPOTrainer(_AdapterResumeMixin, DPOTrainer):
    """TRL's DPOTrainer whose resume restores the trained adapter, not only the frozen reference."""
