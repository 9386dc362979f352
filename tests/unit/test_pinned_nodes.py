"""On a cluster whose nodes outlive runs, the training job runs on the nodes its preflight checked (sbatch
``--nodelist``), and a job that cannot start there says which of them take no jobs and how to train without them.
Requeued (its node failed), it is unpinned from those of them that take no jobs rather than waiting for them.
Slurm is a stand-in answering the hook's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from dtp.form_params import parse_params
from dtp.hooks.shared_fs import ClusterCommandError
from dtp.hooks.slurm import SlurmHook
from dtp.metrics.preflight_gate import checked_nodes
from dtp.operators.slurm import SlurmJobFailed, SlurmSubmitJobOperator, submit_prepared_slurm_job
from dtp.params import TrainParams
from dtp.pipeline import jobs
from dtp.pipeline.spec import run_spec
from dtp.triggers.slurm import SlurmJobTrigger

LOCAL = {"platform": "local", "num_nodes": 2}
PARALLELCLUSTER = {
    "platform": "parallelcluster",
    "recipe": "llama3_2_1b",
    "instance_type": "p5.48xlarge",
    "num_nodes": 2,
    "dataset_uri": "s3://datasets/fsdp/",
}
# A framework's own batch script (not DTP's trainer).
PARALLELCLUSTER_PICOTRON = {**PARALLELCLUSTER, "recipe": "llama3_2_1b_picotron", "dataset_uri": "s3://datasets/p/"}


def preflight_result(*nodes: str, ranks_per_node: int = 2) -> dict[str, Any]:
    """The preflight gate's result of a job whose ranks ran on ``nodes`` (``SLURMD_NODENAME``)."""
    ranks = [{"host": "localhost", "slurm_node": node} for node in nodes for _ in range(ranks_per_node)]
    return {"ranks": [{"rank": rank, **record} for rank, record in enumerate(ranks)], "failures": []}


class Sbatch:
    """Slurm's commands as ``SlurmHook.run`` runs them: sbatch submits job 7, ``scontrol show job`` answers the next
    of ``jobs`` (the last one from then on; none: no job), squeue and sacct know no job, sinfo answers ``sinfo`` (or
    raises it); every argv is kept in ``ran``."""

    def __init__(self, sinfo: str | Exception = "") -> None:
        self.sinfo = sinfo
        self.jobs: list[str] = []
        self.ran: list[list[str]] = []

    def __call__(self, hook: SlurmHook, argv: list[str], **_: Any) -> str:
        self.ran.append(argv)
        if argv[0] == "sbatch":
            return "7\n"
        if argv[:3] == ["scontrol", "show", "job"] and self.jobs:
            return self.jobs.pop(0) if len(self.jobs) > 1 else self.jobs[0]
        if argv[0] == "sinfo":
            if isinstance(self.sinfo, Exception):
                raise self.sinfo
            return self.sinfo
        return ""

    @property
    def sbatch(self) -> list[str]:
        [argv] = [argv for argv in self.ran if argv[0] == "sbatch"]
        return argv

    @property
    def updates(self) -> list[list[str]]:
        return [argv for argv in self.ran if argv[:2] == ["scontrol", "update"]]


@pytest.fixture
def slurm(monkeypatch: pytest.MonkeyPatch) -> Sbatch:
    commands = Sbatch()
    monkeypatch.setattr(SlurmHook, "extra", {})  # the connection's: on this host, every partition
    monkeypatch.setattr(SlurmHook, "run", lambda hook, argv, **kwargs: commands(hook, argv, **kwargs))
    return commands


class XComSink:
    """The task instance's XCom, which these tests do not read."""

    def xcom_push(self, key: str, value: str) -> None:
        pass


def prepare(tmp_path: Path, conf: dict[str, Any], preflight: dict[str, Any] | None) -> dict[str, Any]:
    """The training job prepare_training writes for a run of ``conf`` on a Slurm cluster in ``tmp_path``."""
    spec = run_spec(parse_params(TrainParams, conf), "train_e2e", "manual__2026-12-07")
    cluster = {"platform": conf["platform"], "scheduler": "slurm", "shared_dir": str(tmp_path)}
    return jobs.prepare_training(spec, cluster, {"python": "/usr/bin/python3"}, {"train_bin": "/fsx/t.bin"}, preflight)


def submit(job: dict[str, Any]) -> None:
    """Run the task that submits the prepared ``job`` up to its deferral."""
    operator = submit_prepared_slurm_job("run_job", job)
    operator.pending_timeout = 60  # the form's, which Airflow would render
    with pytest.raises(TaskDeferred):
        operator.execute({"ti": XComSink()})


def test_the_nodes_preflight_checked_are_those_its_ranks_ran_on() -> None:
    assert checked_nodes(preflight_result("n3", "n10")) == ["n10", "n3"]  # each once, whatever its ranks
    # Off Slurm (a PyTorchJob's pods, a Batch job's nodes) no rank has a Slurm node.
    assert checked_nodes({"ranks": [{"rank": 0, "host": "pod-0", "slurm_node": ""}]}) == []


