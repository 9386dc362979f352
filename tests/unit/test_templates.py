"""dtp.templates: every template renders with StrictUndefined, and shell templates quote every value."""

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
from typing import Any

import jinja2
import pytest

from dtp.costs import MODEL_PARAMETERS, SHARED_FS_WRITE_BYTES_PER_S
from dtp.params import TrainParams, parse_params
from dtp.pipeline import jobs
from dtp.pipeline.frameworks import dataset_dir, template_args
from dtp.pipeline.jobs import container_options
from dtp.pipeline.spec import run_spec
from dtp.platforms.pyxis import pyxis_runtime
from dtp.recipes import get_recipe, instance_types
from dtp.templates import TEMPLATE_DIR, UnsafeTemplateValue, render

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


def framework_context(recipe_name: str) -> dict[str, Any]:
    """A framework's template context, as prepare_training builds it for a shipped recipe on its default nodes."""
    recipe = get_recipe(recipe_name)
    spec = {
        "recipe": recipe.model_dump(),
        "params": {
            "num_nodes": recipe.defaults.num_nodes,
            "max_steps": 100,
            "checkpoint_interval": 50,
            "dataset_uri": f"s3://datasets/{recipe.framework}/",
        },
        "instance": instance_types()[recipe.defaults.instance_type].model_dump(),
    }
    return {**COMMON, **template_args(spec, {}, "/fsx/runs/r", "/fsx")}


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


# Platform documents, rendered and validated against their services' schemas by each platform's own tests.
PLATFORM_TEMPLATES = {
    "eks/pytorchjob.yaml.j2": "test_platform_eks.py",
    "parallelcluster/cluster-config.yaml.j2": "test_platform_parallelcluster.py",
}


def test_every_template_has_a_test_context() -> None:
    found = {str(p.relative_to(TEMPLATE_DIR)) for p in TEMPLATE_DIR.rglob("*.j2")}
    assert found - set(PLATFORM_TEMPLATES) == set(CONTEXTS)
    assert all((Path(__file__).parent / test).exists() for test in PLATFORM_TEMPLATES.values())


@pytest.mark.parametrize("name", list(CONTEXTS))
def test_template_renders(name: str) -> None:
    text = render(name, **CONTEXTS[name])
    assert text.endswith("\n")
    assert "{{" not in text and "{%" not in text


@pytest.mark.parametrize("name", list(CONTEXTS))
def test_missing_variable_raises(name: str) -> None:
    context = dict(CONTEXTS[name])
    for key in context:
        partial = {k: v for k, v in context.items() if k != key}
        with pytest.raises(jinja2.UndefinedError, match=key):
            render(name, **partial)


@pytest.mark.parametrize("name", SHELL_TEMPLATES)
def test_shell_templates_pass_bash_syntax_check(name: str) -> None:
    text = render(name, **CONTEXTS[name])
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_train_script_content() -> None:
    text = render("slurm/train.sbatch.j2", **CONTEXTS["slurm/train.sbatch.j2"])
    assert text.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=2\n" in text
    assert "#SBATCH --requeue\n" in text
    assert "#SBATCH --exclusive\n" in text  # whole nodes, as the framework templates and the reference FSDP job
    assert "set -euo pipefail\n" in text
    assert "export NCCL_DEBUG=INFO\n" in text
    assert "export OMP_NUM_THREADS=1\n" in text
    assert "ATTEMPTS=4\n" in text  # max_restarts=3: four fresh launches at most
    assert "--max-restarts=0" in text
    assert "/fsx/training/train.py --config /fsx/runs/r/train.json" in text


@pytest.mark.parametrize("recipe", ["llama3_1_8b_torchtitan", "llama3_2_1b_picotron"])
def test_jobs_that_load_the_dataset_keep_datasets_cache_on_the_shared_filesystem_beside_the_mirror(recipe: str) -> None:
    framework = get_recipe(recipe).framework
    name = f"slurm/train_{framework}.sbatch.j2"
    text = render(name, **CONTEXTS[name])
    mirror = dataset_dir("/fsx", framework, f"s3://datasets/{framework}/")
    # Beside the mirror, not in it: the mirror's stale-file removal would delete it.
    exports = [line for line in text.splitlines() if line.startswith("export HF_DATASETS_CACHE=")]
    assert exports == [f"export HF_DATASETS_CACHE={mirror}.hf_datasets_cache"]
    assert mirror.startswith("/fsx/datasets/")
    assert text.index(exports[0]) < text.index("srun --kill-on-bad-exit=1")


def test_slurm_conf_is_not_shell_quoted() -> None:
    text = render("slurm/slurm.conf.j2", **CONTEXTS["slurm/slurm.conf.j2"])
    assert "StateSaveLocation=/var/dtp/slurm/ctld\n" in text
    assert "AuthInfo=socket=/var/dtp/munge/munge.socket\n" in text
    assert "NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=16001 CPUs=2" in text
    assert "PartitionName=compute Nodes=n1,n2 " in text
    assert "'" not in text


# --- injection ------------------------------------------------------------------------------------


