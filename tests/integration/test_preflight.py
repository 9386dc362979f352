"""The preflight job on the real local Slurm cluster: written, submitted, judged (validate_cluster's steps)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from dtp.form_params import ParamsError
from dtp.hooks.slurm import SlurmHook
from dtp.metrics.preflight_gate import bad_nodes
from dtp.metrics.preflight_job import NO_NODE_RESULT, node_results_dir
from dtp.naming import RunNames
from dtp.pipeline import jobs, results
from dtp.pipeline.run_dirs import run_dir
from dtp.pipeline.validation import build_validation_spec, connect
from dtp.triggers.slurm import SlurmJobTrigger

pytestmark = pytest.mark.stack
NAMES = RunNames("validate_cluster", "it__x")


def _validation(**conf) -> tuple[dict, dict]:
    spec = build_validation_spec({}, conf, RunNames("validate_cluster", f"it__{uuid.uuid4().hex[:8]}"))
    return spec, connect(spec)


def _run_preflight(first_event: Any, spec: dict, cluster: dict, images: dict | None = None) -> dict:
    job = jobs.prepare_preflight(spec, cluster, images or {"python": cluster["python"]})
    hook = SlurmHook(cluster["slurm_conn_id"])
    job_id = hook.submit(job["script_path"], job_name=job["job_name"], output=job["output_path"])
    trigger = SlurmJobTrigger(job_id=job_id, log_path=job["output_path"].replace("%j", job_id), poll_interval=1)
    assert first_event(trigger)["status"] == "success"
    return results.check_preflight(spec, cluster, job["results_path"], job["nccl_tests_path"])


def test_both_nodes_pass_with_a_version_table_per_node(stack, first_event) -> None:
    spec, cluster = _validation()
    checked = _run_preflight(first_event, spec, cluster)
    assert checked["failures"] == []
    # Each node wrote its own result too, to the folder the job's environment named.
    node_files = Path(node_results_dir(str(run_dir(spec, cluster) / "preflight.json")))
    assert sorted(path.name for path in node_files.iterdir()) == ["n1.json", "n2.json"]
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


def test_a_job_whose_ranks_never_start_completes_and_names_no_node(stack, first_event) -> None:
    # No torch on either node (an interpreter that is not there): every task fails before any rank starts, so no
    # node writes its result. The job still ends COMPLETED, and the gate names no node: excluding every node of
    # the job is no advice.
    checked = _run_preflight(first_event, *_validation(python="/nonexistent/bin/python"))
    failures = checked["failures"]
    assert failures[0] == NO_NODE_RESULT
    assert failures[1].startswith("preflight step torch exited with code "), failures
    assert bad_nodes(failures) == []


# preflight.py as an image published before the node files carries it: its options are only these three (any other
# ends it with exit 2 before it writes anything), and it knows nothing of the job's settings in the environment.
OLD_PREFLIGHT = f"""\
import argparse, os, runpy
parser = argparse.ArgumentParser()
parser.add_argument("--results", required=True)
parser.add_argument("--max-bytes", type=int)
parser.add_argument("--no-busbw", action="store_true")
parser.parse_args()
for name in ("DTP_PREFLIGHT_NODE_RESULTS", "DTP_PREFLIGHT_BACKEND"):
    os.environ.pop(name, None)
runpy.run_path({str(jobs.TRAINING_DIR / "preflight.py")!r}, run_name="__main__")
"""


def test_an_image_s_preflight_py_from_before_the_node_files_passes_on_its_results(stack, first_event, workdir) -> None:
    # The job runs the image's own preflight.py where the image carries the programs (training_dir): the job's
    # newer settings must not fail it on every node. It writes no node file; its combined results are judged.
    (workdir / "preflight.py").write_text(OLD_PREFLIGHT)
    spec, cluster = _validation()
    checked = _run_preflight(first_event, spec, cluster, {"python": cluster["python"], "training_dir": str(workdir)})
    assert checked["failures"] == []
    assert sorted(checked["result"]["versions"]) == ["n1", "n2"]
    assert checked["result"]["world_size"] == 2  # preflight.py's combined results, not the node files'


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
