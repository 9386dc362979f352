"""nccom-test's output parsed into the preflight's rows, against the samples its documentation publishes
(tests/unit/data, sources in line 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtp.metrics.nccom_test import NccomTestOutputError, parse_nccom_test

DATA = Path(__file__).parent / "data"


def sample(name: str) -> str:
    text = (DATA / name).read_text()
    assert text.startswith("# source: https://")
    return text


def test_two_nodes_sweep_with_the_average_time_column() -> None:
    result = parse_nccom_test(sample("nccom_test_all_reduce_2_nodes.txt"))
    assert [row["bytes"] for row in result.rows] == [8 << i for i in range(17)]
    # 1.42 and 2.80 GiB/s as printed, in GB/s: 524288 B in 343.84 us is 1.525 GB/s.
    assert result.rows[-1] == {"bytes": 524288, "time_us": 343.84, "algbw_gbps": 1.5247, "busbw_gbps": 3.0065}
    assert result.rows[0] == {"bytes": 8, "time_us": 63.52, "algbw_gbps": 0.0, "busbw_gbps": 0.0}
    assert result.avg_busbw_gbps == pytest.approx(0.2346 * 1.073741824, abs=1e-4)


def test_single_node_example_of_the_neuron_docs() -> None:
    result = parse_nccom_test(sample("nccom_test_all_reduce_single_node.txt"))
    # 32 MiB in 768 us: 43.69 GB/s, which nccom-test prints as 40.69 (GiB/s).
    assert result.rows == [{"bytes": 32 << 20, "time_us": 768.0, "algbw_gbps": 43.6906, "busbw_gbps": 43.6906}]
    assert result.rows[0]["algbw_gbps"] == pytest.approx((32 << 20) / 768e-6 / 1e9, rel=1e-3)
    assert result.avg_busbw_gbps == pytest.approx(40.6901 * 1.073741824, abs=1e-4)


def test_output_without_a_table_is_an_error() -> None:
    with pytest.raises(NccomTestOutputError, match="no nccom-test result row"):
        parse_nccom_test("nccom-test: error: NEURON_RT_ROOT_COMM_ID is not set\n")