def hostile_context(tmp_path: Path) -> dict[str, Any]:
    return {
        **CONTEXTS["slurm/train.sbatch.j2"],
        "env": {
            "NCCL_DEBUG": f"INFO; touch {tmp_path}/p1",
            "SUBST": f"$(touch {tmp_path}/p2)",
            "BACKTICK": f"`touch {tmp_path}/p3`",
            "QUOTE": f"x'; touch {tmp_path}/p4; echo '",
            "MIXED": 'a"b $HOME \\ * ~ & |',
            "EMPTY": "",
        },
        "config_path": Path(tmp_path) / "a b" / "$(id)" / "c.json",
        "python": f"{tmp_path}/py thon",
        "nsys_dir": "",
    }


def test_dangerous_values_appear_only_single_quoted(tmp_path: Path) -> None:
    context = hostile_context(tmp_path)
    text = render("slurm/train.sbatch.j2", **context)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    for value in (context["env"]["NCCL_DEBUG"], context["env"]["SUBST"], str(context["config_path"])):
        quoted = shlex.quote(value)
        assert quoted == f"'{value}'"
        assert text.count(value) == text.count(quoted) >= 1, value
    export = next(line for line in text.splitlines() if line.startswith("export NCCL_DEBUG="))
    assert shlex.split(export) == ["export", f"NCCL_DEBUG=INFO; touch {tmp_path}/p1"]
    launch = text[text.index("srun ") : text.index(" &\n")].replace("\\\n", " ")
    argv = shlex.split(launch)
    assert argv[argv.index("--config") + 1] == str(context["config_path"])
    assert argv[1:3] == ["--kill-on-bad-exit=1", f"{tmp_path}/py thon"]


