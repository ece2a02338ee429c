"""bench/gpu_check.sh, as far as it runs without a GPU: the whole check on CPU with a tiny model
(`--cpu-dry-run`: the same script, trainer and fingerprint code as on the GPU machine), and the
two-call transport of the model (halves stashed by one call, assembled and checksum-checked by
the next)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


def run_script(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cpu_dry_run_trains_fingerprints_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    proc = run_script("--cpu-dry-run", "--work", str(tmp_path / "work"), env={"OUT": str(out)})
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 180, f"the dry run took {seconds:.0f} s"  # 12 s alone; slower on a busy machine
    text = proc.stdout
    assert "GPU check summary (cpu dry run (tiny random model))" in text
    for line in ("sft: 3 steps", "dpo: 2 steps", "fingerprint gpu_fp32", "fingerprint gpu_bf16", "parent M1"):
        assert line in text, line
    result = json.loads((out / "gpu_check.json").read_text())
    for kind, steps in (("sft", 3), ("dpo", 2)):
        r = result["training"][kind]
        assert r["steps"] == steps and r["device"] == "cpu" and r["tokens"] > 0 and r["tokens_per_s"] > 0
    fp = result["fingerprint"]
    assert fp["tolerance"] == 0.6
    # the same dtype on the same device reproduces the trainer's fingerprint; bf16 does not exactly
    assert fp["gpu_fp32"]["max_abs_diff"] < 1e-4 and fp["gpu_fp32"]["within_tolerance"]
    assert 0 < fp["gpu_bf16"]["max_abs_diff"] < 0.6 and fp["gpu_bf16"]["dtype"] == "bfloat16"
    assert fp["parent"]["max_abs_diff"] > 0  # DPO moved M2 away from M1
    assert result["environment"]["trl"] != "missing"
    # the summary of a GPU run (GPU memory figures where the dry run has none) renders too
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    for kind in ("sft", "dpo"):
        facts = result["training"][kind]
        assert facts["peak_gpu_memory_gib"] is None and "gpu_reserved_after_job_gib" in facts
        for key in [k for k in facts if k.endswith("_gib")]:
            facts[key] = 1.5
    text = gpu_check.summary(result)
    assert text.count("peak GPU memory 1.5 GiB, reserved after the job 1.5 GiB") == 2


def test_the_model_travels_in_two_halves_and_is_checked(tmp_path: Path) -> None:
    from selfreward.policy.prepare import builtin_gguf_path

    data = builtin_gguf_path("smollm2-135m-instruct").read_bytes()
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    half = len(data) // 2
    first, second = tmp_path / "call1", tmp_path / "call2"
    (first / "1").mkdir(parents=True)
    (second / "2").mkdir(parents=True)
    (first / "1" / f"{name}.part1").write_bytes(data[:half])
    (second / "2" / f"{name}.part2").write_bytes(data[half:])
    stash = tmp_path / "stash"
    base = {"SELFREWARD_GPU_CHECK_STASH": str(stash), "SELFREWARD_GPU_CHECK_WHEELS": str(tmp_path / "none")}
    # the second call alone: the first half is missing, and the message says what to do
    proc = run_script("--assemble", env={**base, "SELFREWARD_GPU_CHECK_CARRY": str(second)})
    assert proc.returncode == 3 and "part 1 neither carried" in proc.stderr and "--stash" in proc.stderr
    # call 1 stashes its half; call 2 assembles the file from its own half and the stashed one
    proc = run_script("--stash", env={**base, "SELFREWARD_GPU_CHECK_CARRY": str(first)})
    assert proc.returncode == 0, proc.stderr
    assert (stash / "parts" / f"{name}.part1").stat().st_size == half
    proc = run_script("--assemble", env={**base, "SELFREWARD_GPU_CHECK_CARRY": str(second)})
    assert proc.returncode == 0, proc.stderr
    whole = Path(proc.stdout.strip().splitlines()[-1])
    assert whole == stash / name and whole.read_bytes() == data
    # a damaged half is refused by its checksum
    whole.unlink()
    (second / "2" / f"{name}.part2").write_bytes(data[half:-1] + b"\0")
    proc = run_script("--assemble", env={**base, "SELFREWARD_GPU_CHECK_CARRY": str(second)})
    assert proc.returncode == 3 and "sha256 mismatch" in proc.stderr and not whole.exists()
