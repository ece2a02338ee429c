"""Model fingerprints: what a served model must reproduce to prove it is the trained one.

A fingerprint is the top-k next-token log-probabilities of a model at the last few positions
of a fixed set of probe prompts (each rendered with the model's chat template, followed by a
fixed start of an answer, so the positions cover the assistant turn's first tokens). The
token ids of every probe are stored in the fingerprint, so a server is asked about exactly
the same tokens (vLLM: `/v1/completions` with a token-id prompt, `prompt_logprobs` and
`logprobs`); tokenizer or chat-template drift cannot hide a weight mismatch, and tokens
are compared by id, never by their text.

The trainer computes it right after training (`compute_fingerprint`, in memory) and stores it
in the adapter's manifest (`adapter_manifest_fields`); publishing loads the adapter into the
policy server and checks that the same probes through the server match within a tolerance
(`compare_fingerprints`) and differ from the parent model's (selfreward.policy.publish).

Distance: for every probe position and every token of the expected top-k, the absolute
difference between the expected log-probability and the served one; a token missing from
the served top-k' (k' >= k) is bounded by the served k'-th value, so it counts
`max(0, expected - that bound)`. The fingerprint matches when the largest difference is at
most the tolerance. docs/policy.md has the measured distances (fp32 vLLM against fp32
transformers, and a different adapter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from selfreward.errors import InputError

FINGERPRINT_FORMAT = "selfreward-fingerprint/1"
DEFAULT_TOP_K = 5
DEFAULT_POSITIONS = 4
# Largest |logprob difference| accepted (docs/policy.md has the measurements on SmolLM2-135M):
# fp32 vLLM on CPU against fp32 transformers: 4.6e-5, so 0.002 leaves a 40x margin;
# bf16 serving (GPU) against an fp32 fingerprint: up to 0.55, hence 0.6 there.
DEFAULT_TOLERANCE = 0.002
BF16_TOLERANCE = 0.6

# (conversation, fixed start of the assistant's answer); short, varied, stable forever:
# changing them changes every fingerprint, so bump FINGERPRINT_FORMAT if you do.
DEFAULT_PROBES: tuple[tuple[tuple[tuple[str, str], ...], str], ...] = (
    ((("user", "What is the capital of France?"),), "The capital"),
    ((("user", "Write a haiku about autumn leaves."),), "Crimson"),
    ((("user", "Explain photosynthesis in one sentence."),), "Photosynthesis is"),
    ((("user", "Give three tips for learning a new language."),), "1."),
    ((("system", "You are a strict judge."), ("user", "Rate this answer from 0 to 5: 'Paris'.")), "Score:"),
    ((("user", "How do I reverse a list in Python?"),), "You can"),
)

ADAPTER_FILE_PREFIX = "adapter_"  # what vLLM and PEFT load: adapter_config.json, adapter_model.*
# written by `selfreward policy prepare` into every prepared model folder (content_sha256, source)
PREPARED_MODEL_MANIFEST = "selfreward-model.json"


def _messages(conv: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in conv]


def render_probe(tokenizer: Any, conversation: Sequence[tuple[str, str]], answer_start: str) -> list[int]:
    """Token ids of one probe: the chat-rendered conversation, then the start of the answer."""
    messages = _messages(conversation)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a base model without a template: plain "role: content" lines
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    ids = tokenizer(text + answer_start, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def compute_fingerprint(
    model: Any,
    tokenizer: Any,
    probes: Sequence[tuple[Sequence[tuple[str, str]], str]] = DEFAULT_PROBES,
    top_k: int = DEFAULT_TOP_K,
    positions: int = DEFAULT_POSITIONS,
) -> dict[str, Any]:
    """Fingerprint of an in-memory transformers or PEFT causal LM (any device and dtype).

    The model is put in eval mode for the forward passes (dropout off) and its previous mode
    is restored; log-probabilities are computed in float32 from the model's logits.
    """
    import torch

    if top_k < 1 or positions < 1:
        raise ValueError("top_k and positions must be at least 1")
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        device = next(model.parameters()).device
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        out_probes = []
        with torch.no_grad():
            for conversation, answer_start in probes:
                ids = render_probe(tokenizer, conversation, answer_start)
                if len(ids) < positions:
                    raise ValueError(f"probe {answer_start!r} has fewer than {positions} tokens")
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                rows = []
                # position p: the distribution of token p given ids[:p]; p == len(ids) is the next token
                for p in range(len(ids) - positions + 1, len(ids) + 1):
                    values, indices = logprobs[p - 1].topk(top_k)
                    rows.append(
                        {"pos": p, "top": [[int(i), float(v)] for i, v in zip(indices, values, strict=True)]}
                    )
                out_probes.append(
                    {
                        "messages": _messages(conversation),
                        "answer_start": answer_start,
                        "input_ids": ids,
                        "positions": rows,
                    }
                )
    finally:
        if was_training:
            model.train()
    return {
        "format": FINGERPRINT_FORMAT,
        "top_k": top_k,
        "positions": positions,
        "dtype": dtype,
        "probes": out_probes,
    }


def fingerprint_model_dir(
    base_dir: str | Path,
    adapter_dir: str | Path | None = None,
    probes: Sequence[tuple[Sequence[tuple[str, str]], str]] = DEFAULT_PROBES,
    top_k: int = DEFAULT_TOP_K,
    positions: int = DEFAULT_POSITIONS,
) -> dict[str, Any]:
    """Load a model folder (optionally with a PEFT adapter) in float32 on CPU and fingerprint it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise InputError(f"{base_dir}: not a model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok_dir = base_dir
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise InputError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter_dir)
        if (adapter_dir / "tokenizer_config.json").is_file():
            tok_dir = adapter_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return compute_fingerprint(model, tokenizer, probes, top_k, positions)


