"""Training in child processes: `accelerate launch` (single GPU, DDP, DeepSpeed ZeRO-2/3, FSDP),
or one plain child process (`training.subprocess`).

When `training.accelerate_config` names a config (a file shipped in selfreward/training/accelerate/,
by name, or any path), the job writes its request to the work folder and runs

    python -m accelerate.commands.launch --config_file CONFIG \
        -m selfreward.training.train_entry --request REQUEST.json --progress PROGRESS.jsonl

and without one, where `training.subprocess` resolves on (runner.trains_in_child), the same
entry point directly: `python -m selfreward.training.train_entry --request ... --progress ...`.
The child's memory (model, activations, the allocator's caches) goes back to the OS when it
exits; trained in-process, the embedded run kept about 3.5 GB beside vLLM's after SFT.

Every process runs `runner.fit`; the main one appends its progress events to PROGRESS.jsonl,
which this process relays into the job's own `Progress` (RQ job meta, CLI bar). Output goes to
runs/<run>/logs/train/<name>.log; a failure raises with the log's last lines. The launcher is
started with PR_SET_PDEATHSIG, so a killed job does not leave training processes behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from selfreward.errors import ConfigError, StageError
from selfreward.processes import term_with_parent
from selfreward.progress import Progress, ProgressEvent, Task
from selfreward.storage import atomic_write_text

from .request import TrainRequest

CONFIG_DIR = Path(__file__).parent / "accelerate"
_EVENT_KEYS = {"task", "done", "total", "elapsed_s", "finished"}


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def accelerate_config_path(spec: str) -> Path:
    """A shipped config by name (`ddp`, `deepspeed_zero3`, ...) or a path to the user's own."""
    shipped = CONFIG_DIR / f"{spec.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    raise ConfigError(
        [f"training.accelerate_config: {spec!r} is neither a shipped config {shipped_configs()} nor a file"],
        "train",
    )


def num_processes(config_file: Path) -> int:
    """Processes the config launches (for the batch-size check before launching)."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        cluster = load_config_from_file(str(config_file))
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{config_file}: not a valid accelerate config ({exc})"], "train") from None
    n = getattr(cluster, "num_processes", 1)
    return max(1, int(n)) if n and n > 0 else 1


class ProgressFileSink:
    """A `Progress` sink appending each event as a JSON line (the main training process only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, event: ProgressEvent) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event.as_dict(), default=str) + "\n")


class ProgressRelay:
    """Reads new events from a progress file and replays them on a `Progress`."""

    def __init__(self, path: Path, progress: Progress) -> None:
        self.path = path
        self.progress = progress
        self.offset = 0
        self.tasks: dict[str, Task] = {}

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a line being written stays for the next poll
        self.offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            self._replay(json.loads(line))

    def _replay(self, event: dict[str, Any]) -> None:
        name = event["task"]
        task = self.tasks.get(name)
        if task is None:
            task = self.tasks[name] = self.progress.task(name, event.get("total"), event.get("done", 0))
        fields = {k: v for k, v in event.items() if k not in _EVENT_KEYS}
        if fields.get("eta_s") is None:
            fields.pop("eta_s", None)
        task.update(done=event.get("done"), total=event.get("total"), **fields)
        if event.get("finished"):
            task.close()


def launch_command(request: TrainRequest, request_file: Path, progress_file: Path) -> list[str]:
    """`accelerate launch` with `training.accelerate_config`, else the entry point in one process."""
    entry = [
        "selfreward.training.train_entry",
        "--request",
        str(request_file),
        "--progress",
        str(progress_file),
    ]
    spec = request.config.training.accelerate_config
    if spec is None:
        return [sys.executable, "-m", *entry]
    config_file = accelerate_config_path(spec)
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "-m",
        *entry,
    ]


def _tail(path: Path, lines: int = 25) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def run_in_child(request: TrainRequest, progress: Progress, poll_s: float = 0.5) -> None:
    """Train in child processes (`launch_command`) and relay their progress; raise StageError if
    they fail."""
    from .arguments import accumulation_steps

    spec = request.config.training.accelerate_config
    processes = num_processes(accelerate_config_path(spec)) if spec is not None else 1
    accumulation_steps(request.section, processes, request.kind)  # fail before launching
    request_file = request.work_dir / "request.json"
    progress_file = request.work_dir / "progress.jsonl"
    atomic_write_text(request_file, request.model_dump_json(indent=2))
    progress_file.unlink(missing_ok=True)
    request.log_file.parent.mkdir(parents=True, exist_ok=True)
    relay = ProgressRelay(progress_file, progress)
    command = launch_command(request, request_file, progress_file)
    with open(request.log_file, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=term_with_parent,
        )
        try:
            while proc.poll() is None:
                relay.poll()
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    relay.poll()
    if proc.returncode != 0:
        raise StageError(
            "train",
            f"{'accelerate launch' if spec is not None else 'the training process'} exited with status "
            f"{proc.returncode}; last lines of {request.log_file}:\n" + _tail(request.log_file),
        )
