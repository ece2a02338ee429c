"""Fingerprints computed with transformers + PEFT, and their comparison rules (no server)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from selfreward.errors import InputError
from selfreward.fingerprint import (
    DEFAULT_POSITIONS,
    DEFAULT_PROBES,
    DEFAULT_TOP_K,
    adapter_sha256,
    check_fingerprint,
    compare_fingerprints,
    compute_fingerprint,
    fingerprint_model_dir,
    format_comparison,
)


@pytest.fixture(scope="module")
def base_fp(tiny_model_dir: Path) -> dict[str, Any]:
    return fingerprint_model_dir(tiny_model_dir)


def test_fingerprint_structure(base_fp: dict[str, Any], tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert base_fp["top_k"] == DEFAULT_TOP_K and base_fp["dtype"] == "float32"
    assert len(base_fp["probes"]) == len(DEFAULT_PROBES)
    for probe, (conversation, answer_start) in zip(base_fp["probes"], DEFAULT_PROBES, strict=True):
        text = tok.decode(probe["input_ids"])
        assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n" + answer_start)
        assert conversation[-1][1] in text
        n = len(probe["input_ids"])
        assert [r["pos"] for r in probe["positions"]] == list(range(n - DEFAULT_POSITIONS + 1, n + 1))
        for row in probe["positions"]:
            values = [v for _, v in row["top"]]
            assert len(values) == DEFAULT_TOP_K and values == sorted(values, reverse=True)
    assert check_fingerprint(base_fp, "here") == base_fp
    assert json.loads(json.dumps(base_fp)) == base_fp  # stored as JSON in manifests


def test_in_memory_peft_model_matches_saved_adapter_and_keeps_training_mode(
    tiny_model_dir: Path, tiny_lora_dir: Path, base_fp: dict[str, Any]
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        tiny_lora_dir,
        is_trainable=True,
    )
    model.train()
    in_memory = compute_fingerprint(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert model.training, "the model's mode is restored"
    saved = json.loads((tiny_lora_dir / "manifest.json").read_text())["fingerprint"]
    from_dir = fingerprint_model_dir(tiny_model_dir, tiny_lora_dir)
    for other in (saved, from_dir):
        ok, details = compare_fingerprints(in_memory, other, tol=1e-5)
        assert ok, details
    ok, details = compare_fingerprints(in_memory, base_fp, tol=0.02)
    assert not ok and details["max_abs_diff"] > 0.05  # the adapter changes the model


def test_compare_identical_perturbed_and_missing_tokens(base_fp: dict[str, Any]) -> None:
    ok, details = compare_fingerprints(base_fp, base_fp, tol=1e-9)
    assert ok and details["max_abs_diff"] == 0.0 and details["top1_agreement"] == 1.0
    assert details["compared"] == len(DEFAULT_PROBES) * DEFAULT_POSITIONS * DEFAULT_TOP_K

    nudged = copy.deepcopy(base_fp)
    nudged["probes"][2]["positions"][1]["top"][3][1] += 0.01
    assert compare_fingerprints(base_fp, nudged, tol=0.02)[0]
    nudged["probes"][2]["positions"][1]["top"][3][1] += 0.05
    ok, details = compare_fingerprints(base_fp, nudged, tol=0.02)
    assert not ok and details["max_abs_diff"] == pytest.approx(0.06, abs=1e-6)
    assert details["worst"][0]["probe"] == 2

    # a token missing from the served top list is bounded by the served list's lowest value
    missing = copy.deepcopy(base_fp)
    row = missing["probes"][0]["positions"][0]
    dropped_token, dropped_lp = row["top"].pop(0)
    bound = min(v for _, v in row["top"])
    ok, details = compare_fingerprints(base_fp, missing, tol=1e-9)
    assert details["max_abs_diff"] == pytest.approx(max(0.0, dropped_lp - bound), abs=1e-9)
    assert details["top1_agreement"] < 1.0

    report = format_comparison(details, "trained", "served")
    assert "trained" in report and "served" in report and f"{dropped_token}:" in report


def test_compare_refuses_different_probes(base_fp: dict[str, Any]) -> None:
    other = copy.deepcopy(base_fp)
    other["probes"][0]["input_ids"] = [*other["probes"][0]["input_ids"], 5]
    with pytest.raises(ValueError, match="token ids differ"):
        compare_fingerprints(base_fp, other)


def test_check_fingerprint_names_the_bad_field(base_fp: dict[str, Any]) -> None:
    bad = copy.deepcopy(base_fp)
    bad["probes"][1]["positions"][0]["top"] = "oops"
    with pytest.raises(
        InputError, match=r"manifest.json: fingerprint.probes\[1\].positions\[0\] is malformed"
    ):
        check_fingerprint(bad, "manifest.json")
    with pytest.raises(InputError, match="format"):
        check_fingerprint({**base_fp, "format": "v0"}, "m")


def test_adapter_sha256_covers_only_the_adapter_files(tiny_lora_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_lora_dir, copy_dir)
    sha = adapter_sha256(copy_dir)
    assert sha == adapter_sha256(tiny_lora_dir)
    (copy_dir / "manifest.json").write_text("{}")
    (copy_dir / "README.md").write_text("notes")
    assert adapter_sha256(copy_dir) == sha
    weights = copy_dir / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert adapter_sha256(copy_dir) != sha
    with pytest.raises(InputError, match="not a PEFT adapter"):
        adapter_sha256(tmp_path)
