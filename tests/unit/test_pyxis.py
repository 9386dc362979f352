"""dtp.platforms.pyxis: the image reference pyxis hands to enroot is one the enroot the nodes run can import, and the
Slurm job's preamble gives enroot its login to ECR (rendering and running the batch script here: no enroot)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dtp.form_params import parse_params
from dtp.params import TrainParams
from dtp.pipeline import jobs
from dtp.pipeline.jobs import container_options
from dtp.pipeline.spec import run_spec
from dtp.platforms.pyxis import enroot_image, pyxis_runtime

DIGEST = "sha256:" + "ab" * 32
ECR_IMAGE = f"111122223333.dkr.ecr.eu-west-2.amazonaws.com/dtp/training@{DIGEST}"
# Its line of enroot's .credentials: enroot runs the password's command when it imports (doc/cmd/import.md).
ECR_LOGIN = (
    "machine 111122223333.dkr.ecr.eu-west-2.amazonaws.com login AWS password "
    "$(aws ecr get-login-password --region eu-west-2)"
)
# The local profile's loopback registry, which needs no login.
LOOPBACK_IMAGE = f"127.0.0.1:5000/dtp/training@{DIGEST}"

# enroot's grammar of a docker:// reference, from docker::import in src/docker.sh at v3.5.0, the version
# images/packer/versions.pkrvars.hcl pins (identical at v3.4.1, which HyperPod's reference base-config installs):
#   docker://[<user>@][<registry>#]<image>[:<tag>]
ENROOT_3_5_0_PARSE = r"""
reg_user="[[:alnum:]_.!~*\'()%\;:\&=+$,-@]+"
reg_registry="[^#]+"
reg_image="[[:lower:][:digit:]/._-]+"
reg_tag="[[:alnum:]._:-]+"
if [[ "${uri}" =~ ^docker://((${reg_user})@)?((${reg_registry})#)?(${reg_image})(:(${reg_tag}))?$ ]]; then
    printf '%s\n' "${BASH_REMATCH[4]}" "${BASH_REMATCH[5]}" "${BASH_REMATCH[7]}"
else
    echo "Invalid image reference: ${uri}" >&2
    exit 1
fi
"""


def enroot_parse(container_image: str) -> list[str] | None:
    """(registry, image, tag) as enroot 3.5.0 reads pyxis's ``--container-image``, which pyxis prefixes with
    ``docker://`` (pyxis_slurmstepd.c, enroot_container_create, at v0.20.0); None where enroot refuses it."""
    out = subprocess.run(
        ["bash", "-c", ENROOT_3_5_0_PARSE],
        env={"uri": f"docker://{container_image}", "PATH": os.defpath},
        capture_output=True,
        text=True,
    )
    return out.stdout.splitlines() if out.returncode == 0 else None


def test_enroot_3_imports_the_published_image_by_its_digest() -> None:
    image_option = container_options(pyxis_runtime(ECR_IMAGE), "/fsx")[0]
    assert image_option.startswith("--container-image=")
    # enroot asks the registry for /v2/<image>/manifests/<tag>: the digest there pins the image as a tag cannot.
    assert enroot_parse(image_option.removeprefix("--container-image=")) == [
        "111122223333.dkr.ecr.eu-west-2.amazonaws.com",
        "dtp/training",
        DIGEST,
    ]


def test_enroot_3_refuses_docker_s_digest_syntax() -> None:
    # What pyxis was given before: enroot 3.x has no @digest, so no containerised job could start.
    assert enroot_parse(f"111122223333.dkr.ecr.eu-west-2.amazonaws.com#dtp/training@{DIGEST}") is None


def test_an_image_not_pinned_by_digest_is_refused() -> None:
    with pytest.raises(ValueError, match="not an image pinned by digest"):
        enroot_image("111122223333.dkr.ecr.eu-west-2.amazonaws.com/dtp/training:latest")


def test_only_an_ecr_image_comes_with_an_enroot_login() -> None:
    assert pyxis_runtime(ECR_IMAGE)["enroot_credentials"] == ECR_LOGIN
    china = pyxis_runtime(f"111122223333.dkr.ecr.cn-north-1.amazonaws.com.cn/dtp/training@{DIGEST}")
    assert china["enroot_credentials"].endswith("--region cn-north-1)")
    assert "enroot_credentials" not in pyxis_runtime(LOOPBACK_IMAGE)
    assert "enroot_credentials" not in pyxis_runtime(f"registry.example.com/dtp/training@{DIGEST}")


def training_script(tmp_path: Path, runtime: dict[str, Any]) -> tuple[Path, Path]:
    """The batch script prepare_training writes for a ParallelCluster run with ``runtime``, and the run's folder."""
    conf = {
        "platform": "parallelcluster",
        "recipe": "llama3_1_8b",
        "instance_type": "p5.48xlarge",
        "num_nodes": 2,
        "dataset_uri": "s3://datasets/fsdp/",
    }
    spec = run_spec(parse_params(TrainParams, conf), "train_e2e", "manual__2026-12-02")
    cluster = {"platform": "parallelcluster", "scheduler": "slurm", "shared_dir": str(tmp_path / "fsx")}
    job = jobs.prepare_training(spec, cluster, runtime, {"train_bin": "/fsx/data/train.bin"})
    return Path(job["script_path"]), tmp_path / "fsx" / "runs" / spec["names"]["run_key"]


def run_batch_script(script: Path, tmp_path: Path) -> dict[str, str]:
    """Run ``script`` as Slurm's job 1234 with scontrol and srun stand-ins; the environment srun was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\n[ "$2" = hostnames ] && echo n1 || echo "NodeName=n1 NodeAddr=10.0.0.7"\n'
    )
    (bin_dir / "srun").write_text(f"#!/bin/bash\nenv -0 > {tmp_path}/srun.env\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {"PATH": f"{bin_dir}:{os.defpath}", "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"}
    subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, check=True, capture_output=True)
    pairs = (entry.split("=", 1) for entry in (tmp_path / "srun.env").read_text().split("\0") if entry)
    return dict(pairs)


def test_an_ecr_image_s_job_gives_enroot_its_own_login_with_a_fresh_token_on_each_node(tmp_path: Path) -> None:
    script, workdir = training_script(tmp_path, pyxis_runtime(ECR_IMAGE))
    step_env = run_batch_script(script, tmp_path)
    config_path = workdir / "enroot" / "1234"
    # pyxis passes the job's ENROOT_CONFIG_PATH to enroot import (it is not on pyxis's enroot_deny_env list).
    assert step_env["ENROOT_CONFIG_PATH"] == str(config_path)
    credentials = config_path / ".credentials"
    assert credentials.read_text() == ECR_LOGIN + "\n"  # the token is asked for at import, not when the job starts
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "runtime",
    [
        pyxis_runtime(LOOPBACK_IMAGE),
        # The local platform's runtime: the image unpacked on the shared filesystem, no container runtime.
        {
            "source": f"image {LOOPBACK_IMAGE}",
            "image": LOOPBACK_IMAGE,
            "python": "/opt/venv/bin/python",
            "training_dir": "/fsx/images/abab/rootfs/opt/dtp/training",
        },
    ],
    ids=["pyxis", "local"],
)
def test_a_job_whose_image_needs_no_login_gives_enroot_none(tmp_path: Path, runtime: dict[str, Any]) -> None:
    script, workdir = training_script(tmp_path, runtime)
    assert "ENROOT_CONFIG_PATH" not in script.read_text()
    assert "ENROOT_CONFIG_PATH" not in run_batch_script(script, tmp_path)
    assert not (workdir / "enroot").exists()
