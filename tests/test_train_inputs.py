"""Trainer checks that need no training: inputs, counted skips, lineage errors, TRL arguments,
the shipped accelerate configs. Every error must be raised before a model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfreward.config import build_config
from selfreward.errors import ConfigError, EmptyResultError, InputError, StageError
from selfreward.training import runner
from selfreward.training.request import dpo_request, sft_request

PAIR = {
    "prompt_id": "p0",
    "prompt": [{"role": "user", "content": "Give me a recipe for a quick vegetable soup."}],
    "chosen": [{"role": "assistant", "content": "Chop onions, carrots and celery, simmer 20 minutes."}],
    "rejected": [{"role": "assistant", "content": "Soup."}],
    "chosen_score": 4.5,
    "rejected_score": 1.0,
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_config(root: Path, base: Path, **sections: Any):
    data = {"name": "t", "artifact_root": str(root), "model": {"base": str(base)}, **sections}
    return build_config(data, environ={})


def pair(i: int, **over: Any) -> dict[str, Any]:
    row = json.loads(json.dumps(PAIR))
    row["prompt_id"] = f"p{i}"
    row["prompt"][0]["content"] += f" ({i})"
    row.update(over)
    return row


@pytest.fixture()
def cfg(tmp_path: Path, tiny_model_dir: Path):
    return make_config(tmp_path / "art", tiny_model_dir, dpo={"max_length": 160})


# ------------------------------------------------------------------ DPO pairs


def test_pairs_counted_skips_and_kept_examples(tmp_path: Path, cfg) -> None:
    long_prompt = [{"role": "user", "content": "word " * 200}]
    same = [{"role": "assistant", "content": "Identical answer."}]
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [pair(0), pair(1), pair(2, chosen=same, rejected=same), pair(3, prompt=long_prompt)],
    )
    request = dpo_request(cfg, pairs=pairs, name="m1")
    _, data = runner.prepare(request)
    assert data.read == 4
    assert len(data.examples) == 2
    assert dict(data.skipped) == {"chosen_equals_rejected": 1, "prompt_too_long": 1}
    example = data.examples[0]
    assert example["prompt"][-1]["role"] == "user" and example["chosen"][0]["role"] == "assistant"
    assert data.summary()["skipped"] == {"chosen_equals_rejected": 1, "prompt_too_long": 1}


def test_pairs_are_counted_per_kind_and_a_lost_kind_is_warned(
    tmp_path: Path, cfg, caplog: pytest.LogCaptureFixture
) -> None:
    """Meta-reward's judge pairs carry the long judge prompt: if none fits max_length, say so."""
    from selfreward.stages.sft import TrainResult

    long_prompt = [{"role": "user", "content": "word " * 200}]
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            pair(0, kind="actor"),
            pair(1, kind="actor"),
            pair(2, kind="judge", prompt=long_prompt),
            pair(3, kind="judge", prompt=long_prompt),
            pair(4),  # no kind: a pairs file of round 1
        ],
    )
    with caplog.at_level("WARNING"):
        _, data = runner.prepare(dpo_request(cfg, pairs=pairs, name="m1"))
    assert len(data.examples) == 3
    assert data.lost_kinds() == ["judge"]
    assert data.summary()["by_kind"] == {
        "actor": {"read": 2, "examples": 2, "skipped": {}},
        "judge": {"read": 2, "examples": 0, "skipped": {"prompt_too_long": 2}},
        "unlabelled": {"read": 1, "examples": 1, "skipped": {}},
    }
    assert "none of the 2 'judge' pairs is left" in caplog.text and "dpo.max_length" in caplog.text
    result = TrainResult.of({"name": "m1", "data": data.summary()})
    assert result.lost_kinds == ["judge"]
    assert "actor 2/2" in result.summary() and "judge 0/2" in result.summary()
    assert "WARNING: no judge pair left" in result.summary()


def test_pairs_truncated_completion_is_kept_and_counted(tmp_path: Path, cfg) -> None:
    long_answer = [{"role": "assistant", "content": "answer " * 100}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0, chosen=long_answer), pair(1)])
    _, data = runner.prepare(dpo_request(cfg, pairs=pairs, name="m1"))
    assert len(data.examples) == 2 and data.truncated == 1


