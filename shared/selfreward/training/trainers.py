"""TRL's trainers with one fix: resuming a PEFT model that holds more than one adapter.

DPO from M(t) trains M(t)'s adapter ("default") against a frozen copy of it ("ref"). A checkpoint
then holds the trained adapter at its root and the copy in `ref/`. transformers 5.19's
`Trainer._load_from_checkpoint` loads only adapter sub-folders when there are any, so the
trained adapter was silently reset to M(t) on resume (measured: the loss jumped back to ln 2 at
the first resumed step). `_load_from_checkpoint` below loads the root adapter into the active
adapter as well, then every sub-folder adapter, frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trl import DPOTrainer, SFTTrainer

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


class _AdapterResumeMixin:
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.model if model is None else model  # type: ignore[attr-defined]
        if not _load_peft_checkpoint(self, resume_from_checkpoint, target):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]


class ResumableSFTTrainer(_AdapterResumeMixin, SFTTrainer):
    """TRL's SFTTrainer (single adapter; the fix is a no-op there but keeps both paths alike)."""


class ResumableDPOTrainer(_AdapterResumeMixin, DPOTrainer):
    """TRL's DPOTrainer whose resume restores the trained adapter, not only the frozen reference."""
