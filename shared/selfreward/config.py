"""The run configuration: one pydantic model, loaded from YAML with environment overrides.

Rules (docs/configuration.md has the user-facing version):
- Unknown keys are errors, at every level.
- Environment variables `SELFREWARD_<FIELD>` override top-level fields and
  `SELFREWARD_<SECTION>__<FIELD>` nested ones (case-insensitive), e.g.
  `SELFREWARD_ARTIFACT_ROOT=/data`, `SELFREWARD_DPO__BETA=0.2`. Values are parsed as
  YAML scalars (so `0.2`, `true`, `[a, b]` work). Variables whose first segment is not a
  config field (e.g. `SELFREWARD_API_TOKEN`, a service setting) are not config overrides.
- `load_config` raises `ConfigError` listing every problem with its field path and bad value.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selfreward.errors import ConfigError

ENV_PREFIX = "SELFREWARD_"

BACKEND_PATTERN = re.compile(r"^(policy:[^\s#]+|gemini:[\w.\-]+|openai:https?://[^\s#]+#[^\s]+)$")


MAX_STRING = 4096  # characters of any string setting (paths, specs, URLs, templates' names)
MAX_LIST = 256  # items of any list setting
MAX_NAME = 100  # characters of a run name (it becomes a folder name and part of RQ job ids)


class StrictModel(BaseModel):
    """Unknown keys, infinities and NaN are errors; strings and lists are bounded (MAX_STRING, MAX_LIST)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ValueError(f"at most {MAX_STRING} characters (got {len(value)})")
        if isinstance(value, list | tuple):
            if len(value) > MAX_LIST:
                raise ValueError(f"at most {MAX_LIST} items (got {len(value)})")
            for item in value:
                if isinstance(item, str) and len(item) > MAX_STRING:
                    raise ValueError(f"items of at most {MAX_STRING} characters (got {len(item)})")
        return value


def _check_backend(value: str | None) -> str | None:
    if value is not None and not BACKEND_PATTERN.match(value):
        raise ValueError(
            "expected 'policy:<served-model>' (policy:self = the current model M(t)), "
            "'gemini:<model>' or 'openai:<base_url>#<model>'"
        )
    return value


class ModelConfig(StrictModel):
    base: str = Field(
        "smollm2-135m-instruct",
        description="M0: built-in alias, a GGUF file, a local HF folder, or a hub id",
    )
    served_name: str = Field("m0", description="name the policy serves M0 under")
    max_model_len: int = Field(2048, ge=128)
    chat_template: Path | None = Field(None, description="Jinja file replacing the tokenizer's")


class DataConfig(StrictModel):
    source: str = Field(
        "demo", description="'demo' (shipped seed trees), a local OASST file, or hf:OpenAssistant/oasst1"
    )
    languages: list[str] = ["en"]
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of trees in the eval split")
    split_salt: str = Field("selfreward-split-v1", description="salt of the tree-id hash split")
    max_ift: int | None = Field(None, ge=1)
    max_eft_train: int | None = Field(None, ge=1)
    max_eft_eval: int | None = Field(None, ge=1)
    eft_targets: Literal["rank", "judge-filtered"] = "rank"
    eft_judge: str | None = Field(None, description="judge backend for eft_targets=judge-filtered")
    eft_in_sft: bool = Field(True, description="train M1 on EFT examples as well as IFT")

    @field_validator("eft_judge")
    @classmethod
    def _backend(cls, v: str | None) -> str | None:
        return _check_backend(v)


class PromptsConfig(StrictModel):
    source: Literal["self-instruct", "file", "seed-ift"] = Field(
        "self-instruct",
        description="self-instruct: M(t) writes new prompts; file: prompts.file; seed-ift: sampled from "
        "the seed IFT split, seeded, without repeats across iterations until the split is exhausted (spin)",
    )
    file: Path | None = None
    model: str | None = Field(None, description="served model writing prompts; default M(t)")
    num_prompts: int = Field(32, ge=1)
    few_shot: int = Field(8, ge=1)
    few_shot_generated: int = Field(2, ge=0, description="of few_shot, taken from earlier prompts")
    request: Literal["completion", "chat"] = Field(
        "completion",
        description="completion: the model continues the list of tasks as raw text (the original "
        "self-instruct; SmolLM2-135M M1 kept 33 of 48 attempts, copied a shown example once); chat: "
        "the list sent as a user message (kept 16 of 48: 21 answers copied a shown example)",
    )
    temperature: float = Field(0.6, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=8)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    dedup_threshold: float = Field(
        0.7, gt=0.0, le=1.0, description="ROUGE-L F above which a prompt is a near-duplicate"
    )
    max_rounds: int = Field(20, ge=1, description="generation rounds before giving up on num_prompts")

    @model_validator(mode="after")
    def _check(self) -> PromptsConfig:
        if self.source == "file" and self.file is None:
            raise ValueError("prompts.file is required when prompts.source is 'file'")
        if self.few_shot_generated > self.few_shot:
            raise ValueError("prompts.few_shot_generated cannot exceed prompts.few_shot")
        if self.min_words > self.max_words:
            raise ValueError("prompts.min_words cannot exceed prompts.max_words")
        return self