def test_empty_pairs_file_is_an_error(tmp_path: Path, cfg) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    with pytest.raises(InputError, match=r"pairs.jsonl: no records"):
        runner.prepare(dpo_request(cfg, pairs=pairs, name="m1"))


def test_malformed_json_line_names_file_and_line(tmp_path: Path, cfg) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0), '{"prompt_id": "p1", "prompt": ['])
    with pytest.raises(InputError, match=r"pairs.jsonl:2: not valid JSON"):
        runner.prepare(dpo_request(cfg, pairs=pairs, name="m1"))


def test_missing_field_names_line_and_field(tmp_path: Path, cfg) -> None:
    bad = pair(1)
    del bad["rejected"]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0), bad])
    with pytest.raises(InputError, match=r"pairs.jsonl:2 \(record p1\): field 'rejected'"):
        runner.prepare(dpo_request(cfg, pairs=pairs, name="m1"))


def test_wrong_roles_are_errors(tmp_path: Path, cfg) -> None:
    bad = pair(0, chosen=[{"role": "user", "content": "not an answer"}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [bad])
    with pytest.raises(
        InputError, match=r"pairs.jsonl:1: field 'chosen': must be one or more assistant turns"
    ):
        runner.prepare(dpo_request(cfg, pairs=pairs, name="m1"))


def test_all_pairs_skipped_is_an_error_saying_why(tmp_path: Path, cfg) -> None:
    same = [{"role": "assistant", "content": "Identical answer."}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0, chosen=same, rejected=same)])
    with pytest.raises(EmptyResultError, match=r"all 1 records were skipped \(chosen_equals_rejected: 1\)"):
        runner.prepare(dpo_request(cfg, pairs=pairs, name="m1"))


def test_missing_pairs_file(tmp_path: Path, cfg) -> None:
    with pytest.raises(InputError, match=r"pairs file not found: .*nope.jsonl"):
        dpo_request(cfg, pairs=tmp_path / "nope.jsonl", name="m1")


# ------------------------------------------------------------------ SFT seed


def test_sft_examples_are_prompt_completion_from_ift_and_eft(tmp_path: Path, tiny_model_dir: Path) -> None:
    seed = tmp_path / "seed"
    write_jsonl(
        seed / "ift.jsonl", [{"id": "i0", "tree_id": "t0", "prompt": "Name a color.", "response": "Blue."}]
    )
    eft = {
        "id": "e0",
        "tree_id": "t1",
        "prompt": "Name a fruit.",
        "response": "Apple.",
        "score": 4,
        "justification": "Correct and concise.",
    }
    write_jsonl(seed / "eft_train.jsonl", [eft, {**eft, "id": "e1", "response": "   "}])
    cfg = make_config(tmp_path / "art", tiny_model_dir, sft={"max_length": 2048})
    _, data = runner.prepare(sft_request(cfg, seed_dir=seed))
    ift, judge = data.examples
    assert ift == {
        "prompt": [{"role": "user", "content": "Name a color."}],
        "completion": [{"role": "assistant", "content": "Blue."}],
    }
    assert "Name a fruit." in judge["prompt"][0]["content"] and "Apple." in judge["prompt"][0]["content"]
    assert judge["completion"] == [{"role": "assistant", "content": "Correct and concise.\nScore: 4"}]
    assert dict(data.skipped) == {"empty_text": 1}
    assert data.per_file == {str(seed / "ift.jsonl"): 1, str(seed / "eft_train.jsonl"): 1}


def test_sft_without_eft_reads_only_ift(tmp_path: Path, tiny_model_dir: Path) -> None:
    seed = tmp_path / "seed"
    write_jsonl(seed / "ift.jsonl", [{"id": "i0", "tree_id": "t0", "prompt": "Hi?", "response": "Hello."}])
    cfg = make_config(tmp_path / "art", tiny_model_dir, data={"eft_in_sft": False})
    assert [p.name for p in sft_request(cfg, seed_dir=seed).data] == ["ift.jsonl"]


