"""The README's first command, ``scripts/demo`` (``python -m dtp.local.demo``), on the running stack: it triggers
train_e2e, follows it task by task, and prints the outcome the README shows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from dtp.local.config import PROJECT_ROOT

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(1800)]


def test_the_main_job_runs_train_e2e_and_prints_its_outcome(stack) -> None:
    # 200 steps: fewer leave tiny's loss above its final_loss_max gate, and the run fails in evaluate_gates.
    conf = {"max_steps": 200, "checkpoint_interval": 100}
    demo = subprocess.run(
        [sys.executable, "-m", "dtp.local.demo", "--conf", json.dumps(conf), "--timeout", "1500"],
        capture_output=True,
        text=True,
        timeout=1700,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "plugins")},
    )
    out = demo.stdout
    assert demo.returncode == 0, out[-4000:] + demo.stderr[-4000:]
    assert re.search(r"^\[\d\d:\d\d:\d\d\] train\.run_job +success$", out, re.MULTILINE), out
    assert re.search(r"^train_e2e run manual__\S+: SUCCESS$", out, re.MULTILINE), out
    first, final = map(float, re.search(r"loss +(\d+\.\d+) -> (\d+\.\d+) over 200 steps", out).groups())
    assert final < first
    assert re.search(r"^  checkpoints +steps 100, 200$", out, re.MULTILINE), out
    assert re.search(r"^  report +s3://dtp-artifacts-\S+/report\.html$", out, re.MULTILINE), out
    assert f"{stack.airflow_url}/dags/train_e2e" in out