class CandidatesConfig(StrictModel):
    n: int = Field(4, ge=2, description="samples per prompt (N)")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=8)


class JudgeConfig(StrictModel):
    samples: int = Field(3, ge=1, description="verdicts per response (K)")
    mode: Literal["sample", "logprob"] = "sample"
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=4)
    template: str = Field("builtin:yuan2024-additive", description="builtin:<name> or a file path")
    compare_template: str = Field("builtin:alpacaeval-pairwise", description="builtin:<name> or a file path")
    structured: bool = Field(True, description="constrain verdicts to end in 'Score: N' where supported")
    concurrency: int = Field(
        8, ge=1, description="requests in flight per backend (shared like requests_per_minute)"
    )
    requests_per_minute: int | None = Field(
        None,
        ge=1,
        description="requests per backend in any 60 s; in distributed mode shared through Redis by every "
        "judge replica and stage worker (policy: judges excepted, docs/judge.md), embedded: per process; "
        "None = no limit",
    )
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="tokens (prompt + output, as the backend reports them) per backend in any 60 s; "
        "shared like requests_per_minute; None = no limit",
    )
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    max_response_chars: int = Field(6000, ge=100, description="longer responses are truncated and flagged")
    cache: bool = True
    cache_ttl_s: int | None = Field(None, ge=1, description="expiry of cached verdicts; None = never")
    logprob_source: Literal["auto", "prefill", "verdict"] = Field(
        "auto",
        description="logprob mode: 'prefill' reads the digit after a prefilled 'Score: ' (vLLM), 'verdict' "
        "at the score of a greedy verdict (any backend returning logprobs); auto = prefill where supported",
    )
    top_logprobs: int = Field(20, ge=1, le=20, description="logprobs asked per position in logprob mode")
    initial_backoff_s: float = Field(0.5, gt=0, description="first retry delay (doubles, full jitter)")


class TeacherConfig(StrictModel):
    backend: str | None = Field(None, description="gemini:<model> or openai:<base_url>#<model>")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=8)
    api_key_env: str = Field("GEMINI_API_KEY", description="environment variable holding the key")
    api_key_file: Path | None = Field(None, description="mounted secret file holding the key")
    gemini_base_url: str | None = Field(None, description="Gemini endpoint override (proxy, local fake)")
    gemini_api_version: str = Field("v1beta", description="Gemini API version in request paths")
    gemini_thinking_budget: int | None = Field(
        None, ge=0, description="thinking tokens for Gemini 2.5+ models (0 = off where the model allows)"
    )

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str | None) -> str | None:
        return _check_backend(v)


class PairsConfig(StrictModel):
    min_margin: float = Field(0.0, ge=0.0, description="best-worst score gap must exceed this")
    length_control: bool = Field(
        False,
        description="Meta-Rewarding's length control: chosen = the shortest answer of the top score band, "
        "rejected = the longest of the bottom band (docs/methods.md); off: the highest and the lowest score",
    )
    length_rho: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="rho of length control: bands [(1-rho)max+rho min, max], [min, (1-rho)min+rho max]",
    )


