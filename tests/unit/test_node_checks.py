"""Parsers of the validation tools' output, against real captured output (tests/unit/data, sources in line 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtp.metrics.nccl_tests import NcclTestsOutputError, parse_nccl_tests
from dtp.metrics.node_checks import cuda_failures, device_failures, health_failures, versions, xid_errors
from dtp.metrics.preflight_gate import BusbwExpectation, bad_nodes, preflight_failures

DATA = Path(__file__).parent / "data"


def captured(name: str) -> str:
    text = (DATA / name).read_text()
    assert text.startswith("# source: https://github.com/")
    return text


def test_nccl_tests_across_two_p5_nodes_with_mpirun_prefixes() -> None:
    result = parse_nccl_tests(captured("nccl_tests_all_reduce_p5.txt"))
    assert len(result.rows) == 32
    assert result.rows[0] == {"bytes": 8, "time_us": 87.96, "algbw_gbps": 0.0, "busbw_gbps": 0.0}
    assert result.rows[-1] == {"bytes": 16 << 30, "time_us": 66988.0, "algbw_gbps": 256.46, "busbw_gbps": 480.87}
    assert result.avg_busbw_gbps == 123.343 and result.out_of_bounds == 0 and result.wrong_results == 0


def test_nccl_tests_single_node_format_with_header_and_devices() -> None:
    result = parse_nccl_tests(captured("nccl_tests_all_reduce_single_node.txt"))
    assert len(result.rows) == 25
    assert [r["bytes"] for r in result.rows] == [8 << i for i in range(25)]
    assert result.rows[-1]["busbw_gbps"] == 27.26
    assert result.avg_busbw_gbps == 9.09703
    # The summary line is the average of the out-of-place and in-place busbw columns, as nccl-tests computes it.
    assert sum(r["busbw_gbps"] for r in result.rows) / 25 == pytest.approx(9.097, abs=0.01)


def test_nccl_tests_older_layout_without_root_column() -> None:
    old = (
        "#       size         count    type   redop     time   algbw   busbw  error     time   algbw   busbw  error\n"
        "     1048576        262144   float     sum   1035.3    1.01    1.90  5e-07    643.4    1.63    3.06  5e-07\n"
        "  1073741824     268435456   float     sum    35215   30.49   57.17  4e-07    35198   30.51   57.20  4e-07\n"
    )
    rows = parse_nccl_tests(old).rows
    assert [(r["bytes"], r["time_us"], r["busbw_gbps"]) for r in rows] == [
        (1048576, 1035.3, 1.90),
        (1073741824, 35215.0, 57.17),
    ]


def test_nccl_tests_wrong_results_are_counted() -> None:
    text = captured("nccl_tests_all_reduce_single_node.txt").replace("27.26      0   7380.5", "27.26      3   7380.5")
    assert parse_nccl_tests(text).wrong_results == 3


def test_nccl_tests_wrong_in_place_results_are_counted_too() -> None:
    sample = captured("nccl_tests_all_reduce_p5.txt")
    in_place = sample.replace("257.50  482.82      0", "257.50  482.82      2")  # the 16 GiB row's in-place #wrong
    assert in_place != sample
    assert parse_nccl_tests(in_place).wrong_results == 2
    both = in_place.replace("256.46  480.87      0", "256.46  480.87      1")
    assert parse_nccl_tests(both).wrong_results == 3


def test_nccl_tests_crash_before_the_table_is_an_error() -> None:
    with pytest.raises(NcclTestsOutputError, match="no nccl-tests result row"):
        parse_nccl_tests("# nThread 1 nGpus 8\nNCCL failure common.cu:1000 'unhandled system error'\n")


def test_efa_versions_from_captured_installer_file_and_fi_info() -> None:
    found = versions(
        {
            "efa_installed_packages": captured("efa_installed_packages.txt"),
            "fi_info_version": captured("fi_info_version.txt"),
            "ofi_nccl_strings": "NET/OFI Initializing aws-ofi-nccl 1.18.0-aws",
            "nvidia_smi": captured("nvidia_smi_query.csv"),
        }
    )
    assert found == {
        "efa_installer": "1.22.0",
        "libfabric": "1.19.0amzn3.0",
        "aws_ofi_nccl": "1.18.0-aws",
        "nvidia_driver": "535.161.07",
    }


def test_nothing_installed_reads_absent() -> None:
    assert set(versions({}).values()) == {"absent"}


def test_captured_xids_are_read_and_application_errors_do_not_fail_the_node() -> None:
    dmesg = captured("dmesg_xid.txt")
    assert xid_errors(dmesg) == [(13, "PCI:0000:cb:00")] * 3 + [(109, "PCI:0000:cb:00")]
    probes = {"nvidia_smi": captured("nvidia_smi_query.csv"), "dmesg_xid": dmesg}
    assert health_failures("n1", probes, expected_gpus=4) == []


def test_node_fatal_xid_fails_the_node() -> None:
    # The captured Xid 13 line with the code of a GPU that fell off the bus.
    line = captured("dmesg_xid.txt").splitlines()[2].replace("): 13,", "): 79,")
    probes = {"nvidia_smi": captured("nvidia_smi_query.csv"), "dmesg_xid": line}
    assert health_failures("n1", probes, expected_gpus=4) == [
        "node n1: Xid 79 (GPU has fallen off the bus) on PCI:0000:cb:00"
    ]


def test_uncorrected_ecc_and_missing_gpus_fail_the_node() -> None:
    smi = captured("nvidia_smi_query.csv").splitlines()
    header, first = smi[2], smi[3].split(", ")
    column = [c.strip().split(" [")[0] for c in header.split(",")].index("ecc.errors.uncorrected.volatile.total")
    first[column] = "5"
    probes = {"nvidia_smi": "\n".join([header, ", ".join(first)])}
    assert health_failures("n3", probes, expected_gpus=8) == [
        "node n3: 1 GPUs visible to nvidia-smi, expected 8",
        "node n3: GPU 00000000:0A:00.0 has 5 uncorrected ECC errors",
    ]


def _rank(rank: int, node: str, device_count: int) -> dict:
    """A rank's environment screen as preflight.py records it: a rank whose torch cannot use CUDA runs on the CPU."""
    device = "NVIDIA H100 80GB HBM3" if device_count else "cpu"
    return {"rank": rank, "slurm_node": node, "device": device, "device_count": device_count}


