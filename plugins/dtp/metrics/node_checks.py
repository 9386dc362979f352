"""Per-node software versions and GPU health, from the raw probe outputs preflight collects.

The preflight program only captures what the tools print on each node
(``/opt/amazon/efa_installed_packages``, ``fi_info --version``, the
aws-ofi-nccl library's version string, ``nvidia-smi`` queries, kernel Xid
lines); every interpretation lives here, tested against real captured output.
The version set is the reference repo's efa-versions table.
"""

from __future__ import annotations

import re
from typing import Any

from dtp.hostlist import compress_hostlist

_EFA_INSTALLER = re.compile(r"#\s*EFA installer version:\s*(\S+)")
_LIBFABRIC = re.compile(r"^libfabric:\s*(\S+)", re.MULTILINE)
_OFI_NCCL = re.compile(r"aws-ofi-nccl\s+v?(\d+\.\d+\.\d+\S*)")
_XID = re.compile(r"NVRM: Xid \((?P<device>[^)]*)\):\s*(?P<code>\d+)")
# NVIDIA's Xid catalogue, "resolution bucket": these need the node drained (reset or reboot), not a job restart.
NODE_FATAL_XIDS = {
    48: "double-bit ECC error",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    143: "GPU initialization failure",
}


def node_name(record: dict[str, Any]) -> str:
    return str(record.get("slurm_node") or record.get("host") or f"rank {record.get('rank')}")


def versions(probes: dict[str, str | None]) -> dict[str, str]:
    """The efa-versions table of one node; ``absent`` where the component is not installed."""
    gpus = _smi_rows(probes.get("nvidia_smi"))
    found: dict[str, str | None] = {
        "efa_installer": _first(_EFA_INSTALLER, probes.get("efa_installed_packages")),
        "libfabric": _first(_LIBFABRIC, probes.get("fi_info_version")),
        "aws_ofi_nccl": _first(_OFI_NCCL, probes.get("ofi_nccl_strings")),
        "nvidia_driver": gpus[0].get("driver_version") if gpus else None,
    }
    return {key: value or "absent" for key, value in found.items()}


def _first(pattern: re.Pattern[str], text: str | None) -> str | None:
    match = pattern.search(text or "")
    return match.group(1) if match else None


def _smi_rows(text: str | None) -> list[dict[str, str]]:
    """``nvidia-smi --query-gpu=... --format=csv`` as one dict per GPU, keyed by the header's field names."""
    lines = [line for line in (text or "").splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        return []
    header = [name.strip().split(" [")[0] for name in lines[0].rstrip().removesuffix(",").split(",")]
    rows = []
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.rstrip().removesuffix(",").split(",")]
        if len(cells) == len(header):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def xid_errors(dmesg: str | None) -> list[tuple[int, str]]:
    """``(code, device)`` for each NVIDIA Xid line in a kernel log."""
    return [(int(m["code"]), m["device"]) for m in _XID.finditer(dmesg or "")]


def health_failures(node: str, probes: dict[str, str | None], expected_gpus: int) -> list[str]:
    """Why this node should not run the job: missing GPUs, uncorrected ECC errors, node-fatal Xids."""
    if expected_gpus == 0:  # a CPU instance type: nothing to check
        return []
    failures = []
    gpus = _smi_rows(probes.get("nvidia_smi"))
    if len(gpus) < expected_gpus:
        failures.append(f"node {node}: {len(gpus)} GPUs visible to nvidia-smi, expected {expected_gpus}")
    for gpu in gpus:
        ecc = gpu.get("ecc.errors.uncorrected.volatile.total", "")
        if ecc.isdigit() and int(ecc) > 0:
            gpu_id = gpu.get("index") or gpu.get("pci.bus_id", "?")
            failures.append(f"node {node}: GPU {gpu_id} has {ecc} uncorrected ECC errors")
    fatal = sorted({(code, dev) for code, dev in xid_errors(probes.get("dmesg_xid")) if code in NODE_FATAL_XIDS})
    for code, device in fatal:
        failures.append(f"node {node}: Xid {code} ({NODE_FATAL_XIDS[code]}) on {device}")
    return failures


def cuda_failures(ranks: list[dict[str, Any]], expected_gpus: int) -> list[str]:
    """Nodes where torch can use fewer CUDA devices than the job runs processes (one per GPU): their ranks would
    train on the CPU (0 devices) or fail to start. Records without ``device_count`` (not from preflight.py) are
    not judged."""
    if expected_gpus == 0:  # a CPU instance type: nothing to check
        return []
    counts: dict[str, int] = {}
    for record in ranks:
        if "device_count" in record:
            node = node_name(record)
            counts[node] = min(counts.get(node, expected_gpus), int(record["device_count"]))
    return [
        f"node {node}: torch can use {count} CUDA devices, expected {expected_gpus} (one per process)"
        for node, count in sorted(counts.items())
        if count < expected_gpus
    ]


def device_failures(ranks: list[dict[str, Any]], instance_type: str, accelerator: str) -> list[str]:
    """Nodes whose devices are not the instance type's ``accelerator``: the busbw floor and the peak FLOPs follow
    the instance type the run names, which would judge other hardware by figures not its own. A device is the
    accelerator when each dash-separated part of the accelerator's name is a word of the device's name (``NVIDIA
    A100-SXM4-80GB`` is an ``A100-80GB``, and an ``A100``). Not judged: a CPU instance type (its runs take any
    node), ranks on the CPU (``cuda_failures`` judges those) and records without ``device``."""
    if accelerator == "cpu":
        return []
    wanted = _words(accelerator)
    found: dict[str, set[str]] = {}
    for record in ranks:
        device = str(record.get("device") or "cpu")
        if device != "cpu" and not wanted <= _words(device):
            found.setdefault(node_name(record), set()).add(device)
    return [
        f"node {node}: has {', '.join(sorted(devices))}, {instance_type} has {accelerator}"
        for node, devices in sorted(found.items())
    ]


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower())) - {""}


def unchecked(node: str, probes: dict[str, str | None], expected_gpus: int) -> list[str]:
    """Health checks that could not run on this node: the verdict holds without them, the report says so."""
    if expected_gpus and probes.get("dmesg_xid") is None:
        return [
            f"node {node}: Xid errors not checked: the job's user may not read the kernel log "
            "(dmesg refused; kernel.dmesg_restrict=1?)"
        ]
    return []


def version_mismatches(per_node: dict[str, dict[str, str]]) -> list[str]:
    """Components whose version differs across nodes: a ``node <name>: ...`` line for each node off the version
    most nodes have (more than half: the odd nodes out, for ``exclude_nodes``), or, where no version has most of
    them (an even split), one line naming each version's nodes and no node as bad, since either side may be the
    wrong one."""
    failures = []
    components = sorted({key for table in per_node.values() for key in table})
    for component in components:
        by_version: dict[str, list[str]] = {}
        for node, table in sorted(per_node.items()):
            by_version.setdefault(table.get(component, "absent"), []).append(node)
        if len(by_version) == 1:
            continue
        common = next((v for v, nodes in by_version.items() if 2 * len(nodes) > len(per_node)), None)
        if common is None:
            split = "; ".join(f"{v} on {compress_hostlist(nodes)}" for v, nodes in sorted(by_version.items()))
            failures.append(f"{component} differs across nodes and no version is on most of them: {split}")
            continue
        failures += [
            f"node {node}: {component} {table.get(component, 'absent')}, where {len(by_version[common])} of "
            f"{len(per_node)} nodes have {common}"
            for node, table in sorted(per_node.items())
            if table.get(component, "absent") != common
        ]
    return failures