def test_sft_missing_seed_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = make_config(tmp_path / "art", tiny_model_dir)
    with pytest.raises(InputError, match=r"IFT seed file not found: .*seed/ift.jsonl"):
        sft_request(cfg, seed_dir=tmp_path / "seed")
    write_jsonl(
        tmp_path / "seed" / "ift.jsonl", [{"id": "i0", "tree_id": "t", "prompt": "a", "response": "b"}]
    )
    with pytest.raises(InputError, match=r"EFT seed file .*eft_train.jsonl"):
        sft_request(cfg, seed_dir=tmp_path / "seed")


def test_sft_bad_score_names_line_and_field(tmp_path: Path, tiny_model_dir: Path) -> None:
    seed = tmp_path / "seed"
    write_jsonl(seed / "ift.jsonl", [{"id": "i0", "tree_id": "t0", "prompt": "Hi?", "response": "Hello."}])
    bad = {"id": "e7", "tree_id": "t", "prompt": "a", "response": "b", "score": 9, "justification": "j"}
    write_jsonl(seed / "eft_train.jsonl", [bad])
    cfg = make_config(tmp_path / "art", tiny_model_dir)
    with pytest.raises(InputError, match=r"eft_train.jsonl:1 \(record e7\): field 'score'"):
        runner.prepare(sft_request(cfg, seed_dir=seed))


# ------------------------------------------------------------------ models and lineage


def test_missing_base_model_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0)])
    cfg = make_config(tmp_path / "art", tiny_model_dir)
    with pytest.raises(InputError, match=r"base model not found: .*missing-model"):
        dpo_request(cfg, pairs=pairs, name="m1", base_model=tmp_path / "missing-model")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(InputError, match=r"has no config.json"):
        dpo_request(cfg, pairs=pairs, name="m1", base_model=tmp_path / "not-a-model")
    missing = make_config(tmp_path / "art", tmp_path / "no-such-m0")  # model.base goes through prepare
    with pytest.raises(InputError, match=r"model folder not found: .*no-such-m0"):
        dpo_request(missing, pairs=pairs, name="m1")


def test_missing_parent_and_parent_on_another_base(tmp_path: Path, tiny_model_dir: Path) -> None:
    from selfreward.storage import write_manifest
    from selfreward.testing.tiny_model import build_tiny_llama

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0)])
    cfg = make_config(tmp_path / "art", tiny_model_dir)
    with pytest.raises(InputError, match=r"parent model 'm1' not found at .*models/m1"):
        dpo_request(cfg, pairs=pairs, name="m2", parent="m1")
    parent = tmp_path / "art" / "runs" / "t" / "models" / "m1"
    parent.mkdir(parents=True)
    (parent / "adapter_config.json").write_text("{}")
    write_manifest(parent / "manifest.json", {"base_model": {"path": "/elsewhere", "sha256": "0" * 64}})
    with pytest.raises(InputError, match=r"parent adapter 'm1' was trained on base /elsewhere"):
        dpo_request(cfg, pairs=pairs, name="m2", parent="m1")
    other = build_tiny_llama(tmp_path / "other-base", seed=1)
    with pytest.raises(InputError, match=r"an adapter only applies to its own base"):
        dpo_request(cfg, pairs=pairs, name="m2", parent="m1", base_model=other)


def test_existing_model_from_other_inputs_is_refused(tmp_path: Path, cfg) -> None:
    from selfreward.storage import write_manifest

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0)])
    request = dpo_request(cfg, pairs=pairs, name="m1")
    write_manifest(request.manifest_path, {"job_key": "another", "identity": {"data_sha256": "x"}})
    with pytest.raises(
        StageError, match=r"already holds a model trained from other inputs \(changed: .*data_sha256"
    ):
        runner.run(request)


# ------------------------------------------------------------------ TRL arguments