def test_export_lines_set_values_verbatim_without_side_effects(tmp_path: Path) -> None:
    context = hostile_context(tmp_path)
    text = render("slurm/train.sbatch.j2", **context)
    exports = [line for line in text.splitlines() if line.startswith("export ")]
    names = list(context["env"])
    dump = " ".join(f'"${name}"' for name in names)
    script = "\n".join([*exports, f"printf '%s\\0' {dump}"])
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path, env={"PATH": os.defpath}
    )
    assert out.stdout.split("\0")[:-1] == [context["env"][n] for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


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


def test_whole_train_script_runs_with_hostile_values_and_passes_them_as_single_arguments(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    context = hostile_context(work)
    script = tmp_path / "train.sbatch"
    script.write_text(render("slurm/train.sbatch.j2", **context))
    out = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, cwd=work, env=fake_slurm(tmp_path), check=True
    )
    assert '"rdzv": "10.0.0.7:28639"' in out.stdout  # 20000 + (1234 * 7 + 1) % 20000, first attempt
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    assert argv[argv.index("--config") + 1] == str(context["config_path"])
    assert "--rdzv_endpoint=10.0.0.7:28639" in argv and "--rdzv_id=1234-1" in argv
    env = (tmp_path / "srun.env").read_text()
    assert f"NCCL_DEBUG=INFO; touch {work}/p1\n" in env
    assert list(work.iterdir()) == []  # no pN file: nothing was executed


def test_value_with_newline_cannot_escape_a_comment(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    context = {**CONTEXTS["slurm/train.sbatch.j2"], "num_nodes": f"2\ntouch {work}/pwned #"}
    with pytest.raises(UnsafeTemplateValue, match="line break"):
        render("slurm/train.sbatch.j2", **context)
    assert list(work.iterdir()) == []


def test_excluded_nodes_reach_sbatch_and_nothing_is_excluded_by_default() -> None:
    for name in ("slurm/train.sbatch.j2", "slurm/preflight.sbatch.j2"):
        assert "#SBATCH --exclude='n[3-4]'\n" in render(name, **CONTEXTS[name])
        assert "--exclude" not in render(name, **{**CONTEXTS[name], "exclude_nodes": ""})


def test_gpu_preflight_runs_nccl_tests_one_rank_per_gpu() -> None:
    context = {**CONTEXTS["slurm/preflight.sbatch.j2"], "procs_per_node": 8, "max_bytes": 16 << 30}
    torch_only = render("slurm/preflight.sbatch.j2", **{**context, "nccl_tests_path": "", "nccom_test_path": ""})
    assert "all_reduce_perf" not in torch_only and "--no-busbw" not in torch_only
    assert "/opt/aws/neuron/bin/nccom-test" not in torch_only
    assert "#SBATCH --exclusive\n" in torch_only  # torch's all-reduce sweep needs whole nodes as much
    text = render("slurm/preflight.sbatch.j2", **context)
    assert "#SBATCH --exclusive\n" in text
    assert "--max-bytes 17179869184 --no-busbw\n" in text
    assert (
        'srun --mpi=pmix -N "$SLURM_NNODES" -n $((SLURM_NNODES * 8)) --ntasks-per-node=8 \\\n'
        "  /opt/nccl-tests/build/all_reduce_perf -b 8 -e 17179869184 -f 2 -g 1 -c 1 -n 20 "
        "> /fsx/runs/r/nccl-tests.out\n"
    ) in text


def test_nccl_tests_run_one_task_per_gpu_of_every_node_against_the_ami_s_libraries(tmp_path: Path) -> None:
    # Inside the job's allocation (one task a node) srun would otherwise start one task a node: one GPU each.
    context = {
        **CONTEXTS["slurm/preflight.sbatch.j2"],
        "procs_per_node": 8,
        "env": {},
        "nccl_tests_path": tmp_path / "nccl-tests.out",
        "nccom_test_path": "",
    }
    script = tmp_path / "preflight.sbatch"
    script.write_text(render("slurm/preflight.sbatch.j2", **context))
    env = {**fake_slurm(tmp_path), "SLURM_NNODES": "2", "LD_LIBRARY_PATH": "/usr/lib64"}
    subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]  # the last step's: nccl-tests
    assert argv[: argv.index("/opt/nccl-tests/build/all_reduce_perf")] == [
        "--mpi=pmix", "-N", "2", "-n", "16", "--ntasks-per-node=8"
    ]  # fmt: skip
    step_env = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert step_env["LD_LIBRARY_PATH"].split(":") == [
        "/opt/nccl/build/lib", "/opt/aws-ofi-nccl/lib", "/opt/amazon/efa/lib64", "/opt/amazon/openmpi/lib64",
        "/usr/lib64",
    ]  # fmt: skip
    assert step_env["FI_PROVIDER"] == "efa"


def test_trainium_preflight_runs_nccom_test_once_with_a_worker_per_neuron_core_of_every_node(tmp_path: Path) -> None:
    # nccom-test starts its workers on the hosts it is given, rooted at NEURON_RT_ROOT_COMM_ID (reference:
    # micro-benchmarks/nccom-tests/slurm/nccom-tests.sbatch); the torch step leaves the bandwidth to it.
    bin_dir = tmp_path / "neuron"
    bin_dir.mkdir()
    (bin_dir / "nccom-test").write_text('#!/bin/bash\nprintf \'%s\\0\' "$@" > argv\nenv > env\necho "size(B) table"\n')
    (bin_dir / "nccom-test").chmod(0o755)
    context = {
        **CONTEXTS["slurm/preflight.sbatch.j2"],
        "procs_per_node": 32,
        "max_bytes": 2 << 30,
        "env": {},
        "nccl_tests_path": "",
        "nccom_test_path": tmp_path / "nccom-test.out",
        "nccom_test_bin": bin_dir,
    }
    script = tmp_path / "preflight.sbatch"
    script.write_text(render("slurm/preflight.sbatch.j2", **context))
    env = {**fake_slurm(tmp_path), "SLURM_NNODES": "2"}
    subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    torch_step = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    assert torch_step[-3:] == ["--max-bytes", str(2 << 30), "--no-busbw"]
    assert (tmp_path / "argv").read_text().split("\0")[:-1] == [
        "--nworkers", "64", "--nnodes", "2", "--minbytes", "65536", "--maxbytes", str(2 << 30), "--stepfactor", "2",
        "--iters", "20", "--warmup_iters", "5", "--datatype", "fp32", "--non-interactive", "all_reduce",
        "--hosts", "n1",
    ]  # fmt: skip
    tool_env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert tool_env["NEURON_RT_ROOT_COMM_ID"] == "10.0.0.7:28639"  # the first node, beside torch's rendezvous port
    assert tool_env["FI_PROVIDER"] == "efa"
    assert (tmp_path / "nccom-test.out").read_text() == "size(B) table\n"
    assert "all_reduce_perf" not in script.read_text()


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


def test_the_preflight_job_has_a_time_limit() -> None:
    # It takes whole nodes (--exclusive): a sweep that hangs, or outlives a deleted run, must not keep them.
    for nccl_tests_path in ("", "/fsx/runs/r/nccl-tests.out"):
        text = render(
            "slurm/preflight.sbatch.j2", **{**CONTEXTS["slurm/preflight.sbatch.j2"], "nccl_tests_path": nccl_tests_path}
        )
        assert "\n#SBATCH --time=30\n" in text


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


@pytest.mark.parametrize("name", [name for name in SHELL_TEMPLATES if name.endswith(".sbatch.j2")])
def test_every_job_runs_python_unbuffered(name: str) -> None:
    """Log lines reach the job's log as they are printed, not in 8 KiB bursts whose last one a killed step loses."""
    assert "\nexport PYTHONUNBUFFERED=1\n" in render(name, **CONTEXTS[name])


def test_the_training_step_gets_python_unbuffered(tmp_path: Path) -> None:
    script = tmp_path / "train.sbatch"
    script.write_text(render("slurm/train.sbatch.j2", **CONTEXTS["slurm/train.sbatch.j2"]))
    subprocess.run(["bash", str(script)], capture_output=True, cwd=tmp_path, env=fake_slurm(tmp_path), check=True)
    assert "PYTHONUNBUFFERED=1" in (tmp_path / "srun.env").read_text().splitlines()
