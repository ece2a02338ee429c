"""bench/loop_throughput.py's core on the tiny model: both sides of one sample + judge iteration
(our candidates and judgments stages on the shared real vLLM server; HF transformers one at a
time) on 2 prompts x 2 candidates, so that the benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "loop_throughput.py"
# the built-in rubric alone (about 1100 tokens of the tiny model's 512-token BPE) exceeds the
# shared test server's 1024-token context: a compact score template of the same form, on both sides
COMPACT_SCORE = """Rate the response to the question from 0 to 5.
Question: {instruction}
Response: {response}
Justify briefly, then end with the line "Score: <0-5>"."""


def load_bench():  # -> the script as a module
    spec = importlib.util.spec_from_file_location("loop_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_sides_judge_the_same_workload_and_the_ratio_line_parses(
    policy_server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    bench = load_bench()
    template = tmp_path / "score.txt"
    template.write_text(COMPACT_SCORE)
    prompts = bench.demo_prompts(2)
    assert len(prompts) == 2 and all(prompts)
    cfg = bench.bench_config(
        tmp_path,
        policy_server.url,
        policy_server.model,
        model={"max_model_len": 1024},
        candidates={"n": 2, "max_tokens": 8},
        judge={"max_response_chars": 200, "template": str(template)},
    )
    assert cfg.judge.mode == "logprob" and cfg.candidates.temperature == 0.7  # the quickstart's
    ours = bench.run_loop(cfg, prompts, "bench-tiny")
    assert ours["model"] == "tiny" and ours["candidates"] == ours["judged"] == 4
    assert len(ours["texts"]) == 4 and all(s is not None and 0.0 <= s <= 5.0 for s in ours["scores"])
    rows, check = bench.compare_side(policy_server.model_dir, cfg, prompts, None, ours, None, "M0")
    assert [r["records"] for r in rows] == [4, 4] and [r["timed"] for r in rows] == [4, 4]
    assert all(r["records_per_s"] > 0 and r["wall_s"] > 0 for r in rows)
    # HF's judge on our candidates computes the same quantity as vLLM's logprob verdict
    assert check["compared"] == 4 and check["max_abs_diff"] < 0.05
    lines = bench.report_lines(policy_server.model_dir, cfg, prompts, rows, {"M0": check}, 1.0, 1)
    ratio = re.fullmatch(r"ratio=(\d+\.\d\d)", lines[-1])
    assert ratio is not None
    assert abs(float(ratio.group(1)) - rows[0]["records_per_s"] / rows[1]["records_per_s"]) < 0.01
    # a timed prefix is extrapolated per record and says so
    prefix, _ = bench.compare_side(policy_server.model_dir, cfg, prompts, 2, ours, None, "M0")
    assert [r["timed"] for r in prefix] == [4, 2] and prefix[1]["records"] == 4
    assert any(line.startswith("* extrapolated") for line in bench.format_rows(prefix))
