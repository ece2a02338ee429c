"""Training throughput on SmolLM2-135M-Instruct (CPU, LoRA r=16 all-linear): ours vs a plain TRL script.

- ours: the trainer's jobs (`selfreward.training.runner.run`): SFT M0 -> m1, then DPO
  m1 -> m2, with the run config below (precision auto: bf16 autocast on a CPU with native bf16,
  fp32 otherwise; no gradient checkpointing).
- straightforward: what a user writes with TRL's defaults: `SFTTrainer` / `DPOTrainer` with
  `SFTConfig` / `DPOConfig` left at their defaults (bf16, gradient checkpointing) except what
  both runs must share (steps, batch, max_length, LoRA, data). TRL's defaults do not start on a
  CPU-only machine (bf16 without `use_cpu` raises; the message is printed below), so the
  closest straightforward variant that runs adds `use_cpu=True`.

Same data (the shipped demo seed: IFT examples, and preference pairs best vs worst human-ranked
reply), same per-device batch, max_length, LoRA and number of steps; measured the same way for
both: wall time of the training loop, samples = steps x batch, tokens = non-padding input tokens.
Each variant runs `--repeats` times, alternated, and its fastest run is kept (other processes
on a shared machine only ever slow a run down).

    flock /tmp/selfreward-heavy.lock .venv/bin/python bench/train_throughput.py [--sft-steps 3] [--dpo-steps 2]

The last line is `ratio=<ours over the straightforward way>`: samples/s of SFT and DPO together.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH = 4
MAX_LENGTH = 256
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def prepare_data(work: Path) -> tuple[list[dict], list[dict]]:
    """SFT prompt/completion examples and DPO pairs from the shipped demo seed set."""
    from selfreward.config import DataConfig
    from selfreward.data.chat import ift_messages
    from selfreward.data.seed import prepare_seed
    from selfreward.schemas import EFTEvalRecord, IFTRecord, read_records

    seed = work / "seed"
    prepare_seed(DataConfig(source="demo", eval_fraction=0.5), seed)
    sft = []
    for record in read_records(seed / "ift.jsonl", IFTRecord):
        messages = ift_messages(record)
        sft.append({"prompt": messages[:-1], "completion": messages[-1:]})
    pairs = []
    for record in read_records(seed / "eft_eval.jsonl", EFTEvalRecord):
        replies = sorted(record.replies, key=lambda r: r.rank)
        if len(replies) >= 2 and replies[0].text != replies[-1].text:
            pairs.append(
                {
                    "prompt_id": record.id,
                    "prompt": [{"role": "user", "content": record.prompt}],
                    "chosen": [{"role": "assistant", "content": replies[0].text}],
                    "rejected": [{"role": "assistant", "content": replies[-1].text}],
                }
            )
    return sft, pairs


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_ours(
    base: Path, work: Path, sft: list[dict], pairs: list[dict], sft_steps: int, dpo_steps: int, tag: str
) -> dict:
    from selfreward.config import build_config
    from selfreward.training.request import dpo_request, sft_request
    from selfreward.training.runner import run

    seed = work / "ours-seed"
    write_jsonl(seed / "ift.jsonl", [_ift_row(i, ex) for i, ex in enumerate(sft)])
    pairs_file = write_jsonl(work / "pairs.jsonl", pairs)
    section = {"batch_size": BATCH, "per_device_batch_size": BATCH, "max_length": MAX_LENGTH}
    config = build_config(
        {
            "name": "bench",
            "artifact_root": str(work / "art"),
            "model": {"base": str(base)},
            "data": {"eft_in_sft": False},
            "lora": LORA,
            "sft": {**section, "max_steps": sft_steps, "learning_rate": 2e-4},
            "dpo": {**section, "max_steps": dpo_steps, "learning_rate": 5e-5},
            "training": {"tracker": "none", "checkpoint_steps": 1000},
        },
        environ={},
    )
    m1 = run(sft_request(config, name=f"m1-{tag}", seed_dir=seed))
    m2 = run(dpo_request(config, pairs=pairs_file, name=f"m2-{tag}", parent=f"m1-{tag}"))
    return {"sft": _from_manifest(m1), "dpo": _from_manifest(m2), "settings": _settings(m1)}


def _settings(manifest: dict) -> str:
    gc = manifest["config"]["training"]["gradient_checkpointing"]
    return f"precision {manifest['training']['precision']}, gradient_checkpointing={gc}"


def _ift_row(i: int, example: dict) -> dict:
    return {
        "id": f"b{i}",
        "tree_id": f"b{i}",
        "prompt": example["prompt"][0]["content"],
        "response": example["completion"][0]["content"],
    }


def _from_manifest(manifest: dict) -> dict:
    training = manifest["training"]
    return {
        "steps": training["session_steps"],
        "seconds": training["session_seconds"],
        "samples": training["session_steps"] * training["effective_batch_size"],
        "tokens": training["session_tokens"],
    }


def trl_defaults_error() -> str:
    """What TRL's defaults do on this machine without use_cpu."""
    from trl import DPOConfig, SFTConfig

    errors = []
    for cls in (SFTConfig, DPOConfig):
        try:
            cls(output_dir=tempfile.mkdtemp(), report_to="none")
            errors.append(f"{cls.__name__}(): starts")
        except Exception as exc:  # we report whatever TRL raises
            errors.append(f"{cls.__name__}(): {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return "; ".join(errors)


def run_straightforward(
    base: Path, work: Path, sft: list[dict], pairs: list[dict], sft_steps: int, dpo_steps: int, tag: str
) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from selfreward.training.callbacks import ThroughputCallback

    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )
    shared = {
        "per_device_train_batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "use_cpu": True,  # TRL's defaults raise on a CPU-only machine without it
        "report_to": "none",
        "save_strategy": "no",
        "include_num_input_tokens_seen": "non_padding",  # measurement only, as for ours
    }
    results: dict[str, Any] = {}
    for job, steps, trainer_cls, config_cls, data in (
        ("sft", sft_steps, SFTTrainer, SFTConfig, sft),
        ("dpo", dpo_steps, DPOTrainer, DPOConfig, pairs),
    ):
        args = config_cls(output_dir=str(work / f"plain-{job}-{tag}"), max_steps=steps, **shared)
        meter = ThroughputCallback()
        trainer = trainer_cls(
            model=str(base),
            args=args,
            train_dataset=Dataset.from_list(data),
            peft_config=lora,
            callbacks=[meter],
        )
        trainer.train()
        results[job] = {
            "steps": meter.steps,
            "seconds": meter.seconds,
            "samples": meter.steps * BATCH,
            "tokens": meter.tokens,
        }
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        results["settings"] = f"precision {precision}, gradient_checkpointing={args.gradient_checkpointing}"
    return results