def check_fingerprint(fp: Any, where: str) -> dict[str, Any]:
    """Validate the structure of a stored fingerprint; errors name `where` and the field."""
    if not isinstance(fp, Mapping):
        raise InputError(f"{where}: fingerprint must be an object, got {type(fp).__name__}")
    if fp.get("format") != FINGERPRINT_FORMAT:
        raise InputError(f"{where}: fingerprint format {fp.get('format')!r} is not {FINGERPRINT_FORMAT!r}")
    probes = fp.get("probes")
    if not isinstance(probes, list) or not probes:
        raise InputError(f"{where}: fingerprint.probes must be a non-empty list")
    for i, probe in enumerate(probes):
        ids = probe.get("input_ids") if isinstance(probe, Mapping) else None
        rows = probe.get("positions") if isinstance(probe, Mapping) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise InputError(f"{where}: fingerprint.probes[{i}].input_ids must be a list of token ids")
        if not isinstance(rows, list) or not rows:
            raise InputError(f"{where}: fingerprint.probes[{i}].positions must be a non-empty list")
        for j, row in enumerate(rows):
            ok = (
                isinstance(row, Mapping)
                and isinstance(row.get("pos"), int)
                and 1 <= row["pos"] <= len(ids)
                and isinstance(row.get("top"), list)
                and all(isinstance(t, list) and len(t) == 2 for t in row["top"])
            )
            if not ok:
                raise InputError(f"{where}: fingerprint.probes[{i}].positions[{j}] is malformed")
    return dict(fp)


