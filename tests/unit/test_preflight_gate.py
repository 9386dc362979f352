"""The preflight gate judges preflight.py's JSON: nodes, versions, matmul, GPU health and the busbw table."""

from __future__ import annotations

from typing import Any

import pytest

from dtp.metrics.preflight_gate import (
    BUSBW_NOT_CHECKED,
    BusbwExpectation,
    bad_nodes,
    busbw_table,
    cpu_sweep_on_accelerators,
    node_versions,
    preflight_failures,
    preflight_message,
    preflight_warnings,
    reference_row,
)

MiB = 1 << 20
EXPECTED = BusbwExpectation(gbps=100.0, at_bytes=16 * MiB)


def rank(node: str, **overrides: Any) -> dict[str, Any]:
    return {
        "rank": 0,
        "slurm_node": node,
        "host": "h",
        "python": "3.11.7",
        "torch": "2.13.0",
        "cuda": None,
        "nccl": None,
        "matmul_max_abs_error": 1e-5,
        **overrides,
    }


def preflight(ranks: list[dict[str, Any]], busbw: list[float]) -> dict[str, Any]:
    """A sweep from 64 KiB upwards by 4x: the fifth row is 16 MiB."""
    sweep = [{"bytes": 1 << (16 + 2 * i), "busbw_gbps": b} for i, b in enumerate(busbw)]
    return {"ranks": ranks, "allreduce": sweep}


def test_healthy_preflight_passes() -> None:
    assert preflight_failures(preflight([rank("n1"), rank("n2")], [1, 10, 50, 90, 95]), 2, EXPECTED) == []


def test_busbw_is_judged_at_the_expected_size_not_the_best_row() -> None:
    result = preflight([rank("n1"), rank("n2")], [1, 10, 50, 99, 79.9, 120])  # 64 MiB row above the size
    [failure] = preflight_failures(result, 2, EXPECTED)
    assert failure.startswith("busbw: 79.900 GB/s at 16 MiB < 80.000 GB/s (80% of the expected 100.0 GB/s)\n")
    assert "   16 MiB      79.900   100.000    80.000  TOO LOW" in failure


def test_busbw_at_exactly_the_floor_passes() -> None:
    assert preflight_failures(preflight([rank("n1"), rank("n2")], [1, 1, 1, 1, 80.0]), 2, EXPECTED) == []


def test_a_sweep_that_stops_short_is_judged_on_its_largest_row() -> None:
    sweep = [{"bytes": MiB, "busbw_gbps": 50.0}, {"bytes": 4 * MiB, "busbw_gbps": 85.0}]
    assert reference_row(sweep, 16 * MiB) == {"bytes": 4 * MiB, "busbw_gbps": 85.0}
    assert reference_row(sweep, 1024) == {"bytes": MiB, "busbw_gbps": 50.0}
    assert reference_row([], 1024) is None


def test_tolerance_sets_the_floor() -> None:
    result = preflight([rank("n1"), rank("n2")], [60.0])
    assert preflight_failures(result, 2, BusbwExpectation(100.0, MiB, tolerance=0.5)) == []
    assert preflight_failures(result, 2, BusbwExpectation(100.0, MiB, tolerance=0.9))[0].startswith(
        "busbw: 60.000 GB/s at 64 KiB < 90.000 GB/s"
    )


def test_a_single_rank_is_not_judged_on_bandwidth() -> None:
    result = {**preflight([rank("n1")], [0, 0, 0, 0, 0]), "world_size": 1}
    assert preflight_failures(result, 1, EXPECTED) == []


def test_missing_sweep_fails() -> None:
    failures = preflight_failures({"ranks": [rank("n1"), rank("n2")]}, 2, EXPECTED)
    assert failures == ["busbw: no all-reduce measurement in the preflight results"]


def test_table_marks_only_the_judged_row() -> None:
    table = busbw_table([{"bytes": MiB, "busbw_gbps": 5.0}, {"bytes": 16 * MiB, "busbw_gbps": 90.0}], EXPECTED)
    assert table.splitlines() == [
        "      size  busbw GB/s  expected     floor  verdict",
        "     1 MiB       5.000",
        "    16 MiB      90.000   100.000    80.000  ok",
    ]


def test_a_sweep_not_judged_has_no_verdict_and_a_warning_instead() -> None:
    result = {**preflight([rank("n1"), rank("n2")], [1, 1, 1, 1, 2.0]), "backend": "gloo"}
    assert preflight_failures(result, 2, EXPECTED, busbw_checked=False) == []
    assert preflight_warnings(result, busbw_checked=False) == [BUSBW_NOT_CHECKED]
    assert busbw_table(result["allreduce"], None).splitlines()[-1] == "    16 MiB       2.000"


