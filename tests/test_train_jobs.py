"""SFT and DPO on a tiny random Llama with a real tokenizer, in-process and through `accelerate launch`.

The effects are measured independently of the trainer's own logs: log-probabilities computed
here with transformers + PEFT on the saved model folders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selfreward.config import RunConfig, build_config
from selfreward.progress import Progress, ProgressEvent
from selfreward.storage import sha256_dir
from selfreward.training import runner
from selfreward.training.request import dpo_request, sft_request

TOPICS = ["the sea", "photosynthesis", "a new language", "vegetable soup", "Python lists", "sleep"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_seed(folder: Path, n_ift: int = 16, n_eft: int = 4) -> Path:
    ift = [
        {
            "id": f"i{i}",
            "tree_id": f"t{i}",
            "prompt": f"Tell me about {TOPICS[i % len(TOPICS)]}, please ({i}).",
            "response": f"Here is a clear answer about {TOPICS[i % len(TOPICS)]}: practice every day.",
        }
        for i in range(n_ift)
    ]
    eft = [
        {
            "id": f"e{i}",
            "tree_id": f"u{i}",
            "prompt": f"Explain {TOPICS[i % len(TOPICS)]}.",
            "response": "It is interesting.",
            "score": 2,
            "justification": "The response is relevant but does not explain anything.",
        }
        for i in range(n_eft)
    ]
    write_jsonl(folder / "ift.jsonl", ift)
    write_jsonl(folder / "eft_train.jsonl", eft)
    return folder


def write_pairs(path: Path, n: int = 16) -> Path:
    rows = [
        {
            "prompt_id": f"p{i}",
            "prompt": [{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]} ({i})."}],
            "chosen": [
                {"role": "assistant", "content": f"A helpful answer about {TOPICS[i % len(TOPICS)]}."}
            ],
            "rejected": [{"role": "assistant", "content": "Score: 0 1 2 3"}],
            "chosen_score": 4.0,
            "rejected_score": 1.0,
        }
        for i in range(n)
    ]
    return write_jsonl(path, rows)


def train_config(root: Path, base: Path, **over: Any) -> RunConfig:
    data: dict[str, Any] = {
        "name": "t",
        "seed": 7,
        "artifact_root": str(root),
        "model": {"base": str(base)},
        "sft": {
            "learning_rate": 1e-2,
            "max_steps": 12,
            "batch_size": 4,
            "per_device_batch_size": 2,
            "max_length": 1152,
        },
        "dpo": {
            "learning_rate": 1e-2,
            "max_steps": 8,
            "batch_size": 4,
            "per_device_batch_size": 4,
            "max_length": 256,
        },
        "training": {"checkpoint_steps": 4, "num_threads": 1},
    }
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return build_config(data, environ={})


# ------------------------------------------------------------------ independent measurements


def load(base: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def completion_logp(
    model: Any, tokenizer: Any, prompt: list[dict], completion: list[dict]
) -> tuple[float, int]:
    """Sum of log p(completion tokens | prompt) and their count, as the trainers define them."""
    import torch

    prompt_ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([list(full)])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    tail = logp[len(prompt_ids["input_ids"]) - 1 :]
    return float(tail.sum()), int(tail.numel())


def sft_nll(model: Any, tokenizer: Any, examples: list[dict]) -> float:
    total, count = 0.0, 0
    for ex in examples:
        s, n = completion_logp(model, tokenizer, ex["prompt"], ex["completion"])
        total, count = total - s, count + n
    return total / count


def dpo_margin(model: Any, tokenizer: Any, examples: list[dict]) -> float:
    margins = [
        completion_logp(model, tokenizer, ex["prompt"], ex["chosen"])[0]
        - completion_logp(model, tokenizer, ex["prompt"], ex["rejected"])[0]
        for ex in examples
    ]
    return sum(margins) / len(margins)


def batch_logps(model: Any, batch: dict[str, Any]):
    """Per-sequence completion log-prob of a collated DPO batch (chosen rows, then rejected rows)."""
    import torch

    with torch.no_grad():
        logits = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        )
    labels = batch["input_ids"][:, 1:]
    logp = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    """m1 = SFT(M0) and m2 = DPO(m1), trained in-process once for the module."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train")
    config = train_config(root / "art", tiny_model_dir)
    seed = write_seed(root / "seed")
    pairs = write_pairs(root / "pairs.jsonl")
    events: list[dict[str, Any]] = []
    progress = Progress(lambda e: events.append(e.as_dict()))
    sft = sft_request(config, name="m1", seed_dir=seed)
    m1 = runner.run(sft, progress)
    dpo = dpo_request(config, pairs=pairs, name="m2", parent="m1")
    m2 = runner.run(dpo, progress)
    yield {
        "config": config,
        "seed": seed,
        "pairs": pairs,
        "sft": sft,
        "dpo": dpo,
        "m1": m1,
        "m2": m2,
        "events": events,
    }


# ------------------------------------------------------------------ tests


