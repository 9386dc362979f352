"""Parse nccom-test output (the Neuron SDK's collective benchmark, aws-neuronx-tools) into the preflight's
all-reduce rows.

The table has one row per size under a header naming its columns (``size(B)``,
``count(elems)``, ``type``, ``time(us)`` or ``time:avg(us)``, ``algbw(GB/s)``,
``busbw(GB/s)``), then ``Avg bus bandwidth: <x>GB/s``. Its "GB/s" are gibibytes
per second (the Neuron docs' column descriptions): the rows are converted to
GB/s (10^9 bytes), the unit of nccl-tests, preflight.py's sweep and the
instance types' expectations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

GIB = 1 << 30
_HEADER = re.compile(r"^\s*size\(B\)\s")
_AVG = re.compile(r"^\s*Avg bus bandwidth\s*:\s*(?P<value>[\d.]+)\s*GB/s")


class NccomTestOutputError(ValueError):
    """Output with no result row: the benchmark did not run or failed before printing its table."""


@dataclass
class NccomTestResult:
    """The rows of one nccom-test run, in the preflight's row format (GB/s), and its average bus bandwidth."""

    rows: list[dict[str, float]] = field(default_factory=list)
    avg_busbw_gbps: float | None = None


def _gbps(gib_per_s: str) -> float:
    return round(float(gib_per_s) * GIB / 1e9, 4)


def parse_nccom_test(text: str) -> NccomTestResult:
    """The rows of nccom-test's table, read by its header's column names; NccomTestOutputError when it has none."""
    result = NccomTestResult()
    columns: list[str] = []
    for line in text.splitlines():
        if _HEADER.match(line):
            columns = line.split()
            continue
        if match := _AVG.match(line):
            result.avg_busbw_gbps = _gbps(match["value"])
            continue
        cells = line.split()
        if not columns or len(cells) != len(columns) or not cells[0].isdigit():
            continue
        row = dict(zip(columns, cells, strict=True))
        try:
            time_us = next(float(value) for name, value in row.items() if name.startswith("time"))
            algbw, busbw = _gbps(row["algbw(GB/s)"]), _gbps(row["busbw(GB/s)"])
        except (KeyError, StopIteration, ValueError):
            continue
        result.rows.append({"bytes": int(row["size(B)"]), "time_us": time_us, "algbw_gbps": algbw, "busbw_gbps": busbw})
    if not result.rows:
        raise NccomTestOutputError("no nccom-test result row found: did the benchmark run? (see the job log)")
    return result
