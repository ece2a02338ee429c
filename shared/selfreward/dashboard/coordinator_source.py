"""The dashboard's runs from the coordinator: its Redis state (selfreward.drivers.state), RQ's
jobs and the manifests, read by the same functions the REST API answers with
(selfreward.api.coordinator.status), reshaped into the page's shapes (dashboard.source)."""

from __future__ import annotations

from typing import Any

import redis

from selfreward.api.coordinator import status as run_status_api
from selfreward.config import RunConfig
from selfreward.dashboard.source import (
    RunMissing,
    config_rows,
    counts_of,
    iteration_status,
    run_status,
    with_record,
)
from selfreward.drivers.state import RunNotFound, RunStore
from selfreward.stages import plan
from selfreward.storage import RunLayout


class CoordinatorSource:
    mode = "coordinator"
    writable = True

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn
        self.store = RunStore(conn)

    def config(self, run: str) -> RunConfig:
        try:
            return self.store.config(run)
        except RunNotFound as exc:
            raise RunMissing(str(exc)) from None

    def layout(self, run: str) -> RunLayout:
        return RunLayout(self.config(run).artifact_root, run)

    def _iteration(self, run: str, t: int, config: RunConfig) -> dict[str, Any]:
        try:
            detail = run_status_api.iteration_detail(self.store, self.conn, run, t)
        except RunNotFound:  # never started: its stages, all pending
            stages = [
                {"stage": s.name, "queue": s.queue, "state": "pending"}
                for s in plan.stages_of(t, config.variant)
            ]
            return {
                "run": run,
                "t": t,
                "status": "pending",
                "model_in": plan.model_name(t),
                "model_out": plan.model_name(t + 1),
                "stages": stages,
            }
        for s in detail["stages"]:
            counts = s.get("counts") or {}
            if "seconds" in counts:
                s["seconds"] = counts["seconds"]
            if counts:
                s["counts"] = counts_of(counts)
            if s.get("error") and not isinstance(s["error"], dict):
                s["error"] = with_record({"stage": s["stage"], "message": s["error"]})
        if detail.get("error"):
            detail["error"] = with_record(
                {"stage": detail.get("failed_stage"), "message": str(detail["error"])}
            )
            for s in detail["stages"]:  # the stored failed stage, also once RQ forgot its job
                if s["stage"] == detail.get("failed_stage") and s["state"] in ("pending", "blocked"):
                    s.update(state="failed", error=detail["error"])
        if detail["status"] == "pending":
            detail["status"] = iteration_status(detail["stages"])
        return detail

    def _summary(self, run: str, brief: bool) -> dict[str, Any]:
        config = self.config(run)
        summary = run_status_api.run_summary(self.store, self.conn, run, brief=True)
        started = {i["t"] for i in summary["iterations"]}
        ts = sorted(started | set(range(0, config.iterations + 1)))
        timeline = [self._iteration(run, t, config) for t in ts]
        layout = RunLayout(config.artifact_root, run)
        completed = plan.completed_iterations(layout, config.variant)
        out = {
            "run": run,
            "variant": config.variant,
            "base_model": config.model.base,
            "completed_iterations": max(0, completed),
            "iterations_planned": config.iterations,
            "status": run_status(timeline, completed, config.iterations),
            "created_at": summary.get("created_at"),
            "updated_at": max(
                [float(summary.get("created_at") or 0)]
                + [float(i.get(k) or 0) for i in timeline for k in ("started_at", "finished_at")]
            ),
        }
        if not brief:
            out["timeline"] = timeline
            out["config"] = config_rows(config)
            out["artifacts"] = str(layout.run_dir)
        return out

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for run in self.store.run_ids():
            try:
                out.append(self._summary(run, brief=True))
            except redis.RedisError:
                raise
            except Exception as exc:  # one bad record never hides the others
                out.append(
                    {"run": run, "status": "unreadable", "error": f"unreadable ({type(exc).__name__})"}
                )
        return out

    def run(self, run: str) -> dict[str, Any]:
        return self._summary(run, brief=False)

    def iteration(self, run: str, t: int) -> dict[str, Any]:
        config = self.config(run)
        if t < 0:
            raise RunMissing(f"run {run!r} has no iteration {t}")
        return self._iteration(run, t, config)
