"""Generation throughput: vLLM's server with concurrent requests (ours) against HF `generate`
one sample at a time (the straightforward way, as the original study generated candidates).

The same workload both ways: P prompts (default 32) x N samples (default 4) x T new tokens
(default 64; generation is forced to T tokens on both sides, so both count the same tokens),
sampling at temperature 0.7, top_p 0.9, SmolLM2-135M-Instruct in float32 on CPU.
(b) ours: the policy service's launcher starts vLLM (eager, fp32), and all P requests (n=N
each) are sent at once through the project's client with `--concurrency` in flight. (a) the
straightforward way: transformers `generate` on one prompt for one sample at a time, after
the server has stopped (no contention). One-at-a-time generation has a constant rate, so
`--hf-samples K` times only the first K samples of the workload to keep the run short; the
printed table says how many it timed. Run it under the heavy-work lock:

    flock /tmp/selfreward-heavy.lock .venv/bin/python bench/policy_throughput.py

The last line is `ratio=<ours tokens/s over the straightforward tokens/s>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the sea at night.",
    "What are three tips for learning a new language?",
    "Give me a recipe for a quick vegetable soup.",
    "Summarize the causes of the French Revolution in two sentences.",
    "How do I reverse a list in Python?",
    "What is the difference between weather and climate?",
    "Describe a good morning routine for a student.",
    "Why is the sky blue?",
    "Write a polite email declining a meeting invitation.",
    "What are the benefits of regular exercise?",
    "Explain what a black hole is to a ten-year-old.",
    "List five fruits that are rich in vitamin C.",
    "How does a bicycle stay upright when moving?",
    "Give advice for a first job interview.",
    "What is machine learning?",
    "Describe the water cycle.",
    "Suggest a name for a friendly robot and explain why.",
    "How can I save money on groceries?",
    "What causes earthquakes?",
    "Write a haiku about autumn leaves.",
    "Explain the rules of chess briefly.",
    "What should I pack for a weekend hiking trip?",
    "How do vaccines work?",
    "Give three ideas for a rainy afternoon.",
    "What is the Pythagorean theorem?",
    "Describe the taste of coffee to someone who has never tried it.",
    "How do I make a good cup of tea?",
    "Why do cats purr?",
    "Explain recursion with an example.",
    "What are the main parts of a plant cell?",
    "Write a two-sentence story about a lost key.",
]


def run_vllm(
    model_dir: Path, prompts: list[str], samples: int, tokens: int, concurrency: int
) -> dict[str, Any]:
    from selfreward.config import PolicyServerConfig
    from selfreward.llm.openai import OpenAICompatClient
    from selfreward.policy.launcher import PolicyServer

    log_dir = Path(os.environ.get("SELFREWARD_ARTIFACT_ROOT", "artifacts")) / "logs" / "bench"
    policy = PolicyServerConfig(port=0, cpu_kvcache_gib=2)
    started = time.monotonic()
    with PolicyServer(
        model_dir, served_name="smol", policy=policy, max_model_len=2048, log_dir=log_dir
    ) as server:
        startup = time.monotonic() - started

        async def go() -> tuple[float, int]:
            async with OpenAICompatClient(server.url, concurrency=concurrency, timeout_s=1800) as client:

                async def one(prompt: str) -> int:
                    gen = await client.chat(
                        "smol",
                        [{"role": "user", "content": prompt}],
                        n=samples,
                        temperature=0.7,
                        top_p=0.9,
                        max_tokens=tokens,
                        extra={"ignore_eos": True},
                    )
                    return int(gen.usage["completion_tokens"])

                await one("Hello!")  # warm-up, not timed
                t0 = time.monotonic()
                counts = await asyncio.gather(*(one(p) for p in prompts))
                return time.monotonic() - t0, sum(counts)

        seconds, generated = asyncio.run(go())
    return {"seconds": seconds, "tokens": generated, "samples": len(prompts) * samples, "startup_s": startup}


def run_hf(
    model_dir: Path, prompts: list[str], samples: int, tokens: int, limit: int | None
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    jobs = [(p, s) for p in prompts for s in range(samples)]
    if limit is not None:
        jobs = jobs[:limit]

    def generate(prompt: str, seed: int) -> int:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                **ids,
                do_sample=True,
                temperature=0.7,
                top_p=0.9,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        return int(out.shape[1] - ids["input_ids"].shape[1])

    generate("Hello!", 0)  # warm-up, not timed
    t0 = time.monotonic()
    generated = sum(generate(p, i) for i, (p, _) in enumerate(jobs))
    return {"seconds": time.monotonic() - t0, "tokens": generated, "samples": len(jobs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec (prepared first)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight to vLLM")
    parser.add_argument("--hf-samples", type=int, default=None, help="time only the first K HF samples")
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"), help="prepared-model cache")
    args = parser.parse_args()

    import torch
    import transformers

    from selfreward.policy.prepare import prepare_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    model_dir = prepare_model(args.model, args.cache)
    print(f"model: {args.model} ({model_dir}), float32, CPU; torch threads {torch.get_num_threads()}")
    print(
        f"workload: {len(prompts)} prompts x {args.samples} samples x {args.max_tokens} new tokens (forced)"
    )
    ours = run_vllm(model_dir, prompts, args.samples, args.max_tokens, args.concurrency)
    plain = run_hf(model_dir, prompts, args.samples, args.max_tokens, args.hf_samples)

    rows = [
        (f"vLLM server, {args.concurrency} requests in flight (ours)", ours),
        ("HF generate, one sample at a time", plain),
    ]
    header = f"{'way':<48}{'samples':>8}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}"
    print(header)
    print("-" * len(header))
    for label, r in rows:
        print(
            f"{label:<48}{r['samples']:>8}{r['tokens']:>8}{r['seconds']:>9.1f}{r['tokens'] / r['seconds']:>10.1f}"
        )
    print(f"(vLLM start-up, not in the rate: {ours['startup_s']:.0f} s)")
    print(f"ratio={(ours['tokens'] / ours['seconds']) / (plain['tokens'] / plain['seconds']):.2f}")


if __name__ == "__main__":
    main()