def best(runs: list[dict], job: str) -> dict:
    """The run of highest throughput (other processes on a shared machine only ever slow one down)."""
    return max((r[job] for r in runs), key=lambda r: r["samples"] / r["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft-steps", type=int, default=3)
    parser.add_argument("--dpo-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternated; best kept")
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"), help="prepared-model cache")
    args = parser.parse_args()

    import datasets
    import torch
    import transformers

    from selfreward.policy.prepare import prepare_model
    from selfreward.training.arguments import cpu_has_native_bf16

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.monotonic()
    base = prepare_model("smollm2-135m-instruct", args.cache)
    ours: list[dict] = []
    plain: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        work = Path(tmp)
        sft, pairs = prepare_data(work)
        print(f"model: SmolLM2-135M-Instruct ({base}); torch threads: {torch.get_num_threads()}")
        print(f"CPU with native bf16 (AVX512-BF16/AMX): {cpu_has_native_bf16()}")
        print(
            f"data: {len(sft)} SFT examples, {len(pairs)} DPO pairs; batch {BATCH}, max_length {MAX_LENGTH}"
        )
        print(
            f"steps: SFT {args.sft_steps}, DPO {args.dpo_steps}; {args.repeats} alternated runs each, best kept"
        )
        print(f"TRL defaults without use_cpu: {trl_defaults_error()}")
        for i in range(args.repeats):
            ours.append(run_ours(base, work, sft, pairs, args.sft_steps, args.dpo_steps, str(i)))
            plain.append(run_straightforward(base, work, sft, pairs, args.sft_steps, args.dpo_steps, str(i)))

    print(f"\nours: {ours[0]['settings']} | straightforward (TRL defaults + use_cpu): {plain[0]['settings']}")
    header = f"{'job':<5}{'variant':<17}{'steps':>6}{'s/step':>9}{'samples/s':>11}{'tokens/s':>10}"
    print(header)
    print("-" * len(header))
    totals = {"ours": [0.0, 0.0], "straightforward": [0.0, 0.0]}
    for job in ("sft", "dpo"):
        rates = {}
        for label, runs in (("ours", ours), ("straightforward", plain)):
            result = best(runs, job)
            sec = result["seconds"]
            rates[label] = (result["samples"] / sec, result["tokens"] / sec)
            totals[label][0] += result["samples"]
            totals[label][1] += sec
            print(
                f"{job:<5}{label:<17}{result['steps']:>6}{sec / result['steps']:>9.2f}"
                f"{rates[label][0]:>11.3f}{rates[label][1]:>10.1f}"
            )
        ratio_samples = rates["ours"][0] / rates["straightforward"][0]
        ratio_tokens = rates["ours"][1] / rates["straightforward"][1]
        print(f"{'':<5}{'ours / straight':<17}{'':>6}{'':>9}{ratio_samples:>11.2f}{ratio_tokens:>10.2f}")
    ours_rate = totals["ours"][0] / totals["ours"][1]
    plain_rate = totals["straightforward"][0] / totals["straightforward"][1]
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s")
    print(f"ratio={ours_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