def test_only_a_gloo_sweep_on_an_instance_type_with_accelerators_measures_no_accelerator_collective() -> None:
    gloo = {**preflight([rank("n1")], [2.0]), "backend": "gloo"}
    assert cpu_sweep_on_accelerators(gloo, "trainium1")
    assert not cpu_sweep_on_accelerators(gloo, "cpu")  # what a CPU instance type's expectation is measured with
    assert not cpu_sweep_on_accelerators({**gloo, "backend": "nccl"}, "h100")
    assert not cpu_sweep_on_accelerators({**gloo, "allreduce": []}, "trainium1")  # no sweep: judged as missing


def test_too_few_nodes_names_those_that_answered() -> None:
    failures = preflight_failures(preflight([rank("n2"), rank("n2")], [1, 1, 1, 1, 100]), 3, EXPECTED)
    assert failures == ["nodes: 1 answered (n2), expected 3"]


def test_host_identifies_the_node_when_slurm_node_is_empty() -> None:
    ranks = [rank("", host="ip-10-0-0-1"), rank("", host="ip-10-0-0-2")]
    assert preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 2, EXPECTED) == []


@pytest.mark.parametrize("key", ["torch", "cuda", "nccl", "python"])
def test_version_mismatch_names_the_odd_node(key: str) -> None:
    ranks = [rank("n1", **{key: "1.0"}), rank("n2", **{key: "1.0"}), rank("n3", **{key: "2.0"})]
    failures = preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 3, EXPECTED)
    assert failures == [f"node n3: {key} 2.0, where 2 of 3 nodes have 1.0"]
    assert bad_nodes(failures) == ["n3"]


def test_a_version_split_evenly_names_no_node_as_the_odd_one_out() -> None:
    # Which half has the wrong version is not for the gate to guess: no exclude_nodes advice.
    ranks = [rank(f"p5-st-{i}", torch="2.13.0" if i < 8 else "2.12.0") for i in range(16)]
    failures = preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 16, EXPECTED)
    assert failures == [
        "torch differs across nodes and no version is on most of them: 2.12.0 on p5-st-[8-15]; 2.13.0 on p5-st-[0-7]"
    ]
    assert "exclude_nodes" not in preflight_message(failures)
    two = [rank("n1"), rank("n2", python="3.12.1")]
    assert preflight_failures(preflight(two, [1, 1, 1, 1, 100]), 2, EXPECTED) == [
        "python differs across nodes and no version is on most of them: 3.11.7 on n1; 3.12.1 on n2"
    ]


EFA_1_30 = "# EFA installer version: 1.30.0\n# Debug packages installed: no\n# Packages installed:\nlibfabric-aws\n"


def probes(**overrides: str | None) -> dict[str, str | None]:
    return {
        "efa_installed_packages": EFA_1_30,
        "fi_info_version": "fi_info: 1.19.0amzn4.0\nlibfabric: 1.19.0amzn4.0\nlibfabric api: 1.19\n",
        "ofi_nccl_strings": "NET/OFI Initializing aws-ofi-nccl 1.7.4-aws",
        "nvidia_smi": "index, name, driver_version, ecc.errors.uncorrected.volatile.total\n"
        + "".join(f"{i}, NVIDIA H100 80GB HBM3, 535.129.03, 0\n" for i in range(8)),
        "dmesg_xid": "",
        **overrides,
    }


def test_efa_versions_per_node_come_from_the_probes() -> None:
    result = preflight([rank("n1", probes=probes()), rank("n2")], [1])
    assert node_versions(result)["n1"] == {
        "python": "3.11.7",
        "torch": "2.13.0",
        "cuda": "None",
        "nccl": "None",
        "efa_installer": "1.30.0",
        "libfabric": "1.19.0amzn4.0",
        "aws_ofi_nccl": "1.7.4-aws",
        "nvidia_driver": "535.129.03",
    }


def test_efa_installer_mismatch_fails_naming_the_node() -> None:
    old = probes(efa_installed_packages=EFA_1_30.replace("1.30.0", "1.29.1"))
    ranks = [rank("n1", probes=probes()), rank("n2", probes=old), rank("n3", probes=probes())]
    failures = preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 3, EXPECTED, gpus_per_node=8)
    assert failures == ["node n2: efa_installer 1.29.1, where 2 of 3 nodes have 1.30.0"]


def test_a_component_missing_on_one_node_is_a_mismatch() -> None:
    ranks = [rank("n1", probes=probes()), rank("n2", probes=probes(fi_info_version=None)), rank("n3", probes=probes())]
    failures = preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 3, EXPECTED, gpus_per_node=8)
    assert failures == ["node n2: libfabric absent, where 2 of 3 nodes have 1.19.0amzn4.0"]


