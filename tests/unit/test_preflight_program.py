"""include/training/preflight.py itself, under torchrun on this host's CPU: the settings the Slurm job passes it in the
environment (the node files' folder, the job's backend), which an image's older preflight.py ignores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PREFLIGHT = Path(__file__).resolve().parents[2] / "include" / "training" / "preflight.py"


def run_preflight(tmp_path: Path, *launcher: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            *launcher,
            str(PREFLIGHT),
            "--results",
            str(tmp_path / "preflight.json"),
            "--max-bytes",
            "65536",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "SLURMD_NODENAME": "n7", **env},
        timeout=300,
    )


def test_each_node_writes_its_result_where_the_environment_says(tmp_path: Path) -> None:
    (tmp_path / "nodes").mkdir()
    ran = run_preflight(
        tmp_path,
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"),
        DTP_PREFLIGHT_NODE_RESULTS=str(tmp_path / "nodes"),
        DTP_PREFLIGHT_BACKEND="gloo",
    )
    assert ran.returncode == 0, ran.stderr
    assert [path.name for path in (tmp_path / "nodes").iterdir()] == ["n7.json"]
    node = json.loads((tmp_path / "nodes" / "n7.json").read_text())
    assert (node["slurm_node"], node["backend"], node["rank"]) == ("n7", "gloo", 0)
    combined = json.loads((tmp_path / "preflight.json").read_text())
    assert (combined["backend"], combined["world_size"]) == ("gloo", 1)
    assert combined["ranks"][0]["probes"] == node["probes"]


def test_a_backend_it_does_not_know_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    ran = run_preflight(tmp_path, DTP_PREFLIGHT_NODE_RESULTS=str(tmp_path), DTP_PREFLIGHT_BACKEND="mpi")
    assert ran.returncode == 2
    assert "DTP_PREFLIGHT_BACKEND='mpi': the backend is nccl or gloo" in ran.stderr
    assert list(tmp_path.iterdir()) == []


def test_tf32_overrides_are_off_in_the_program_whatever_its_image_sets() -> None:
    # NGC images set TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, and pyxis keeps an image's value over the job's.
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, runpy, sys; runpy.run_path(sys.argv[1], run_name='preflight');"
            " print(os.environ['TORCH_ALLOW_TF32_CUBLAS_OVERRIDE'], os.environ['NVIDIA_TF32_OVERRIDE'])",
            str(PREFLIGHT),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1", "NVIDIA_TF32_OVERRIDE": "1"},
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["0", "0"]
