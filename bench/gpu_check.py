"""The GPU check: SFT + DPO with LoRA in bf16 on CUDA through the project's trainer, and the
fingerprint's GPU-vs-CPU distance (the 0.6 tolerance of bf16 serving is a guess until this runs).

bench/gpu_check.sh runs this on a lent GPU machine (one H200 with torch, transformers, peft and
accelerate, no TRL, no network): after installing the carried wheels it calls

    python3 bench/gpu_check.py --model PATH --out DIR

What it does, all through the project's own code (selfreward.training, selfreward.fingerprint):
1. prepares the model (`selfreward.policy.prepare.prepare_model`: a GGUF is dequantised into a
   float32 Hugging Face folder, as `selfreward policy prepare` does);
2. trains M1 = SFT(M0) on the shipped demo seed, then M2 = DPO(M1) on preference pairs from it
   (best vs worst human-ranked reply), each with `selfreward.training.runner.run` (TRL + PEFT LoRA,
   training.device cuda, precision auto = bf16); tokens/s and peak GPU memory of each, and the
   CUDA memory this process keeps cached after each job before and after
   `selfreward.policy.sleep.release_gpu_memory` (what the sleep hook frees before vLLM wakes);
3. fingerprints M2 (and M1) four ways and compares them with `compare_fingerprints`:
   - `cpu_fp32`: the trainer's own (the manifest's: the saved adapter on CPU in float32);
   - `gpu_fp32`: the same model on the GPU in float32 (the device alone);
   - `gpu_bf16`: on the GPU in bfloat16 (what a bf16 server such as vLLM with --dtype auto on
     a GPU computes; vLLM itself is not on the machine, so this is transformers' bf16);
   - `parent`: M1's fingerprint against M2's (how far apart an adapter and its parent are:
     a tolerance above it could not tell them apart);
   and prints each max |Δlogprob| against the tolerance used today (0.6 on cuda, 0.002 on cpu);
4. prints a summary block and writes it as JSON (`gpu_check.json` under --out, and $OUT).

`--cpu-dry-run` runs the same steps on CPU with a tiny random model (selfreward.testing), a few
steps, fp32 training and a bf16 CPU fingerprint in place of the GPU ones, in well under a
minute: tests/test_gpu_check.py runs it so that this script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/train_throughput.py: the shared demo-seed data
sys.path.insert(0, str(HERE.parent / "shared"))  # this checkout's selfreward, installed or not

LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "pyarrow", "gguf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def gpu_facts(device: str) -> dict[str, Any]:
    import torch

    if device != "cuda":
        return {"device": "cpu", "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": "cuda",
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "bf16": torch.cuda.is_bf16_supported(),
        "cuda": torch.version.cuda,
    }


def memory_after_job(device: str) -> dict[str, float | None]:
    """The CUDA memory this process keeps cached after a training job, and what
    `release_gpu_memory` (the sleep hook, before vLLM wakes) gives back; None on CPU."""
    import torch

    from selfreward.policy.sleep import release_gpu_memory

    keys = ("gpu_reserved_after_job_gib", "gpu_released_before_wake_gib", "gpu_reserved_after_release_gib")
    if device != "cuda":
        return dict.fromkeys(keys)
    kept = torch.cuda.memory_reserved()
    released = release_gpu_memory()
    after = torch.cuda.memory_reserved()
    return dict(zip(keys, (round(b / 2**30, 2) for b in (kept, released, after)), strict=True))


def train(config: Any, work: Path, steps: tuple[int, int], device: str) -> dict[str, Any]:
    """M1 = SFT(M0), M2 = DPO(M1) through selfreward.training.runner.run; facts of each."""
    import torch
    from train_throughput import _ift_row, prepare_data, write_jsonl

    from selfreward.training.request import dpo_request, sft_request
    from selfreward.training.runner import run

    sft, pairs = prepare_data(work)
    seed = work / "seed-ift"
    write_jsonl(seed / "ift.jsonl", [_ift_row(i, ex) for i, ex in enumerate(sft)])
    pairs_file = write_jsonl(work / "pairs.jsonl", pairs)
    out: dict[str, Any] = {"data": {"sft_examples": len(sft), "dpo_pairs": len(pairs)}}
    for kind, build in (
        ("sft", lambda: sft_request(config, name="m1", seed_dir=seed)),
        ("dpo", lambda: dpo_request(config, pairs=pairs_file, name="m2", parent="m1")),
    ):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.monotonic()
        manifest = run(build())
        wall = time.monotonic() - started
        t = manifest["training"]
        seconds = float(t["session_seconds"]) or float("nan")
        out[kind] = {
            "steps": t["session_steps"],
            "precision": t["precision"],
            "device": t["device"],
            "train_seconds": seconds,
            "job_seconds": round(wall, 1),  # loading, data, training, saving, fingerprint
            "tokens": t["session_tokens"],
            "tokens_per_s": round(t["session_tokens"] / seconds, 1),
            "samples_per_s": round(t["session_steps"] * t["effective_batch_size"] / seconds, 2),
            "first_loss": manifest.get("metrics", {}).get("first_loss"),
            "last_loss": manifest.get("metrics", {}).get("last_loss"),
            "peak_gpu_memory_gib": (
                round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
            ),
        }
        out[kind].update(memory_after_job(device))
    return out


def fingerprint_on(base: Path, adapter: Path, device: str, dtype_name: str) -> dict[str, Any]:
    """The adapter's fingerprint computed with the model on `device` in `dtype_name`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfreward.fingerprint import compute_fingerprint

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(model, adapter).to(device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    try:
        return compute_fingerprint(model, tokenizer)
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def distances(config: Any, base: Path, device: str, tolerance: float) -> dict[str, Any]:
    """M2's fingerprint on each device and dtype against the trainer's (CPU fp32) one."""
    from selfreward.fingerprint import compare_fingerprints
    from selfreward.storage import RunLayout, read_manifest

    layout = RunLayout(config.artifact_root, config.name)
    m1, m2 = (read_manifest(layout.model_manifest(n)) for n in ("m1", "m2"))
    assert m1 is not None and m2 is not None
    expected = m2["fingerprint"]
    out: dict[str, Any] = {"tolerance": tolerance, "reference": "cpu_fp32 (the trainer's manifest)"}
    fast = "cuda" if device == "cuda" else "cpu"
    for label, dev, dtype in (("gpu_fp32", fast, "float32"), ("gpu_bf16", fast, "bfloat16")):
        started = time.monotonic()
        served = fingerprint_on(base, layout.model_dir("m2"), dev, dtype)
        _, details = compare_fingerprints(expected, served, tolerance)
        out[label] = {
            "device": dev,
            "dtype": dtype,
            "max_abs_diff": details["max_abs_diff"],
            "mean_abs_diff": details["mean_abs_diff"],
            "top1_agreement": details["top1_agreement"],
            "within_tolerance": details["max_abs_diff"] <= tolerance,
            "seconds": round(time.monotonic() - started, 1),
        }
    _, parent = compare_fingerprints(expected, m1["fingerprint"], tolerance)
    out["parent"] = {
        "what": "M1 (the parent) against M2, both cpu_fp32",
        "max_abs_diff": parent["max_abs_diff"],
        "mean_abs_diff": parent["mean_abs_diff"],
        "above_tolerance": parent["max_abs_diff"] > tolerance,
    }
    return out


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary(result: dict[str, Any]) -> str:
    lines = ["", "=" * 72, f"GPU check summary ({result['mode']})", "=" * 72]
    env = result["environment"]
    lines.append(
        "machine: "
        + ", ".join(f"{k} {v}" for k, v in result["hardware"].items())
        + " | "
        + ", ".join(f"{k} {v}" for k, v in env.items())
    )
    lines.append(f"model: {result['model']}")
    for kind in ("sft", "dpo"):
        r = result["training"][kind]
        peak = ""
        if r["peak_gpu_memory_gib"] is not None:
            peak = (
                f", peak GPU memory {r['peak_gpu_memory_gib']} GiB, reserved after the job "
                f"{r['gpu_reserved_after_job_gib']} GiB, {r['gpu_reserved_after_release_gib']} GiB after "
                "release_gpu_memory (what the sleep hook frees before vLLM wakes)"
            )
        lines.append(
            f"{kind}: {r['steps']} steps {r['precision']} on {r['device']}: {r['tokens_per_s']} tokens/s, "
            f"{r['samples_per_s']} samples/s, loss {_num(r['first_loss'])} -> {_num(r['last_loss'])} "
            f"(train {r['train_seconds']:.1f} s, job {r['job_seconds']} s){peak}"
        )
    fp = result["fingerprint"]
    tol = fp["tolerance"]
    for label in ("gpu_fp32", "gpu_bf16"):
        r = fp[label]
        verdict = "within" if r["within_tolerance"] else "OVER"
        lines.append(
            f"fingerprint {label} ({r['device']} {r['dtype']}) vs cpu_fp32: max |dlogprob| "
            f"{r['max_abs_diff']:.4g} ({verdict} tolerance {tol}), mean {r['mean_abs_diff']:.3g}, "
            f"top-1 agreement {r['top1_agreement']:.0%}"
        )
    p = fp["parent"]
    lines.append(
        f"fingerprint parent M1 vs M2 (cpu_fp32): max |dlogprob| {p['max_abs_diff']:.4g} "
        f"({'above' if p['above_tolerance'] else 'NOT above'} tolerance {tol}: "
        f"{'publish tells them apart' if p['above_tolerance'] else 'too close to tell apart'})"
    )
    lines.append(f"wall time {result['seconds']:.0f} s")
    lines.append("=" * 72)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model spec (GGUF, folder, alias)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write gpu_check.json here")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="the same steps on CPU with a tiny random model, a few steps (tests/test_gpu_check.py)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    import tempfile

    import torch

    from selfreward.config import build_config
    from selfreward.fingerprint import BF16_TOLERANCE, DEFAULT_TOLERANCE
    from selfreward.policy.prepare import prepare_model

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device visible: run on a GPU machine, or pass --cpu-dry-run", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    model_spec = args.model
    if dry:
        from selfreward.testing.tiny_model import build_tiny_llama

        model_spec = str(build_tiny_llama(work / "tiny-model"))
        sft_steps, dpo_steps, batch, max_length = 3, 2, 2, 256
    else:
        sft_steps, dpo_steps, batch, max_length = args.sft_steps, args.dpo_steps, args.batch, args.max_length
    t0 = time.monotonic()
    base = prepare_model(model_spec, work / "cache")
    prepare_seconds = round(time.monotonic() - t0, 1)
    section = {"batch_size": batch, "per_device_batch_size": batch, "max_length": max_length}
    config = build_config(
        {
            "name": "gpu-check",
            "artifact_root": str(work / "artifacts"),
            "model": {"base": str(base)},
            "data": {"eft_in_sft": False},
            "lora": LORA,
            "sft": {**section, "max_steps": sft_steps, "learning_rate": 2e-4},
            "dpo": {**section, "max_steps": dpo_steps, "learning_rate": 5e-5},
            "training": {"device": device, "precision": "auto", "tracker": "none", "checkpoint_steps": 1000},
            "policy": {"device": device},
        },
        environ={},
    )
    tolerance = BF16_TOLERANCE if device == "cuda" else DEFAULT_TOLERANCE
    if dry:
        tolerance = BF16_TOLERANCE  # the bf16 CPU fingerprint stands in for the GPU's
    training = train(config, work, (sft_steps, dpo_steps), device)
    fingerprint = distances(config, base, device, tolerance)
    result = {
        "mode": "cpu dry run (tiny random model)" if dry else "gpu",
        "model": f"{args.model if not dry else 'tiny random Llama'} -> {base} (prepared in {prepare_seconds} s)",
        "hardware": gpu_facts(device),
        "environment": versions(),
        "settings": {"lora": LORA, "batch": batch, "max_length": max_length, "steps": [sft_steps, dpo_steps]},
        "training": training,
        "fingerprint": fingerprint,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(summary(result), flush=True)
    text = json.dumps(result, indent=2, default=str) + "\n"
    for folder in sorted({Path(p).resolve() for p in (args.out, os.environ.get("OUT")) if p}):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu_check.json").write_text(text, encoding="utf-8")
        print(f"wrote {folder / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