def test_every_odd_node_out_is_named_for_exclude_nodes() -> None:
    # 16 nodes: one with an older EFA installer, another whose GPU computes NaN.
    old = probes(efa_installed_packages=EFA_1_30.replace("1.30.0", "1.29.1"))
    ranks = [
        rank(f"p5-st-{i}", rank=i, probes=old if i == 7 else probes(), matmul_max_abs_error="nan" if i == 4 else 0.0)
        for i in range(16)
    ]
    failures = preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 16, EXPECTED, gpus_per_node=8)
    assert failures == [
        "node p5-st-7: efa_installer 1.29.1, where 15 of 16 nodes have 1.30.0",
        "node p5-st-4: matmul on rank 4 is wrong (max error nan)",
    ]
    assert preflight_message(failures).endswith("trigger again with exclude_nodes=p5-st-4,p5-st-7")


def test_gpu_health_names_the_bad_node_and_how_to_exclude_it() -> None:
    sick = probes(
        dmesg_xid="[Mon Nov 23 10:00:00 2026] NVRM: Xid (PCI:0000:53:00): 79, pid=1234, GPU has fallen off the bus.",
        nvidia_smi=(probes()["nvidia_smi"] or "").replace("535.129.03, 0\n3,", "535.129.03, 2\n3,"),
    )
    ranks = [rank("n1", probes=probes()), rank("n7", probes=sick)]
    failures = preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 2, EXPECTED, gpus_per_node=8)
    assert failures == [
        "node n7: GPU 2 has 2 uncorrected ECC errors",
        "node n7: Xid 79 (GPU has fallen off the bus) on PCI:0000:53:00",
    ]
    assert bad_nodes(failures) == ["n7"]
    assert preflight_message(failures).endswith("to train without them, trigger again with exclude_nodes=n7")
    # A cluster made for the run goes with it: the next run's has other nodes, and refuses exclude_nodes.
    assert preflight_message(failures, nodes_outlive_runs=False).endswith(
        "Xid 79 (GPU has fallen off the bus) on PCI:0000:53:00"
    )


def test_missing_gpus_fail_but_cpu_instances_skip_gpu_checks() -> None:
    no_gpu = probes(nvidia_smi=None)
    ranks = [rank("n1", probes=no_gpu), rank("n2", probes=no_gpu)]
    assert preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 2, EXPECTED, gpus_per_node=0) == []
    failures = preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 2, EXPECTED, gpus_per_node=8)
    assert failures == [
        "node n1: 0 GPUs visible to nvidia-smi, expected 8",
        "node n2: 0 GPUs visible to nvidia-smi, expected 8",
    ]


def test_an_unreadable_kernel_log_is_reported_not_checked_not_passed() -> None:
    # preflight.py gives None where dmesg was refused, "" where it was read and held no Xid line.
    ranks = [rank("n1", probes=probes()), rank("n2", probes=probes(dmesg_xid=None))]
    result = preflight(ranks, [1, 1, 1, 1, 100])
    assert preflight_failures(result, 2, EXPECTED, gpus_per_node=8) == []
    assert preflight_warnings(result, gpus_per_node=8) == [
        "node n2: Xid errors not checked: the job's user may not read the kernel log "
        "(dmesg refused; kernel.dmesg_restrict=1?)"
    ]
    assert preflight_warnings(result, gpus_per_node=0) == []  # a CPU instance type has no Xid to check


def test_wrong_matmul_names_the_node_and_error() -> None:
    ranks = [rank("n1"), rank("n2", matmul_max_abs_error=0.5)]
    failures = preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 2, EXPECTED)
    assert failures == ["node n2: matmul on rank 0 is wrong (max error 0.5)"]


@pytest.mark.parametrize("error", ["nan", "inf"])
def test_a_matmul_that_is_not_a_number_fails(error: str) -> None:
    ranks = [rank("n1"), rank("n2", matmul_max_abs_error=error)]
    failures = preflight_failures(preflight(ranks, [1, 1, 1, 1, 100]), 2, EXPECTED)
    assert failures == [f"node n2: matmul on rank 0 is wrong (max error {error})"]


def test_every_preflight_failure_is_listed() -> None:
    ranks = [rank("n1", torch="2.12.0", matmul_max_abs_error=1.0)]
    failures = preflight_failures(preflight(ranks, [1.0]), 2, EXPECTED)
    assert [f.split(" ")[0] for f in failures] == ["nodes:", "node", "busbw:"]
    # Only the node with the wrong matmul is named: a missing node or a slow network is no node to exclude.
    assert preflight_message(failures).endswith("trigger again with exclude_nodes=n1")
