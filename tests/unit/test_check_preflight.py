"""check_preflight: which all-reduce rows judge a cluster (preflight.py's sweep, nccl-tests', nccom-test's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dtp.metrics.preflight_gate import BUSBW_NOT_CHECKED, bad_nodes, preflight_message
from dtp.pipeline import results, validation
from dtp.recipes import instance_types

DATA = Path(__file__).parent / "data"
MiB = 1 << 20


def rank(node: str) -> dict[str, Any]:
    return {"rank": 0, "slurm_node": node, "python": "3.10.12", "torch": "2.7.0", "cuda": None, "nccl": None}


def gloo_sweep(busbw_gbps: float) -> list[dict[str, Any]]:
    """preflight.py's sweep on CPU tensors, 64 KiB to 1 GiB by 4x: TCP between hosts, a few GB/s at best."""
    return [{"bytes": 1 << (16 + 2 * i), "busbw_gbps": busbw_gbps} for i in range(8)]


@pytest.fixture
def preflight_output(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the preflight job left on the shared filesystem: preflight.py's JSON (None: none), a collective test's
    output, and other files by path (the job's status file, the per-node results)."""
    output: dict[str, Any] = {"result": {}, "collective_test": "", "files": {}}

    def read_json(cluster: dict[str, Any], path: str) -> dict[str, Any]:
        if output["result"] is None:
            raise FileNotFoundError(path)
        return output["result"]

    monkeypatch.setattr(results, "read_json", read_json)

    class Files:
        @staticmethod
        def of_cluster(cluster: dict[str, Any]) -> Files:
            return Files()

        def read_file(self, path: str) -> tuple[str, None]:
            return output["files"].get(path, output["collective_test"] if path.endswith(".out") else ""), None

        def list_files(self, folder: str) -> list[str]:
            return sorted(Path(path).name for path in output["files"] if str(Path(path).parent) == folder)

    monkeypatch.setattr(results, "SharedFilesystemHook", Files)
    return output


def spec(instance_type: str, **instance: Any) -> dict[str, Any]:
    return {
        "params": {"num_nodes": 2, "expected_busbw_gbps": 0, "instance_type": instance_type},
        "instance": {**instance_types()[instance_type].model_dump(), **instance},
    }


def test_a_gloo_sweep_on_trainium_is_not_judged_against_the_efa_figure(preflight_output: dict[str, Any]) -> None:
    # The Neuron image's torch has no CUDA: preflight.py's sweep is gloo over TCP on CPU tensors, ~2 GB/s.
    preflight_output["result"] = {"backend": "gloo", "world_size": 64, "ranks": [rank("n1"), rank("n2")]}
    preflight_output["result"]["allreduce"] = gloo_sweep(2.0)
    checked = results.check_preflight(spec("trn1.32xlarge"), {}, "/fsx/runs/r/preflight.json")
    assert checked["failures"] == []
    assert checked["result"]["warnings"] == [BUSBW_NOT_CHECKED]
    assert checked["result"]["expected_busbw"] is None  # the report plots no floor the sweep was never held to


def test_a_gloo_sweep_on_a_cpu_instance_type_is_still_judged(preflight_output: dict[str, Any]) -> None:
    preflight_output["result"] = {"backend": "gloo", "world_size": 2, "ranks": [rank("n1"), rank("n2")]}
    preflight_output["result"]["allreduce"] = gloo_sweep(0.05)
    checked = results.check_preflight(spec("m5.2xlarge"), {}, "/fsx/runs/r/preflight.json")
    [failure] = checked["failures"]
    assert failure.startswith("busbw: 0.050 GB/s at 16 MiB < 0.080 GB/s")
    assert checked["result"]["warnings"] == []


def test_nccom_test_s_rows_judge_a_trainium_cluster(preflight_output: dict[str, Any]) -> None:
    # preflight.py ran with --no-busbw; nccom-test measured the all-reduce over the Neuron devices and EFA.
    preflight_output["result"] = {"backend": "gloo", "world_size": 64, "ranks": [rank("n1"), rank("n2")]}
    preflight_output["result"]["allreduce"] = []
    preflight_output["collective_test"] = (DATA / "nccom_test_all_reduce_2_nodes.txt").read_text()
    trn1 = spec("trn1.32xlarge", collective_test="nccom-test")
    checked = results.check_preflight(trn1, {}, "/fsx/runs/r/preflight.json", "/fsx/runs/r/nccom-test.out")
    [failure] = checked["failures"]  # the sample stops at 512 KiB: 3.0 GB/s there, far below the expectation
    assert failure.startswith(f"busbw: 3.006 GB/s at 512 KiB < {trn1['instance']['expected_busbw_gbps'] * 0.8:.3f}")
    assert checked["result"]["allreduce"][-1]["busbw_gbps"] == 3.0065
    assert checked["result"]["nccom_test"] == {"avg_busbw_gbps": pytest.approx(0.2519, abs=1e-4)}
    assert checked["result"]["warnings"] == []
    trn1["params"]["expected_busbw_gbps"] = 3.0
    assert (
        results.check_preflight(trn1, {}, "/fsx/runs/r/preflight.json", "/fsx/runs/r/nccom-test.out")["failures"] == []
    )


def test_nodes_with_other_gpus_than_the_instance_type_s_fail_and_the_failures_are_logged(
    preflight_output: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # p5's 487 GB/s floor was never meant for A100s: the node is named, in the task log too (the report may not
    # be published).
    h100, a100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
    ranks = [{**rank("n1"), "device": h100}, {**rank("n2"), "device": a100, "rank": 1}]
    allreduce = [{"bytes": 16 << 30, "busbw_gbps": 480.0}]
    preflight_output["result"] = {"backend": "nccl", "world_size": 16, "ranks": ranks, "allreduce": allreduce}
    with caplog.at_level("ERROR", logger=results.__name__):
        checked = results.check_preflight(spec("p5.48xlarge"), {}, "/fsx/runs/r/preflight.json")
    assert checked["failures"] == [f"node n2: has {a100}, p5.48xlarge has H100"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"Preflight failure: node n2: has {a100}, p5.48xlarge has H100"
    ]
    # A capacity fallback's cluster is judged by the instance type it got.
    p5e = {"instance_type": "p5e.48xlarge", "instance": instance_types()["p5e.48xlarge"].model_dump()}
    checked = results.check_preflight(spec("p5.48xlarge"), p5e, "/fsx/runs/r/preflight.json")
    assert checked["failures"] == [
        f"node n1: has {h100}, p5e.48xlarge has H200",
        f"node n2: has {a100}, p5e.48xlarge has H200",
    ]


def test_a_cpu_instance_type_is_not_judged_on_the_device(preflight_output: dict[str, Any]) -> None:
    ranks = [{**rank("n1"), "device": "cpu"}, {**rank("n2"), "device": "cpu"}]
    preflight_output["result"] = {"backend": "gloo", "world_size": 2, "ranks": ranks, "allreduce": gloo_sweep(1.0)}
    assert results.check_preflight(spec("local.cpu"), {}, "/fsx/runs/r/preflight.json")["failures"] == []


def node_record(node: str, global_rank: int, device_count: int) -> dict[str, Any]:
    """What preflight.py's first rank on a node writes to its node file before the ranks meet."""
    smi = "index, name, driver_version, ecc.errors.uncorrected.volatile.total\n"
    smi += "".join(f"{i}, NVIDIA H100 80GB HBM3, 550.54.15, 0\n" for i in range(device_count))
    probes = {"nvidia_smi": smi, "dmesg_xid": ""}
    return {**rank(node), "rank": global_rank, "backend": "nccl", "device_count": device_count, "probes": probes}


def test_a_node_that_ended_the_job_is_named_from_the_node_files(preflight_output: dict[str, Any]) -> None:
    # n2 has 7 of p5's 8 GPUs: its rank 15 fails at set_device and the job's torch step with it, so there are no
    # combined results and nccl-tests printed no table; n3's torch never started (no file). The report still names
    # both, and the exclude_nodes advice takes them.
    preflight_output["result"] = None
    preflight_output["files"] = {
        "/fsx/runs/r/preflight.status": "nodes=n1,n2,n3\ntorch_rc=1\nnccl_tests_rc=0\n",
        "/fsx/runs/r/preflight-nodes/n1.json": json.dumps(node_record("n1", 0, 8)),
        "/fsx/runs/r/preflight-nodes/n2.json": json.dumps(node_record("n2", 8, 7)),
        "/fsx/runs/r/preflight-nodes/n2.json.partial": "{",
    }
    p5 = spec("p5.48xlarge")
    p5["params"]["num_nodes"] = 3
    checked = results.check_preflight(p5, {}, "/fsx/runs/r/preflight.json", "/fsx/runs/r/nccl-tests.out")
    failures = checked["failures"]
    assert failures[:2] == [
        "node n3: no preflight result (see the job log)",
        "preflight step torch exited with code 1 (see the job log)",
    ]
    assert "nccl-tests: no nccl-tests result row found: did the test run? (see the job log)" in failures
    assert "node n2: 7 GPUs visible to nvidia-smi, expected 8" in failures
    assert "node n2: torch can use 7 CUDA devices, expected 8 (one per process)" in failures
    assert not any(f.startswith("node n1") for f in failures)
    assert bad_nodes(failures) == ["n2", "n3"]
    assert sorted(checked["result"]["versions"]) == ["n1", "n2"]  # the report's table, from the node files


def test_the_combined_results_are_judged_with_the_job_s_status(preflight_output: dict[str, Any]) -> None:
    # The torch step passed; nccl-tests exited non-zero after its table (wrong results): both are failures.
    preflight_output["result"] = {"backend": "gloo", "world_size": 2, "ranks": [rank("n1"), rank("n2")]}
    preflight_output["result"]["allreduce"] = gloo_sweep(0.5)
    preflight_output["files"] = {"/fsx/runs/r/preflight.status": "nodes=n1,n2\ntorch_rc=0\n"}
    assert results.check_preflight(spec("m5.2xlarge"), {}, "/fsx/runs/r/preflight.json")["failures"] == []
    preflight_output["files"]["/fsx/runs/r/preflight.status"] += "nccl_tests_rc=1\n"
    assert results.check_preflight(spec("m5.2xlarge"), {}, "/fsx/runs/r/preflight.json")["failures"] == [
        "preflight step nccl-tests exited with code 1 (see the job log)"
    ]


def test_a_job_where_no_node_wrote_its_result_names_no_node(preflight_output: dict[str, Any]) -> None:
    # torchrun's agents failed before any rank started (a container that did not start, torch that did not import, a
    # rendezvous not reached): every task ends together, so no node is named, and excluding them all is no advice.
    preflight_output["result"] = None
    preflight_output["files"] = {"/fsx/runs/r/preflight.status": "nodes=n1,n2\ntorch_rc=1\n"}
    failures = results.check_preflight(spec("m5.2xlarge"), {}, "/fsx/runs/r/preflight.json")["failures"]
    assert failures[:2] == [
        "preflight: no node wrote its result: the job ended before its ranks started (a container that did not "
        "start, torch that did not import, a rendezvous not reached; see the job log)",
        "preflight step torch exited with code 1 (see the job log)",
    ]
    assert bad_nodes(failures) == []
    assert "exclude_nodes" not in preflight_message(failures)


def test_a_step_slurm_ended_is_a_failure_whatever_the_job_left(preflight_output: dict[str, Any]) -> None:
    # Slurm ended the job (its time limit) while torch ran: both nodes had written their files, and a table of
    # nccl-tests is there (an earlier try's, say), yet neither step finished in this try.
    preflight_output["result"] = None
    preflight_output["collective_test"] = (DATA / "nccl_tests_all_reduce_p5.txt").read_text()
    preflight_output["files"] = {
        "/fsx/runs/r/preflight.status": "nodes=n1,n2\n",
        "/fsx/runs/r/preflight-nodes/n1.json": json.dumps(node_record("n1", 0, 8)),
        "/fsx/runs/r/preflight-nodes/n2.json": json.dumps(node_record("n2", 8, 8)),
    }
    p5 = spec("p5.48xlarge", expected_busbw_gbps=1.0)
    failures = results.check_preflight(p5, {}, "/fsx/runs/r/preflight.json", "/fsx/runs/r/nccl-tests.out")["failures"]
    assert failures == [
        "preflight step torch did not finish (see the job log)",
        "preflight step nccl-tests did not finish (see the job log)",
    ]
    # Where the job ran no collective test, torch's is the only step it owed.
    preflight_output["files"]["/fsx/runs/r/preflight.status"] = "nodes=n1,n2\ntorch_rc=0\n"
    assert results.check_preflight(p5, {}, "/fsx/runs/r/preflight.json", "/fsx/runs/r/nccl-tests.out")["failures"] == [
        "preflight step nccl-tests did not finish (see the job log)"
    ]


def test_an_older_preflight_py_s_combined_results_are_judged_as_before(preflight_output: dict[str, Any]) -> None:
    # The image's preflight.py predates the node files: the job's folder of them stays empty, the combined results
    # name every node, and only what they show fails.
    preflight_output["result"] = {"backend": "gloo", "world_size": 2, "ranks": [rank("n1"), rank("n2")]}
    preflight_output["result"]["allreduce"] = gloo_sweep(0.5)
    preflight_output["files"] = {"/fsx/runs/r/preflight.status": "nodes=n1,n2\ntorch_rc=0\n"}
    assert results.check_preflight(spec("m5.2xlarge"), {}, "/fsx/runs/r/preflight.json")["failures"] == []
    preflight_output["result"]["ranks"][1]["matmul_max_abs_error"] = "nan"
    assert results.check_preflight(spec("m5.2xlarge"), {}, "/fsx/runs/r/preflight.json")["failures"] == [
        "node n2: matmul on rank 0 is wrong (max error nan)"
    ]


def test_without_a_status_file_or_results_there_is_nothing_to_judge(preflight_output: dict[str, Any]) -> None:
    # Off Slurm (no status file) the combined results are all there is.
    preflight_output["result"] = None
    with pytest.raises(FileNotFoundError):
        results.check_preflight(spec("m5.2xlarge"), {}, "/fsx/runs/r/preflight.json")


def test_validate_cluster_reports_a_job_that_left_no_results(monkeypatch: pytest.MonkeyPatch) -> None:
    # Slurm ended the job before any node wrote its result (or it never ran): the report and the verdict say so.
    def nothing_to_judge(*args: Any) -> dict[str, Any]:
        raise FileNotFoundError("/fsx/runs/r/preflight.json is missing or empty on the cluster")

    monkeypatch.setattr(results, "check_preflight", nothing_to_judge)
    result = validation.evaluate.function({}, {}, "/fsx/runs/r/preflight.json", "", "failed")
    assert result["failures"] == ["no preflight results: run_checks failed"]
    assert "node" not in preflight_message(result["failures"])  # no node to exclude on that evidence
