"""Parse nccl-tests output (``all_reduce_perf`` and friends) into the preflight's all-reduce rows.

Both table layouts seen in the wild are read: the current one with ``root``
and ``#wrong`` columns and the older one with ``error``; lines may carry an
``mpirun --tag-output`` prefix such as ``[1,0]<stdout>:``. The out-of-place
columns are used, as the reference repo's plots do; wrong results are
counted in both the out-of-place and the in-place ``#wrong`` columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_PREFIX = re.compile(r"^\s*\[\d+,\d+\]<std(?:out|err)>:")
_HEADER = re.compile(r"#\s+size\s+count\s+type\s+redop\s+(?P<root>root\s+)?time")
_AVG = re.compile(r"#\s*Avg bus bandwidth\s*:\s*(?P<value>[\d.]+)")
_OOB = re.compile(r"#\s*Out of bounds values\s*:\s*(?P<count>\d+)\s+(?P<verdict>\w+)")


class NcclTestsOutputError(ValueError):
    """Output with no result row: the test did not run or crashed before printing its table."""


@dataclass
class NcclTestsResult:
    """The rows of one nccl-tests run, in the preflight's row format, and its summary lines."""

    rows: list[dict[str, float]] = field(default_factory=list)
    avg_busbw_gbps: float | None = None
    out_of_bounds: int | None = None
    wrong_results: int = 0


def _strip(line: str) -> str:
    return _PREFIX.sub("", line, count=1)


def parse_nccl_tests(text: str) -> NcclTestsResult:
    result = NcclTestsResult()
    # Columns after redop: [root] time algbw busbw #wrong|error (out-of-place), then the in-place ones.
    first = 4
    for raw in text.splitlines():
        line = _strip(raw)
        if match := _HEADER.search(line):
            first = 5 if match["root"] else 4
            continue
        if match := _AVG.search(line):
            result.avg_busbw_gbps = float(match["value"])
            continue
        if match := _OOB.search(line):
            result.out_of_bounds = int(match["count"])
            continue
        cells = line.split()
        if len(cells) < first + 4 or not cells[0].isdigit() or not cells[1].isdigit():
            continue
        try:
            time_us, algbw, busbw = (float(c) for c in cells[first : first + 3])
        except ValueError:
            continue
        # #wrong of the out-of-place then the in-place result (a wrong one either way is wrong); "N/A" under -c 0.
        result.wrong_results += sum(int(cell) for cell in cells[first + 3 : first + 8 : 4] if cell.isdigit())
        result.rows.append({"bytes": int(cells[0]), "time_us": time_us, "algbw_gbps": algbw, "busbw_gbps": busbw})
    if not result.rows:
        raise NcclTestsOutputError("no nccl-tests result row found: did the test run? (see the job log)")
    return result
