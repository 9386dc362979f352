"""The preflight gate: judge a cluster before training spends money on it.

Input is the preflight program's JSON (one record per rank, raw probe outputs
per node, the all-reduce sweep, or rows parsed from nccl-tests or nccom-test).
Every failure names the node or the number it is about; the bandwidth failure
carries the measured-vs-expected table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dtp.metrics.node_checks import (
    cuda_failures,
    health_failures,
    node_name,
    unchecked,
    version_mismatches,
    versions,
)

# Versions reported by every rank's environment screen, then those read from each node's probes.
RANK_VERSIONS = ("python", "torch", "cuda", "nccl")
MATMUL_MAX_ERROR = 1e-2
BUSBW_NOT_CHECKED = "busbw not checked: gloo on CPU measures no accelerator collective"


@dataclass(frozen=True)
class BusbwExpectation:
    """Expected all-reduce bus bandwidth at one message size, and the share of it that passes."""

    gbps: float
    at_bytes: int
    tolerance: float = 0.8

    @property
    def floor(self) -> float:
        return self.gbps * self.tolerance


def reference_row(sweep: list[dict[str, Any]], at_bytes: int) -> dict[str, Any] | None:
    """The measured row the expectation is judged on: the largest size not above ``at_bytes``."""
    eligible = [row for row in sweep if row["bytes"] <= at_bytes] or sweep[:1]
    return max(eligible, key=lambda row: row["bytes"], default=None)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def busbw_table(sweep: list[dict[str, Any]], expected: BusbwExpectation | None) -> str:
    """The sweep as a fixed-width table, the judged row marked with the expected figure and verdict (none marked
    without an expectation: a sweep that is not judged)."""
    judged = reference_row(sweep, expected.at_bytes) if expected else None
    lines = [f"{'size':>10} {'busbw GB/s':>11} {'expected':>9} {'floor':>9}  verdict"]
    for row in sweep:
        line = f"{_size(row['bytes']):>10} {row['busbw_gbps']:>11.3f}"
        if expected and row is judged:
            verdict = "ok" if row["busbw_gbps"] >= expected.floor else "TOO LOW"
            line += f" {expected.gbps:>9.3f} {expected.floor:>9.3f}  {verdict}"
        lines.append(line)
    return "\n".join(lines)


def busbw_failures(sweep: list[dict[str, Any]], expected: BusbwExpectation) -> list[str]:
    judged = reference_row(sweep, expected.at_bytes)
    if judged is None:
        return ["busbw: no all-reduce measurement in the preflight results"]
    if judged["busbw_gbps"] >= expected.floor:
        return []
    return [
        f"busbw: {judged['busbw_gbps']:.3f} GB/s at {_size(judged['bytes'])} < {expected.floor:.3f} GB/s "
        f"({expected.tolerance:.0%} of the expected {expected.gbps} GB/s)\n{busbw_table(sweep, expected)}"
    ]


def cpu_sweep_on_accelerators(result: dict[str, Any], accelerator: str) -> bool:
    """Whether the all-reduce rows are preflight.py's gloo sweep on CPU tensors on an instance type with
    accelerators (a Neuron image's torch has no CUDA): they measure TCP between the hosts, not the accelerators'
    collective, and judged against the instance type's figure would fail every healthy cluster."""
    return accelerator != "cpu" and result.get("backend") == "gloo" and bool(result.get("allreduce"))


def node_versions(result: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The efa-versions table per node, with the environment screen's versions."""
    table: dict[str, dict[str, str]] = {}
    for record in result.get("ranks", []):
        node = table.setdefault(node_name(record), {})
        node.update({key: str(record.get(key)) for key in RANK_VERSIONS})
        if "probes" in record:
            node.update(versions(record["probes"]))
    return table


def preflight_failures(
    result: dict[str, Any],
    num_nodes: int,
    expected: BusbwExpectation,
    gpus_per_node: int = 0,
    busbw_checked: bool = True,
) -> list[str]:
    """Everything wrong with the cluster, one line (or table) per problem; empty when it may train. The bus
    bandwidth is judged only when ``busbw_checked``."""
    ranks = result.get("ranks", [])
    failures = []
    nodes = sorted({node_name(r) for r in ranks})
    if len(nodes) < num_nodes:
        failures.append(f"nodes: {len(nodes)} answered ({', '.join(nodes)}), expected {num_nodes}")
    failures += version_mismatches(node_versions(result))
    for record in ranks:
        error = float(record.get("matmul_max_abs_error", 0))  # "nan" or "inf" from a device computing garbage
        if not error <= MATMUL_MAX_ERROR:
            failures.append(
                f"node {node_name(record)}: matmul on rank {record.get('rank')} is wrong (max error {error:.3g})"
            )
        if "probes" in record:
            failures += health_failures(node_name(record), record["probes"], gpus_per_node)
    failures += cuda_failures(ranks, gpus_per_node)
    # One rank has no peer: its bus bandwidth is zero by definition, not a fault.
    if busbw_checked and result.get("world_size") != 1:
        failures += busbw_failures(result.get("allreduce", []), expected)
    return failures


def preflight_warnings(result: dict[str, Any], gpus_per_node: int = 0, busbw_checked: bool = True) -> list[str]:
    """Checks that could not run, one line per node (and one for a bus bandwidth not judged): they do not fail
    the cluster, the report lists them."""
    probed = {node_name(r): r["probes"] for r in result.get("ranks", []) if "probes" in r}
    lines = [line for node, probes in sorted(probed.items()) for line in unchecked(node, probes, gpus_per_node)]
    return lines if busbw_checked else [BUSBW_NOT_CHECKED, *lines]


def checked_nodes(result: dict[str, Any]) -> list[str]:
    """The Slurm nodes the preflight job's ranks ran on (``SLURMD_NODENAME``), sorted: the nodes it checked; none
    off Slurm."""
    return sorted({str(record["slurm_node"]) for record in result.get("ranks", []) if record.get("slurm_node")})


def bad_nodes(failures: list[str]) -> list[str]:
    """Nodes a failure names as unhealthy (``node <name>: ...``): candidates for ``exclude_nodes``."""
    return sorted({f.split(":", 1)[0].removeprefix("node ") for f in failures if f.startswith("node ")})


def preflight_message(failures: list[str], nodes_outlive_runs: bool = True) -> str:
    """The task's error: every failure, then how to run without the nodes found bad, on a cluster whose nodes
    outlive the run (a cluster made for the run goes with it)."""
    message = "preflight failed:\n" + "\n".join(failures)
    if (nodes := bad_nodes(failures)) and nodes_outlive_runs:
        message += f"\nto train without them, trigger again with exclude_nodes={','.join(nodes)}"
    return message
