"""The run's metrics: one JSON line per record, on the job's log and appended to the run's ``metrics_path``."""

from __future__ import annotations

import json
from pathlib import Path


def emit(record: dict, metrics_path: Path) -> None:
    """Print ``record`` as one JSON line and append the line to ``metrics_path``."""
    line = json.dumps(record)
    print(line, flush=True)
    with metrics_path.open("a") as fh:
        fh.write(line + "\n")
