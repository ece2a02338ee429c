"""End to end through the CLI (`selfreward run`): stage 0 + one iteration on a tiny model, for all
three variants, against the real policy service (vLLM on loopback). Teachers: a second model
behind the OpenAI-compatible protocol (the same vLLM serving a LoRA "teacher" adapter), and the
Gemini fake speaking the real generateContent wire format."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from selfreward.cli.main import app
from selfreward.storage import load_jsonl, read_manifest
from selfreward.testing.tiny_run import tiny_run_config


def tiny_config(root: Path, name: str, model_dir: Path, policy_url: str, **over: Any) -> Path:
    config = tiny_run_config(name, model_dir, policy_url, root, artifact_root=str(root), **over)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(config: Path, policy_url: str) -> str:
    result = CliRunner().invoke(app, ["run", str(config), "--policy-url", policy_url])
    assert result.exit_code == 0, result.output + (repr(result.exception) if result.exception else "")
    return result.output


def check_run(root: Path, name: str, variant: str) -> dict[str, Any]:
    run = root / "runs" / name
    for t, stages in (
        (0, ["prepare", "sft", "publish"]),
        (1, ["prompts", "candidates", "judgments", "pairs", "train", "publish", "evaluate"]),
    ):
        for s in stages:
            assert read_manifest(run / f"iter-{t}" / f"{s}.manifest.json") is not None, (t, s)
    pairs = load_jsonl(run / "iter-1" / "pairs.jsonl")
    assert pairs
    for p in pairs:  # TRL's conversational preference format plus scores
        assert p["prompt"][0]["role"] == "user" and p["chosen"][0]["role"] == "assistant"
        assert p["rejected"][0]["role"] == "assistant" and p["chosen"] != p["rejected"]
    for m in ("m1", "m2"):
        manifest = json.loads((run / "models" / m / "manifest.json").read_text())
        assert manifest["adapter_sha256"] and manifest["fingerprint"]
    m2 = json.loads((run / "models" / "m2" / "manifest.json").read_text())
    assert m2["parent"]["name"] == "m1"
    assert "<h1>Run " in (run / "report.html").read_text()  # written at the end of `selfreward run`
    report = json.loads((run / "eval" / "iter-1" / "report.json").read_text())
    assert report["model"].startswith("m2-") and report["baseline"].startswith("m1-")
    # eval.max_prompts 3, less the held-out check's removals (the demo seed has a near duplicate:
    # "What is the difference between weather and climate?" vs "... affect and effect?", ROUGE-L 0.75)
    assert report["contamination"]["checked"] == 3
    assert report["head2head"]["n"] == 3 - report["contamination"]["removed"]
    return {"pairs": pairs, "report": report, "run": run}


@pytest.mark.timeout(600)
def test_self_reward_run_end_to_end_and_resume(tmp_path: Path, tiny_model_dir: Path, policy_server) -> None:
    # the default: the embedded run trains in a child process (training.subprocess: auto)
    config = tiny_config(
        tmp_path / "a", "self", tiny_model_dir, policy_server.url, training={"subprocess": "auto"}
    )
    output = run_cli(config, policy_server.url)
    assert "summary" in output
    # the quickstart ends with the command that opens its dashboard
    assert f"dashboard: selfreward ui {tmp_path / 'a'} --port 8765" in output
    out = check_run(tmp_path / "a", "self", "self-reward")
    # the process tree's peak memory: per stage in its manifest, for the run in the summary
    peaks = [read_manifest(m)["peak_rss_bytes"] for m in sorted(out["run"].glob("iter-*/*.manifest.json"))]
    assert len(peaks) == 10 and min(peaks) > 100e6, peaks  # this process alone holds torch
    total = re.search(r"peak memory (\d+\.\d+) GB", output)
    assert total is not None and float(total.group(1)) >= max(peaks) / 1e9 - 0.01, output
    assert (out["run"] / "models" / "m2" / "log_history.jsonl").is_file()
    for m in ("m1", "m2"):  # each trained by `python -m selfreward.training.train_entry`
        log = (out["run"] / "logs" / "train" / f"{m}.log").read_text()
        command = [line for line in log.splitlines() if line.startswith("$ ")]
        assert len(command) == 1 and " -m selfreward.training.train_entry --request " in command[0], log
        assert "accelerate.commands.launch" not in command[0]
    assert not (out["run"] / "iter-1" / "candidates.error.json").exists()
    progress = json.loads((out["run"] / "iter-1" / "candidates.progress.json").read_text())
    assert progress["stage"] == "candidates" and progress["current"]["finished"] is True
    # the dashboard over the real run: every stage done, the real curves and pairs
    from fastapi.testclient import TestClient

    from selfreward.dashboard.app import create_app

    with TestClient(create_app(tmp_path / "a")) as ui:
        run = ui.get("/ui/api/runs/self").json()
        assert run["status"] == "done" and run["completed_iterations"] == 1
        assert all(s["state"] == "done" for i in run["timeline"] for s in i["stages"])
        metrics = ui.get("/ui/api/runs/self/metrics").json()
        assert [c["model"] for c in metrics["curves"]] == ["m1", "m2"]
        assert all(c["points"] and "loss" in c["points"][0] for c in metrics["curves"])
        assert "rewards/margins" in metrics["curves"][1]["points"][-1]
        assert metrics["trends"][0]["sentence"]["text"].startswith("M2 vs M1: win rate ")
        data = ui.get("/ui/api/runs/self/iterations/1/data").json()
        assert [i["pair"]["chosen"] for i in data["items"]] == [
            p["chosen"][0]["content"] for p in out["pairs"]
        ]
        assert all(len(i["candidates"]) == 3 and i["candidates"][0]["verdicts"] for i in data["items"])
    for p in out["pairs"]:
        assert p["chosen_score"] > p["rejected_score"]
    judgments = load_jsonl(out["run"] / "iter-1" / "judgments.jsonl")
    assert len(judgments) == 9 and all(j["judge"].startswith("policy:m1-") for j in judgments)
    # a second invocation finds every stage done and runs nothing
    again = run_cli(config, policy_server.url)
    assert again.count("already done") == 10
    # the served adapters with their lineage from the manifests (vLLM's parent is only the base)
    served = CliRunner().invoke(
        app, ["policy", "adapters", "list", "--url", policy_server.url], env={"COLUMNS": "300"}
    )
    assert served.exit_code == 0, served.output
    cells = [
        [c.strip() for c in line.strip().strip("│").split("│")]
        for line in served.output.splitlines()
        if line.startswith("│")
    ]
    rows = {r[0]: r for r in cells}
    m1 = next(r for name, r in rows.items() if name.startswith("m1-"))
    m2 = next(r for name, r in rows.items() if name.startswith("m2-"))
    assert m2[1] == "m1" and m1[1] == "(base)" and m2[2] == "tiny", served.output


@pytest.mark.timeout(600)
def test_teacher_reward_with_openai_compatible_teacher(
    tmp_path: Path, tiny_model_dir: Path, openai_teacher: str, policy_server
) -> None:
    teacher = openai_teacher
    config = tiny_config(
        tmp_path / "b",
        "treward",
        tiny_model_dir,
        policy_server.url,
        variant="teacher-reward",
        teacher={"backend": teacher},
        eval={"judge_bench": [{"set": str(BENCH), "limit": 10}]},
    )
    run_cli(config, policy_server.url)
    out = check_run(tmp_path / "b", "treward", "teacher-reward")
    judgments = load_jsonl(out["run"] / "iter-1" / "judgments.jsonl")
    assert {j["judge"] for j in judgments} == {teacher}
    # the judge benchmark: M2 as self-judge, the teacher (kept once per run) and the baselines
    bench = out["report"]["judge_bench"]["generic"]
    roles = {j["role"]: j for j in bench["judges"]}
    assert set(roles) == {"self", "teacher", "length:longer", "length:shorter", "random:7"}
    assert roles["self"]["judge"].startswith("policy:m2-") and roles["teacher"]["judge"] == teacher
    assert roles["length:longer"]["metrics"]["accuracy"] == 0.625  # tests/test_judge_bench.py's hand count
    for role in ("self", "teacher"):
        m = roles[role]["metrics"]
        assert m["n"] + m["failures"] == 4
    run = out["run"]
    assert (
        len(load_jsonl(run / "eval" / "judge-bench" / "generic" / "verdicts" / f"{teacher_file(teacher)}"))
        == 4
    )
    assert (run / "eval" / "iter-1" / "judge-bench" / "generic" / "report.md").is_file()
    assert set(out["report"]["metrics"]["judge_bench_accuracy"]["generic"]) == set(roles)
    assert "Judge benchmark <code>generic</code>" in (run / "report.html").read_text()


BENCH = Path(__file__).parent / "data" / "judge-bench" / "generic.jsonl"


def teacher_file(spec: str) -> str:
    from selfreward.evaluation.answers import safe_name

    return f"{safe_name(spec)}-pointwise.jsonl"


TEACHER_ANSWER = "A careful, complete answer written by the teacher."


def gemini_reply(model: str, prompt: str, body: dict[str, Any]) -> str:
    if "Best Model Identifier" in prompt:  # the pairwise evaluation prompt
        return "m"
    if "Score: <total points>" in prompt:  # the additive judge prompt
        return "Relevant and helpful.\nScore: 4"
    return TEACHER_ANSWER


@pytest.mark.timeout(600)
def test_teacher_demo_with_gemini_fake(
    tmp_path: Path, tiny_model_dir: Path, policy_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfreward.testing.fake_gemini import fake_gemini

    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    with fake_gemini(api_key="test-key", reply=gemini_reply) as gemini:
        config = tiny_config(
            tmp_path / "c",
            "tdemo",
            tiny_model_dir,
            policy_server.url,
            variant="teacher-demo",
            teacher={"backend": "gemini:gemini-pro", "gemini_base_url": gemini.base_url},
            eval={"judge": "gemini:gemini-pro"},
        )
        run_cli(config, policy_server.url)
        assert all(r.key_ok for r in gemini.requests)
    out = check_run(tmp_path / "c", "tdemo", "teacher-demo")
    assert all(p["chosen"][0]["content"] == TEACHER_ANSWER for p in out["pairs"])
    assert read_manifest(out["run"] / "iter-1" / "judgments.manifest.json")["skipped"]


@pytest.mark.timeout(900)
def test_spin_two_iterations_pair_human_answers_against_the_model(
    tmp_path: Path, tiny_model_dir: Path, policy_server
) -> None:
    """spin end to end on the tiny model (embedded): prompts from the seed IFT split without
    repeats across iterations, no judge, chosen = the human answer, rejected = M(t)'s."""
    config = tiny_config(
        tmp_path / "s",
        "spin",
        tiny_model_dir,
        policy_server.url,
        variant="spin",
        iterations=2,
        prompts={"source": "seed-ift", "num_prompts": 3},
    )
    run_cli(config, policy_server.url)
    out = check_run(tmp_path / "s", "spin", "spin")
    run = out["run"]
    human = {r["id"]: r["response"] for r in load_jsonl(run / "seed" / "ift.jsonl")}
    used = []
    for t in (1, 2):
        prompts = load_jsonl(run / f"iter-{t}" / "prompts.jsonl")
        assert len(prompts) == 3 and all(p["source"] == "seed-ift" for p in prompts)
        used.append({p["provenance"]["ift_id"] for p in prompts})
        assert read_manifest(run / f"iter-{t}" / "judgments.manifest.json")["skipped"]
        pairs = load_jsonl(run / f"iter-{t}" / "pairs.jsonl")
        cands = {c["id"]: c for c in load_jsonl(run / f"iter-{t}" / "candidates.jsonl")}
        assert len(cands) == 3  # one answer per prompt
        for p in pairs:
            assert p["kind"] == "spin"
            assert p["chosen"][0]["content"] == human[p["chosen_id"].removeprefix("human:")]
            assert p["rejected"][0]["content"] == cands[p["rejected_id"]]["text"]
        manifest = read_manifest(run / f"iter-{t}" / "pairs.manifest.json")
        assert manifest["pairs"] + sum(manifest["dropped_by_reason"].values()) == 3
    assert not used[0] & used[1]  # no prompt repeats while the split lasts
    m3 = json.loads((run / "models" / "m3" / "manifest.json").read_text())
    assert m3["parent"]["name"] == "m2" and m3["data"]["by_kind"]["spin"]["examples"] >= 1
    # the same set-up with self-reward, one iteration: `selfreward compare` lines them up
    other = tiny_config(tmp_path / "s", "self", tiny_model_dir, policy_server.url)
    run_cli(other, policy_server.url)
    root = str(tmp_path / "s")
    compared = CliRunner().invoke(
        app,
        [
            "compare",
            "spin",
            "self",
            "--root",
            root,
            "--html",
            f"{root}/compare.html",
            "--json",
            f"{root}/c.json",
        ],
        env={"COLUMNS": "400"},
    )
    assert compared.exit_code == 0, compared.output
    data = json.loads((tmp_path / "s" / "c.json").read_text())
    assert [(r["run"], r["variant"], len(r["iterations"])) for r in data["runs"]] == [
        ("spin", "spin", 2),
        ("self", "self-reward", 1),
    ]
    # same config but the method's own fields, and SFT on CPU is deterministic: the same M1
    assert data["config_differences"] == [] and data["comparable"], data["not_comparable_because"]
    first = data["runs"][0]["iterations"][0]
    report = json.loads((run / "eval" / "iter-1" / "report.json").read_text())
    assert first["win_rate_vs_fixed"] == report["head2head_fixed"]["win_rate"]
    assert first["pairs_by_kind"] == read_manifest(run / "iter-1" / "pairs.manifest.json")["pairs_by_kind"]
    assert set(first["seconds"]) == {
        "prompts",
        "candidates",
        "judgments",
        "pairs",
        "train",
        "publish",
        "evaluate",
    }
    assert data["runs"][1]["iterations"][0]["pairs_by_kind"].keys() <= {"actor"}
    page = (tmp_path / "s" / "compare.html").read_text()
    assert "Runs compared: spin, self" in page and "not comparable" not in page.lower()
    assert "win vs fixed" in compared.output