def test_trl_arguments_on_cpu(tmp_path: Path, cfg) -> None:
    from selfreward.training.arguments import dpo_arguments, sft_arguments

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0)])
    c = cfg.model_copy(
        update={
            "dpo": cfg.dpo.model_copy(update={"batch_size": 16, "per_device_batch_size": 4, "beta": 0.2}),
            "training": cfg.training.model_copy(update={"tracker": "wandb", "checkpoint_steps": 7}),
        }
    )
    from selfreward.training.arguments import cpu_has_native_bf16

    args = dpo_arguments(dpo_request(c, pairs=pairs, name="m1"))
    native = cpu_has_native_bf16()
    assert (args.bf16, args.fp16, args.use_cpu, args.gradient_checkpointing) == (native, False, True, False)
    assert args.gradient_accumulation_steps == 4 and args.per_device_train_batch_size == 4
    assert args.beta == 0.2 and args.loss_type == ["sigmoid"] and args.learning_rate == cfg.dpo.learning_rate
    assert args.save_steps == 7 and args.report_to == ["wandb"] and args.seed == cfg.seed
    assert args.output_dir.endswith("models/.work/m1/checkpoints")
    assert (
        dpo_arguments(dpo_request(c, pairs=pairs, name="m1"), world_size=2).gradient_accumulation_steps == 2
    )
    seed = tmp_path / "seed"
    write_jsonl(seed / "ift.jsonl", [{"id": "i", "tree_id": "t", "prompt": "a", "response": "b"}])
    write_jsonl(seed / "eft_train.jsonl", [])
    sft = sft_arguments(sft_request(cfg, seed_dir=seed))
    assert sft.completion_only_loss is True and sft.lr_scheduler_type == "cosine"
    assert sft.learning_rate == 5.5e-6 and sft.report_to == [] and sft.max_length == cfg.sft.max_length


