"""The preflight job's template (slurm/preflight.sbatch.j2): torch's all-reduce sweep, nccl-tests with one rank per
GPU against the AMI's libraries, nccom-test with a worker per NeuronCore on Trainium, and the job's time limit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from templates_support import CONTEXTS, fake_slurm

from dtp.templates import render


def job_files(folder: Path) -> dict[str, Path]:
    """The paths of what the job writes besides a collective test's output, in ``folder``: a script the tests run
    must not write to the context's /fsx."""
    return {
        "results_path": folder / "preflight.json",
        "node_results_dir": folder / "preflight-nodes",
        "status_path": folder / "preflight.status",
    }


def test_gpu_preflight_runs_nccl_tests_one_rank_per_gpu() -> None:
    context = {**CONTEXTS["slurm/preflight.sbatch.j2"], "procs_per_node": 8, "max_bytes": 16 << 30}
    torch_only = render("slurm/preflight.sbatch.j2", **{**context, "nccl_tests_path": "", "nccom_test_path": ""})
    assert "all_reduce_perf" not in torch_only and "--no-busbw" not in torch_only
    assert "/opt/aws/neuron/bin/nccom-test" not in torch_only
    assert "#SBATCH --exclusive\n" in torch_only  # torch's all-reduce sweep needs whole nodes as much
    text = render("slurm/preflight.sbatch.j2", **context)
    assert "#SBATCH --exclusive\n" in text
    assert "--max-bytes 17179869184 --no-busbw || torch_rc=$?\n" in text
    assert (
        'srun --mpi=pmix -N "$SLURM_NNODES" -n $((SLURM_NNODES * 8)) --ntasks-per-node=8 \\\n'
        "  /opt/nccl-tests/build/all_reduce_perf -b 8 -e 17179869184 -f 2 -g 1 -c 1 -n 20 "
        "| tee /fsx/runs/r/nccl-tests.out \\\n  || nccl_tests_rc=$?\n"
    ) in text


