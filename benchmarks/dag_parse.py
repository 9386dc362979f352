"""Import time of each DAG file, in a fresh interpreter each time (what a dag-processor child pays).

Reports the median of N runs per file, and the same for a bare ``import airflow.sdk`` as the baseline,
so the DAG file's own cost is the difference. Writes benchmarks/results/dag_parse.json.

    .venv/bin/python benchmarks/dag_parse.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "dag_parse.json"
PROBE = """
import time, runpy, sys
t = time.perf_counter()
{body}
print(time.perf_counter() - t)
"""


def timed(body: str, runs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    samples = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True, env=env, check=True
        )
        samples.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    baseline = timed("import airflow.sdk; from airflow.sdk import DAG, task, Param", args.runs)
    files = {}
    for path in sorted((ROOT / "dags").glob("*.py")):
        total = timed(f"runpy.run_path({str(path)!r})", args.runs)
        files[path.name] = {"median_seconds": round(total, 3), "beyond_airflow_sdk_seconds": round(total - baseline, 3)}
    result = {
        "benchmark": "DAG file import time (fresh interpreter, median)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": args.runs,
        "airflow_sdk_import_seconds": round(baseline, 3),
        "files": files,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