def test_soft_preference_target_is_cream_loss_exactly(tmp_path: Path, cfg) -> None:
    """With a preference confidence C (cream), TRL's own DPO loss over a batch equals
    C * DPO(chosen > rejected) + (1 - C) * DPO(rejected > chosen) (the batch flipped), for a
    policy that differs from its reference (a margin away from 0)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from selfreward.training.arguments import dpo_arguments, dpo_loss

    assert dpo_loss("sigmoid", None) == {"loss_type": ["sigmoid"]}
    assert dpo_loss("sigmoid", 1.0) == {"loss_type": ["sigmoid"]}
    with pytest.raises(ConfigError, match="needs the sigmoid loss"):
        dpo_loss("ipo", 0.7)
    base = cfg.model.base
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():  # the policy moves away from its reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [pair(i) for i in range(4)]
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def loss(data: list[dict[str, Any]], confidence: float | None) -> float:
        request = dpo_request(cfg, pairs=pairs_file, name="m1", preference_confidence=confidence)
        args = dpo_arguments(request)
        args.bf16 = False
        args.per_device_train_batch_size = len(data)
        trainer = DPOTrainer(
            model=policy,
            ref_model=AutoModelForCausalLM.from_pretrained(base),
            args=args,
            train_dataset=Dataset.from_list(
                [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data]
            ),
            processing_class=tokenizer,
        )
        policy.eval()
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            return float(trainer.compute_loss(policy, batch))

    forward, backward = loss(rows, None), loss(flipped, None)
    assert abs(forward - backward) > 1e-3  # the margin is not 0: the identity is not trivial
    for c in (0.0, 0.3, 0.75):
        assert loss(rows, c) == pytest.approx(c * forward + (1 - c) * backward, rel=1e-5, abs=1e-6)


def test_batch_size_must_divide(tmp_path: Path, cfg) -> None:
    from selfreward.training.arguments import dpo_arguments

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0)])
    c = cfg.model_copy(
        update={"dpo": cfg.dpo.model_copy(update={"batch_size": 6, "per_device_batch_size": 4})}
    )
    with pytest.raises(
        ConfigError, match=r"dpo.batch_size=6 is not a multiple of dpo.per_device_batch_size=4"
    ):
        dpo_arguments(dpo_request(c, pairs=pairs, name="m1"))


def test_precision_on_cpu(cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: bf16 autocast on CPUs with native bf16, fp32 elsewhere; fp16 needs a GPU."""
    import torch

    from selfreward.training import arguments

    training = cfg.training.model_copy(update={"precision": "fp16"})
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a GPU"):
        arguments.resolve_precision(training, "cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(arguments, "cpu_has_native_bf16", lambda native=native: native)
        assert arguments.resolve_precision(cfg.training, "cpu") == expected
    monkeypatch.undo()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if hasattr(torch.cpu, "_is_avx512_bf16_supported") and flags:
        assert arguments.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


# ------------------------------------------------------------------ accelerate configs


def test_shipped_accelerate_configs_are_valid() -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    from selfreward.training.launch import CONFIG_DIR, accelerate_config_path, num_processes

    shipped = {p.stem: p for p in CONFIG_DIR.glob("*.yaml")}
    assert {"single_gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "cpu"} <= set(shipped)
    launch_options = {action.dest for action in launch_command_parser()._actions}
    expected = {
        "single_gpu": ("NO", None),
        "ddp": ("MULTI_GPU", None),
        "deepspeed_zero2": ("DEEPSPEED", 2),
        "deepspeed_zero3": ("DEEPSPEED", 3),
        "fsdp": ("FSDP", None),
        "cpu": ("NO", None),
    }
    for name, path in shipped.items():
        cluster = load_config_from_file(str(path))  # accelerate's own parser: unknown keys raise
        assert isinstance(cluster, ClusterConfig)
        raw = yaml.safe_load(path.read_text())
        assert set(raw) <= set(ClusterConfig.__dataclass_fields__), name
        for section in ("deepspeed_config", "fsdp_config"):  # nested keys are `accelerate launch` options
            unknown = set(raw.get(section) or {}) - launch_options
            assert not unknown, f"{name}.{section}: unknown keys {unknown}"
        kind, stage = expected.get(name, (None, None))
        if kind is not None:
            assert cluster.distributed_type.value == kind, name
        if stage is not None:
            assert cluster.deepspeed_config["zero_stage"] == stage
        assert accelerate_config_path(name) == path and accelerate_config_path(f"{name}.yaml") == path
        assert num_processes(path) >= 1
    assert cluster_uses_gpu_precision(shipped)
    with pytest.raises(ConfigError, match=r"neither a shipped config"):
        accelerate_config_path("no-such-config")


def cluster_uses_gpu_precision(shipped: dict[str, Path]) -> bool:
    """GPU configs use bf16 (= training.precision auto on GPUs); the CPU one uses none."""
    for name, path in shipped.items():
        mixed = yaml.safe_load(path.read_text())["mixed_precision"]
        if mixed != ("no" if name == "cpu" else "bf16"):
            return False
    return True


def test_cli_reports_input_errors_without_traceback(tmp_path: Path, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from selfreward.cli.main import app

    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"name": "t", "artifact_root": str(tmp_path), "model": {"base": str(tiny_model_dir)}})
    )
    result = CliRunner().invoke(
        app,
        ["train", "dpo", "--config", str(config), "--pairs", str(tmp_path / "none.jsonl"), "--name", "m2"],
    )
    assert result.exit_code == 2
    assert "pairs file not found" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ resume bookkeeping


def test_latest_checkpoint_skips_and_removes_torn_ones(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(
                json.dumps({"global_step": step})
            )
    (folder / "checkpoint-x").mkdir()
    latest = runner.latest_checkpoint(folder)
    assert latest == folder / "checkpoint-8" and runner.checkpoint_step(latest) == 8
    assert not (folder / "checkpoint-12").exists() and (folder / "checkpoint-4").exists()
    assert runner.latest_checkpoint(tmp_path / "none") is None and runner.checkpoint_step(None) == 0


def test_checkpoints_of_another_job_are_discarded(tmp_path: Path, cfg) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0)])
    request = dpo_request(cfg, pairs=pairs, name="m1")
    old = request.checkpoint_dir / "checkpoint-4"
    old.mkdir(parents=True)
    runner._reset_stale_work(request, "key-a", {"a": 1})
    assert old.exists()  # same job (first attempt recorded now): kept
    runner._reset_stale_work(request, "key-a", {"a": 1})
    assert old.exists()  # the same job again: resumable
    runner._reset_stale_work(request, "key-b", {"a": 2})
    assert not old.exists()  # inputs changed: never resumed
    assert json.loads((request.work_dir / "job.json").read_text())["key"] == "key-b"


