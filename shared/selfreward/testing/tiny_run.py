"""A run config sized for a tiny random model (tests and smoke runs of the whole loop).

Seconds per stage on a CPU: 2 SFT and 2 DPO steps at a high learning rate (so M1 and M2 really
differ from their parents and publishing can tell them apart), 3 prompts x 3 candidates, one
logprob verdict each, 3 evaluation prompts. The judge prompt is replaced by a short template:
the built-in one is ~1000 tokens in a tiny model's 512-token BPE, more than such a server's
context leaves for the answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHORT_JUDGE = (
    'Rate the answer from 0 to 5.\nQuestion: {instruction}\nAnswer: {response}\nEnd with "Score: <0-5>".'
)


def tiny_run_config(
    name: str, model_dir: str | Path, policy_url: str, template_dir: str | Path, **over: Any
) -> dict[str, Any]:
    """The config (as a dict, the YAML's content) of a run on the model served at `policy_url`
    as "tiny"; `over` replaces top-level keys, merging one level into sections."""
    template = Path(template_dir) / "short-judge.txt"
    if not template.exists():
        template.parent.mkdir(parents=True, exist_ok=True)
        template.write_text(SHORT_JUDGE)
    config: dict[str, Any] = {
        "name": name,
        "seed": 7,
        "variant": "self-reward",
        "iterations": 1,
        "model": {"base": str(model_dir), "served_name": "tiny", "max_model_len": 1024},
        "data": {"source": "demo", "max_ift": 12, "max_eft_train": 8},
        "prompts": {"num_prompts": 3, "max_tokens": 24, "min_words": 1, "max_words": 80, "max_rounds": 5},
        "candidates": {"n": 3, "max_tokens": 24},
        "judge": {"samples": 1, "mode": "logprob", "max_tokens": 16, "template": str(template)},
        "lora": {"r": 8, "alpha": 16},
        "sft": {
            "learning_rate": 0.05,
            "max_steps": 2,
            "batch_size": 4,
            "per_device_batch_size": 4,
            "max_length": 768,
        },
        "dpo": {
            "learning_rate": 0.05,
            "max_steps": 2,
            "batch_size": 2,
            "per_device_batch_size": 2,
            "max_length": 768,
        },
        "training": {
            "device": "cpu",
            "precision": "fp32",
            "checkpoint_steps": 1,
            "num_threads": 1,
            "tracker": "none",
            # in this process: a child would import torch again, ~7 s per training (the default,
            # auto = a child in the embedded run, is tested in tests/test_loop_e2e.py)
            "subprocess": "off",
        },
        "services": {"policy_url": policy_url, "concurrency": 8},
        "eval": {"max_prompts": 3, "max_tokens": 24, "bootstrap_samples": 200},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config