def test_sft_lowers_the_loss_on_its_data(trained: dict[str, Any], tiny_model_dir: Path) -> None:
    _, data = runner.prepare(trained["sft"])
    assert data.per_file[str(trained["seed"] / "eft_train.jsonl")] == 4  # judge examples trained too
    tokenizer = runner.load_tokenizer(trained["sft"])
    before = sft_nll(load(tiny_model_dir), tokenizer, data.examples)
    after = sft_nll(load(tiny_model_dir, trained["sft"].model_dir), tokenizer, data.examples)
    assert after < before - 0.2, (before, after)
    metrics = trained["m1"]["metrics"]
    assert metrics["last_loss"] < metrics["first_loss"]


def test_dpo_raises_the_chosen_rejected_margin(trained: dict[str, Any], tiny_model_dir: Path) -> None:
    _, data = runner.prepare(trained["dpo"])
    tokenizer = runner.load_tokenizer(trained["dpo"])
    m1 = dpo_margin(load(tiny_model_dir, trained["sft"].model_dir), tokenizer, data.examples)
    m2 = dpo_margin(load(tiny_model_dir, trained["dpo"].model_dir), tokenizer, data.examples)
    assert m2 > m1 + 1.0, (m1, m2)
    assert trained["m2"]["metrics"]["rewards/margins"] > 0
    # the curves of the dashboard and the report: one line per logged step, as the trainer logged it
    history = [
        json.loads(x) for x in (trained["dpo"].model_dir / "log_history.jsonl").read_text().splitlines()
    ]
    steps = [h["step"] for h in history]
    assert (
        len(steps) >= 2
        and steps == sorted(set(steps))
        and steps[-1] <= trained["m2"]["training"]["global_step"]
    )
    assert all({"loss", "rewards/margins", "rewards/accuracies"} <= set(h) for h in history)
    assert history[-1]["loss"] == pytest.approx(trained["m2"]["metrics"]["last_loss"])
    assert "log_history.jsonl" in trained["m2"]["files"]


def test_dpo_reference_is_the_parent_not_m0(trained: dict[str, Any], tiny_model_dir: Path) -> None:
    """TRL's reference log-probs equal M(t)'s computed independently, before and after training."""
    import torch

    config = trained["config"]
    config = config.model_copy(update={"dpo": config.dpo.model_copy(update={"max_steps": 3})})
    request = dpo_request(config, pairs=trained["pairs"], name="ref-check", parent="m1")
    tokenizer, data = runner.prepare(request)
    trainer = runner.build_trainer(request, tokenizer, data)
    batch = next(iter(trainer.get_train_dataloader()))
    m0 = load(tiny_model_dir)
    m1 = load(tiny_model_dir, trained["sft"].model_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.args.bf16):  # as the trainer runs
        expected_m1, expected_m0 = batch_logps(m1, batch), batch_logps(m0, batch)
    assert (expected_m1 - expected_m0).abs().max() > 1e-2  # M(t) != M0 here
    for _ in ("before training", "after training"):
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        reference = torch.cat([ref_chosen, ref_rejected])
        torch.testing.assert_close(reference, expected_m1, atol=1e-4, rtol=1e-5)
        trainer.train()
    trainer.model.eval()
    policy = batch_logps(trainer.model, batch)
    assert (policy - expected_m1).abs().max() > 1e-2  # the policy moved, the reference did not


def test_manifest_is_complete(trained: dict[str, Any], tiny_model_dir: Path) -> None:
    from selfreward.training.arguments import cpu_has_native_bf16
    from selfreward.training.request import base_model_sha256

    m1, m2, dpo = trained["m1"], trained["m2"], trained["dpo"]
    precision = "bf16" if cpu_has_native_bf16() else "fp32"  # training.precision auto on CPU
    folder = dpo.model_dir
    assert m2["name"] == "m2" and m2["kind"] == "dpo" and m2["run"] == "t" and m2["seed"] == 7
    assert m2["base_model"]["path"] == str(tiny_model_dir.resolve())
    assert m2["base_model"]["sha256"] == base_model_sha256(tiny_model_dir)
    assert m2["parent"]["name"] == "m1" and m2["parent"]["adapter_sha256"] == m1["adapter_sha256"]
    assert m1["parent"] is None and m2["reference_model"].startswith("m1: a frozen copy")
    assert m2["data"]["sha256"] and m2["data"]["files"] == {
        str(trained["pairs"].resolve()): m2["data"]["files"][str(trained["pairs"].resolve())]
    }
    assert m2["data"]["examples"] == 16 and m2["data"]["skipped"] == {}
    assert m2["config"]["dpo"]["beta"] == 0.1 and m2["config"]["dpo"]["learning_rate"] == 1e-2
    assert m2["config"]["lora"]["inherited_from"] == "m1" and m2["config"]["lora"]["r"] == 16
    assert m1["config"]["sft"]["lr_scheduler"] == "cosine" and m1["config"]["lora"]["alpha"] == 32
    assert set(m2["versions"]) >= {"trl", "transformers", "peft", "torch", "accelerate"}
    for manifest, steps in ((m1, 12), (m2, 8)):
        training = manifest["training"]
        assert training["global_step"] == training["total_steps"] == steps
        assert training["resumed_from_step"] == 0 and training["precision"] == precision
        assert training["effective_batch_size"] == 4
        metrics = manifest["metrics"]
        assert {"first_loss", "last_loss", "tokens_per_s", "samples_per_s"} <= set(metrics)
        assert metrics["tokens_per_s"] > 0 and metrics["input_tokens_seen"] > 0
    assert m1["training"]["gradient_accumulation_steps"] == 2
    assert {"rewards/margins", "rewards/accuracies"} <= set(m2["metrics"])
    # the folder: adapter + tokenizer + manifest, no frozen reference copy, hash recomputable
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "manifest.json"} <= names
    assert not any(p.is_dir() for p in folder.iterdir())
    assert m2["adapter_sha256"] == sha256_dir(folder, include=lambda rel: rel.name.startswith("adapter_"))
    assert json.loads((folder / "manifest.json").read_text()) == m2
    assert "content_sha256" in m2["base_model"]  # from the prepared folder's manifest (None here)
    # checkpoints were outside the model folder and are gone; TensorBoard got the metrics
    assert not dpo.work_dir.exists()
    assert list(dpo.tensorboard_dir.glob("events.out.tfevents.*"))