def test_a_job_already_running_elsewhere_is_refused(tmp_path: Path, cfg) -> None:
    import fcntl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(0)])
    request = dpo_request(cfg, pairs=pairs, name="m1")
    lock = request.work_dir.with_name("m1.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # another process (open file description) holds it
        with pytest.raises(StageError, match=r"another process is training 'm1' of run 't'"):
            runner.run(request)


def test_progress_relay_replays_complete_lines_only(tmp_path: Path) -> None:
    from selfreward.progress import Progress
    from selfreward.training.launch import ProgressFileSink, ProgressRelay

    path = tmp_path / "progress.jsonl"
    child = Progress(ProgressFileSink(path))
    seen: list[dict[str, Any]] = []
    relay = ProgressRelay(path, Progress(lambda e: seen.append(e.as_dict())))
    task = child.task("dpo m2", total=10)
    task.update(done=3, loss=0.5, eta_s=7.0)
    with open(path, "a") as fh:
        fh.write('{"task": "dpo m2", "done": 4')  # a line being written
    relay.poll()
    assert seen[-1]["done"] == 3 and seen[-1]["loss"] == 0.5 and seen[-1]["eta_s"] == 7.0
    with open(path, "a") as fh:
        fh.write(', "total": 10, "elapsed_s": 1.0, "eta_s": null, "finished": true, "loss": 0.4}\n')
    relay.poll()
    assert seen[-1]["done"] == 4 and seen[-1]["finished"] and seen[-1]["loss"] == 0.4


# ------------------------------------------------------------------ the fused LM head on CPU


def test_cpu_fused_lm_head_scores_only_label_positions_with_the_same_loss_and_gradients(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    import trl.kernels.chunked_logprob as kernels
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfreward.training.trainers import score_label_positions_only

    assert score_label_positions_only() and score_label_positions_only()  # installed at import, idempotent
    assert trl_utils._use_triton(torch.device("cpu")) is True

    rows: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def counting(hidden: Any, *args: Any) -> Any:
        rows.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    )
    ids = torch.randint(0, 500, (2, 24))
    labels = ids.clone()
    labels[:, :18] = -100  # the prompt: 2 x (24 - 18) = 12 label positions after the shift
    labels[1, -2:] = -100  # padding at the end of the second row

    def loss_and_grads() -> tuple[Any, list[Any]]:
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.loss + out.entropy.sum() * 0.1).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return out.loss.detach(), grads

    compact_loss, compact_grads = loss_and_grads()
    monkeypatch.setattr(trl_utils, "_use_triton", kernels._use_triton)  # TRL's own CPU path
    full_loss, full_grads = loss_and_grads()
    assert rows == [10, 2 * 23]  # label positions only, then every shifted position
    torch.testing.assert_close(compact_loss, full_loss)
    for got, want in zip(compact_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_failing_training_child_raises_once_with_its_log_tail(tmp_path: Path, tiny_model_dir: Path) -> None:
    """training.subprocess: on with weights that cannot be loaded (the tokenizer, checked in this
    process, is fine): the child fails, and the job raises one StageError naming the child, its
    status and the base model's error from the child's log; no model folder is written."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "model.safetensors").write_bytes(b"not a safetensors file")
    seed = tmp_path / "seed"
    write_jsonl(
        seed / "ift.jsonl", [{"id": "i0", "tree_id": "t0", "prompt": "Name a color.", "response": "Blue."}]
    )
    cfg = make_config(
        tmp_path / "art",
        base,
        sft={"max_steps": 1, "batch_size": 1, "per_device_batch_size": 1},
        data={"eft_in_sft": False},
        training={"subprocess": "on", "device": "cpu", "tracker": "none"},
    )
    request = sft_request(cfg, seed_dir=seed)
    with pytest.raises(StageError) as err:
        runner.run(request)
    text = str(err.value)
    assert "the training process exited with status 2" in text and str(request.log_file) in text
    assert f"base model {base}" in text, text
    assert not request.model_dir.exists()
