"""Preflight checks on every node of a job: ``torchrun ... preflight.py --results out.json``.

0. One result file per node (local rank 0, where DTP_PREFLIGHT_NODE_RESULTS
   names their folder): the node's versions, visible device count and probes,
   written before anything that can fail on a broken node (the rendezvous of
   the process group, opening a GPU), so the gate names the node even when its
   fault ends the job.
1. Environment screen per rank (the reference repo's pytorch-env-validation):
   host, torch / CUDA / NCCL versions, devices, and a small matmul checked
   against float64.
2. Raw probe outputs per node (local rank 0): the EFA installer, libfabric,
   aws-ofi-nccl and driver versions (the reference's efa-versions) and GPU
   health (nvidia-smi ECC counters, kernel Xid lines). Absent tools give None;
   DTP's gate (dtp.metrics.node_checks) interprets them.
3. All-reduce bus bandwidth over a size sweep, computed as nccl-tests does:
   algbw = bytes / time, busbw = algbw * 2 * (n - 1) / n (skipped with
   --no-busbw where nccl-tests or nccom-test measures it instead). Where torch
   has no CUDA (a Neuron image's) the sweep is gloo's on CPU tensors: TCP
   between the hosts, which the gate does not judge on an instance type with
   accelerators.
Rank 0 writes everything to one JSON file for the gate to judge. The backend
is the job's where DTP_PREFLIGHT_BACKEND names it (from its instance type): a
node whose torch lacks CUDA then fails on its own instead of choosing gloo
while the others choose nccl.

The Slurm job passes those two settings in the environment, not as options: an
image published before them holds a preflight.py whose options are only
--results, --max-bytes and --no-busbw, and which ignores the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from datetime import timedelta

# NGC images turn TF32 on for every fp32 matmul (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 in the image, which pyxis keeps
# over a job's exported value; EKS and Batch set neither): the environment screen's fp32 matmul is checked against
# float64 within 1e-2, which TF32 misses, so both are off in this process, before torch loads cuBLAS.
os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "0"
os.environ["NVIDIA_TF32_OVERRIDE"] = "0"

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import errors

NODE_RESULTS_ENV = "DTP_PREFLIGHT_NODE_RESULTS"  # the folder of the per-node result files, <node>.json
BACKEND_ENV = "DTP_PREFLIGHT_BACKEND"  # the job's: nccl or gloo (default: nccl where torch has CUDA)


def environment(device: torch.device) -> dict:
    a = torch.randn(256, 256, dtype=torch.float32, device=device)
    b = torch.randn(256, 256, dtype=torch.float32, device=device)
    error = (a @ b).double().cpu() - (a.double().cpu() @ b.double().cpu())
    return {
        "rank": dist.get_rank(),
        "host": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME", ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        # As text when not finite: the results travel as JSON, which has no NaN.
        "matmul_max_abs_error": worst if math.isfinite(worst := float(error.abs().max())) else str(worst),
    }


SMI_QUERY = "index,name,driver_version,ecc.errors.uncorrected.volatile.total"
OFI_NCCL_LIBS = ("/opt/amazon/ofi-nccl/lib/libnccl-net.so", "/opt/aws-ofi-nccl/lib/libnccl-net.so")


def _command(*argv: str) -> str | None:
    """What a tool prints, or None when it is not installed or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: str, limit: int = 64 << 10) -> str | None:
    try:
        with open(path, errors="replace") as fh:
            return fh.read(limit)
    except OSError:
        return None


def _ofi_nccl_strings() -> str | None:
    """The aws-ofi-nccl plugin's version strings (what `strings libnccl-net.so | grep aws-ofi-nccl` shows)."""
    for path in OFI_NCCL_LIBS:
        try:
            with open(path, "rb") as fh:
                found = re.findall(rb"[ -~]*aws-ofi-nccl [ -~]*", fh.read())
        except OSError:
            continue
        return "\n".join(sorted({line.decode() for line in found}))
    return None


def probes() -> dict[str, str | None]:
    dmesg = _command("dmesg")
    return {
        "efa_installed_packages": _read("/opt/amazon/efa_installed_packages"),
        "fi_info_version": _command("fi_info", "--version"),
        "ofi_nccl_strings": _ofi_nccl_strings(),
        "nvidia_smi": _command("nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv"),
        # None: dmesg refused (kernel.dmesg_restrict=1 for a non-root job); "" : read, and no Xid in it.
        "dmesg_xid": "\n".join(line for line in dmesg.splitlines() if "Xid" in line) if dmesg is not None else None,
    }


def node_record(backend: str, node_probes: dict[str, str | None]) -> dict:
    """What this node reports before its ranks meet: versions, the CUDA devices torch sees and the probes."""
    cuda = torch.cuda.is_available()
    return {
        "rank": int(os.environ.get("RANK", 0)),  # torchrun's, known before the process group exists
        "host": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME", ""),
        "backend": backend,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "probes": node_probes,
    }


def write_json(path: str, document: dict) -> None:
    """Write ``document`` whole or not at all: the gate never reads half a file."""
    partial = f"{path}.partial"
    with open(partial, "w") as fh:
        json.dump(document, fh, indent=1)
    os.replace(partial, path)


def bus_bandwidth(device: torch.device, max_bytes: int, iters: int = 5) -> list[dict]:
    world = dist.get_world_size()
    results = []
    size = 1 << 16
    while size <= max_bytes:
        tensor = torch.ones(size // 4, dtype=torch.float32, device=device)
        dist.all_reduce(tensor)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iters
        algbw = size / seconds / 1e9
        results.append(
            {
                "bytes": size,
                "time_us": round(seconds * 1e6, 1),
                "algbw_gbps": round(algbw, 4),
                "busbw_gbps": round(algbw * 2 * (world - 1) / world, 4),
            }
        )
        size *= 4
    return results


@errors.record  # torchrun's summary of a failed rank then shows its exception
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", required=True)
    parser.add_argument("--max-bytes", type=int, default=16 << 20)
    parser.add_argument("--no-busbw", action="store_true", help="nccl-tests or nccom-test measures it instead")
    args = parser.parse_args()
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        parser.error(f"{BACKEND_ENV}={backend!r}: the backend is nccl or gloo")
    node_results = os.environ.get(NODE_RESULTS_ENV)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    node_probes = probes() if local_rank == 0 else None
    if node_probes is not None and node_results:
        node = node_record(backend, node_probes)
        write_json(os.path.join(node_results, f"{node['slurm_node'] or node['host']}.json"), node)
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device: each rank its own GPU
    record = environment(device)
    if node_probes is not None:
        record["probes"] = node_probes
    envs: list = [None] * dist.get_world_size()
    dist.all_gather_object(envs, record)
    sweep = [] if args.no_busbw else bus_bandwidth(device, args.max_bytes)
    if dist.get_rank() == 0:
        write_json(
            args.results, {"backend": backend, "world_size": dist.get_world_size(), "ranks": envs, "allreduce": sweep}
        )
        best = max((r["busbw_gbps"] for r in sweep), default=None)
        print(json.dumps({"event": "preflight", "busbw_gbps_max": best}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