@pytest.mark.timeout(900)
def test_cream_two_iterations_weigh_pairs_by_the_two_judges_consistency(
    tmp_path: Path, tiny_model_dir: Path, policy_server
) -> None:
    """cream end to end on the tiny model (embedded): the candidates judged by M(t) and again by
    M(t-1) (M0 in iteration 1), the consistency rate in the pairs manifest, and DPO trained with it."""
    config = tiny_config(
        tmp_path / "c",
        "cream",
        tiny_model_dir,
        policy_server.url,
        variant="cream",
        iterations=2,
        eval={"continue_on_collapse": True},  # a random tiny judge gives one score to most answers
    )
    run_cli(config, policy_server.url)
    run = tmp_path / "c" / "runs" / "cream"
    for t, current, previous in ((1, "m1-", "tiny"), (2, "m2-", "m1-")):
        it = run / f"iter-{t}"
        judged = load_jsonl(it / "judgments.jsonl")
        reference = load_jsonl(it / "reference_judgments.jsonl")
        assert sorted(j["id"] for j in reference) == sorted(j["id"] for j in judged) and len(judged) == 9
        assert all(j["judge"].startswith(f"policy:{current}") for j in judged)
        assert all(j["judge"].startswith(f"policy:{previous}") for j in reference)
        manifest = read_manifest(it / "pairs.manifest.json")
        c = manifest["consistency"]
        assert c["prompts"] + c["prompts_without"] == 3 and manifest["preference_confidence"] == c["mean"]
        assert c["reference_judge"] == reference[0]["judge"]
        pairs = load_jsonl(it / "pairs.jsonl")
        assert all(p["kind"] == "cream" and p["consistency"] is not None for p in pairs)
        model = json.loads((run / "models" / f"m{t + 1}" / "manifest.json").read_text())
        assert model["identity"].get("preference_confidence") == c["mean"]
    assert read_manifest(run / "iter-2" / "evaluate.manifest.json") is not None


