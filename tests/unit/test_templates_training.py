"""The training job's templates (slurm/train*.sbatch.j2), also as prepare_training writes them: nsys around the launch,
a pyxis container, the run's directory and a private script, and Slurm's early signal ahead of the time limit."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from templates_support import CONTEXTS, fake_slurm

from dtp.costs import MODEL_PARAMETERS, SHARED_FS_WRITE_BYTES_PER_S
from dtp.form_params import parse_params
from dtp.params import TrainParams
from dtp.pipeline import jobs
from dtp.pipeline.jobs import container_options
from dtp.pipeline.spec import run_spec
from dtp.platforms.pyxis import pyxis_runtime
from dtp.templates import render


def test_nsys_wraps_the_launch_only_when_profiling_on_gpu_nodes() -> None:
    context = CONTEXTS["slurm/train.sbatch.j2"]
    text = render("slurm/train.sbatch.j2", **context)
    assert "export NSYS_OUTPUT=/fsx/runs/r/profile/nsys-%h\n" in text
    assert 'srun --kill-on-bad-exit=1 "${NSYS[@]}" /opt/venv/bin/python -m torch.distributed.run' in text
    assert "nsys" not in render("slurm/train.sbatch.j2", **{**context, "nsys_dir": ""})


@pytest.mark.parametrize("nsys_in_the_step", [True, False])
def test_nsys_is_looked_for_where_the_launch_runs_not_on_the_batch_host(tmp_path: Path, nsys_in_the_step: bool) -> None:
    """Under pyxis nsys runs in the container: the launch step looks for it there. The batch host has an nsys that
    must not count; the step's own PATH decides."""
    context = {**CONTEXTS["slurm/train.sbatch.j2"], "nsys_dir": str(tmp_path / "profile"), "stop_signal_s": 0}
    script = tmp_path / "train.sbatch"
    script.write_text(render("slurm/train.sbatch.j2", **context))
    env = fake_slurm(tmp_path)
    host_nsys = Path(env["PATH"].split(":")[0]) / "nsys"
    host_nsys.write_text("#!/bin/bash\nexit 0\n")
    host_nsys.chmod(0o755)
    subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    launched = argv[argv.index("bash") :]
    # The step: its PATH has an nsys (recording its arguments) or none; "python" records how it was started.
    step_bin = tmp_path / "step-bin"
    step_bin.mkdir()
    (step_bin / "python").write_text(f"#!/bin/bash\necho python >> {tmp_path}/ran\n")
    if nsys_in_the_step:
        (step_bin / "nsys").write_text(f'#!/bin/bash\necho "nsys $*" >> {tmp_path}/ran\n')
    for tool in step_bin.iterdir():
        tool.chmod(0o755)
    step_env = {"PATH": f"{step_bin}:/usr/bin:/bin", "NSYS_OUTPUT": "/fsx/p/nsys-%h"}
    launched[launched.index(context["python"])] = "python"
    subprocess.run(launched, env=step_env, check=True)
    ran = (tmp_path / "ran").read_text().splitlines()
    if nsys_in_the_step:
        [line] = ran
        assert (
            line.startswith("nsys profile --capture-range=cudaProfilerApi ")
            and "--output /fsx/p/nsys-%h python" in line
        )
    else:
        assert ran == ["python"]


def test_a_pyxis_runtime_runs_every_training_step_in_its_container() -> None:
    runtime = pyxis_runtime("111122223333.dkr.ecr.us-east-1.amazonaws.com/dtp/training@sha256:" + "ab" * 32)
    options = container_options(runtime, "/fsx")
    assert options == [
        "--container-image=111122223333.dkr.ecr.us-east-1.amazonaws.com#dtp/training:sha256:" + "ab" * 32,
        "--container-mounts=/fsx:/fsx",
    ]
    assert container_options({"python": "/usr/bin/python3"}, "/fsx") == []
    for name in ("slurm/train.sbatch.j2", "slurm/preflight.sbatch.j2", "slurm/train_torchtitan.sbatch.j2"):
        text = render(name, **{**CONTEXTS[name], "container": options})
        launches = [line for line in text.splitlines() if "srun --kill-on-bad-exit=1" in line]
        assert launches and all(f"{shlex.join(options)} " in line for line in launches), name
        assert "--container-image" not in render(name, **CONTEXTS[name])