def test_nccl_tests_run_one_task_per_gpu_of_every_node_against_the_ami_s_libraries(tmp_path: Path) -> None:
    # Inside the job's allocation (one task a node) srun would otherwise start one task a node: one GPU each.
    context = {
        **CONTEXTS["slurm/preflight.sbatch.j2"],
        "procs_per_node": 8,
        "env": {},
        **job_files(tmp_path),
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
        **job_files(tmp_path),
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


def test_the_preflight_job_has_a_time_limit() -> None:
    # It takes whole nodes (--exclusive): a sweep that hangs, or outlives a deleted run, must not keep them.
    for nccl_tests_path in ("", "/fsx/runs/r/nccl-tests.out"):
        text = render(
            "slurm/preflight.sbatch.j2", **{**CONTEXTS["slurm/preflight.sbatch.j2"], "nccl_tests_path": nccl_tests_path}
        )
        assert "\n#SBATCH --time=30\n" in text


def test_a_failed_check_is_recorded_and_the_job_still_ends_completed(tmp_path: Path) -> None:
    # A node whose GPU cannot be opened fails the torch step; the job goes on to nccl-tests and ends with exit 0
    # (COMPLETED), its status file holding the job's nodes and each step's exit code for the gate.
    run = tmp_path / "run"
    (run / "preflight-nodes").mkdir(parents=True)
    (run / "preflight.json").write_text("{}")  # an earlier try's
    (run / "preflight-nodes" / "n9.json").write_text("{}")
    (run / "preflight.status").write_text("nodes=n9\ntorch_rc=0\n")
    context = {
        **CONTEXTS["slurm/preflight.sbatch.j2"],
        "procs_per_node": 8,
        "env": {},
        **job_files(run),
        "nccl_tests_path": run / "nccl-tests.out",
        "nccom_test_path": "",
    }
    script = tmp_path / "preflight.sbatch"
    script.write_text(render("slurm/preflight.sbatch.j2", **context))
    env = fake_slurm(tmp_path)
    # The torch step fails with 1 and records its environment; nccl-tests prints its table and fails with 3.
    (tmp_path / "bin" / "srun").write_text(
        "#!/bin/bash\n"
        f'if [[ "$*" == *preflight.py* ]]; then env > {tmp_path}/torch.env;'
        f" printf '%s\\0' \"$@\" > {tmp_path}/torch.argv; exit 1; fi\n"
        f'env > {tmp_path}/nccl.env; echo "#  8  2  float  sum  -1  9.1  0.00  0.00  0"; exit 3\n'
    )
    ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr
    assert (run / "preflight.status").read_text() == "nodes=n1\ntorch_rc=1\nnccl_tests_rc=3\n"
    assert not (run / "preflight.json").exists() and list((run / "preflight-nodes").iterdir()) == []
    # nccl-tests' table is in the job's log (the hang detector reads it) and in its file.
    assert "#  8  2  float" in ran.stdout and (run / "nccl-tests.out").read_text().startswith("#  8  2  float")
    torch_env = dict(line.split("=", 1) for line in (tmp_path / "torch.env").read_text().splitlines() if "=" in line)
    assert torch_env["DTP_PREFLIGHT_BACKEND"] == "nccl"
    assert torch_env["DTP_PREFLIGHT_NODE_RESULTS"] == str(run / "preflight-nodes")
    assert "DTP_PREFLIGHT_" not in (tmp_path / "nccl.env").read_text()  # the torch step's alone


# preflight.py as images published before the node files carry it: its options are these three, and any other
# ends it with argparse's exit 2 before it writes anything.
OLD_PREFLIGHT = """\
import argparse, json, os
parser = argparse.ArgumentParser()
parser.add_argument("--results", required=True)
parser.add_argument("--max-bytes", type=int)
parser.add_argument("--no-busbw", action="store_true")
args = parser.parse_args()
with open(args.results, "w") as fh:
    json.dump({"backend": "gloo", "world_size": 1, "ranks": [{"slurm_node": os.environ["SLURMD_NODENAME"]}]}, fh)
"""


def test_an_image_s_preflight_py_from_before_the_node_files_still_writes_its_results(tmp_path: Path) -> None:
    # The image's own preflight.py runs (pyxis images, the local unpacked one): the job's new settings must not be
    # options it refuses. It writes the combined results and no node file, which the gate judges alone.
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "preflight.py").write_text(OLD_PREFLIGHT)
    context = {
        **CONTEXTS["slurm/preflight.sbatch.j2"],
        "env": {},
        "python": tmp_path / "torchrun-python",
        "program": tmp_path / "preflight.py",
        **job_files(run),
        "nccl_tests_path": "",
        "nccom_test_path": "",
    }
    script = tmp_path / "preflight.sbatch"
    script.write_text(render("slurm/preflight.sbatch.j2", **context))
    env = {**fake_slurm(tmp_path), "SLURMD_NODENAME": "n1"}
    # srun runs its command on this host; `python -m torch.distributed.run` runs the program after its own options.
    (tmp_path / "bin" / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (tmp_path / "torchrun-python").write_text(
        f'#!/bin/bash\nshift 2\nwhile [[ "$1" == -* ]]; do shift; done\nexec {sys.executable} "$@"\n'
    )
    (tmp_path / "torchrun-python").chmod(0o755)
    ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr
    assert (run / "preflight.status").read_text() == "nodes=n1\ntorch_rc=0\n", ran.stderr
    assert json.loads((run / "preflight.json").read_text())["ranks"] == [{"slurm_node": "n1"}]
    assert list((run / "preflight-nodes").iterdir()) == []


def test_a_try_slurm_ends_during_the_torch_step_leaves_no_exit_code_and_no_earlier_try_s_output(
    tmp_path: Path,
) -> None:
    # Slurm ends the batch script (the time limit, a node lost) while torch runs: the status file shows the step
    # unfinished, and the earlier try's nccl-tests table is gone rather than judged as this try's.
    run = tmp_path / "run"
    run.mkdir()
    (run / "nccl-tests.out").write_text("#  8  2  float  sum  -1  9.1  0.00  0.00  0\n")  # an earlier try's
    (run / "preflight.status").write_text("nodes=n1\ntorch_rc=0\nnccl_tests_rc=0\n")
    context = {
        **CONTEXTS["slurm/preflight.sbatch.j2"],
        "env": {},
        **job_files(run),
        "nccl_tests_path": run / "nccl-tests.out",
        "nccom_test_path": "",
    }
    script = tmp_path / "preflight.sbatch"
    script.write_text(render("slurm/preflight.sbatch.j2", **context))
    env = fake_slurm(tmp_path)
    (tmp_path / "bin" / "srun").write_text("#!/bin/bash\nkill -KILL $PPID\n")  # the batch script
    ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ran.returncode == -signal.SIGKILL
    assert (run / "preflight.status").read_text() == "nodes=n1\n"
    assert not (run / "nccl-tests.out").exists()


def test_a_job_that_cannot_start_its_steps_still_fails(tmp_path: Path) -> None:
    # Only a check's failure is recorded: a broken preamble (here, no scontrol to find the rendezvous host) fails
    # the job as before.
    context = {
        **CONTEXTS["slurm/preflight.sbatch.j2"],
        **job_files(tmp_path),
        "nccl_tests_path": "",
        "nccom_test_path": "",
    }
    script = tmp_path / "preflight.sbatch"
    script.write_text(render("slurm/preflight.sbatch.j2", **context))
    env = fake_slurm(tmp_path)
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/bash\nexit 1\n")
    ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ran.returncode != 0
    assert not (tmp_path / "srun.argv").exists()