@pytest.mark.timeout(900)
def test_temporal_two_iterations_anchor_rejections_and_guide_chosen_by_a_future_model(
    tmp_path: Path, tiny_model_dir: Path, policy_server
) -> None:
    """temporal end to end on the tiny model (embedded): M1's answers added once per prompt and
    cached, anchored pairs, the future model M_f trained, served and judged, the final pairs
    from both, M(t+1) trained on them."""
    config = tiny_config(
        tmp_path / "t",
        "temporal",
        tiny_model_dir,
        policy_server.url,
        variant="temporal",
        iterations=2,
        eval={"continue_on_collapse": True},
    )
    run_cli(config, policy_server.url)
    run = tmp_path / "t" / "runs" / "temporal"
    anchors = load_jsonl(run / "anchors" / "m1.jsonl")
    for t in (1, 2):
        it = run / f"iter-{t}"
        cands = load_jsonl(it / "candidates.jsonl")
        mine = [c for c in cands if not c["anchor"]]
        theirs = [c for c in cands if c["anchor"]]
        assert len(mine) == len(theirs) == 9 and {c["index"] for c in theirs} == {3, 4, 5}
        assert all(c["model"].startswith("m1-") for c in theirs)
        assert {c["text"] for c in theirs} <= {a["text"] for a in anchors}
        assert len(load_jsonl(it / "judgments.jsonl")) == 18  # M(t) judges the anchor's answers too
        anchored = load_jsonl(it / "anchored_pairs.jsonl")
        future = json.loads((run / "models" / f"m{t + 1}-future" / "manifest.json").read_text())
        assert future["parent"]["name"] == f"m{t}"
        fut = load_jsonl(it / "future_candidates.jsonl")
        assert {c["prompt_id"] for c in fut} == {p["prompt_id"] for p in anchored}
        assert all(c["model"].startswith(f"m{t + 1}-future-") for c in fut)
        assert len(load_jsonl(it / "future_judgments.jsonl")) == len(fut)
        pairs = load_jsonl(it / "pairs.jsonl")
        assert [p["prompt_id"] for p in pairs] == [p["prompt_id"] for p in anchored]
        for p, a in zip(pairs, anchored, strict=True):
            assert p["rejected"] == a["rejected"] and p["kind"] == f"{p['chosen_from']}/{p['rejected_from']}"
            assert p["chosen_score"] >= a["chosen_score"]
        manifest = read_manifest(it / "pairs.manifest.json")
        assert manifest["chosen_from_future"] == sum(p["chosen_from"] == "future" for p in pairs)
        model = json.loads((run / "models" / f"m{t + 1}" / "manifest.json").read_text())
        assert model["parent"]["name"] == f"m{t}"
    # iteration 1's anchor is M1 = M(t): its answers came from the cache only when a prompt repeats
    m = read_manifest(run / "iter-2" / "candidates.manifest.json")
    assert m["anchor_model"] == "m1" and m["anchor_answers"] == 9
    assert (
        len(anchors)
        == m["anchor_generated"]
        + read_manifest(run / "iter-1" / "candidates.manifest.json")["anchor_generated"]
    )