def test_where_nodes_outlive_runs_training_is_submitted_to_the_nodes_preflight_checked(
    tmp_path: Path, slurm: Sbatch
) -> None:
    job = prepare(tmp_path, LOCAL, preflight_result("n2", "n3"))
    assert job["nodelist"] == "n[2-3]"
    submit(job)
    assert "--nodelist=n[2-3]" in slurm.sbatch
    assert slurm.sbatch[-1] == job["script_path"]


@pytest.mark.parametrize(
    ("conf", "preflight"),
    [
        # A cluster made for the run has its nodes alone, which preflight all checked; a node put in place of a
        # failed one has a name preflight never saw.
        (PARALLELCLUSTER, preflight_result("queue-st-p5-1", "queue-st-p5-2")),
        (PARALLELCLUSTER_PICOTRON, preflight_result("queue-st-p5-1", "queue-st-p5-2")),
        # No preflight result (its task marked succeeded by hand): no nodes to pin to.
        (LOCAL, None),
    ],
)
def test_training_is_not_pinned_elsewhere(
    tmp_path: Path, slurm: Sbatch, conf: dict[str, Any], preflight: dict[str, Any] | None
) -> None:
    job = prepare(tmp_path, conf, preflight)
    assert job["nodelist"] == ""
    submit(job)
    assert not [arg for arg in slurm.sbatch if arg.startswith("--nodelist")]


def pending_timeout(
    slurm: Sbatch, sinfo: str | Exception, event_fields: dict[str, Any] | None = None, **options: Any
) -> str:
    """The task's error for job 7, pinned to n2 and n3 and still PENDING at the pending timeout, when ``sinfo -N``
    answers ``sinfo`` (``event_fields``: the trigger's event's further fields)."""
    slurm.sinfo = sinfo
    operator = SlurmSubmitJobOperator(
        task_id="run_job", script_path="/s.sh", job_name="run", output_path="/o-%j", pending_timeout=60, **options
    )
    operator._cancel = lambda job_id: "cancelled it"  # type: ignore[method-assign]
    event = {
        "status": "pending",
        "job_id": "7",
        "state": "PENDING",
        "reason": "ReqNodeNotAvail,_UnavailableNodes:n3",
        "unavailable_nodes": ["n3 Not responding"],
        "tail": [],
        "errors": [],
        **(event_fields or {}),
    }
    with pytest.raises(SlurmJobFailed) as failed:
        operator.execute_complete({}, event)
    return str(failed.value)


def test_a_pinned_job_kept_pending_by_a_node_that_went_down_says_to_train_without_it(slurm: Sbatch) -> None:
    message = pending_timeout(slurm, "n1 idle\nn2 alloc\nn3 down*\n", nodelist="n2,n3")
    assert message == (
        "Slurm job 7 (run) did not start within 60s: it is still PENDING, Slurm's reason: "
        "ReqNodeNotAvail,_UnavailableNodes:n3; cancelled it. Nodes down or drained, and why:\nn3 Not responding. "
        "It may run only on n2,n3, the nodes the run's preflight checked; of those, these take no jobs (down, "
        "drained or gone from the partition): n3. To train without them, trigger again with exclude_nodes=n3"
    )
    # A node taken out of the partition since preflight is no more use.
    assert pending_timeout(slurm, "n1 idle\nn2 drain\n", nodelist="n2,n3").endswith(
        ": n2, n3. To train without them, trigger again with exclude_nodes=n2,n3"
    )


def test_a_pinned_job_whose_nodes_all_take_jobs_says_so(slurm: Sbatch) -> None:
    message = pending_timeout(slurm, "n1 idle\nn2 alloc\nn3 mix\n", nodelist="n2,n3")
    assert message.endswith(
        "It may run only on n2,n3, the nodes the run's preflight checked; all of them take jobs (other jobs may hold "
        "them)"
    )
    assert "exclude_nodes" not in message
    # Slurm writes the job's nodes in its own short form, not the one DTP pinned them in: still those preflight checked.
    message = pending_timeout(slurm, "n1 idle\nn2 alloc\nn3 mix\n", {"required_nodes": "n[2-3]"}, nodelist="n3,n2")
    assert "It may run only on n[2-3], the nodes the run's preflight checked; all of them take jobs" in message


def test_a_pinned_job_says_how_to_train_without_a_node_when_sinfo_cannot_tell_which(slurm: Sbatch) -> None:
    message = pending_timeout(slurm, ClusterCommandError("sinfo: error: slurmctld not responding"), nodelist="n2,n3")
    assert message.endswith(
        "It may run only on n2,n3, the nodes the run's preflight checked: if one of them is down or drained, trigger "
        "again with exclude_nodes=<that node>"
    )


def test_an_unpinned_job_kept_pending_says_nothing_of_pinned_nodes(slurm: Sbatch) -> None:
    message = pending_timeout(slurm, "n1 idle\n")
    assert message.endswith("Nodes down or drained, and why:\nn3 Not responding")
    assert not [argv for argv in slurm.ran if argv[0] == "sinfo"]


