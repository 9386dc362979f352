"""What a preflight job on Slurm leaves besides preflight.py's combined results, and what it says about the nodes.

The job (slurm/preflight.sbatch.j2) records its nodes and each step's exit code
in a status file beside the results, and each node's first rank writes that
node's own result file before anything that can fail on a broken node. A node
that ends the job (a GPU missing, torch without CUDA, a crash) leaves no
combined results, yet the gate still reads every other node's file and names
the one that wrote none. Where no node wrote one, the job ended before its
ranks started (a container that did not start, torch that did not import, a
rendezvous not reached): torchrun's agents then end together whichever node
failed, so the gate names none. An image's preflight.py from before the node
files writes none: its combined results are judged alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtp.metrics.node_checks import node_name


def status_path(results_path: str) -> str:
    """The job's status file: ``nodes=<n1,n2>``, then ``<step>_rc=<code>`` per step, one a line."""
    return str(Path(results_path).with_suffix(".status"))


def node_results_dir(results_path: str) -> str:
    """The folder of the per-node result files, ``<node>.json``."""
    return f"{Path(results_path).with_suffix('')}-nodes"


@dataclass(frozen=True)
class PreflightStatus:
    """The job's nodes and the exit code of each step that ran (``torch``, ``nccl-tests``, ``nccom-test``)."""

    nodes: list[str]
    exit_codes: dict[str, int]


def parse_status(text: str) -> PreflightStatus:
    """The status file's content; lines it does not know are left out."""
    nodes: list[str] = []
    exit_codes: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "nodes":
            nodes = [node for node in value.split(",") if node]
        elif key.endswith("_rc") and value.lstrip("-").isdigit():
            exit_codes[key.removesuffix("_rc").replace("_", "-")] = int(value)
    return PreflightStatus(nodes, exit_codes)


def with_node_records(result: dict[str, Any] | None, node_records: list[dict[str, Any]]) -> dict[str, Any]:
    """The results to judge: preflight.py's combined ones where the job got that far, else the node files' records
    in place of the ranks' (no all-reduce measured)."""
    if result is not None:
        return result
    backends = {record.get("backend") for record in node_records}
    return {
        "backend": backends.pop() if len(backends) == 1 else None,
        "world_size": None,
        "ranks": sorted(node_records, key=lambda record: record.get("rank") or 0),
        "allreduce": [],
    }


NO_NODE_RESULT = (
    "preflight: no node wrote its result: the job ended before its ranks started (a container that did not start, "
    "torch that did not import, a rendezvous not reached; see the job log)"
)


def job_failures(
    status: PreflightStatus, result: dict[str, Any], node_records: list[dict[str, Any]], steps: Sequence[str]
) -> list[str]:
    """What the status file shows is wrong: the job's nodes that wrote no result (``node <name>: ...``, for the
    exclude_nodes advice) where others did, or one line naming no node where none did; then each of the ``steps``
    the job runs (``torch``, then its collective test's) that exited non-zero or recorded no exit code (Slurm ended
    the job during it or before it: what the job left then is not the whole of it)."""
    answered = {node_name(record) for record in [*result.get("ranks", []), *node_records]}
    if answered:
        failures = [
            f"node {node}: no preflight result (see the job log)" for node in status.nodes if node not in answered
        ]
    else:
        failures = [NO_NODE_RESULT]
    for step in dict.fromkeys([*steps, *status.exit_codes]):
        code = status.exit_codes.get(step)
        if code is None:
            failures.append(f"preflight step {step} did not finish (see the job log)")
        elif code != 0:
            failures.append(f"preflight step {step} exited with code {code} (see the job log)")
    return failures