META = {
    "variant": "meta-reward",
    "iterations": 2,
    "judge": {"samples": 3, "mode": "sample", "max_tokens": 16},
    "pairs": {"length_control": True, "length_rho": 0.2},
    "meta": {"judge_pair_fraction": 0.5, "max_tokens": 16, "max_judgment_chars": None},
    "eval": {"continue_on_collapse": True},  # a random judge may collapse: tests/test_judge_health.py
}


@pytest.mark.timeout(900)
def test_meta_reward_two_iterations_with_trends(tmp_path: Path, tiny_model_dir: Path, policy_server) -> None:
    """meta-reward end to end on the tiny model (embedded): both iterations meta-judge, the pairs
    stage mixes both kinds by its rules, the report shows the judge's trends."""
    over = {k: v for k, v in META.items() if k != "judge"}
    config = tiny_config(tmp_path / "m", "meta", tiny_model_dir, policy_server.url, **over)
    data = yaml.safe_load(config.read_text())
    data["judge"] = {**data["judge"], **META["judge"]}  # sampled judgments replace the logprob ones
    config.write_text(yaml.safe_dump(data))
    output = run_cli(config, policy_server.url)
    assert "meta_judgments" in output
    run = tmp_path / "m" / "runs" / "meta"
    for t in (1, 2):
        meta = read_manifest(run / f"iter-{t}" / "meta_judgments.manifest.json")
        records = load_jsonl(run / f"iter-{t}" / "meta_judgments.jsonl") if meta["candidates"] else []
        assert meta["candidates"] == len(records) and meta["battles"] == 3 * len(
            records
        )  # 3 judgments: 3 pairs
        for r in records:
            assert len(r["elo"]) == len(r["judgments"]) == 3 and len(r["battles"]) == 3
            assert {b["outcome"] for b in r["battles"]} <= {"a", "b", "tie", "failed"}
        pairs = read_manifest(run / f"iter-{t}" / "pairs.manifest.json")
        judge = pairs["judge_pairs"]
        kinds = pairs["pairs_by_kind"]
        assert kinds.get("actor", 0) >= 1 and judge["meta_judged"] == len(records)
        taken = kinds.get("judge", 0)
        left = sum(judge["dropped"].values())
        assert taken + left == len(records)  # every meta-judged candidate: a judge pair or a reason
        assert taken <= kinds["actor"]  # judge_pair_fraction 0.5: at most as many as actor pairs
        rows = load_jsonl(run / f"iter-{t}" / "pairs.jsonl")
        assert sorted({r["kind"] for r in rows}) == sorted(kinds)
        assert set(pairs["mean_lengths"]) == {"chosen", "rejected"}
        report = json.loads((run / "eval" / f"iter-{t}" / "report.json").read_text())
        health = report["judge_health"]
        assert math.isclose(sum(health["score_shares"].values()), 1.0, abs_tol=1e-3)
        assert (
            health["collapsed"] == (health["top_share"] > 0.9)
            and report["metrics"]["judge_collapsed"] == health["collapsed"]
        )
    page = (run / "report.html").read_text()
    assert "judge: share of its top score" in page or "trends.png" in page
    # one evaluator for the run (M0, named with its hash), both comparisons, held-out check, summary rule
    pinned = json.loads((run / "eval" / "evaluator.json").read_text())
    assert (pinned["spec"], pinned["kind"], pinned["judge"]) == ("policy:m0", "base", "policy:tiny")
    assert len(pinned["weights_sha256"]) == 64 and pinned["pinned_at_iteration"] == 1
    reports = [json.loads((run / "eval" / f"iter-{t}" / "report.json").read_text()) for t in (1, 2)]
    m1 = reports[0]["baseline"]
    for t, report in zip((1, 2), reports, strict=True):
        assert (
            report["evaluator"] == pinned
            and report["judge"] == "policy:tiny"
            and not report["self_evaluation"]
        )
        fixed, previous = report["head2head_fixed"], report["head2head"]
        assert fixed["b"] == m1 and fixed["a"] == report["model"]
        assert previous["b"] == (m1 if t == 1 else reports[0]["model"])
        assert fixed["summary"]["text"].startswith("no evidence of a difference")  # 3 prompts < min_prompts
        c = report["contamination"]
        assert c["checked"] >= fixed["n"] and set(c["training_prompts"]) >= {
            "seed/ift.jsonl",
            "iter-1/prompts.jsonl",
        }
        assert ("iter-2/prompts.jsonl" in c["training_prompts"]) == (t == 2)
    # the fixed baseline answered once: one answer per prompt, reused by iteration 2
    answers = load_jsonl(run / "eval" / "answers" / f"answers-{m1}.jsonl")
    assert (
        len(answers)
        == len({a["prompt_id"] for a in answers})
        == reports[1]["head2head_fixed"]["prompt_count"]
    )
    assert (
        "Evaluator: `policy:tiny` (the base model M0" in (run / "eval" / "iter-2" / "report.md").read_text()
    )
    assert "win rate vs fixed baseline" in page and "Held-out check" in page and "sha256" in page


