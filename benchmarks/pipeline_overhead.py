"""Orchestration overhead of train_e2e: run wall time vs the critical path of task durations.

Runs the DAG once through the real scheduler on the local stack (which must be
up: ``scripts/stack up``), then computes the longest path through the task
graph weighted by each task's duration (deferred time included). The
difference is what Airflow itself adds: scheduling, queuing, deferral
hand-offs. Writes benchmarks/results/pipeline_overhead.json.

    PYTHONPATH=plugins .venv/bin/python benchmarks/pipeline_overhead.py [--conf '{"max_steps": 300}']
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from dtp.local.api import AirflowApi
from dtp.local.config import StackConfig

DAG_ID = "train_e2e"
OUT = Path(__file__).parent / "results" / "pipeline_overhead.json"


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def critical_path(durations: dict[str, float], upstream: dict[str, set[str]]) -> tuple[float, list[str]]:
    @cache
    def longest(task: str) -> tuple[float, tuple[str, ...]]:
        best = max((longest(u) for u in upstream.get(task, ())), default=(0.0, ()))
        return best[0] + durations.get(task, 0.0), (*best[1], task)

    total, path = max(longest(t) for t in durations)
    return total, list(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conf", default="{}", help="run conf (JSON); the default runs train_e2e as the demo does")
    args = parser.parse_args()
    cfg = StackConfig.from_env()
    api = AirflowApi(cfg.airflow_url, "admin", cfg.passwords()["admin"])
    started = time.monotonic()
    run_id = api.trigger(DAG_ID, json.loads(args.conf))
    state = api.wait(DAG_ID, run_id)
    client_wall = time.monotonic() - started
    _, run = api.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id.replace('+', '%2B').replace(':', '%3A')}")
    tis = api.task_instances(DAG_ID, run_id)
    _, graph = api.request("GET", f"/api/v2/dags/{DAG_ID}/tasks")
    upstream: dict[str, set[str]] = {}
    for t in graph["tasks"]:
        for down in t["downstream_task_ids"]:
            upstream.setdefault(down, set()).add(t["task_id"])
    # Wall time of each task from its first start to its end, so deferral and reschedule waits count as work.
    durations = {
        ti["task_id"]: _ts(ti["end_date"]) - _ts(ti["start_date"]) for ti in tis if ti["start_date"] and ti["end_date"]
    }
    path_seconds, path = critical_path(durations, upstream)
    wall = _ts(run["end_date"]) - _ts(run["start_date"])
    result = {
        "benchmark": "train_e2e orchestration overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, local profile (LocalExecutor, parallelism 4)",
        "conf": json.loads(args.conf),
        "state": state,
        "run_wall_seconds": round(wall, 1),
        "client_wall_seconds": round(client_wall, 1),
        "critical_path_seconds": round(path_seconds, 1),
        "overhead_seconds": round(wall - path_seconds, 1),
        "overhead_ratio": round((wall - path_seconds) / wall, 3),
        "sum_task_seconds": round(sum(durations.values()), 1),
        "critical_path": path,
        "task_seconds": {k: round(v, 1) for k, v in sorted(durations.items())},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("task_seconds", "critical_path")}, indent=1))


if __name__ == "__main__":
    main()