def scontrol_job(state: str, required: str, restarts: int, **fields: str) -> str:
    """``scontrol show job -o 7`` of a job in ``state`` required to run on ``required``, requeued ``restarts`` times."""
    more = "".join(f" {key}={value}" for key, value in fields.items())
    return f"JobId=7 JobName=run JobState={state} Restarts={restarts} ReqNodeList={required or '(null)'}{more}\n"


@pytest.mark.parametrize(
    ("sinfo", "dropped", "update"),
    [
        ("n1 idle\nn2 idle\nn3 down*\n", ["n3"], ["ReqNodeList=n2"]),
        # All of them gone: the pin is cleared, any of the partition's nodes will do.
        ("n1 idle\nn2 drain\n", ["n2", "n3"], ["ReqNodeList="]),
        ("n1 idle\nn2 alloc\nn3 mix\n", [], None),
    ],
)
def test_a_job_is_unpinned_from_the_nodes_it_requires_that_take_no_jobs(
    slurm: Sbatch, sinfo: str, dropped: list[str], update: list[str] | None
) -> None:
    slurm.sinfo = sinfo
    slurm.jobs = [scontrol_job("PENDING", "n[2-3]", 1, Reason="ReqNodeNotAvail,_UnavailableNodes:n3")]
    job = SlurmHook().get_job("7")
    assert (job.required_nodes, job.restarts) == ("n[2-3]", 1)
    assert SlurmHook().unpin_unusable_nodes(job) == dropped
    assert slurm.updates == ([["scontrol", "update", "JobId=7", *update]] if update else [])


def test_a_requeued_job_whose_pinned_node_failed_is_unpinned_from_it_and_runs(
    slurm: Sbatch, first_event: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    slurm.sinfo = "n1 idle\nn2 idle\nn3 down*\n"
    slurm.jobs = [
        scontrol_job("RUNNING", "n[2-3]", 0, NodeList="n[2-3]"),
        scontrol_job("PENDING", "n[2-3]", 1, Reason="BeginTime"),  # requeued: n3 failed
        scontrol_job("PENDING", "n2", 1, Reason="Resources"),  # as the update left it
        scontrol_job("RUNNING", "n2", 1, NodeList="n[1-2]"),
        scontrol_job("COMPLETED", "n2", 1, NodeList="n[1-2]", ExitCode="0:0"),
    ]
    trigger = SlurmJobTrigger(job_id="7", log_path="/nonexistent/o-7", poll_interval=0, nodelist="n[2-3]")
    event = first_event(trigger)
    assert (event["status"], event["nodes"]) == ("success", "n[1-2]")
    assert slurm.updates == [["scontrol", "update", "JobId=7", "ReqNodeList=n2"]]  # once: n2 takes jobs
    assert (
        "Slurm job 7 was requeued, and of the nodes it was pinned to (n[2-3]) these take no jobs (down, drained or "
        "gone from the partition): n3. Unpinned it from them so that it does not wait for them: it will run on n2 "
        "and other nodes of the partition, which the run's preflight did not check"
    ) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("restarts", "nodelist"),
    [
        (0, "n[2-3]"),  # never ran: it waits for the nodes preflight checked, and says so at the pending timeout
        (1, ""),  # pinned by its own sbatch arguments, not to the nodes preflight checked
    ],
)
def test_only_a_requeued_job_pinned_to_the_nodes_preflight_checked_is_unpinned(
    slurm: Sbatch, first_event: Any, restarts: int, nodelist: str
) -> None:
    slurm.sinfo = "n1 idle\nn2 idle\nn3 down*\n"
    slurm.jobs = [scontrol_job("PENDING", "n[2-3]", restarts, Reason="ReqNodeNotAvail,_UnavailableNodes:n3")]
    trigger = SlurmJobTrigger(
        job_id="7", log_path="/nonexistent/o-7", poll_interval=0, pending_timeout=1e-9, nodelist=nodelist
    )
    event = first_event(trigger)
    assert (event["status"], event["required_nodes"]) == ("pending", "n[2-3]")
    assert slurm.updates == []


def test_a_job_unpinned_from_some_nodes_that_still_does_not_start_names_those_it_kept(slurm: Sbatch) -> None:
    message = pending_timeout(slurm, "n1 alloc\nn2 alloc\n", {"required_nodes": "n2"}, nodelist="n2,n3")
    assert message.endswith(
        "It must run on n2: of the nodes the run's preflight checked (n2,n3), those it was not unpinned from when "
        "requeued; all of them take jobs (other jobs may hold them)"
    )
    # Unpinned from all of them, it may run on any node: nothing to say of pinned nodes.
    message = pending_timeout(slurm, "n1 alloc\n", {"required_nodes": ""}, nodelist="n2,n3")
    assert message.endswith("Nodes down or drained, and why:\nn3 Not responding")