@pytest.mark.timeout(900)
def test_an_embedded_run_stops_its_own_policy_while_training_and_serves_the_adapters_after(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """policy.stop_during_training: the run starts its own vLLM for the set-up's publish, stops it
    for DPO, and the next stage (publish M2) starts it again with M1 served from the start; M2's
    fingerprint is verified on the new server and the evaluation compares both."""
    from selfreward.config import build_config
    from selfreward.drivers.embedded import run_embedded

    data = tiny_run_config(
        "stopper",
        tiny_model_dir,
        "http://127.0.0.1:9",  # never used: the run starts its own server
        tmp_path,
        artifact_root=str(tmp_path),
        policy={
            "port": 0,
            "cpu_kvcache_gib": 1,
            "max_lora_rank": 16,
            "max_loras": 2,
            "stop_during_training": True,
        },
    )
    result = run_embedded(build_config(data, environ={}))
    ran = [(o.t, o.stage) for o in result.outcomes if o.status == "ran"]
    assert ran[-4:] == [(1, "pairs"), (1, "train"), (1, "publish"), (1, "evaluate")], ran
    run = Path(result.run_dir)
    starts = sorted((run / "logs" / "policy").glob("*.log"))
    assert len(starts) == 2, starts  # once for the set-up's publish, once after DPO
    assert "m1-" in starts[1].read_text()  # the second server served M1 from its start (--lora-modules)
    for t in (0, 1):
        published = read_manifest(run / f"iter-{t}" / "publish.manifest.json")
        assert published is not None and published["max_abs_diff"] <= 0.002, published
    report = json.loads((run / "eval" / "iter-1" / "report.json").read_text())
    assert report["model"].startswith("m2-") and report["baseline"].startswith("m1-")