def test_a_framework_job_starts_in_the_run_s_directory_in_its_container_and_its_script_is_private(
    tmp_path: Path,
) -> None:
    conf = {
        "platform": "parallelcluster",
        "recipe": "llama3_2_1b_picotron",
        "instance_type": "p5.48xlarge",
        "num_nodes": 2,
        "dataset_uri": "s3://datasets/picotron/",
        "extra_env": {"HF_TOKEN": "hf_secret"},
    }
    spec = run_spec(parse_params(TrainParams, conf), "train_e2e", "manual__2026-12-02")
    cluster = {"platform": "parallelcluster", "scheduler": "slurm", "shared_dir": str(tmp_path)}
    runtime = pyxis_runtime("111122223333.dkr.ecr.us-east-1.amazonaws.com/dtp/training@sha256:" + "ab" * 32)
    job = jobs.prepare_training(spec, cluster, runtime, {})
    workdir = tmp_path / "runs" / spec["names"]["run_key"]
    text = Path(job["script_path"]).read_text()
    # picotron reads ./hf_model_safetensors, which the script links into the run's directory, not the image's.
    launches = [line for line in text.splitlines() if "srun --kill-on-bad-exit=1" in line]
    assert launches and all(f"--container-workdir={workdir} " in line for line in launches)
    # The script exports the run's extra_env: only its owner, who submits it, may read it.
    assert "export HF_TOKEN=hf_secret\n" in text
    assert stat.S_IMODE(os.stat(job["script_path"]).st_mode) == 0o700


def test_slurm_s_early_signal_has_the_trainer_stop_and_the_job_wait_for_its_time_limit(tmp_path: Path) -> None:
    """USR1, which Slurm sends the batch shell alone (B:) ahead of the time limit, creates the stop file the
    trainer's ranks read; the launch the trainer then ends is not relaunched, and the job waits for Slurm to end it
    at its limit (TIMEOUT, as without the signal)."""
    stop_file = tmp_path / "train.stop"
    context = {**CONTEXTS["slurm/train.sbatch.j2"], "nsys_dir": "", "stop_file": str(stop_file)}
    text = render("slurm/train.sbatch.j2", **context)
    assert "#SBATCH --signal=B:USR1@300\n" in text
    assert "sleep infinity" not in text
    script = tmp_path / "train.sbatch"
    script.write_text(text.replace("sleep 30\n", "sleep 0.1\n"))  # its wait's lines, sooner
    env = fake_slurm(tmp_path)
    stop_file.touch()  # left by an earlier job of the run: removed before training starts
    # The launch: the trainer saves and exits once the stop file is there.
    (Path(env["PATH"].split(":")[0]) / "srun").write_text(
        f"#!/bin/bash\necho launched >> {tmp_path}/launches\nwhile [ ! -e {stop_file} ]; do sleep 0.05; done\nexit 1\n"
    )
    log = tmp_path / "job.out"
    with log.open("w") as out:
        job = subprocess.Popen(
            ["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "launches").exists():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert not stop_file.exists()
        job.send_signal(signal.SIGUSR1)
        while '"event": "stopped_for_time_limit"' not in log.read_text():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        assert job.poll() is None, log.read_text()  # still there, for Slurm to end at the limit
        # ... and not silent meanwhile, which the task's hang detection would take for a hang.
        assert '"event": "waiting_for_time_limit"' in log.read_text()
        assert (tmp_path / "launches").read_text() == "launched\n"
        assert "launch_failed" not in log.read_text()
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the script and its sleep
        job.wait()


def test_no_early_signal_without_a_stop_lead() -> None:
    text = render("slurm/train.sbatch.j2", **{**CONTEXTS["slurm/train.sbatch.j2"], "stop_signal_s": 0})
    assert "#SBATCH --signal" not in text and "STOP_FILE" not in text and "\ntrap " not in text


@pytest.mark.parametrize(("instance_type", "signalled"), [("p5.48xlarge", True), ("m5.2xlarge", False)])
def test_prepare_training_has_slurm_signal_a_gpu_job_in_time_for_its_checkpoint(
    tmp_path: Path, instance_type: str, signalled: bool
) -> None:
    """A GPU job is signalled ahead of its time limit by the checkpoint's expected write (12 bytes a parameter at
    the default FSx's baseline), the step in progress and the stop check, and a margin; a CPU job keeps SIGTERM."""
    conf = {
        "platform": "parallelcluster",
        "recipe": "llama3_2_1b",
        "instance_type": instance_type,
        "num_nodes": 2,
        "dataset_uri": "s3://datasets/fsdp/",
    }
    spec = run_spec(parse_params(TrainParams, conf), "train_e2e", "manual__2026-12-02")
    cluster = {"platform": "parallelcluster", "scheduler": "slurm", "shared_dir": str(tmp_path)}
    job = jobs.prepare_training(spec, cluster, {"python": "/usr/bin/python3"}, {"train_bin": "/fsx/train.bin"})
    text = Path(job["script_path"]).read_text()
    workdir = tmp_path / "runs" / spec["names"]["run_key"]
    config = json.loads((workdir / "train.json").read_text())
    assert config["stop_file"] == f"{workdir}/train.stop"
    write_s = math.ceil(MODEL_PARAMETERS["llama3_2_1b"] * 12 / SHARED_FS_WRITE_BYTES_PER_S)
    assert config["checkpoint_timeout_s"] == max(1800, 2 * write_s)
    if signalled:
        lead = write_s + math.ceil(spec["recipe"]["expected_step_seconds"]) + jobs.STOP_CHECK_SECONDS + 60
        assert f"\n#SBATCH --signal=B:USR1@{lead}\n" in text
        assert f"STOP_FILE={workdir}/train.stop\n" in text
    else:
        assert "#SBATCH --signal" not in text