class MetaConfig(StrictModel):
    """Settings of the meta-reward method (Wu et al. 2024; docs/methods.md)."""

    judge_pair_fraction: float = Field(
        0.1,
        ge=0.0,
        le=0.5,
        description="share of judge pairs in an iteration's DPO data; NeMo-Aligner saw the judge "
        "collapse to always 5 above 0.15, so the default stays below",
    )
    judge_iterations: int | None = Field(
        2, ge=1, description="judge pairs in iterations 1..N only (the paper: 2); None = every iteration"
    )
    max_judgment_chars: int | None = Field(
        1100, ge=1, description="drop judge pairs whose chosen judgment is longer (the paper's filter)"
    )
    max_score_share: float = Field(
        0.4,
        gt=0.0,
        le=1.0,
        description="no score of chosen judgments makes up this share of judge pairs or more",
    )
    template: str = Field(
        "builtin:meta-judge", description="the meta-judge prompt (builtin:<name> or a file)"
    )
    max_tokens: int = Field(256, ge=8, description="tokens of a meta-judge's explanation")
    strip_scores: bool = Field(True, description="show the meta-judge the judgments without their scores")


class CreamConfig(StrictModel):
    """Settings of the cream method (Wang et al. 2024, CREAM; docs/methods.md)."""

    first_reference: Literal["m0", "teacher"] = Field(
        "m0",
        description="the previous judge of iteration 1, which has no M(t-1) adapter: the base model M0 "
        "or the teacher (teacher.backend); later iterations use M(t-1)",
    )


class TemporalConfig(StrictModel):
    """Settings of the temporal method (Temporal Self-Rewarding, arXiv 2508.06026; docs/methods.md)."""

    anchor: Literal["m1", "m0"] = Field(
        "m1",
        description="the fixed early model whose answers are the anchored rejected ones (generated once "
        "per prompt and cached in the run): M1 (the SFT model, the paper's M0-after-SFT) or the base M0",
    )