def test_a_node_whose_torch_sees_fewer_gpus_than_the_job_s_processes_fails() -> None:
    ranks = [_rank(i, "n1", 8) for i in range(8)] + [_rank(8 + i, "n2", 0) for i in range(8)]
    assert cuda_failures(ranks, 8) == ["node n2: torch can use 0 CUDA devices, expected 8 (one per process)"]
    assert cuda_failures([*ranks[:8], _rank(8, "n2", 4)], 8) == [
        "node n2: torch can use 4 CUDA devices, expected 8 (one per process)"
    ]
    assert cuda_failures(ranks[:8], 8) == []
    assert cuda_failures([_rank(0, "n1", 0)], 0) == []  # a CPU instance type


def test_the_preflight_gate_names_the_node_torch_runs_on_the_cpu() -> None:
    ranks = [{**_rank(0, "n1", 8), "matmul_max_abs_error": 0.0}, {**_rank(1, "n2", 0), "matmul_max_abs_error": 0.0}]
    result = {"ranks": ranks, "allreduce": [{"bytes": 1 << 20, "busbw_gbps": 100.0}]}
    failures = preflight_failures(result, 2, BusbwExpectation(gbps=100.0, at_bytes=1 << 20), gpus_per_node=1)
    assert failures == ["node n2: torch can use 0 CUDA devices, expected 1 (one per process)"]
    assert bad_nodes(failures) == ["n2"]


@pytest.mark.parametrize(
    ("device", "accelerator"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA A10G", "A10G"),
    ],
)
def test_a_device_of_the_instance_type_s_accelerator_passes(device: str, accelerator: str) -> None:
    assert device_failures([{**_rank(0, "n1", 8), "device": device}], "p", accelerator) == []


def test_a_node_with_other_gpus_than_the_instance_type_s_fails() -> None:
    # The busbw floor and peak FLOPs are the typed instance type's: p5 figures would judge A100s wrongly.
    ranks = [_rank(i, "p5-st-1", 8) for i in range(8)] + [
        {**_rank(8 + i, "p5-st-2", 8), "device": "NVIDIA A100-SXM4-80GB"} for i in range(8)
    ]
    failures = device_failures(ranks, "p5.48xlarge", "H100")
    assert failures == ["node p5-st-2: has NVIDIA A100-SXM4-80GB, p5.48xlarge has H100"]
    assert bad_nodes(failures) == ["p5-st-2"]
    assert device_failures(
        [{**_rank(0, "n1", 8), "device": "NVIDIA A100-SXM4-40GB"}], "p4de.24xlarge", "A100-80GB"
    ) == ["node n1: has NVIDIA A100-SXM4-40GB, p4de.24xlarge has A100-80GB"]


def test_cpu_ranks_and_cpu_instance_types_are_not_judged_on_their_device() -> None:
    assert device_failures([_rank(0, "n1", 0)], "p5.48xlarge", "H100") == []  # cuda_failures' to judge
    assert device_failures([{"rank": 0, "slurm_node": "n1"}], "p5.48xlarge", "H100") == []  # no device recorded
    assert device_failures([_rank(0, "n1", 1)], "local.cpu", "cpu") == []  # a GPU host may run a CPU type's jobs
