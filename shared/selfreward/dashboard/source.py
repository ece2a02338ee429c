"""Where the dashboard's run states come from: one `RunSource` protocol, two sources.

`ArtifactSource` (the embedded mode, `selfreward ui`) reads an artifact folder: a stage is done
when its manifest exists, running while its progress file (`<stage>.progress.json`, written by
the embedded driver) is fresh and its process alive, failed when `<stage>.error.json` exists.
`selfreward.dashboard.coordinator_source.CoordinatorSource` answers the same from the
coordinator's Redis state and RQ (selfreward.api.coordinator.status).

Both give the same shapes (the page reads only these):
    run summary: run, variant, base_model, completed_iterations, iterations (planned), status,
                 updated_at
    run:         the summary + config (rows: key, value, default) + timeline (iteration details)
    iteration:   run, t, status, stages [{stage, state, progress, seconds, counts, error}], error
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from selfreward.config import RunConfig, build_config
from selfreward.errors import named_record
from selfreward.stages import plan
from selfreward.stages.stage import ENVELOPE
from selfreward.storage import RunLayout, read_manifest

# manifest keys that are not the stage's counts: bulky ones and the envelope every stage manifest
# carries (when, how long, peak memory: shown as their own fields)
BULKY = {"config", "inputs", *ENVELOPE}
# a progress file not updated for this long, of a process this host cannot check, is stale
STALE_S = 600.0


class RunMissing(LookupError):
    pass


class RunSource(Protocol):
    mode: str  # "embedded" | "coordinator"
    writable: bool  # whether the page may offer start, resume, cancel

    def runs(self) -> list[dict[str, Any]]: ...

    def run(self, run: str) -> dict[str, Any]: ...

    def iteration(self, run: str, t: int) -> dict[str, Any]: ...

    def layout(self, run: str) -> RunLayout: ...

    def config(self, run: str) -> RunConfig: ...


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def config_rows(config: RunConfig) -> list[dict[str, Any]]:
    """The config as rows (dotted key, value, whether it is the built-in default)."""
    values = _flatten(config.model_dump(mode="json"))
    defaults = _flatten(RunConfig().model_dump(mode="json"))
    return [{"key": k, "value": v, "default": k in defaults and defaults[k] == v} for k, v in values.items()]


def counts_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in BULKY}


def with_record(error: dict[str, Any] | None) -> dict[str, Any] | None:
    if error and error.get("message") and not error.get("record"):
        error = {**error, "record": named_record(str(error["message"]))}
    return error


def iteration_status(stages: list[dict[str, Any]]) -> str:
    states = [s["state"] for s in stages]
    for state in ("failed", "worker_lost", "running", "interrupted", "retrying", "queued", "waiting"):
        if state in states:
            return state
    if states and all(s == "done" for s in states):
        return "done"
    return "partial" if "done" in states else "pending"


def run_status(iterations: list[dict[str, Any]], completed: int, planned: int) -> str:
    statuses = [i["status"] for i in iterations]
    for state in ("failed", "worker_lost", "running", "queued", "waiting_for_setup", "interrupted"):
        if state in statuses:
            return state
    if completed >= planned:
        return "done"
    return "stopped" if completed >= 0 or "partial" in statuses else "pending"


def _alive(progress: dict[str, Any]) -> bool:
    pid, host = progress.get("pid"), progress.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - float(progress.get("updated_at") or 0) < STALE_S


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def progress_view(progress: dict[str, Any]) -> dict[str, Any]:
    """The page's progress bar: the newest task's step/total, ETA, elapsed and its fields."""
    current = dict(progress.get("current") or {})
    current["updated_at"] = progress.get("updated_at")
    current["stage_elapsed_s"] = round(time.time() - float(progress.get("started_at") or time.time()), 1)
    current["tasks"] = list((progress.get("tasks") or {}).values())
    return current


class ArtifactSource:
    """Runs of an artifact folder (`<root>/runs/<run>/`), read-only."""

    mode = "embedded"
    writable = False

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def layout(self, run: str) -> RunLayout:
        layout = RunLayout(self.root, run)
        if (
            not layout.config_path.is_file()
            or layout.run_dir.resolve().parent != (self.root / "runs").resolve()
        ):
            raise RunMissing(f"no run {run!r} in {self.root}")
        return layout

    def config(self, run: str) -> RunConfig:
        layout = self.layout(run)
        data = yaml.safe_load(layout.config_path.read_text(encoding="utf-8")) or {}
        return build_config(data, environ={}, source=str(layout.config_path))

    def _run_names(self) -> list[str]:
        base = self.root / "runs"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "config.yaml").is_file())

    def _iterations(self, layout: RunLayout, config: RunConfig) -> list[int]:
        ts = {0, *range(1, config.iterations + 1)}
        for d in layout.run_dir.glob("iter-*"):
            suffix = d.name.removeprefix("iter-")
            if suffix.isdigit():
                ts.add(int(suffix))
        return sorted(ts)

    def _updated_at(self, layout: RunLayout) -> float:
        latest = layout.config_path.stat().st_mtime
        for d in layout.run_dir.glob("iter-*"):
            for p in d.iterdir():
                try:
                    latest = max(latest, p.stat().st_mtime)
                except OSError:
                    continue
        return latest

    def _summary(self, run: str) -> dict[str, Any]:
        layout = self.layout(run)
        config = self.config(run)
        timeline = [self._iteration(layout, config, t) for t in self._iterations(layout, config)]
        completed = plan.completed_iterations(layout, config.variant)
        return {
            "run": run,
            "variant": config.variant,
            "base_model": config.model.base,
            "completed_iterations": max(0, completed),
            "iterations_planned": config.iterations,
            "status": run_status(timeline, completed, config.iterations),
            "updated_at": self._updated_at(layout),
            "timeline": timeline,
        }

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for name in self._run_names():
            try:
                summary = self._summary(name)
            except Exception as exc:  # one unreadable run never hides the others
                out.append({"run": name, "status": "unreadable", "error": f"{type(exc).__name__}: {exc}"})
                continue
            summary.pop("timeline")
            out.append(summary)
        return out

    def run(self, run: str) -> dict[str, Any]:
        summary = self._summary(run)
        summary["config"] = config_rows(self.config(run))
        summary["artifacts"] = str(self.layout(run).run_dir)
        return summary

    def iteration(self, run: str, t: int) -> dict[str, Any]:
        layout = self.layout(run)
        config = self.config(run)
        if t < 0 or t not in self._iterations(layout, config):
            raise RunMissing(f"run {run!r} has no iteration {t}")
        return self._iteration(layout, config, t)

    def _iteration(self, layout: RunLayout, config: RunConfig, t: int) -> dict[str, Any]:
        stages = []
        for s in plan.stages_of(t, config.variant):
            entry: dict[str, Any] = {"stage": s.name, "queue": s.queue, "state": "pending"}
            manifest = read_manifest(layout.stage_manifest(t, s.name))
            error = _read_json(layout.stage_error(t, s.name))
            progress = _read_json(layout.stage_progress(t, s.name))
            if manifest is not None:
                entry.update(
                    state="done",
                    seconds=manifest.get("seconds"),
                    peak_rss_bytes=manifest.get("peak_rss_bytes"),
                    counts=counts_of(manifest),
                )
                entry["started_at"] = manifest.get("started_at")
            elif error is not None and (
                progress is None
                or float(error.get("failed_at") or 0) >= float(progress.get("updated_at") or 0)
            ):
                entry.update(state="failed", error=with_record(error))
            elif progress is not None:
                entry["state"] = "running" if _alive(progress) else "interrupted"
                entry["progress"] = progress_view(progress)
                entry["started_at"] = progress.get("started_at")
            if progress is not None and "progress" not in entry and entry["state"] != "done":
                entry["progress"] = progress_view(progress)
            stages.append(entry)
        status = iteration_status(stages)
        detail: dict[str, Any] = {
            "run": layout.run,
            "t": t,
            "status": status,
            "model_in": plan.model_name(t),
            "model_out": plan.model_name(t + 1),
            "stages": stages,
        }
        failed = next((s for s in stages if s["state"] == "failed"), None)
        if failed is not None:
            detail.update(failed_stage=failed["stage"], error=failed["error"])
        return detail