def compare_fingerprints(
    expected: Mapping[str, Any], served: Mapping[str, Any], tol: float = DEFAULT_TOLERANCE
) -> tuple[bool, dict[str, Any]]:
    """Compare a served fingerprint with the expected one; (match, details).

    `served` has the same probes and positions; its `top` lists may be longer (k' >= k).
    details: max_abs_diff, mean_abs_diff, top1_agreement (share of positions whose most
    likely token is the same), compared (token comparisons), tolerance, and `worst`: the
    positions with the largest differences (probe, pos, expected top, served top).
    """
    if len(expected["probes"]) != len(served["probes"]):
        raise ValueError("fingerprints have different probe counts")
    diffs: list[float] = []
    per_position: list[tuple[float, int, dict[str, Any], dict[str, Any]]] = []
    top1_same = 0
    n_pos = 0
    for i, (e_probe, s_probe) in enumerate(zip(expected["probes"], served["probes"], strict=True)):
        if e_probe["input_ids"] != s_probe["input_ids"]:
            raise ValueError(f"probe {i}: token ids differ between the fingerprints")
        s_rows = {row["pos"]: row for row in s_probe["positions"]}
        for e_row in e_probe["positions"]:
            s_row = s_rows.get(e_row["pos"])
            if s_row is None:
                raise ValueError(f"probe {i}: served fingerprint lacks position {e_row['pos']}")
            s_map = {int(t): float(v) for t, v in s_row["top"]}
            bound = min(s_map.values()) if s_map else -math.inf
            worst_here = 0.0
            for token, lp in e_row["top"]:
                lp = float(lp)
                d = abs(lp - s_map[int(token)]) if int(token) in s_map else max(0.0, lp - bound)
                diffs.append(d)
                worst_here = max(worst_here, d)
            n_pos += 1
            s_top1 = max(s_map, key=s_map.__getitem__) if s_map else None
            top1_same += int(bool(e_row["top"]) and s_top1 == int(e_row["top"][0][0]))
            per_position.append((worst_here, i, e_row, s_row))
    per_position.sort(key=lambda x: -x[0])
    max_diff = max(diffs) if diffs else math.inf
    details = {
        "max_abs_diff": max_diff,
        "mean_abs_diff": sum(diffs) / len(diffs) if diffs else math.inf,
        "top1_agreement": top1_same / n_pos if n_pos else 0.0,
        "compared": len(diffs),
        "tolerance": tol,
        "worst": [
            {"probe": i, "pos": e_row["pos"], "diff": d, "expected": e_row["top"], "served": s_row["top"]}
            for d, i, e_row, s_row in per_position[:5]
        ],
    }
    return max_diff <= tol, details


def format_comparison(
    details: Mapping[str, Any], expected_label: str = "expected", served_label: str = "served", rows: int = 3
) -> str:
    """Human-readable report of a comparison: both fingerprints at the worst positions."""

    def top(items: Sequence[Sequence[float]], k: int = 5) -> str:
        return " ".join(f"{int(t)}:{float(v):.4f}" for t, v in list(items)[:k])

    lines = [
        f"max |Δlogprob| {details['max_abs_diff']:.4g} (tolerance {details['tolerance']:.4g}), "
        f"mean {details['mean_abs_diff']:.4g}, top-1 agreement {details['top1_agreement']:.0%} "
        f"over {details['compared']} token logprobs"
    ]
    for w in details["worst"][:rows]:
        lines.append(f"  probe {w['probe']} position {w['pos']} (largest difference {w['diff']:.4g}):")
        lines.append(f"    {expected_label:>9} top tokens (id:logprob) {top(w['expected'])}")
        lines.append(f"    {served_label:>9} top tokens (id:logprob) {top(w['served'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------ adapter identity


def adapter_sha256(adapter_dir: str | Path) -> str:
    """sha256 of what a server loads from an adapter folder (the `adapter_*` files)."""
    from selfreward.storage import sha256_dir

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    return sha256_dir(
        adapter_dir, include=lambda rel: len(rel.parts) == 1 and rel.name.startswith(ADAPTER_FILE_PREFIX)
    )


def adapter_manifest_fields(
    adapter_dir: str | Path, fingerprint: Mapping[str, Any], base_model_dir: str | Path | None = None
) -> dict[str, Any]:
    """The fields publishing reads from an adapter's manifest.json (merge them into it).

    adapter_sha256: `adapter_sha256(adapter_dir)`; fingerprint: `compute_fingerprint(...)`;
    base_model: {"path", "content_sha256"} of the prepared base folder the adapter was
    trained on (content_sha256 from its selfreward-model.json, when it was prepared by
    `selfreward policy prepare`).
    """
    import json

    fields: dict[str, Any] = {"adapter_sha256": adapter_sha256(adapter_dir), "fingerprint": dict(fingerprint)}
    if base_model_dir is not None:
        base = Path(base_model_dir).resolve()
        info: dict[str, Any] = {"path": str(base), "content_sha256": None}
        prepared = base / PREPARED_MODEL_MANIFEST
        if prepared.is_file():
            info["content_sha256"] = json.loads(prepared.read_text(encoding="utf-8")).get("content_sha256")
        fields["base_model"] = info
    return fields
