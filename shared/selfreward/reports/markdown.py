"""Markdown of each evaluation, from its report.json data (so a report can be re-rendered)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from selfreward.evaluation.metrics.alpaca import LC_LABEL


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def interval(iv: Sequence[float] | None) -> str:
    return "n/a" if not iv else f"[{pct(iv[0])}, {pct(iv[1])}]"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


REFERENCE_ROWS = [
    ("pairwise accuracy (score equals the reference's)", "pairwise_accuracy", pct),
    ("5-best (judge 5, reference 5)", "five_best", pct),
    ("exact match (all scores of a prompt equal)", "exact_match", pct),
    ("Spearman (pooled)", "spearman", num),
    ("Kendall tau-b (pooled)", "kendall_tau", num),
    ("responses", "responses", str),
    ("prompts", "prompts", str),
]
HUMAN_ROWS = [
    ("pairwise accuracy (judge ties = disagreement)", "pairwise_accuracy", pct),
    ("pairwise accuracy (judge ties = half)", "pairwise_accuracy_ties_half", pct),
    ("5-best (judge 5, human best)", "five_best", pct),
    ("exact match (judge order = human order)", "exact_match", pct),
    ("Spearman (mean per prompt)", "spearman", num),
    ("Kendall tau-b (mean per prompt)", "kendall_tau", num),
    ("Spearman (pooled)", "spearman_pooled", num),
    ("Kendall tau-b (pooled)", "kendall_tau_pooled", num),
    ("human-ordered pairs", "pairs", str),
    ("judge ties among them", "judge_ties", str),
    ("responses", "responses", str),
    ("prompts with correlation defined / undefined", "correlation_prompts", str),
]


def reward_model_markdown(data: Mapping[str, Any], heading: str = "## Reward-modeling ability") -> str:
    human = data["reference"] == "human-ranks"
    rows_spec = HUMAN_ROWS if human else REFERENCE_ROWS
    ex = data["excluding_unparseable"]
    rows = []
    for label, key, fmt in rows_spec:
        if key == "correlation_prompts":
            rows.append(
                [
                    label,
                    f"{data[key]} / {data['correlation_undefined_prompts']}",
                    f"{ex[key]} / {ex['correlation_undefined_prompts']}",
                ]
            )
        else:
            rows.append([label, fmt(data[key]), fmt(ex[key])])
    against = "human ranks" if human else "a reference judge's scores"
    parts = [
        heading,
        "",
        f"Judge scores (`{data.get('scores_path') or 'scores'}`) against {against} "
        f"(`{data.get('reference_path') or 'reference'}`).",
        "",
        table(["metric", "all scores (unparseable = -1)", "excluding unparseable"], rows),
        "",
        f"- parse-failure rate of the judge: {pct(data['parse_failure_rate'])} "
        f"({data['parse_failures']} of {data['responses_compared']} responses)",
    ]
    if not human:
        parts.append(
            f"- parse-failure rate of the reference: {pct(data.get('reference_parse_failure_rate'))}"
        )
    parts.append(
        f"- prompts compared: {data['prompts_compared']}; only in the scores: {data['prompts_only_in_scores']}; "
        f"only in the reference: {data['prompts_only_in_reference']}"
    )
    if data["responses_only_in_scores"] or data["responses_only_in_reference"]:
        parts.append(
            f"- responses not compared: {data['responses_only_in_scores']} only in the scores, "
            f"{data['responses_only_in_reference']} only in the reference"
        )
    for key, side in (("prompt_ids_only_in_scores", "scores"), ("prompt_ids_only_in_reference", "reference")):
        ids = data.get(key) or []
        if ids:
            shown = ", ".join(f"`{i}`" for i in ids[:20]) + (" ..." if len(ids) > 20 else "")
            parts.append(f"- prompt ids only in the {side}: {shown}")
    return "\n".join(parts) + "\n"


def head2head_markdown(data: Mapping[str, Any], heading: str = "## Head-to-head") -> str:
    iv = data["intervals"]
    conf = f"{data.get('confidence', 0.95):.0%}"
    rows = [
        ["win", pct(data["win"]), interval(iv["win"]), str(data["wins"])],
        ["tie", pct(data["tie"]), interval(iv["tie"]), str(data["ties"])],
        ["loss", pct(data["loss"]), interval(iv["loss"]), str(data["losses"])],
        ["win rate (wins + ties/2)", pct(data["win_rate"]), interval(iv["win_rate"]), ""],
    ]
    summary = data.get("summary")
    parts = [
        heading,
        "",
        *([f"**{summary['text']}**", ""] if summary else []),
        f"`{data['a']}` (A) against `{data['b']}` (B) on {data['n']} prompts"
        + (f" from `{data['prompts']}`" if data.get("prompts") else "")
        + (f", judged by `{data['judge']}` in both orders" if data.get("judge") else "")
        + ". A disagreement between the two orders is a tie; identical answers are ties.",
        "",
        table(["outcome", "share", f"{conf} interval", "prompts"], rows),
        "",
        f"- judging failed on {data['failures']} prompt(s) (excluded); intervals: percentile bootstrap, "
        f"{data['bootstrap_samples']} resamples, seed {data['seed']}",
    ]
    if "identical_answers" in data:
        parts.append(
            f"- {data['identical_answers']} of the {data['ties']} ties are identical answers (a tie without a judge call)"
        )
    lengths = data.get("mean_answer_chars") or {}
    if lengths:
        parts.append(
            "- mean answer length: " + ", ".join(f"`{k}` {v:.0f} characters" for k, v in lengths.items())
        )
    return "\n".join(parts) + "\n"


def alpaca_markdown(data: Mapping[str, Any], heading: str = "## AlpacaEval-style win rate") -> str:
    parts = [heading, ""]
    parts.append(
        f"Outputs of `{data['generator']}` on {data['instructions']} instructions, in AlpacaEval's format: "
        f"`{data['model_outputs']}` (run the official tool: "
        f"`alpaca_eval --model_outputs {data['model_outputs']}`)."
    )
    wr = data.get("win_rate")
    if wr is not None:
        lc = data.get("length_controlled") or {}
        wtl = data.get("win_tie_loss") or {}
        ci = interval((wtl.get("intervals") or {}).get("win_rate"))
        rows = [
            ["win rate", pct(wr["win_rate"]), pct(wr["standard_error"]), ci],
            [lc.get("label", LC_LABEL), pct(lc.get("win_rate")), "", ""],
        ]
        parts += [
            "",
            f"Against `{data['reference_generator']}` (`{data['reference']}`), judged by `{data['judge']}` "
            "in both orders; identical outputs count half.",
            "",
            table(["metric", "value", "standard error", "95% bootstrap interval"], rows),
            "",
            f"- wins {wr['n_wins']}, draws {wr['n_draws']} ({wr['n_identical']} identical), losses "
            f"{wr['n_losses']}, judging failed {wr['failures']}",
            f"- instructions only in the model outputs: {data['only_in_model']}; only in the reference: "
            f"{data['only_in_reference']}",
        ]
        if lc:
            coef = ", ".join(f"{k} = {v:.3f}" for k, v in lc["coefficients"].items())
            parts.append(
                f"- length-controlled fit: {coef}; length sd {lc['length_sd']:.1f} characters; "
                f"L2 {lc['l2']}; converged: {lc['converged']}"
            )
    return "\n".join(parts) + "\n"


def judge_health_markdown(h: Mapping[str, Any], t: int) -> str:
    """The judge's scores of this iteration's candidates: distribution, entropy, collapse flag."""
    shares = h.get("score_shares") or {}
    lines = [
        f"## The feedback judge in iteration {t} (`{h.get('judge')}`)",
        "",
        "| score | " + " | ".join(shares) + " |",
        "| --- |" + " --- |" * len(shares),
        "| share of candidates | " + " | ".join(f"{v:.0%}" for v in shares.values()) + " |",
        "",
        f"Entropy {h.get('entropy_bits')} bits (uniform: 2.585); parse failures "
        f"{h.get('parse_failure_rate', 0):.1%} of the verdicts; mean length of chosen / rejected answers "
        f"{h.get('chosen_length')} / {h.get('rejected_length')} characters.",
        "",
    ]
    if h.get("collapsed"):
        lines += [
            f"**Judge collapse**: {h.get('top_share', 0) or 0:.0%} of the scores are {h.get('top_score')} "
            f"(threshold {h.get('threshold')}). Its pairs say little; the next iteration does not start "
            "unless eval.continue_on_collapse is set.",
            "",
        ]
    return "\n".join(lines)


def iteration_markdown(data: Mapping[str, Any]) -> str:
    parts = [
        f"# Evaluation of {data['model']} (run {data['run']}, iteration {data['iteration']})",
        "",
        evaluator_line(data),
        "",
    ]
    if data.get("self_evaluation"):
        parts += [
            f"> **{data['self_evaluation']}**: the judge is the model under test (eval.judge: policy:self).",
            "",
        ]
    c = data.get("contamination")
    if c:
        parts += [contamination_line(c), ""]
    if data.get("head2head"):
        parts.append(
            head2head_markdown(data["head2head"], f"## Against the previous model `{data['head2head']['b']}`")
        )
    fixed = data.get("head2head_fixed")
    if fixed and fixed != data.get("head2head"):
        parts.append(
            head2head_markdown(
                fixed, f"## Against the fixed baseline `{fixed['b']}` (the same every iteration)"
            )
        )
    elif fixed:
        parts += [
            f"The fixed baseline is `{fixed['b']}`, the previous model in this iteration: one comparison.",
            "",
        ]
    if data.get("reward_model"):
        parts.append(reward_model_markdown(data["reward_model"], "## Reward-modeling ability (EFT eval)"))
    if data.get("judge_health"):
        parts.append(judge_health_markdown(data["judge_health"], data["iteration"]))
    for name, bench in (data.get("judge_bench") or {}).items():
        s = bench["set"]
        parts += [
            f"## Judge benchmark: {name} (`{s['source']}`, {s['sampled']} items)",
            "",
            judge_bench_table(bench["judges"]),
            "",
            f"Full report: judge-bench/{name}/report.md",
            "",
        ]
    for name in data.get("plots", []):
        parts.append(f"![{name}]({name})\n")
    return "\n".join(parts)


def bench_row(j: Mapping[str, Any], quote: bool = True) -> list[str]:
    """One judge's row of BENCH_HEADER (Markdown, the CLI table and the run's HTML page)."""
    m = j["metrics"]
    pos = m.get("position") or {}
    length = m["length"]
    return [
        f"`{j['judge']}`" if quote else j["judge"],
        j["mode"],
        str(m["n"]),
        f"{pct(m['accuracy'])} {interval(m['intervals'].get('accuracy'))}",
        pct(m["accuracy_ties_wrong"]),
        str(m["judge_ties"]),
        f"{m['failures']} ({pct(m['parse_failure_rate'])})",
        pct(pos.get("consistency")) if pos else "-",
        pct(pos.get("first_position_share")) if pos else "-",
        pct(length["judge_prefers_longer_rate"]),
    ]


BENCH_HEADER = [
    "judge",
    "mode",
    "items",
    "accuracy (ties half) [95% CI]",
    "accuracy (ties wrong)",
    "judge ties",
    "failures",
    "position consistency",
    "first-position share",
    "prefers longer",
]


def judge_bench_table(judges: Sequence[Mapping[str, Any]]) -> str:
    return table(BENCH_HEADER, [bench_row(j) for j in judges])


def judge_bench_markdown(data: Mapping[str, Any], heading: str | None = None) -> str:
    """One set's judge benchmark: the set's accounting, then every judge (docs/evaluation.md)."""
    s = data["set"]
    judges = data["judges"]
    excluded = ", ".join(f"{k} {v}" for k, v in s["excluded"].items()) or "none"
    lines = [
        heading or f"# Judge benchmark: {s['name']}",
        "",
        f"Set `{s['source']}` (format {s['format']}): {s['records']} records, {s['items']} judgeable items "
        f"(excluded: {excluded})"
        + (f"; a seeded sample of {s['sampled']} (limit {s['limit']})" if s.get("limit") else "")
        + ".",
        "",
    ]
    if s.get("coerced"):
        lines += [
            "Coerced (accepted as the number they spell): "
            + ", ".join(f"{k} in {v} records" for k, v in s["coerced"].items())
            + ".",
            "",
        ]
    if s.get("problems"):
        shown = s["problems"][:10]
        lines += [
            f"Invalid records ({s['excluded'].get('invalid_record', 0)}; the first {len(shown)}):",
            "",
            table(["record", "field", "error"], [[str(p["index"]), p["field"], p["error"]] for p in shown]),
            "",
        ]
    lines += [judge_bench_table(judges), ""]
    subsets = sorted({name for j in judges for name in j["metrics"]["subsets"]})
    if subsets:
        rows = [
            [name]
            + [
                f"{pct((j['metrics']['subsets'].get(name) or {}).get('accuracy'))} "
                f"(n={(j['metrics']['subsets'].get(name) or {}).get('n', 0)})"
                for j in judges
            ]
            for name in subsets
        ]
        lines += [
            "Accuracy per subset:",
            "",
            table(["subset", *(f"`{j['judge']}`" for j in judges)], rows),
            "",
        ]
    sections = [j for j in judges if j.get("rewardbench_sections")]
    if sections:
        names = sorted({k for j in sections for k in j["rewardbench_sections"]})
        rows = [
            [f"`{j['judge']}`"]
            + [
                pct(sec["accuracy"]) + ("" if sec["complete"] else " (partial)")
                if (sec := j["rewardbench_sections"].get(n))
                else "n/a"
                for n in names
            ]
            for j in sections
        ]
        lines += [
            "RewardBench sections (its weights; docs/evaluation.md):",
            "",
            table(["judge", *names], rows),
            "",
        ]
    length_rows = [
        [
            f"`{j['judge']}`",
            f"{pct(j['metrics']['length']['accuracy_human_prefers_longer'])} "
            f"(n={j['metrics']['length']['n_human_prefers_longer']})",
            f"{pct(j['metrics']['length']['accuracy_human_prefers_shorter'])} "
            f"(n={j['metrics']['length']['n_human_prefers_shorter']})",
            pct(j["metrics"]["length"]["judge_prefers_longer_rate"]),
        ]
        for j in judges
    ]
    lines += [
        "Length bias (characters):",
        "",
        table(
            ["judge", "accuracy, human prefers longer", "accuracy, human prefers shorter", "prefers longer"],
            length_rows,
        ),
        "",
    ]
    cost_rows = [
        [
            f"`{j['judge']}`",
            str(j["cost"].get("verdicts_total")),
            str(j["cost"].get("cached_verdicts_total")),
            str(j["cost"].get("judged_now")),
            f"{j['cost'].get('wall_s', 0):.1f} s",
            "n/a"
            if not j["cost"].get("tokens_now")
            else ", ".join(f"{k} {v}" for k, v in j["cost"]["tokens_now"].items()),
        ]
        for j in judges
    ]
    lines += [
        "Cost:",
        "",
        table(
            [
                "judge",
                "verdicts",
                "cached verdicts",
                "judged this run",
                "wall time this run",
                "tokens this run",
            ],
            cost_rows,
        ),
        "",
    ]
    for name in data.get("plots", []):
        lines.append(f"![{name}]({name})\n")
    return "\n".join(lines)


def evaluator_line(data: Mapping[str, Any]) -> str:
    ev = data.get("evaluator") or {}
    if not ev:
        return f"Evaluation judge: `{data.get('judge')}`; prompts: `{data.get('prompts')}`."
    weights = ev.get("weights_sha256")
    what = {
        "base": "the base model M0, not trained by the run",
        "teacher": "the teacher",
        "configured": "eval.judge",
        "self": "the model under test (self-evaluation)",
    }.get(ev.get("kind"), ev.get("kind"))
    return (
        f"Evaluator: `{data.get('judge')}` ({what}"
        + (f", weights sha256 {weights[:12]}" if weights else "")
        + f"; pinned by iteration {ev.get('pinned_at_iteration')}'s evaluation); prompts: `{data.get('prompts')}`."
    )


def contamination_line(c: Mapping[str, Any]) -> str:
    sources = ", ".join(f"{k} ({v})" for k, v in c["training_prompts"].items()) or "none"
    flagged = c["exact_duplicates"] + c["near_duplicates"]
    action = f"removed {c['removed']}" if c["action"] == "drop" else "kept (eval.contamination: report)"
    return (
        f"Held-out check: {c['checked']} evaluation prompts against the training prompts of {sources}: "
        f"{c['exact_duplicates']} exact and {c['near_duplicates']} near duplicates (ROUGE-L >= {c['threshold']}); "
        + (action if flagged else "none found")
        + "."
    )
