"""DTP's FSDP trainer: ``torchrun ... train.py --config run.json``.

One JSON config (written by the train task from the recipe and the run's
params, so no value travels through a shell) drives everything. Rank 0 prints
one JSON line per logged step and appends it to ``metrics_path``. The run
resumes from the newest complete checkpoint, so a Slurm requeue or a torchrun
restart loses at most one checkpoint interval. SIGTERM (a Slurm time limit or
preemption, a Kubernetes eviction: torchrun forwards it to its workers and
kills them 30 s later) makes every rank stop after the step it is in, save a
checkpoint there and exit with 143. So does ``stop_file`` appearing: the Slurm
batch script creates it when Slurm signals it ahead of the job's time limit, early
enough for a save that would not fit in SIGTERM's 30 s (a signal to the job's
step reaches torchrun, not its workers).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import resource
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing import errors
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoint
from heartbeat import heartbeat
from metrics_log import emit
from model import MODELS, Transformer, count_parameters, flops_per_token
from profiling import StepProfiler
from stopping import catch_sigterm, diverged, exit_preempted, stop_requested

# Dense bf16 peak per device, for MFU (vendor datasheets, without sparsity), by a pattern of the name CUDA
# gives the device ("NVIDIA H100 80GB HBM3"): the first that matches. A run on a cluster takes its instance
# type's figure from include/instance_types.yaml instead (``TrainConfig.peak_flops``).
PEAK_FLOPS = (
    (r"H100 PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H100|H200", 989e12),
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"L4\b", 121e12),
    (r"A10G", 70e12),  # AWS's figure: NVIDIA's A10 (125e12) is another part
)


@dataclass
class TrainConfig:
    model: str
    data_path: str
    checkpoint_dir: str
    metrics_path: str
    seq_len: int = 128
    micro_batch: int = 16
    max_steps: int = 200
    lr: float = 5e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_interval: int = 50
    log_interval: int = 1
    precision: str = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    collective_timeout_s: int = 300
    checkpoint_timeout_s: int = 1800  # for a save's or a load's collectives, which wait for the slowest rank's writes
    run_name: str = "local"
    profile_steps: int = 0
    profile_dir: str = ""
    peak_flops: float | None = None  # per device, for MFU; None: by the device's name (PEAK_FLOPS)
    device: str = "auto"  # "auto": CUDA when torch can use it, else the CPU; "cuda": CUDA or fail
    final_checkpoint: bool = True  # off for a benchmark: it measures steps, and a 3B model's save is 43 GB
    stop_check_steps: int = 1  # steps between the ranks' checks for a stop (each a collective every rank waits on)
    stop_file: str = ""  # its appearing asks the run to stop as SIGTERM does ("": none)

    @classmethod
    def load(cls, path: str) -> TrainConfig:
        return cls(**json.loads(Path(path).read_text()))


def lr_at(cfg: TrainConfig, step: int, schedule_steps: int | None = None) -> float:
    """The LR of 0-based ``step``: a linear warm-up that peaks at the last warm-up step, then a cosine decay that
    reaches 0.1 * lr on the last step of ``schedule_steps`` (default ``max_steps``), held after."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step + 1 - cfg.warmup_steps) / max(1, (schedule_steps or cfg.max_steps) - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_for(
    data: np.ndarray,
    cfg: TrainConfig,
    step: int,
    rank: int,
    world: int = 1,
    resumed_from: tuple[int, int] = (0, 0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch of ``rank`` (of ``world``) at ``step``: the data's windows of ``seq_len`` + 1 tokens, end to
    end, are dealt out in an order shuffled anew for each pass over the data, ``micro_batch`` to each rank in turn.
    No two ranks of a step share a window, each pass sees every window once, and the batches depend on the seed
    and the samples dealt before the step only, so a resumed run sees the ones an uninterrupted run would.
    ``resumed_from``: the step the run resumed from and the samples dealt up to it, which continue from there
    whatever the world size and micro-batch they were dealt with."""
    windows = (len(data) - 1) // cfg.seq_len
    if windows < 1:
        raise ValueError(f"{cfg.data_path}: {len(data)} tokens, fewer than one sequence of {cfg.seq_len} + 1")
    resumed_step, resumed_samples = resumed_from
    first = resumed_samples + ((step - resumed_step) * world + rank) * cfg.micro_batch
    rows = []
    for sample in range(first, first + cfg.micro_batch):
        epoch, index = divmod(sample, windows)
        start = shuffled(index, windows, cfg.seed, epoch) * cfg.seq_len
        rows.append(data[start : start + cfg.seq_len + 1])
    tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
    return tokens[:, :-1], tokens[:, 1:]


@functools.lru_cache(maxsize=64)
def _affine(windows: int, seed: int, epoch: int) -> tuple[int, int]:
    gen = np.random.default_rng((seed, epoch))
    while True:  # a multiplier coprime with the count makes the map a permutation
        a = int(gen.integers(1, windows)) if windows > 1 else 1
        if math.gcd(a, windows) == 1:
            return a, int(gen.integers(0, windows))


def shuffled(index: int, windows: int, seed: int, epoch: int) -> int:
    """Where the ``index``-th window of pass ``epoch`` is: an affine permutation of ``range(windows)`` drawn from
    (seed, epoch), which needs no table however large the data."""
    a, b = _affine(windows, seed, epoch)
    return (a * index + b) % windows


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for pattern, flops in PEAK_FLOPS if re.search(pattern, name)), None)


def mfu_peak(cfg: TrainConfig, device: torch.device) -> float | None:
    """The per-device FLOP/s MFU is measured against: a dense bf16 peak, so only a bf16 run has an MFU."""
    if cfg.precision != "bf16":
        return None
    return cfg.peak_flops or peak_flops(device)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reserved_memory_mb(device: torch.device) -> float | None:
    """Peak memory the caching allocator held (what other trainers, torchtitan's among them, report)."""
    return round(torch.cuda.max_memory_reserved(device) / 2**20, 1) if device.type == "cuda" else None


def build(cfg: TrainConfig, device: torch.device, world: int):
    """The model sharded block by block with FSDP2, and its optimizer. The model is built on the meta device and
    initialised once sharded, so each rank only ever holds its shards. Each block is wrapped for activation
    checkpointing and compiled (a dense one whole, ``fullgraph``) before it is sharded, so FSDP's hooks stay
    outside the compiled graphs: compiling the whole model instead breaks its graph at every block's hooks.
    Checkpoints keep the plain parameter names either way (``get_state_dict`` strips the wrappers')."""
    args = MODELS[cfg.model]
    with torch.device("meta"):  # no rank ever holds the whole model: a 70B one is 280 GB in fp32
        model = Transformer(args, cfg.seq_len)
    mesh = init_device_mesh(device.type, (world,))
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # The embedding and the output projection are units of their own, as the blocks are (a Llama 3 vocabulary makes
    # them 1-2B parameters): gathered only around their use, their gradients reduced while the blocks' backward runs.
    fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=policy)
    for i, block in enumerate(model.layers):
        if cfg.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            block = checkpoint_wrapper(block)
        if cfg.compile:
            # The experts' routing has data-dependent shapes (torch.nonzero): a MoE block's graph breaks there.
            block = torch.compile(block, fullgraph=not args.n_experts)
        model.layers[i] = block
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(model.layers) - 1)
    # Last in the forward, first in the backward: kept gathered in between, as the last block is.
    fully_shard([model.norm, model.output], mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    model.init_weights(cfg.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    return model, optimizer


def select_device(cfg: TrainConfig) -> tuple[str, torch.device]:
    """The process group's backend and this rank's device. With ``device`` "cuda" (a GPU instance type) a node whose
    torch cannot use CUDA fails here, rather than train on its CPU for the whole budget."""
    if cfg.device not in ("auto", "cuda"):
        raise ValueError(f"device must be 'auto' or 'cuda', not {cfg.device!r}")
    if torch.cuda.is_available():
        return "nccl", torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.device == "cuda":
        raise RuntimeError(
            f"device 'cuda' is required but torch {torch.__version__} (CUDA build: {torch.version.cuda}) cannot use "
            f"a GPU on {socket.gethostname()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
            "check the node's driver and that the image's torch is a CUDA build"
        )
    return "gloo", torch.device("cpu")


def train(cfg: TrainConfig) -> None:
    catch_sigterm()
    backend, device = select_device(cfg)
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.collective_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    stop_group = (
        dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.collective_timeout_s))
        if backend != "gloo"
        else None
    )
    # A large model's save takes longer than collective_timeout_s (a 70B one about 47 minutes on a small FSx):
    # its collectives, waiting for the slowest rank's writes, get a group of their own with a timeout sized for it.
    checkpoint_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.checkpoint_timeout_s))
    torch.manual_seed(cfg.seed)

    model, optimizer = build(cfg, device, world)
    ckpt_dir, metrics_path = Path(cfg.checkpoint_dir), Path(cfg.metrics_path)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(ckpt_dir)
    dist.barrier()

    start, schedule, samples = 0, cfg.max_steps, 0
    latest = checkpoint.newest_complete(ckpt_dir)
    if latest is not None:
        with heartbeat(f"loading {latest}") if rank == 0 else contextlib.nullcontext():
            meta = checkpoint.load(latest, model, optimizer, checkpoint_group)
        # The cosine schedule keeps the length the run started with: a resume to a larger max_steps would stretch
        # it and raise the LR mid-run (a checkpoint from before the schedule was recorded: this run's max_steps).
        start, schedule = meta["step"], meta.get("lr_schedule_steps", cfg.max_steps)
        # The data continues after the samples the checkpoint's run was dealt, on however many ranks (a checkpoint
        # from before they were recorded: as many as this run's).
        samples = meta.get("samples_seen", start * world * cfg.micro_batch)
    args = MODELS[cfg.model]
    params = count_parameters(args)
    fpt = flops_per_token(args, cfg.seq_len)
    peak = mfu_peak(cfg, device)
    if rank == 0:
        emit(
            {
                "event": "start",
                "run": cfg.run_name,
                "model": cfg.model,
                "params": params,
                "world_size": world,
                "backend": backend,
                "resumed_from_step": start if latest else None,
                "resumed_from_samples": samples if latest else None,
                "time": time.time(),
            },
            metrics_path,
        )
        if schedule != cfg.max_steps:
            kept = {"event": "lr_schedule_kept", "schedule_steps": schedule, "max_steps": cfg.max_steps}
            emit({**kept, "time": time.time()}, metrics_path)

    data = np.memmap(cfg.data_path, dtype=np.uint8, mode="r")
    fail_at = int(os.environ.get("DTP_FAIL_AT_STEP", "0"))
    tokens_per_step = cfg.micro_batch * cfg.seq_len * world
    window_start, window_steps = time.perf_counter(), 0
    # The first step after a (re)start warms up allocators and compiled code: profile the ones after it.
    first = min(start + 2, cfg.max_steps)
    profiler = StepProfiler(cfg.profile_dir, first, min(cfg.profile_steps, cfg.max_steps - first + 1), rank, device)
    for step in range(start, cfg.max_steps):
        profiler.before_step(step + 1)
        if fail_at and step + 1 == fail_at:
            raise RuntimeError(f"injected failure at step {fail_at} (DTP_FAIL_AT_STEP)")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step, schedule)
        inputs, targets = (t.to(device) for t in batch_for(data, cfg, step, rank, world, (start, samples)))
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_steps += 1
        done = step + 1
        trace = profiler.after_step(done)
        if trace and rank == 0:
            emit(
                {"event": "profile", "steps": [first, done], "path": str(trace.parent), "time": time.time()},
                metrics_path,
            )
        preempted = (
            done < cfg.max_steps and done % cfg.stop_check_steps == 0 and stop_requested(stop_group, cfg.stop_file)
        )
        logged = done % cfg.log_interval == 0 or done == cfg.max_steps
        saved = done % cfg.checkpoint_interval == 0 or (done == cfg.max_steps and cfg.final_checkpoint) or preempted
        if logged or saved:
            norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not math.isfinite(norm):
                diverged(done, norm, ckpt_dir, metrics_path, rank)
        if logged:
            loss_avg = loss.detach().clone()
            dist.all_reduce(loss_avg, op=dist.ReduceOp.AVG if backend == "nccl" else dist.ReduceOp.SUM)
            if backend != "nccl":
                loss_avg /= world
            mean_loss = loss_avg.item()  # waits for the device to finish the window's steps, so the time is theirs
            elapsed = time.perf_counter() - window_start
            tps = tokens_per_step * window_steps / elapsed
            if rank == 0:
                emit(
                    {
                        "event": "step",
                        "step": done,
                        "max_steps": cfg.max_steps,
                        # The steps left at this window's pace: the run's progress as the task log shows it.
                        "eta_s": round((cfg.max_steps - done) * elapsed / window_steps),
                        "loss": round(mean_loss, 5),
                        "lr": lr_at(cfg, step, schedule),
                        "grad_norm": round(norm, 4),
                        "tokens_per_s": round(tps, 1),
                        "tokens_per_s_per_device": round(tps / world, 1),
                        "mfu": round(fpt * tps / world / peak, 4) if peak else None,
                        "memory_mb": round(memory_mb(device), 1),
                        "memory_reserved_mb": reserved_memory_mb(device),
                        "time": time.time(),
                    },
                    metrics_path,
                )
            window_start, window_steps = time.perf_counter(), 0
        if saved:
            step_loss = float(loss.item())
            saving = time.perf_counter()
            seen = samples + (done - start) * world * cfg.micro_batch
            extra = {"loss": step_loss, "lr_schedule_steps": schedule, "samples_seen": seen}
            with heartbeat(f"saving the checkpoint of step {done}") if rank == 0 else contextlib.nullcontext():
                path = checkpoint.save(ckpt_dir, done, model, optimizer, extra, group=checkpoint_group)
            window_start += time.perf_counter() - saving  # saving is not training: the window's throughput skips it
            if rank == 0:
                emit({"event": "checkpoint", "step": done, "path": str(path), "time": time.time()}, metrics_path)
        if preempted:
            exit_preempted(done, metrics_path, rank)

    if rank == 0:
        emit({"event": "end", "step": cfg.max_steps, "config": asdict(cfg), "time": time.time()}, metrics_path)
    dist.destroy_process_group()


@errors.record  # torchrun's summary of a failed rank then shows its exception
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="path to the run's JSON config")
    train(TrainConfig.load(parser.parse_args().config))


if __name__ == "__main__":
    main()
