"""benchmarks/trainer_mfu.py's CPU smoke path: the GPU benchmark runs end to end and writes its JSON; torchtitan's
side, which needs CUDA, is recorded as not run; a side that fails is recorded, not fatal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_measures_and_profiles_the_trainer_after_warm_up(tmp_path: Path) -> None:
    out = tmp_path / "trainer_mfu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "trainer_mfu.py"), "--smoke", "--profile", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["peak_flops"] is None
    [run] = result["results"]
    assert run["shape"] == {
        "model": "tiny",
        "seq_len": 64,
        "micro_batch": 4,
        "precision": "fp32",
        "warmup_steps": 3,
        "measured_steps": 6,
    }
    ours = run["dtp"]
    assert ours["status"] == "ran", ours
    assert ours["steps_measured"] == 6 and ours["tokens_per_s_per_device"] > 0 and ours["peak_memory_mb"] > 0
    assert ours["mfu"] is None  # no known peak FLOPs for a CPU: not a made-up number
    # --profile: the trainer's profiled warm-up steps, summarized by kind of work.
    assert ours["profile"]["source"] == "host operators" and ours["profile"]["by_kind_ms"]["matmul"] > 0
    assert run["torchtitan"] == {"status": "not run", "reason": "torchtitan trains on CUDA devices only"}
    assert run["ratio_tokens_per_s"] is None


def test_a_side_that_fails_is_recorded_with_its_reason_and_the_run_goes_on(trainer_mfu: ModuleType) -> None:
    shape = trainer_mfu.Shape("no_such_model", 64, 4, "fp32", 1, 1)
    run = trainer_mfu.measure(shape, compile_=False, profile=False, torchtitan_python=None)
    assert run["dtp"]["status"] == "failed"
    assert run["dtp"]["reason"].startswith("exit ") and "no_such_model" in run["dtp"]["reason"]
    assert run["torchtitan"]["status"] == "not run" and run["ratio_tokens_per_s"] is None
