"""check_preflight: which all-reduce rows judge a cluster (preflight.py's sweep, nccl-tests', nccom-test's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dtp.metrics.preflight_gate import BUSBW_NOT_CHECKED
from dtp.pipeline import results
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
    """What the preflight job left on the shared filesystem: preflight.py's JSON, and a collective test's output."""
    output: dict[str, Any] = {"result": {}, "collective_test": ""}
    monkeypatch.setattr(results, "read_json", lambda cluster, path: output["result"])

    class Files:
        @staticmethod
        def of_cluster(cluster: dict[str, Any]) -> Files:
            return Files()

        def read_file(self, path: str) -> tuple[str, None]:
            return output["collective_test"], None

    monkeypatch.setattr(results, "SharedFilesystemHook", Files)
    return output


def spec(instance_type: str, **instance: Any) -> dict[str, Any]:
    return {
        "params": {"num_nodes": 2, "expected_busbw_gbps": 0},
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
