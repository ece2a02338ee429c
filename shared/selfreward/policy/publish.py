"""Publishing an adapter: load it into the running policy server and prove the server serves it.

`publish_adapter` (used by the loop's publish stage and `selfreward policy publish`):
1. reads the adapter's manifest.json: its fingerprint (computed by the trainer with
   transformers + PEFT, `selfreward.fingerprint`) and adapter_sha256, which must still match
   the adapter files (a stale manifest is an error);
2. checks that the adapter's base model is the model the server serves (content hashes of
   the prepared folders, when the server's model folder is readable here);
3. loads it under `<name>-<sha256 prefix>`, so a changed adapter never hides behind an old
   name (re-publishing the same files is a no-op);
4. asks the server for the same probes (token ids, prompt logprobs) through that name: they
   must match the fingerprint within the tolerance, and the parent model's answers must
   not (else the server could be serving the parent and nobody would notice). A failed check
   unloads the adapter and raises with both fingerprints shown.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selfreward.config import PolicyServerConfig
from selfreward.errors import InputError, ServiceError
from selfreward.fingerprint import (
    BF16_TOLERANCE,
    DEFAULT_TOLERANCE,
    PREPARED_MODEL_MANIFEST,
    adapter_sha256,
    check_fingerprint,
    compare_fingerprints,
    format_comparison,
)
from selfreward.llm.openai import OpenAICompatClient, token_id
from selfreward.llm.retry import HTTPStatusError
from selfreward.storage import read_manifest, sha256_dir

SHA_PREFIX = 12
MAX_SERVED_TOP_K = 20  # vLLM's default --max-logprobs


class FingerprintMismatch(ServiceError):
    """The served adapter does not reproduce its fingerprint (or cannot be told from its parent)."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        self.details = details
        super().__init__(message)


def tolerance_for(policy: PolicyServerConfig) -> float:
    """The fingerprint tolerance of a policy server config (policy.fingerprint_tolerance or the
    device's default: fp32 on CPU, bf16 on GPU)."""
    if policy.fingerprint_tolerance is not None:
        return policy.fingerprint_tolerance
    return DEFAULT_TOLERANCE if policy.device == "cpu" else BF16_TOLERANCE


def _server_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:400]
    except (ValueError, KeyError, TypeError):
        return body[:400]


def served_name_for(name: str, sha256: str) -> str:
    return f"{name}-{sha256[:SHA_PREFIX]}"


async def served_fingerprint(
    client: OpenAICompatClient, model: str, expected: Mapping[str, Any], top_k: int | None = None
) -> dict[str, Any]:
    """The same probes as `expected`, answered by the server for `model` (token ids, no sampling).

    One /v1/completions request per probe, batching one prompt per fingerprinted position: the
    probe's token ids up to that position, 1 new token, the top-`top_k` logprobs of that token
    (default: twice the fingerprint's k, at most 20). Not `prompt_logprobs`: with a LoRA adapter
    that crashes vLLM's engine (0.32, CPU; vllm-project/vllm#29955, #16668).
    """
    k = top_k or min(2 * int(expected["top_k"]), MAX_SERVED_TOP_K)

    async def probe(p: Mapping[str, Any]) -> dict[str, Any]:
        ids = [int(t) for t in p["input_ids"]]
        positions = [int(row["pos"]) for row in p["positions"]]
        gen = await client.complete(
            model,
            [ids[:pos] for pos in positions],  # a batch of token-id prompts
            max_tokens=1,
            temperature=0.0,
            logprobs=k,
            return_tokens_as_token_ids=True,
        )
        if len(gen.choices) != len(positions):
            raise ServiceError(f"{client.base_url}: {len(gen.choices)} answers to {len(positions)} prompts")
        rows = []
        for pos, choice in zip(positions, gen.choices, strict=True):
            if not choice.top_logprobs:
                raise ServiceError(f"{client.base_url}: the server returned no logprobs for model {model!r}")
            dist = {token_id(t): v for t, v in choice.top_logprobs[0].items()}
            best = sorted(dist.items(), key=lambda kv: -kv[1])[:k]  # drop a sampled token beyond top-k
            rows.append({"pos": pos, "top": [[t, float(v)] for t, v in best]})
        return {"input_ids": ids, "positions": rows}

    probes = await asyncio.gather(*(probe(p) for p in expected["probes"]))
    return {"format": expected["format"], "top_k": k, "model": model, "probes": list(probes)}


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    if not adapter_dir.is_dir():
        raise InputError(f"adapter folder not found: {adapter_dir}")
    sha = adapter_sha256(adapter_dir)  # raises when it is not an adapter folder
    manifest = read_manifest(adapter_dir / "manifest.json")
    if manifest is None or "fingerprint" not in manifest:
        raise InputError(
            f"{adapter_dir}: no manifest.json with a fingerprint (the trainer writes one; for an adapter "
            "trained elsewhere: `selfreward policy fingerprint ADAPTER --base MODEL_DIR`)"
        )
    fingerprint = check_fingerprint(manifest["fingerprint"], f"{adapter_dir / 'manifest.json'}")
    recorded = manifest.get("adapter_sha256")
    if recorded is not None and recorded != sha:
        raise InputError(
            f"{adapter_dir}: the adapter files changed after its manifest was written "
            f"(manifest adapter_sha256 {str(recorded)[:SHA_PREFIX]}, files {sha[:SHA_PREFIX]}); "
            "its fingerprint no longer describes them"
        )
    return manifest, fingerprint, sha