class LoraConfig(StrictModel):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class SFTConfig(StrictModel):
    learning_rate: float = Field(5.5e-6, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    batch_size: int = Field(16, ge=1, description="effective batch (per device x accumulation)")
    per_device_batch_size: int = Field(4, ge=1)
    max_length: int = Field(1024, ge=16)


class DPOConfig(StrictModel):
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    beta: float = Field(0.1, gt=0)
    loss_type: str = "sigmoid"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    per_device_batch_size: int = Field(4, ge=1)
    max_length: int = Field(1024, ge=16)
    precompute_ref_log_probs: bool = Field(
        False, description="compute the reference log-probs of every pair once before training"
    )


class TrainingConfig(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 on CPU (bf16 is slow without AVX512-BF16), bf16 on GPU"
    )
    gradient_checkpointing: bool = False
    checkpoint_steps: int = Field(50, ge=1, description="save a resumable checkpoint every N steps")
    keep_checkpoints: bool = Field(
        False, description="keep the resumable checkpoints once the model is written"
    )
    logging_steps: int = Field(1, ge=1)
    accelerate_config: str | None = Field(
        None, description="accelerate config (name under selfreward/training/accelerate or a path)"
    )
    tracker: Literal["tensorboard", "wandb", "mlflow", "none"] = "tensorboard"
    num_threads: int | None = Field(None, ge=1, description="torch threads; default: all cores")
    subprocess: Literal["auto", "on", "off"] = Field(
        "auto",
        description="train in a child process (python -m selfreward.training.train_entry), whose memory "
        "goes back to the OS when it ends; auto: on in the embedded run (selfreward run, where the "
        "trainer's memory would otherwise stay beside vLLM's for the rest of the run), off elsewhere "
        "(an RQ worker forks a process per job; selfreward train ends with its job)",
    )


class PolicyServerConfig(StrictModel):
    device: Literal["cpu", "cuda"] = "cpu"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0: a free port, chosen at start")
    enforce_eager: bool | None = Field(None, description="default: True on CPU, False on GPU")
    cpu_kvcache_gib: float = Field(2.0, gt=0)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    max_loras: int = Field(4, ge=1)
    max_logprobs: int = Field(20, ge=1)
    grouped_cpu_lora: bool = Field(
        True,
        description="on CPU, compute LoRA with one matmul per adapter in the batch instead of vLLM "
        "0.32's per-token weight gathers (selfreward.policy.cpu_lora; same results, judging with "
        "an adapter several times faster); false: vLLM's own ops",
    )
    cpu_one_worker_process: bool = Field(
        True,
        description="CPU: the model runs inside vLLM's engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0 "
        "keeps vLLM's CPU platform on its one-process executor) rather than in a worker process of its "
        "own: 0.8 GB less and a 15 s shorter start, same throughput (docs/policy.md); false: vLLM's "
        "multiprocess executor",
    )
    startup_timeout_s: float = Field(600.0, gt=0)
    extra_args: list[str] = []
    cpu_reserved_cores: int | None = Field(
        None,
        ge=0,
        description="cores vLLM keeps free of its compute threads for its scheduler "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU); default: 0 on machines with up to 4 cores, else vLLM's (1)",
    )
    python: str | None = Field(
        None, description="Python interpreter of the environment that has vLLM; default: this one"
    )
    access_log: bool = Field(False, description="log every HTTP request in the server's log")
    seeded_requests: bool | None = Field(
        None,
        description="send per-request sampling seeds (reproducible samples); default: on GPU only, "
        "since vLLM 0.32's CPU engine dies on a seeded request whose prompt is prefilled in chunks",
    )
    fingerprint_tolerance: float | None = Field(
        None,
        gt=0,
        description="max |logprob difference| between an adapter's fingerprint and the served adapter; "
        "default: 0.002 on cpu (fp32 both sides), 0.6 on cuda (bf16 serving, docs/policy.md)",
    )
    sleep_during_training: Literal["auto", "on", "off"] = Field(
        "auto",
        description="put vLLM to sleep (level 1: weights to CPU memory, KV cache freed) while a training "
        "stage runs, so that training gets the GPU, and wake it after; the server then starts with "
        "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1. auto: on when the policy runs on cuda and shares "
        "its GPU with the trainer (shares_gpu_with_trainer), off on CPU (vLLM has no sleep mode there); "
        "untested on a GPU until bench/gpu_check.sh runs (docs/deployment.md)",
    )
    stop_during_training: bool = Field(
        False,
        description="the embedded run stops the policy server it started while a training stage runs and "
        "starts it again for the next stage that needs it, serving the published adapters: the trainer "
        "and vLLM never hold memory at the same time (what sleep mode does on a GPU; vLLM's CPU sleep "
        "keeps the memory). Costs one server start per training stage (about 30 s for SmolLM2-135M on CPU)",
    )
    shares_gpu_with_trainer: bool | None = Field(
        None,
        description="the trainer trains on the policy's GPU (what sleep_during_training: auto reads); "
        "default: true where the embedded mode starts the policy itself (one machine) and training.device "
        "is not cpu, false for a policy service elsewhere (docker-compose.yml sets it: TRAINER_SHARES_POLICY_GPU)",
    )

    @field_validator("sleep_during_training", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads unquoted on/off as booleans, in files and SELFREWARD_* values
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _sleep_needs_a_gpu(self) -> PolicyServerConfig:
        if self.sleep_during_training == "on" and self.device == "cpu":
            raise ValueError(
                "policy.sleep_during_training: on needs policy.device: cuda (vLLM has no sleep mode on CPU); "
                "use auto or off"
            )
        return self


class ServicesConfig(StrictModel):
    policy_url: str = Field("http://127.0.0.1:8000", description="vLLM OpenAI-compatible server")
    policy_pool: str | None = Field(
        None,
        description="the policy's replicas, each published every adapter (loaded and fingerprint-verified "
        "on each): HOST:PORT[,HOST:PORT...], every address a name resolves to one replica (a headless "
        "Service, compose's service name; docs/deployment.md); None = policy_url is the one server",
    )
    policy_lora_dir: str | None = Field(
        None,
        description="the folder of the policy's vLLM filesystem LoRA resolver (its VLLM_LORA_RESOLVER_CACHE_DIR, "
        "the same path here): publish links each verified adapter there under its served name, so a replica "
        "started later serves it on first request; None = no links",
    )
    judge_url: str | None = Field(None, description="judge service; None = judge in-process")
    redis_url: str = "redis://127.0.0.1:6379/0"
    request_timeout_s: float = Field(300.0, gt=0)
    concurrency: int = Field(16, ge=1, description="generation requests in flight")
    stage_retry_intervals_s: list[int] = Field(
        [10, 60, 300],
        description="distributed mode: a failed stage job is retried after each of these delays (RQ Retry)",
    )
    judge_shards: int = Field(
        1,
        ge=1,
        le=64,
        description="distributed mode: the judging stages (judgments, reference_judgments, "
        "future_judgments) split their candidates into this many shards (by prompt), each a job on "
        "the judge queue that any worker takes, and the evaluate stage its prompts, EFT-eval "
        "records and judge-bench items (jobs on the evaluate queue); merged when all are done. "
        "The embedded mode judges in one process",
    )

    @field_validator("policy_pool")
    @classmethod
    def _pool(cls, value: str | None) -> str | None:
        if value is not None:
            from selfreward.policy.pool import pool_entries

            pool_entries(value)  # ValueError names the bad entry
        return value


class JudgeBenchSetConfig(StrictModel):
    """A human-labelled preference set the evaluate stage measures the iteration's judge on
    (docs/evaluation.md#judge-benchmark)."""

    set: str = Field(
        ..., description="a JSON/JSONL file, a folder of them (LLMBar) or hf:<repo>[@<config>][:<split>]"
    )
    format: Literal["llmbar", "pandalm", "rewardbench", "mtbench", "generic"] | None = Field(
        None, description="default: detected from the first record's keys"
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        max_length=MAX_NAME,
        description="default: from the source",
    )
    limit: int | None = Field(
        100, ge=1, description="a seeded sample of at most this many items per iteration"
    )
    mode: Literal["pointwise", "pairwise"] = "pointwise"


class EvalConfig(StrictModel):
    prompts: str = Field(
        "ift-eval", description="ift-eval | alpaca_eval:<file> | mt_bench:<file> | <jsonl path>"
    )
    max_prompts: int | None = Field(32, ge=1)
    judge: str | None = Field(
        None,
        description="the run's evaluator, pinned by its first evaluation; default: the teacher, else policy:m0 "
        "(the base model); policy:m<k> = the run's model M<k>; policy:self only explicitly (self-evaluation, flagged)",
    )
    head2head_against: Literal["previous", "m0", "m1", "none"] = "previous"
    fixed_baseline: Literal["m0", "m1", "none"] = Field(
        "m1",
        description="every iteration is also compared against this one model: one ruler across iterations",
    )
    min_prompts: int = Field(
        20,
        ge=1,
        description="below this many judged prompts a win rate is reported as no evidence of a difference",
    )
    contamination: Literal["drop", "report"] = Field(
        "drop",
        description="evaluation prompts that duplicate a training prompt (exact or ROUGE-L >= prompts.dedup_threshold)",
    )
    reward_model: bool = Field(True, description="measure judge agreement with human ranks on EFT eval")
    bootstrap_samples: int = Field(1000, ge=100)
    max_tokens: int = Field(256, ge=8)
    temperature: float = Field(
        0.0, ge=0.0, description="sampling temperature of evaluation answers (0 = greedy)"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    concurrency: int = Field(
        96,
        ge=1,
        description="evaluation answer requests in flight, both models' answers together: decoding reads every "
        "weight once per step whatever the batch, so a bigger batch is faster (docs/evaluation.md); "
        "concurrency x (prompt + max_tokens) tokens should fit vLLM's KV cache, else it preempts",
    )
    collapse_threshold: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="a judge giving one score to more than this share of answers has collapsed",
    )
    continue_on_collapse: bool = Field(
        False, description="start the next iteration after a judge collapse (default: stop, flagged)"
    )
    judge_bench: list[JudgeBenchSetConfig] = Field(
        default_factory=list,
        description="human-labelled preference sets: the iteration's self-judge, the teacher (once per run) "
        "and the length baseline are measured on each",
    )


class RunConfig(StrictModel):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=MAX_NAME)
    seed: int = 42
    artifact_root: Path = Path("artifacts")
    variant: str = Field(
        "self-reward", description="the feedback method (selfreward.methods; `selfreward methods` lists them)"
    )
    iterations: int = Field(1, ge=1)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    prompts: PromptsConfig = PromptsConfig()
    candidates: CandidatesConfig = CandidatesConfig()
    judge: JudgeConfig = JudgeConfig()
    teacher: TeacherConfig = TeacherConfig()
    pairs: PairsConfig = PairsConfig()
    meta: MetaConfig = MetaConfig()
    cream: CreamConfig = CreamConfig()
    temporal: TemporalConfig = TemporalConfig()
    lora: LoraConfig = LoraConfig()
    sft: SFTConfig = SFTConfig()
    dpo: DPOConfig = DPOConfig()
    training: TrainingConfig = TrainingConfig()
    policy: PolicyServerConfig = PolicyServerConfig()
    services: ServicesConfig = ServicesConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("variant")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from selfreward.methods import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; methods: {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _check_variant(self) -> RunConfig:
        from selfreward.methods import METHODS

        problems = METHODS[self.variant].rules(self)
        if problems:
            raise ValueError("; ".join(problems))
        if self.teacher.backend and self.teacher.backend.startswith("policy:self"):
            raise ValueError("teacher.backend cannot be policy:self (that is the self-reward variant)")
        if self.lora.r > self.policy.max_lora_rank:
            raise ValueError(
                f"policy.max_lora_rank ({self.policy.max_lora_rank}) is below lora.r ({self.lora.r}): "
                "the policy server could not load the trained adapters"
            )
        if self.data.eft_targets == "judge-filtered" and not self.data.eft_judge:
            raise ValueError("data.eft_judge is required when data.eft_targets is 'judge-filtered'")
        return self

    def run_dir(self) -> Path:
        return self.artifact_root / "runs" / self.name

    def request_seed(self, seed: int) -> int | None:
        """`seed` for a generation request, or None where per-request seeds are off (policy.seeded_requests)."""
        on = self.policy.seeded_requests
        if on is None:
            on = self.policy.device == "cuda"
        return seed if on else None

    def feedback_judge(self) -> str | None:
        """The judge backend of the loop's judgment stage for this method (None: no judge)."""
        from selfreward.methods import METHODS

        return METHODS[self.variant].feedback_judge(self)


# ---------------------------------------------------------------- loading


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict | list) or len(repr(value)) < 80 else "..."
        problems.append(f"{loc}: {msg} (got {shown})")
    return problems


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Nested dict of config overrides from SELFREWARD_* variables."""
    environ = os.environ if environ is None else environ
    top_fields = set(RunConfig.model_fields)
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.upper().startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        if not path or path[0] not in top_fields:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"{key}: conflicts with another override"], "environment")
        node[path[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], str(path))
    return data


def build_config(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None, source: str = "config"
) -> RunConfig:
    merged = deep_merge(dict(data), env_overrides(environ))
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err), source) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> RunConfig:
    """Load a run config from YAML, apply SELFREWARD_* overrides, validate."""
    path = Path(path)
    return build_config(read_yaml(path), environ, source=str(path))


def command_config(
    path: str | Path | None, environ: Mapping[str, str] | None = None, **sections: Mapping[str, Any]
) -> RunConfig:
    """The run config of a CLI command: the YAML file at `path` (else the built-in defaults) with
    SELFREWARD_* overrides, then the command line's options per section (`judge={"mode": ...}`;
    None = not given). Errors name every bad field; the source is "command line"."""
    config = load_config(path, environ) if path else build_config({}, environ, source="environment")
    given = {s: {k: v for k, v in values.items() if v is not None} for s, values in sections.items()}
    given = {s: values for s, values in given.items() if values}
    if not given:
        return config
    data = config.model_dump()
    for section, values in given.items():
        data[section].update(values)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err), "command line") from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md is this text; a test keeps them equal)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `selfreward config reference` from `selfreward.config.RunConfig`; do not edit",
        "by hand. Every key below can be overridden by `SELFREWARD_<SECTION>__<FIELD>` (see README).",
        "",
    ]

    def table(model: type[BaseModel], prefix: str) -> None:
        lines.append("| key | type | default | description |")
        lines.append("| --- | --- | --- | --- |")
        nested: list[tuple[str, type[BaseModel]]] = []
        items: list[tuple[str, type[BaseModel]]] = []  # lists of sections, e.g. eval.judge_bench
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((name, ann))
                continue
            args = typing.get_args(ann)
            if (
                typing.get_origin(ann) is list
                and args
                and isinstance(args[0], type)
                and issubclass(args[0], BaseModel)
            ):
                items.append((f"{prefix}{name}", args[0]))
                type_name = f"list of {args[0].__name__} (below)"
            else:
                type_name = str(ann).replace("typing.", "").replace("pathlib.", "").replace("<class '", "")
                type_name = type_name.replace("'>", "").replace("|", "\\|")
            default = info.get_default(call_default_factory=True)
            default_s = "required" if info.is_required() else "`null`" if default is None else f"`{default}`"
            desc = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | {type_name} | {default_s} | {desc} |")
        lines.append("")
        for key, sub in items:
            lines.append(f"Each item of `{key}` ({sub.__name__}):")
            lines.append("")
            table(sub, f"{key}[].")
        for name, sub in nested:
            lines.append(f"## `{name}`")
            lines.append("")
            table(sub, f"{name}.")

    lines.append("## top level")
    lines.append("")
    table(RunConfig, "")
    return "\n".join(lines).rstrip() + "\n"
