"""Model preparation: local folders (real tiny model), the content-hash cache, and its errors.

The GGUF conversion of the built-in alias is exercised for real in test_policy_smollm2.py
(slow: about 35 s to dequantise SmolLM2-135M).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfreward.errors import InputError, ServiceError
from selfreward.fingerprint import PREPARED_MODEL_MANIFEST
from selfreward.policy.prepare import (
    BUILTIN_MODELS,
    builtin_gguf_path,
    check_causal_lm,
    prepare_model,
    read_prepared_manifest,
    resolve_source,
)

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


def test_folder_is_prepared_once_and_cached_by_content(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = prepare_model(str(tiny_model_dir), cache)
    assert path.parent == cache / "models"
    manifest = read_prepared_manifest(path)
    assert manifest is not None and manifest["content_sha256"] == path.name
    assert manifest["source"]["kind"] == "folder" and manifest["architectures"] == ["LlamaForCausalLM"]
    check_causal_lm(path)
    # weights are shared with the source, everything else is the prepared folder's own
    assert os.stat(path / "model.safetensors").st_ino == os.stat(tiny_model_dir / "model.safetensors").st_ino
    assert os.stat(path / "tokenizer.json").st_ino != os.stat(tiny_model_dir / "tokenizer.json").st_ino
    stamp = (path / PREPARED_MODEL_MANIFEST).stat().st_mtime_ns
    assert prepare_model(str(tiny_model_dir), cache) == path
    assert (path / PREPARED_MODEL_MANIFEST).stat().st_mtime_ns == stamp, "a cache hit writes nothing"


def test_chat_template_override_is_part_of_the_content(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    template = tmp_path / "plain.jinja"
    template.write_text(TEMPLATE)
    source_template = (tiny_model_dir / "chat_template.jinja").read_text()
    plain = prepare_model(str(tiny_model_dir), tmp_path / "cache", chat_template=template)
    default = prepare_model(str(tiny_model_dir), tmp_path / "cache")
    assert plain != default
    rendered = AutoTokenizer.from_pretrained(plain).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert rendered == "[user] hi\n[assistant] "
    assert (tiny_model_dir / "chat_template.jinja").read_text() == source_template, "the source is untouched"


def test_out_folder_and_rebuild_on_changed_source(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(tiny_model_dir, source)
    out = tmp_path / "served"
    assert prepare_model(str(source), tmp_path / "cache", out=out) == out
    first = read_prepared_manifest(out)
    config = json.loads((source / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (source / "config.json").write_text(json.dumps(config))
    prepare_model(str(source), tmp_path / "cache", out=out)
    second = read_prepared_manifest(out)
    assert first is not None and second is not None and first["content_sha256"] != second["content_sha256"]
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-5
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a prepared model folder; refusing to overwrite"):
        prepare_model(str(source), tmp_path / "cache", out=occupied)
    assert (occupied / "notes.txt").read_text() == "mine"


def test_bad_specs_are_clear_errors(tmp_path: Path, tiny_lora_dir: Path) -> None:
    with pytest.raises(InputError, match=r"model folder not found: \./nowhere"):
        prepare_model("./nowhere", tmp_path)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(InputError, match="not a causal language model"):
        prepare_model(str(bert), tmp_path)
    with pytest.raises(InputError, match="this is a LoRA adapter"):
        prepare_model(str(tiny_lora_dir), tmp_path)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(InputError, match="a model is a folder, a .gguf file"):
        prepare_model(str(weights), tmp_path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 16)
    with pytest.raises(InputError, match="not a GGUF file"):
        prepare_model(str(fake), tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"broken/config.json: not valid JSON"):
        prepare_model(str(broken), tmp_path)
    with pytest.raises(InputError, match="chat template file not found"):
        prepare_model(str(bert), tmp_path, chat_template=tmp_path / "none.jinja")


def test_model_without_chat_template_names_the_setting(tiny_model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    tok_config = json.loads((bare / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(InputError, match=r"no chat template.*model\.chat_template.*--chat-template"):
        prepare_model(str(bare), tmp_path / "cache")
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    assert prepare_model(str(bare), tmp_path / "cache", chat_template=template).is_dir()


def test_hub_id_offline_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source("org-that-does-not-exist/model-x").kind == "hub"
    with pytest.raises(
        ServiceError, match=r"no local folder of that name, and downloading it from the Hugging Face hub"
    ):
        prepare_model("org-that-does-not-exist/model-x", tmp_path)


def test_builtin_alias_resolves_to_the_packaged_gguf() -> None:
    path = builtin_gguf_path("smollm2-135m-instruct")
    assert path.name == BUILTIN_MODELS["smollm2-135m-instruct"][1] and path.read_bytes()[:4] == b"GGUF"
    source = resolve_source("smollm2-135m-instruct")
    assert source.kind == "gguf" and Path(source.location) == path


def test_cli_prepare(tiny_model_dir: Path, tmp_path: Path) -> None:
    from selfreward.cli.main import app

    out = tmp_path / "prepared"
    result = CliRunner().invoke(app, ["policy", "prepare", str(tiny_model_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(str(out)) and (out / PREPARED_MODEL_MANIFEST).is_file()
    bad = CliRunner().invoke(app, ["policy", "prepare", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "model folder not found" in bad.output


def test_a_gguf_file_is_read_once_while_converting(tmp_path: Path) -> None:
    """transformers parses a GGUF file for the tokenizer, the config and the weights: within the
    conversion `gguf` hands out one reader per file and one tensor-name map per architecture,
    and afterwards its own names are back (the full SmolLM2 conversion gives byte-identical
    files either way, 25 -> 13 s; tests/test_policy_smollm2.py serves and fingerprints it)."""
    import gguf
    import numpy as np

    from selfreward.policy.prepare import _gguf_read_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and first.tensors[0].name == "token_embd.weight"
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 2).get_name("token_embd") == "token_embd"
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not first