def test_manifest_fingerprint_matches_the_saved_adapter(
    trained: dict[str, Any], tiny_model_dir: Path
) -> None:
    """Computed in memory right after training; the folder reloaded from disk reproduces it, M1 does not."""
    from selfreward.fingerprint import compare_fingerprints, fingerprint_model_dir

    expected = trained["m2"]["fingerprint"]
    assert expected["probes"] and expected["dtype"] == "float32"
    ok, details = compare_fingerprints(
        expected, fingerprint_model_dir(tiny_model_dir, trained["dpo"].model_dir)
    )
    assert ok and details["max_abs_diff"] < 1e-4, details
    parent_ok, _ = compare_fingerprints(expected, trained["m1"]["fingerprint"])
    assert not parent_ok


def test_progress_reports_steps_loss_and_eta(trained: dict[str, Any]) -> None:
    events = [e for e in trained["events"] if e["task"] == "dpo m2"]
    assert events[0]["done"] == 0 and events[0]["total"] == 8
    assert [e["done"] for e in events if not e["finished"]][-1] == 8
    assert any("loss" in e and e["eta_s"] is not None for e in events)
    assert events[-1]["finished"] and events[-1]["loss"] == pytest.approx(
        trained["m2"]["metrics"]["last_loss"]
    )


def test_finished_job_is_a_noop(trained: dict[str, Any]) -> None:
    adapter = trained["dpo"].model_dir / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns
    events: list[ProgressEvent] = []
    again = runner.run(trained["dpo"], Progress(events.append))
    assert again == trained["m2"] and adapter.stat().st_mtime_ns == mtime and events == []


def test_accelerate_launch_path_matches_in_process(trained: dict[str, Any], tiny_model_dir: Path) -> None:
    """The same DPO job through `accelerate launch` (cpu.yaml): same adapter, progress relayed."""
    from safetensors.torch import load_file

    config = trained["config"]
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"accelerate_config": "cpu"})}
    )
    request = dpo_request(config, pairs=trained["pairs"], name="m2-launched", parent="m1")
    events: list[dict[str, Any]] = []
    manifest = runner.run(request, Progress(lambda e: events.append(e.as_dict())))
    assert manifest["training"]["global_step"] == 8 and manifest["training"]["world_size"] == 1
    assert events[-1]["finished"] and events[-1]["done"] == 8 and "loss" in events[-1]
    launched = load_file(request.model_dir / "adapter_model.safetensors")
    in_process = load_file(trained["dpo"].model_dir / "adapter_model.safetensors")
    assert launched.keys() == in_process.keys()
    for key, tensor in in_process.items():
        assert (launched[key] - tensor).abs().max() < 1e-5, key
    assert "accelerate.commands.launch" in request.log_file.read_text()


def test_cli_trains_with_a_progress_bar(trained: dict[str, Any], tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from selfreward.cli.main import app

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(trained["config"].model_dump(mode="json")))
    args = [
        "train",
        "dpo",
        "-c",
        str(config_file),
        "--pairs",
        str(trained["pairs"]),
        "--parent",
        "m1",
        "--name",
        "m3",
    ]
    result = CliRunner().invoke(app, args, env={**os.environ, "SELFREWARD_DPO__MAX_STEPS": "2"})
    assert result.exit_code == 0, result.output
    manifest = json.loads((trained["dpo"].layout.model_dir("m3") / "manifest.json").read_text())
    assert manifest["training"]["global_step"] == 2 and manifest["config"]["dpo"]["max_steps"] == 2
    assert (
        "dpo m3" in result.output
        and "2/2" in result.output
        and manifest["adapter_sha256"][:12] in result.output
    )
