"""Scaled judging against a teacher with a hard quota: 1, 2 and 4 judge replicas, one shared limit.

Everything runs on loopback, side by side in this one run:
- a fake teacher speaking Gemini's generateContent wire format (selfreward.testing.fake_gemini)
  with a fixed latency (--latency-s, 1 s) and a hard quota (requests per minute; above it the
  teacher answers 429 RESOURCE_EXHAUSTED and serves nothing);
- one Redis; N judge replicas (`selfreward serve judge`, separate processes) whose backend
  limits (requests per minute, concurrency) are one budget in that Redis
  (selfreward.llm.limits.SharedLimits);
- the sharded judgments stage: N shards of a teacher-reward iteration's candidates, each run by
  its own worker process through the distributed driver's shard entry point
  (selfreward.drivers.rq.run_shard, the code an RQ shard job runs), worker i talking to replica
  i (in a deployment a Service spreads them); then the stage's own step merges the shards.

For N = 1, 2, 4 under a quota above the 4-replica demand it prints records/s, the teacher's
peak requests in any quota window, the 429s it sent and failed records. Then N = 4 with a quota
below that demand (--tight-quota, the judges' shared limit set to it): the teacher must never
see a request above its quota and no record may fail. Last line:
`ratio=<records/s with 4 replicas over 1 replica> over_quota=<requests above quota seen by the
teacher in the tight run>`. Targets: ratio >= 3.5, over_quota = 0.

    .venv/bin/python bench/judge_scaling.py            # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

SPEC = "gemini:bench-teacher"
KEY = "bench-key"


def run_config(root: Path, judge_urls: list[str], concurrency: int) -> dict[str, Any]:
    return {
        "name": "bench",
        "artifact_root": str(root),
        "variant": "teacher-reward",
        "teacher": {"backend": SPEC},
        "judge": {
            "samples": 1,
            "mode": "sample",
            "max_tokens": 16,
            "cache": False,
            "concurrency": concurrency,
        },
        "services": {"judge_url": judge_urls[0], "judge_shards": len(judge_urls)},
    }


def write_candidates(root: Path, records: int) -> Path:
    from selfreward.schemas import CandidateRecord, candidate_id
    from selfreward.storage import RunLayout, write_jsonl_atomic

    layout = RunLayout(root, "bench")
    rows = [
        CandidateRecord(
            id=candidate_id(f"p{i}", 0),
            prompt_id=f"p{i}",
            prompt=f"Question number {i}: what is {i} plus {i}?",
            index=0,
            text=f"It is {2 * i}.",
            model="m1",
        ).model_dump()
        for i in range(records)
    ]
    path = layout.stage_file(1, "candidates")
    write_jsonl_atomic(path, rows)
    return path


def worker(args: argparse.Namespace) -> None:
    """One shard of the judgments stage, as an RQ shard job runs it; prints its timing as JSON."""
    from selfreward.config import build_config
    from selfreward.drivers.rq import run_shard
    from selfreward.stages import judgments
    from selfreward.stages.stage import StageContext, run_stage
    from selfreward.storage import RunLayout

    config = json.loads(Path(args.config).read_text())
    config["services"]["judge_url"] = args.judge_url
    cfg = build_config(config, environ={})
    i, n = (int(x) for x in args.shard.split("/"))
    layout = RunLayout(cfg.artifact_root, cfg.name)
    # every worker starts judging at the same moment, its imports done (process start-up is not
    # judging throughput; a late worker starts at once and its delay counts)
    time.sleep(max(0.0, args.start_at - time.time()))
    started = time.time()
    cpu0 = time.process_time()
    if n == 1:  # one worker: the stage as one job (no shards to merge)
        result = run_stage(StageContext(cfg, layout, 1), judgments.STAGE)
    else:
        result = run_shard(StageContext(cfg, layout, 1, shard=(i, n)), judgments.STAGE)
    ended = time.time()
    cpu = time.process_time() - cpu0
    print(json.dumps({"started": started, "ended": ended, "cpu_s": cpu, "result": result}))


def phase(
    tmp: Path,
    redis_url: str,
    teacher: Any,
    *,
    replicas: int,
    records: int,
    quota: int,
    limit: int,
    concurrency: int,
    backend_concurrency: int,
) -> dict[str, Any]:
    import redis

    from selfreward.config import build_config
    from selfreward.stages import judgments
    from selfreward.stages.stage import StageContext, run_stage
    from selfreward.storage import RunLayout, load_jsonl
    from selfreward.testing.servers import background, free_port, wait_http

    redis.Redis.from_url(redis_url).flushdb()  # a fresh shared budget
    teacher.reset()
    teacher.quota_rpm = quota
    root = tmp / f"n{replicas}-q{quota}"
    write_candidates(root, records)
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "GEMINI_API_KEY": KEY,
        "SELFREWARD_TEACHER__GEMINI_BASE_URL": teacher.base_url,
        "SELFREWARD_TEACHER__BACKEND": SPEC,
        "SELFREWARD_VARIANT": "teacher-reward",
        "SELFREWARD_ALLOWED_BACKENDS": "gemini:*",
        "SELFREWARD_JUDGE__CACHE": "false",
        "SELFREWARD_JUDGE__CONCURRENCY": str(backend_concurrency),
        "SELFREWARD_JUDGE__REQUESTS_PER_MINUTE": str(limit),
        "OMP_NUM_THREADS": "1",
    }
    exe = [sys.executable, "-m", "selfreward.cli.main"]
    with ExitStack() as stack:
        urls, judges = [], []
        for r in range(replicas):
            port = free_port()
            log = root / f"judge{r}.log"
            proc = stack.enter_context(
                background([*exe, "serve", "judge", "--port", str(port), "--log-level", "warning"], log, env)
            )
            judges.append(proc)
            urls.append(f"http://127.0.0.1:{port}")
            wait_http(f"{urls[-1]}/healthz", 60, proc, log)
        config_path = root / "config.json"
        config_path.write_text(json.dumps(run_config(root, urls, concurrency)))
        workers = []
        start_at = time.time() + 4.0 + 2.0 * replicas  # after every worker's imports (2 cores)
        for i in range(replicas):
            err = stack.enter_context(open(root / f"worker{i}.log", "wb"))
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--config",
                str(config_path),
                "--shard",
                f"{i}/{replicas}",
                "--start-at",
                str(start_at),
            ]
            workers.append(
                subprocess.Popen(
                    [*cmd, "--judge-url", urls[i]], stdout=subprocess.PIPE, stderr=err, env=env, text=True
                )
            )
        judge_cpu0 = sum(proc_cpu_s(p.pid) for p in judges)
        main_cpu0 = time.process_time()
        outs = [w.communicate(timeout=900)[0] for w in workers]
        judge_cpu = sum(proc_cpu_s(p.pid) for p in judges) - judge_cpu0
        main_cpu = time.process_time() - main_cpu0
        if any(w.returncode for w in workers):
            raise SystemExit(f"a worker failed: see {root}/worker*.log")
        spans = [json.loads(o.strip().splitlines()[-1]) for o in outs]
        cfg = build_config(json.loads(config_path.read_text()), environ={})
        manifest = run_stage(StageContext(cfg, RunLayout(root, "bench"), 1), judgments.STAGE)  # the merge
    wall = max(s["ended"] for s in spans) - min(s["started"] for s in spans)
    seen = sorted(r.at for r in teacher.requests)
    first_s = seen[0] - min(s["started"] for s in spans)  # until the teacher's first request
    last_s = max(s["ended"] for s in spans) - seen[-1]  # from the teacher's last request
    judged = load_jsonl(RunLayout(root, "bench").stage_file(1, "judgments"))
    failed = records - sum(1 for j in judged if j.get("score") is not None)
    return {
        "replicas": replicas,
        "records": records,
        "quota_rpm": quota,
        "limit_rpm": limit,
        "seconds": round(wall, 1),
        "records_per_s": records / wall,
        "first_request_s": round(first_s, 2),
        "after_last_request_s": round(last_s, 2),
        "teacher_requests": teacher.calls,
        "teacher_max_in_flight": teacher.max_in_flight,
        "peak_in_window": teacher.peak_in_window,
        "over_quota_429": teacher.over_quota,
        "failed_records": failed,
        "merged": manifest.get("from_shards", {}).get("records", 0),
        # CPU milliseconds per record while judging: judge replicas, workers, the teacher (this process)
        "cpu_ms_per_record": {
            "judges": round(1000 * judge_cpu / records, 1),
            "workers": round(1000 * sum(s["cpu_s"] for s in spans) / records, 1),
            "teacher": round(1000 * main_cpu / records, 1),
        },
    }


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=400, help="candidates judged per scaling run")
    p.add_argument("--tight-records", type=int, default=1200, help="candidates of the tight-quota run")
    p.add_argument(
        "--latency-s",
        type=float,
        default=1.0,
        help="the teacher's answer time (1 s: an LLM teacher's; at 0.3 s four replicas and four workers "
        "saturate this 2-core machine's CPU at about 60 records/s)",
    )
    p.add_argument(
        "--quota", type=int, default=6000, help="the teacher's quota (requests/minute), scaling runs"
    )
    p.add_argument("--tight-quota", type=int, default=900, help="a quota below the 4-replica demand")
    p.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight per worker (judge.concurrency)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--shard", help=argparse.SUPPRESS)
    p.add_argument("--judge-url", help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from selfreward.testing.fake_gemini import fake_gemini
    from selfreward.testing.servers import redis_server

    rows = []
    with tempfile.TemporaryDirectory(prefix="judge-scaling-") as d, ExitStack() as stack:
        tmp = Path(d)
        redis_url = stack.enter_context(redis_server(tmp / "redis", appendonly=False))
        teacher = stack.enter_context(
            fake_gemini(api_key=KEY, reply=lambda m, p, b: "Clear and correct.\nScore: 4")
        )
        teacher.delay_s = args.latency_s
        common = {"concurrency": args.concurrency, "backend_concurrency": 64}
        for n in (1, 2, 4):
            rows.append(phase(tmp, redis_url, teacher, replicas=n, records=args.records, quota=args.quota,
                              limit=args.quota, **common))  # fmt: skip
            print_row(rows[-1])
        tight = phase(tmp, redis_url, teacher, replicas=4, records=args.tight_records, quota=args.tight_quota,
                      limit=args.tight_quota, **common)  # fmt: skip
        print_row(tight, "tight quota")
    demand = rows[-1]["records_per_s"] * 60
    print(
        f"teacher latency {args.latency_s} s; judge.concurrency {args.concurrency} (the teacher saw "
        f"{rows[0]['teacher_max_in_flight']} requests at once from one worker); the 4-replica "
        f"demand is {demand:.0f} requests/min, the tight quota {args.tight_quota}/min"
    )
    ratio = rows[2]["records_per_s"] / rows[0]["records_per_s"]
    print(f"ratio={ratio:.2f} over_quota={tight['over_quota_429']}")


def print_row(r: dict[str, Any], label: str = "") -> None:
    print(
        f"{label or 'scaling':11s} replicas={r['replicas']} records={r['records']} in {r['seconds']} s: "
        f"{r['records_per_s']:.1f} records/s (first request after {r['first_request_s']} s, "
        f"done {r['after_last_request_s']} s after the last) | teacher: {r['teacher_requests']} served, "
        f"{r['teacher_max_in_flight']} at once at most, peak {r['peak_in_window']} "
        f"in a 60 s window (quota {r['quota_rpm']}), 429s sent {r['over_quota_429']} | failed records "
        f"{r['failed_records']} | merged {r['merged']} | CPU ms/record "
        + ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_record"].items()),
        flush=True,
    )


if __name__ == "__main__":
    main()