def _check_base(manifest: Mapping[str, Any], adapter_dir: Path, base_entry: Mapping[str, Any]) -> None:
    """An adapter trained on another base than the served one is an error (when we can tell)."""
    trained_on = manifest.get("base_model") or {}
    root = Path(str(base_entry.get("root") or ""))
    if not trained_on or not root.is_dir():
        return  # the server's folder is not visible from here: the fingerprint check decides
    served_manifest = root / PREPARED_MODEL_MANIFEST
    served_content = (
        json.loads(served_manifest.read_text(encoding="utf-8")).get("content_sha256")
        if served_manifest.is_file()
        else None
    )
    mismatch = None
    if trained_on.get("content_sha256") and served_content:
        if trained_on["content_sha256"] != served_content:
            mismatch = (str(trained_on["content_sha256"]), served_content)
    elif trained_on.get("sha256"):
        served_sha = sha256_dir(root)
        if trained_on["sha256"] != served_sha:
            mismatch = (str(trained_on["sha256"]), served_sha)
    if mismatch is not None:
        raise InputError(
            f"adapter {adapter_dir} was trained on base model {trained_on.get('path')} "
            f"(sha256 {mismatch[0][:SHA_PREFIX]}), but the server serves {base_entry.get('id')!r} from {root} "
            f"(sha256 {mismatch[1][:SHA_PREFIX]}): an adapter only applies to its own base model"
        )


async def publish_adapter(
    client: OpenAICompatClient,
    adapter_dir: str | Path,
    *,
    name: str | None = None,
    parent: str | None = None,
    tol: float = DEFAULT_TOLERANCE,
    require_change: bool = True,
) -> dict[str, Any]:
    """Load `adapter_dir` into the server and verify it; return the publication record.

    `name`: the served name's stem (default: the folder's name); the adapter is served as
    `<name>-<sha256[:12]>`. `parent`: the served model the adapter must differ from (default:
    the server's base model). Raises InputError (bad adapter, stale manifest, other base),
    FingerprintMismatch (verification failed; the adapter is unloaded again), ServiceError.
    """
    adapter_dir = Path(adapter_dir).resolve()
    manifest, expected, sha = _read_adapter(adapter_dir)
    served = served_name_for(name or adapter_dir.name, sha)

    models = await client.models()
    bases = [m for m in models if not m.get("parent")]
    if not bases:
        raise ServiceError(f"{client.base_url}: serves no base model")
    base = bases[0]
    _check_base(manifest, adapter_dir, base)
    parent_name = parent or str(base["id"])
    if parent_name not in {m["id"] for m in models}:
        raise InputError(f"parent model {parent_name!r} is not served by {client.base_url}")

    already_loaded = any(m["id"] == served for m in models)
    if not already_loaded:
        try:
            await client.load_adapter(served, str(adapter_dir))
        except HTTPStatusError as exc:
            if exc.status == 400 and "has already been loaded" in exc.body:
                # loaded meanwhile (another publisher, or vLLM's LoRA resolver on a request for it)
                already_loaded = True
            elif exc.status not in (400, 404, 500):
                raise
            else:
                shapes = any(s in exc.body for s in ("size of tensor", "shape", "must match"))
                why = (
                    "its weights do not fit that model: the adapter was trained on another base model"
                    if shapes
                    else "see the server's message"
                )
                raise InputError(
                    f"the server refused adapter {adapter_dir} on its base model {base['id']!r} "
                    f"({base.get('root')}): {why}. Server said: {_server_message(exc.body)}"
                ) from None

    state = "it was served before this publish: left loaded" if already_loaded else "unloaded again"

    async def fail(message: str, details: dict[str, Any]) -> None:
        if not already_loaded:
            await client.unload_adapter(served)
        raise FingerprintMismatch(message, details)

    got = await served_fingerprint(client, served, expected)
    ok, details = compare_fingerprints(expected, got, tol)
    if not ok:
        await fail(
            f"the server does not serve adapter {adapter_dir} as trained: its answers through "
            f"{served!r} differ from the fingerprint in manifest.json ({state}).\n"
            + format_comparison(details, "trained", "served"),
            details,
        )
    parent_fp = await served_fingerprint(client, parent_name, expected)
    parent_ok, parent_details = compare_fingerprints(expected, parent_fp, tol)
    if parent_ok and require_change:
        await fail(
            f"adapter {adapter_dir} cannot be told apart from its parent {parent_name!r}: the parent's "
            f"answers also match the fingerprint within {tol} (largest difference "
            f"{parent_details['max_abs_diff']:.3g}), so a server serving the parent would pass too. "
            "Train it longer, or publish with require_change=False (--allow-unchanged).\n"
            + format_comparison(parent_details, "trained", parent_name[:9]),
            parent_details,
        )
    return {
        "served_name": served,
        "adapter_dir": str(adapter_dir),
        "adapter_sha256": sha,
        "base_model": str(base["id"]),
        "base_root": str(base.get("root") or ""),  # what the server was started with (its model path)
        "parent": parent_name,
        "tolerance": tol,
        "max_abs_diff": details["max_abs_diff"],
        "mean_abs_diff": details["mean_abs_diff"],
        "top1_agreement": details["top1_agreement"],
        "parent_max_abs_diff": parent_details["max_abs_diff"],
        "already_loaded": already_loaded,
    }


async def unpublish_adapter(client: OpenAICompatClient, served_name: str) -> None:
    """Stop serving an adapter (its name as `publish_adapter` returned it)."""
    if served_name not in {m["id"] for m in await client.adapters()}:
        raise InputError(f"adapter {served_name!r} is not served by {client.base_url}")
    await client.unload_adapter(served_name)
