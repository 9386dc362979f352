"""The preflight job on the real local Slurm cluster: written, submitted, judged (validate_cluster's steps)."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

from dtp.form_params import ParamsError
from dtp.hooks.slurm import SlurmHook
from dtp.metrics.preflight_gate import bad_nodes
from dtp.naming import RunNames
from dtp.pipeline import jobs, results
from dtp.pipeline.validation import build_validation_spec, connect
from dtp.triggers.slurm import SlurmJobTrigger

pytestmark = pytest.mark.stack
NAMES = RunNames("validate_cluster", "it__x")


def _validation(**conf) -> tuple[dict, dict]:
    spec = build_validation_spec({}, conf, RunNames("validate_cluster", f"it__{uuid.uuid4().hex[:8]}"))
    return spec, connect(spec)


def _run_preflight(first_event: Any, spec: dict, cluster: dict) -> dict:
    job = jobs.prepare_preflight(spec, cluster, {"python": cluster["python"]})
    hook = SlurmHook(cluster["slurm_conn_id"])
    job_id = hook.submit(job["script_path"], job_name=job["job_name"], output=job["output_path"])
    trigger = SlurmJobTrigger(job_id=job_id, log_path=job["output_path"].replace("%j", job_id), poll_interval=1)
    assert first_event(trigger)["status"] == "success"
    return results.check_preflight(spec, cluster, job["results_path"], job["nccl_tests_path"])


def test_both_nodes_pass_with_a_version_table_per_node(stack, first_event) -> None:
    checked = _run_preflight(first_event, *_validation())
    assert checked["failures"] == []
    versions = checked["result"]["versions"]
    assert sorted(versions) == ["n1", "n2"]
    # No EFA or GPU on this machine: every node reports the same "absent", which is consistent.
    assert {v["efa_installer"] for v in versions.values()} == {"absent"}
    assert checked["result"]["expected_busbw"] == {"gbps": 0.1, "at_bytes": 16 << 20, "floor": pytest.approx(0.08)}


def test_excluded_node_takes_no_part(stack, first_event) -> None:
    checked = _run_preflight(first_event, *_validation(num_nodes=1, exclude_nodes="n1"))
    assert checked["failures"] == []
    assert {r["slurm_node"] for r in checked["result"]["ranks"]} == {"n2"}


def test_unreachable_bandwidth_fails_with_the_table(stack, first_event) -> None:
    checked = _run_preflight(first_event, *_validation(expected_busbw_gbps=1000.0))
    [failure] = checked["failures"]
    assert failure.startswith("busbw: ") and "< 800.000 GB/s (80% of the expected 1000.0 GB/s)" in failure
    assert "  1000.000   800.000  TOO LOW" in failure


def test_nodes_whose_checks_cannot_run_are_named_and_the_job_completes(stack, first_event) -> None:
    # No torch on either node (an interpreter that is not there): each node's step fails before it writes its
    # result. The job still ends COMPLETED, and the gate names both nodes for exclude_nodes.
    checked = _run_preflight(first_event, *_validation(python="/nonexistent/bin/python"))
    failures = checked["failures"]
    assert failures[:2] == [
        "node n1: no preflight result (see the job log)",
        "node n2: no preflight result (see the job log)",
    ]
    assert any(f.startswith("preflight step torch exited with code ") for f in failures), failures
    assert bad_nodes(failures) == ["n1", "n2"]


def test_slurm_ends_a_preflight_job_at_its_deadline(stack) -> None:
    # It takes whole nodes: one that hangs, or outlives a deleted run, must not keep them past its time limit. The
    # local partition has no MaxTime: the limit is the script's own.
    spec, cluster = _validation()
    job = jobs.prepare_preflight(spec, cluster, {"python": cluster["python"]})
    hook = SlurmHook(cluster["slurm_conn_id"])
    job_id = hook.submit(job["script_path"], job_name=job["job_name"], output=job["output_path"], extra_args=["--hold"])
    try:
        assert f"TimeLimit=00:{jobs.SLURM_PREFLIGHT_MINUTES}:00" in hook.run(["scontrol", "show", "job", job_id])
    finally:
        hook.cancel_job_and_wait(job_id)
        hook.remove_tree(os.path.dirname(job["script_path"]))  # the run's directory, which only this test used


def test_excluding_too_many_nodes_is_refused_before_any_job(stack) -> None:
    spec = build_validation_spec({}, {"exclude_nodes": "n[1-2]", "num_nodes": 1}, NAMES)
    with pytest.raises(
        ParamsError, match=r"has 2 nodes that take jobs \(of 2: .*\), 0 once exclude_nodes='n\[1-2\]' is"
    ):
        connect(spec)
    assert SlurmHook().find_jobs(spec["names"]["slurm_job"], prefix=True) == []


def test_a_node_excluded_twice_counts_once(stack) -> None:
    spec = build_validation_spec({}, {"exclude_nodes": "n1,n[1-1]", "num_nodes": 1}, NAMES)
    assert connect(spec)["nodes"] == 2
    spec = build_validation_spec({}, {"exclude_nodes": "n1,n[1-1]", "num_nodes": 2}, NAMES)
    with pytest.raises(
        ParamsError, match=r"has 2 nodes that take jobs \(of 2: .*\), 1 once exclude_nodes='n1,n\[1-1\]'"
    ):
        connect(spec)
