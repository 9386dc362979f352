"""On the local Slurm cluster, whose two nodes outlive runs, a one-node run trains on the node its preflight
checked, though another is idle by then (the one Slurm would pick first); requeued once that node takes no jobs, it is
unpinned from it and runs on the other."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from airflow.sdk.exceptions import TaskDeferred
from slurm_support import XComSink, resume_node

from dtp.form_params import parse_params
from dtp.hooks.slurm import SlurmHook
from dtp.hostlist import expand_hostlist
from dtp.operators.slurm import SlurmSubmitJobOperator, submit_prepared_slurm_job
from dtp.params import TrainParams
from dtp.pipeline import jobs, results
from dtp.pipeline.data import SAMPLE_CORPUS
from dtp.pipeline.run_dirs import run_dir
from dtp.pipeline.spec import run_spec
from dtp.platforms import get_platform
from dtp.triggers.slurm import SlurmJobTrigger

pytestmark = pytest.mark.stack
Cancel = Callable[[str], str]


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(1)


def test_training_runs_on_the_node_preflight_checked(workdir: Path, cancel_after: Cancel, first_event) -> None:
    hook = SlurmHook()
    spec = run_spec(parse_params(TrainParams, {"num_nodes": 1}), "train_e2e", f"it__{uuid.uuid4().hex[:8]}")
    assert spec["params"]["platform"] == "local"
    cluster = get_platform("local").provision(spec, {})
    assert cluster["nodes"] > spec["params"]["num_nodes"]  # else training could land nowhere else anyway
    # n1 is busy while preflight runs, so preflight checks n2; once n1 is free, Slurm would give training n1.
    holder = workdir / "hold.sh"
    holder.write_text("#!/bin/bash\nsleep 600\n")
    holder_id = hook.submit(
        str(holder),
        job_name=cancel_after(f"it-hold-{workdir.name}"),
        output=str(workdir / "hold-%j.out"),
        extra_args=["--nodelist=n1", "--exclusive"],
    )
    (workdir / "train.bin").write_bytes(SAMPLE_CORPUS.read_bytes())
    try:
        _wait_for(lambda: hook.get_job(holder_id).state == "RUNNING", 300, "n1 was not taken")
        preflight = jobs.prepare_preflight(spec, cluster, {"python": sys.executable})
        preflight_id = hook.submit(
            preflight["script_path"], job_name=cancel_after(preflight["job_name"]), output=preflight["output_path"]
        )
        log_path = preflight["output_path"].replace("%j", preflight_id)
        assert first_event(SlurmJobTrigger(job_id=preflight_id, log_path=log_path, poll_interval=1))["status"] == (
            "success"
        )
        checked = results.check_preflight(spec, cluster, preflight["results_path"], preflight["nccl_tests_path"])
        assert checked["failures"] == []
        hook.cancel_job_and_wait(holder_id)

        training = jobs.prepare_training(
            spec, cluster, {"python": sys.executable}, {"train_bin": str(workdir / "train.bin")}, checked["result"]
        )
        cancel_after(training["job_name"])
        operator = submit_prepared_slurm_job("run_job", training)
        operator.pending_timeout = 600  # the form's, which Airflow would render
        sink = XComSink()
        with pytest.raises(TaskDeferred):
            operator.execute({"ti": sink})
        training_id = sink.pushed["job_id"]
        _wait_for(lambda: hook.get_job(training_id).state != "PENDING", 300, "training did not start")

        preflight_nodes = expand_hostlist(hook.get_job(preflight_id).nodes)
        assert preflight_nodes == ["n2"]
        assert expand_hostlist(hook.get_job(training_id).nodes) == preflight_nodes
        # Requeued (its node failed, say), the job stays on the node preflight checked.
        hook.run(["scontrol", "requeue", training_id])
        assert "ReqNodeList=n2 " in hook.run(["scontrol", "show", "job", "-o", training_id])
    finally:
        hook.cancel_and_wait(spec["names"]["slurm_job"], prefix=True)
        hook.remove_tree(str(run_dir(spec, cluster)))


def test_a_requeued_job_whose_pinned_node_takes_no_jobs_is_unpinned_and_runs_elsewhere(
    workdir: Path, cancel_after: Cancel, first_event
) -> None:
    # n2 drained while the job, pinned to it, runs there (the job goes on); then the job is requeued, as Slurm
    # requeues one whose node failed. Pinned, it would wait for n2 until the pending timeout.
    hook = SlurmHook()
    script = workdir / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --requeue\n#SBATCH --open-mode=append\n"
        'echo "attempt ${SLURM_RESTART_COUNT:-0} on $SLURMD_NODENAME"\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 600; fi\n'
    )
    name = cancel_after(f"it-unpin-{workdir.name}")
    operator = SlurmSubmitJobOperator(
        task_id="run_job",
        script_path=str(script),
        job_name=name,
        output_path=str(workdir / f"{name}-%j.out"),
        poll_interval=1,
        pending_timeout=300,
        nodelist="n2",
    )
    sink = XComSink()
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({"ti": sink})
    job_id = sink.pushed["job_id"]
    try:
        _wait_for(lambda: hook.get_job(job_id).state == "RUNNING", 300, "the job did not start on n2")
        assert expand_hostlist(hook.get_job(job_id).nodes) == ["n2"]
        hook.run(["scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=dtp-unpin-test"])
        hook.run(["scontrol", "requeue", job_id])
        event = first_event(deferred.value.trigger)
    finally:
        resume_node(hook, "n2")
    assert event["status"] == "success", event
    assert expand_hostlist(event["nodes"]) == ["n1"]
    assert "attempt 1 on n1" in event["tail"]
    assert "ReqNodeList=(null) " in hook.run(["scontrol", "show", "job", "-o", job_id])
