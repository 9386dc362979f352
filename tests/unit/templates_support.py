"""What the template tests share: a test context for every template, and stand-ins for Slurm's commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dtp.pipeline.frameworks import template_args
from dtp.recipes import Recipe, get_recipe, instance_types

COMMON = {
    "num_nodes": 2,
    "procs_per_node": 1,
    "python": "/opt/venv/bin/python",
    "omp_threads": 1,
    "env": {"NCCL_DEBUG": "INFO"},
    "exclude_nodes": "n[3-4]",
    "container": [],
    "enroot_login": None,
}


def framework_spec(recipe: Recipe) -> dict[str, Any]:
    """What prepare_training reads of the spec of a run of ``recipe`` on its default nodes: 100 steps, a checkpoint
    every 50, a dataset of the framework's."""
    return {
        "recipe": recipe.model_dump(),
        "params": {
            "num_nodes": recipe.defaults.num_nodes,
            "max_steps": 100,
            "checkpoint_interval": 50,
            "dataset_uri": f"s3://datasets/{recipe.framework}/",
        },
        "instance": instance_types()[recipe.defaults.instance_type].model_dump(),
    }


def framework_context(recipe_name: str) -> dict[str, Any]:
    """A framework's template context, as prepare_training builds it for a shipped recipe on its default nodes."""
    return {**COMMON, **template_args(framework_spec(get_recipe(recipe_name)), {}, "/fsx/runs/r", "/fsx")}


CONTEXTS: dict[str, dict[str, Any]] = {
    "slurm/train_torchtitan.sbatch.j2": framework_context("llama3_1_8b_torchtitan"),
    "slurm/train_megatron.sbatch.j2": framework_context("llama3_1_70b_megatron"),
    "slurm/train_neuronx.sbatch.j2": framework_context("llama3_1_8b_trn1"),
    "slurm/train_picotron.sbatch.j2": framework_context("llama3_2_1b_picotron"),
    # NeMo's job runs the image's `nemo` CLI, not an interpreter.
    "slurm/train_nemo.sbatch.j2": {k: v for k, v in framework_context("llama3_1_8b_nemo").items() if k != "python"},
    "slurm/train.sbatch.j2": {
        **COMMON,
        "program": Path("/fsx/training/train.py"),
        "config_path": Path("/fsx/runs/r/train.json"),
        "max_restarts": 3,
        "nsys_dir": "/fsx/runs/r/profile",
        "stop_signal_s": 300,
        "stop_file": "/fsx/runs/r/train.stop",
    },
    "slurm/preflight.sbatch.j2": {
        **COMMON,
        "program": Path("/fsx/training/preflight.py"),
        "results_path": Path("/fsx/runs/r/preflight.json"),
        "node_results_dir": "/fsx/runs/r/preflight-nodes",
        "status_path": "/fsx/runs/r/preflight.status",
        "backend": "nccl",
        "max_bytes": 16 << 20,
        "nccl_tests_path": "/fsx/runs/r/nccl-tests.out",
        "nccl_tests_bin": "/opt/nccl-tests/build",
        "nccom_test_path": "/fsx/runs/r/nccom-test.out",
        "nccom_test_bin": "/opt/aws/neuron/bin",
        "time_minutes": 30,
    },
    "slurm/_env.sh.j2": {"omp_threads": 8, "env": {"NCCL_DEBUG": "INFO"}, "enroot_login": None},
    "slurm/slurm.conf.j2": {
        "nodes": [{"name": "n1", "port": 16001}, {"name": "n2", "port": 16002}],
        "ctld_port": 16000,
        "user": "dtp",
        "munge_socket": Path("/var/dtp/munge/munge.socket"),
        "state_dir": Path("/var/dtp/slurm"),
        "log_dir": Path("/var/dtp/logs"),
        "cpus": 2,
    },
    "ssh/sshd_config.j2": {
        "port": 16022,
        "host_key": Path("/var/dtp/ssh/host"),
        "authorized_keys": Path("/var/dtp/ssh/authorized_keys"),
        "user": "dtp",
        "slurm_conf": Path("/var/dtp/slurm/slurm.conf"),
    },
}
SHELL_TEMPLATES = [name for name in CONTEXTS if name.endswith((".sh.j2", ".sbatch.j2"))]


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """scontrol/srun stand-ins: srun records its argv, NUL-separated."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [ "$2" = hostnames ]; then echo n1; else echo "NodeName=n1 NodeAddr=10.0.0.7 State=IDLE"; fi\n'
    )
    (bin_dir / "srun").write_text(
        f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {tmp_path}/srun.argv\nenv > {tmp_path}/srun.env\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.defpath}",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_JOB_ID": "1234",
        "SLURM_NNODES": "1",
    }
