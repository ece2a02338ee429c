"""Judge scoring modes on the same records: `logprob` (ours) against `sample` with K=3.

`sample` (the straightforward way, Yuan et al.): K=3 sampled verdicts per answer (each a
justification and "Score: N", constrained on vLLM), score = mean of the parsed scores.
`logprob` (ours): one forward step after a prefilled "Score: ", score = expectation of 0..5
under the exact digit probabilities (vLLM `logprob_token_ids`).

Records: every (prompt, ranked reply) of the project's demo OASST trees, so agreement with
the human ranks is measured too (Spearman per prompt, averaged). The judge is SmolLM2-135M-
Instruct served by vLLM on CPU (the embedded default's model); pass --policy-url to use a
server that is already running, else one is started here from the prepared model folder
(--model-dir, else SmolLM2 prepared under the artifact root's cache) by the policy service's
launcher.
Run it under the heavy-work lock:

    flock /tmp/selfreward-heavy.lock .venv/bin/python bench/judge_modes.py

Output: a side-by-side table (records/s, verdicts/s, failures, agreement) measured in this
run; the last line is `ratio=<logprob records scored per second / sample records scored per
second>`. Caching is off, so every record costs model calls in both modes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from statistics import mean
from typing import Any

from scipy.stats import pearsonr, spearmanr

import selfreward
from selfreward.config import JudgeConfig
from selfreward.judging import ScoreResult, make_judge

DEMO_TREES = Path(selfreward.__file__).parent / "data" / "demo" / "trees.jsonl"
LOG_DIR = Path(os.environ.get("SELFREWARD_ARTIFACT_ROOT", "artifacts")) / "logs" / "bench"


def demo_records(limit: int) -> list[tuple[str, str, str, int]]:
    """(prompt id, prompt, reply, human rank) of the demo trees' ranked first replies."""
    out = []
    for line in DEMO_TREES.read_text(encoding="utf-8").splitlines():
        tree = json.loads(line)
        prompt = tree["prompt"]
        for reply in prompt.get("replies", []):
            if reply.get("rank") is not None and reply.get("lang", "en") == "en":
                out.append((prompt["message_id"], prompt["text"], reply["text"], int(reply["rank"])))
    return out[:limit]


@contextmanager
def policy_server(model_dir: Path, served: str, max_model_len: int) -> Iterator[str]:
    """The policy service (vLLM's OpenAI server through `selfreward.policy`) on a free port."""
    from selfreward.config import PolicyServerConfig
    from selfreward.policy.launcher import PolicyServer

    policy = PolicyServerConfig(port=0, max_logprobs=20)
    with PolicyServer(
        model_dir, served_name=served, policy=policy, max_model_len=max_model_len, log_dir=LOG_DIR
    ) as server:
        yield server.url


async def run_mode(
    url: str, model: str, mode: str, records: list[tuple[str, str, str, int]], k: int, concurrency: int
) -> tuple[list[ScoreResult], float]:
    cfg = JudgeConfig(mode=mode, samples=k, cache=False, concurrency=concurrency, max_tokens=128)
    judge = make_judge(f"policy:{model}", cfg, policy_url=url)
    try:
        await judge.score("Say hello.", ["Hello!"])  # warm-up: capabilities, label token ids, context
        started = time.perf_counter()
        results = await asyncio.gather(*(judge.score(prompt, [reply]) for _, prompt, reply, _ in records))
        elapsed = time.perf_counter() - started
    finally:
        await judge.aclose()
    return [r[0] for r in results], elapsed


def rank_agreement(records: list[tuple[str, str, str, int]], scores: list[float | None]) -> float | None:
    """Mean over prompts with 2+ scored replies of Spearman(score, -human rank)."""
    by_prompt: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for (pid, _, _, rank), score in zip(records, scores, strict=True):
        if score is not None:
            by_prompt[pid].append((score, rank))
    values = []
    for pairs in by_prompt.values():
        if len(pairs) >= 2 and len({s for s, _ in pairs}) > 1:
            rho = spearmanr([s for s, _ in pairs], [-r for _, r in pairs]).statistic
            values.append(float(rho))
    return mean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy-url", help="an OpenAI-compatible vLLM server already serving --model")
    parser.add_argument("--model", default="smollm2", help="served name of the judge model")
    parser.add_argument("--model-dir", type=Path, help="prepared model folder to serve (default: SmolLM2)")
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args()

    records = demo_records(args.records)
    if args.policy_url:
        url_ctx: Any = nullcontext(args.policy_url)
    else:
        model_dir = args.model_dir
        if model_dir is None:
            from selfreward.policy.prepare import prepare_model

            root = Path(os.environ.get("SELFREWARD_ARTIFACT_ROOT", "artifacts"))
            model_dir = prepare_model("smollm2-135m-instruct", root / "cache")
        url_ctx = policy_server(model_dir, args.model, args.max_model_len)

    with url_ctx as url:
        sample, t_sample = asyncio.run(
            run_mode(url, args.model, "sample", records, args.samples, args.concurrency)
        )
        logprob, t_logprob = asyncio.run(run_mode(url, args.model, "logprob", records, 1, args.concurrency))

    s_scores = [r.score for r in sample]
    l_scores = [r.score for r in logprob]
    both = [(a, b) for a, b in zip(s_scores, l_scores, strict=True) if a is not None and b is not None]
    n = len(records)
    rows = [
        ("records", n, n),
        ("verdicts generated", sum(len(r.verdicts) for r in sample), sum(len(r.verdicts) for r in logprob)),
        ("wall time (s)", f"{t_sample:.2f}", f"{t_logprob:.2f}"),
        ("records scored per second", f"{n / t_sample:.3f}", f"{n / t_logprob:.3f}"),
        (
            "verdicts per second",
            f"{sum(len(r.verdicts) for r in sample) / t_sample:.3f}",
            f"{n / t_logprob:.3f}",
        ),
        ("unparseable verdicts", sum(r.failures for r in sample), sum(r.failures for r in logprob)),
        ("records without a score", sum(s is None for s in s_scores), sum(s is None for s in l_scores)),
        (
            "mean score",
            f"{mean(s for s in s_scores if s is not None):.3f}",
            f"{mean(x for x in l_scores if x is not None):.3f}",
        ),
    ]
    h_s, h_l = rank_agreement(records, s_scores), rank_agreement(records, l_scores)
    rows.append(
        (
            "Spearman vs human rank",
            "n/a" if h_s is None else f"{h_s:.3f}",
            "n/a" if h_l is None else f"{h_l:.3f}",
        )
    )
    print(
        f"judge modes on {n} demo records, judge policy:{args.model} (vLLM, CPU), concurrency {args.concurrency}"
    )
    print(f"{'':28} {'sample (K=' + str(args.samples) + ')':>16} {'logprob (ours)':>16}")
    for name, a, b in rows:
        print(f"{name:28} {a!s:>16} {b!s:>16}")
    if len(both) >= 3:
        xs, ys = [a for a, _ in both], [b for _, b in both]
        print(
            f"agreement on {len(both)} records scored by both: Pearson {pearsonr(xs, ys).statistic:.3f}, "
            f"Spearman {spearmanr(xs, ys).statistic:.3f}, mean |diff| {mean(abs(a - b) for a, b in both):.3f}, "
            f"same rounded score {mean(round(a) == round(b) for a, b in both):.2%}"
        )
    else:
        print(f"agreement: only {len(both)} records scored by both modes")
    print(f"ratio={(n / t_logprob) / (n / t_sample):.3f}")


if __name__ == "__main__":
    main()
