"""``python -m dtp.local.demo``: bring the stack up, run train_e2e, follow it, print the outcome.

This is the README's first command. It leaves the stack running so the run
can be browsed in the UI; ``scripts/stack down`` stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dtp.local import stack
from dtp.local.api import AirflowApi
from dtp.local.config import StackConfig
from dtp.local.daemon import StackError

DAG_ID = "train_e2e"


def _now() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S")


class Progress:
    """Prints task state changes, and the trainer's step lines once the job writes them."""

    def __init__(self, api: AirflowApi, run_id: str) -> None:
        self.api, self.run_id = api, run_id
        self.metrics_path: Path | None = None
        self.offset = 0
        self.printed_up_to = 0  # steps are logged every max_steps/100: print the first past each 50

    def on_change(self, task_id: str, state: str) -> None:
        if state in ("none", "scheduled", "queued"):
            return
        print(f"[{_now()}] {task_id:<32} {state}", flush=True)
        if task_id == "train.prepare_training" and state == "success":
            path = self.api.xcom(DAG_ID, self.run_id, task_id, key="metrics_path")
            self.metrics_path = Path(path) if path else None

    def print_steps(self) -> None:
        if self.metrics_path is None or not self.metrics_path.exists():
            return
        with self.metrics_path.open() as fh:
            fh.seek(self.offset)
            while (line := fh.readline()).endswith("\n"):  # a line still being written waits for the next poll
                self.offset = fh.tell()
                record = json.loads(line)
                if record.get("event") == "step" and record["step"] // 50 > self.printed_up_to // 50:
                    self.printed_up_to = record["step"]
                    print(
                        f"           step {record['step']:>5}  loss {record['loss']:.4f}  "
                        f"{record['tokens_per_s']:>9.0f} tokens/s",
                        flush=True,
                    )


def summarize(api: AirflowApi, run_id: str, state: str, cfg: StackConfig) -> None:
    metrics: dict[str, Any] = api.xcom(DAG_ID, run_id, "collect_metrics") or {}
    report: dict[str, Any] = api.xcom(DAG_ID, run_id, "report") or {}
    print()
    print(f"train_e2e run {run_id}: {state.upper()}")
    if metrics:
        print(
            f"  loss            {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}"
            f" over {metrics['last_step']} steps"
        )
        print(
            f"  throughput      {metrics['median_tokens_per_s']:.0f} tokens/s (median, {metrics['world_size']} ranks)"
        )
        print(f"  checkpoints     steps {', '.join(map(str, metrics['checkpoints']))}")
        print(f"  metrics         {metrics['metrics_uri']}")
    if report:
        print(f"  report          {report['uri']}")
        print(f"                  {report['url']}")
    print(f"  Airflow UI      {cfg.airflow_url}/dags/{DAG_ID}  (user admin, password in {cfg.passwords_file})")
    print("  stop the stack  scripts/stack down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conf", default="{}", help="JSON conf for the run, e.g. '{\"max_steps\": 100}'")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    cfg = StackConfig.from_env()
    print(f"[{_now()}] Bringing up the local stack (state in {cfg.home})", flush=True)
    try:
        stack.up(cfg)
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    api = AirflowApi(cfg.airflow_url, "admin", cfg.passwords()["admin"])
    api.wait_for_dag(DAG_ID)
    run_id = api.trigger(DAG_ID, json.loads(args.conf))
    print(f"[{_now()}] Triggered {DAG_ID} run {run_id}", flush=True)
    progress = Progress(api, run_id)
    state = api.wait(DAG_ID, run_id, timeout=args.timeout, on_change=progress.on_change, on_poll=progress.print_steps)
    progress.print_steps()
    summarize(api, run_id, state, cfg)
    return 0 if state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
