"""What a training run is estimated to take and cost, and the time limit its budget and expiry set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from dtp.recipes import Recipe

# Hours a run takes besides its training job: its cluster coming up (HyperPod's may take 90 minutes), data staging,
# preflight, results and teardown. A shorter expiry would let the reaper delete the run while it still runs. Its
# nodes are paid for during these hours too: the cost estimate and the budget's time limit count them.
SETUP_HOURS = 2.0
# Minutes the training job runs besides its steps and checkpoint writes: the image onto the nodes, the process
# groups, the model built and sharded (a checkpoint loaded when resuming). A budget that paid for the steps alone
# would have the scheduler stop the job before its last steps.
JOB_START_MINUTES = 10
# Minutes a framework's job spends before its first step on top of JOB_START_MINUTES: neuronx-distributed's job
# first compiles the model's graphs with neuron_parallel_compile (include/templates/slurm/train_neuronx.sbatch.j2),
# tens of minutes for a Llama 3 8B on trn1. An allowance, not a measurement.
FRAMEWORK_START_MINUTES = {"neuronx-distributed": 30}

# Parameters of the models the recipes name (``count_parameters`` of include/training/model.py, whose torch the
# Airflow components do not have; tests/unit/test_costs.py keeps the two equal).
MODEL_PARAMETERS = {
    "tiny": 459_392,
    "tiny_deep": 853_120,
    "small": 3_279_104,
    "llama3_2_1b": 1_498_482_688,
    "llama3_2_3b": 3_606_752_256,
    "llama3_1_8b": 8_030_261_248,
    "llama3_1_70b": 70_553_706_496,
    "tiny_moe": 755_328,
    "mixtral_8x7b": 46_702_792_704,
}
# Bytes a checkpoint holds per parameter: fp32 parameters and AdamW's two fp32 moments, as DTP's trainer saves them
# (the other frameworks are counted the same); Megatron-LM's torch_dist format, NeMo's too, adds the bf16 weights.
ADAMW_CHECKPOINT_BYTES_PER_PARAMETER = 12
CHECKPOINT_BYTES_PER_PARAMETER = {"megatron-lm": 14, "nemo": 14}
# Checkpoints a framework keeps, deleting older ones only once the next is written (one more on disk meanwhile):
# DTP's trainer keeps 2 (include/training/checkpoint.py), torchtitan its keep_latest_k (10; DTP's launch leaves
# it). The others are counted as keeping every checkpoint they save (Megatron-LM's and picotron's delete none).
CHECKPOINTS_KEPT = {"fsdp": 2, "torchtitan": 10}
# FSx for Lustre PERSISTENT_2 sizes: 1200 GiB, 2400 GiB, then multiples of 2400 GiB.
FSX_SMALLEST_GIB, FSX_STEP_GIB = 1200, 2400
# What a PERSISTENT_2 FSx for Lustre's storage costs, USD per GiB-month, by its throughput per TiB of storage
# (PerUnitStorageThroughput, MB/s per TiB: ParallelClusterSettings.fsx_throughput_per_tib): AWS list prices in
# us-east-1, the region of the instance types' prices (include/instance_types.yaml), from
# https://aws.amazon.com/fsx/lustre/pricing/ (quoted per GB-month of the file system's storage capacity, which FSx
# sizes in GiB). Checked 2026-12-07: the copy of that page read then gave the billing (by the month, prorated by the
# second) but not its table; a third-party estimator (c3x.dev, aws_fsx_lustre_file_system) gave 0.145 at 125, and
# a published table of ap-northeast-1's hourly prices (2022) gives the same steps between the four throughputs
# (1 : 1.48 : 2.48 : 4.48 there, 1 : 1.45 : 2.34 : 4.14 here) at Tokyo's higher level.
FSX_USD_PER_GIB_MONTH = {125: 0.145, 250: 0.210, 500: 0.340, 1000: 0.600}
# Hours AWS counts a month as when it prices by the hour what it quotes by the month.
HOURS_PER_MONTH = 730


@dataclass(frozen=True)
class RunFsx:
    """The PERSISTENT_2 FSx for Lustre file system DTP makes for a run with its cluster and deletes with it:
    ``storage_gib`` of storage at ``throughput_per_tib`` MB/s per TiB of it (``FSX_USD_PER_GIB_MONTH``'s keys)."""

    storage_gib: int
    throughput_per_tib: int

    @property
    def write_bytes_per_s(self) -> float:
        """Its baseline throughput in bytes per second, its storage in TiB times its throughput per TiB (FSx for
        Lustre's performance docs); its bursts are not counted."""
        return self.storage_gib / 1024 * self.throughput_per_tib * 1e6

    @property
    def usd_per_hour(self) -> float:
        """What it costs an hour: its GiB at the GiB-month price of its throughput, over ``HOURS_PER_MONTH``."""
        return self.storage_gib * FSX_USD_PER_GIB_MONTH[self.throughput_per_tib] / HOURS_PER_MONTH


# Bytes per second the training job writes its checkpoints at where DTP does not make the shared file system: the
# baseline throughput of the smallest FSx for Lustre ParallelCluster makes (1200 GiB at its default 250 MB/s per
# TiB), taken, being the least DTP makes, as an existing file system's, HyperPod's, EKS's, Batch's and the local
# one's. A file system DTP makes for the run writes at its own size's throughput (``RunFsx.write_bytes_per_s``).
SHARED_FS_WRITE_BYTES_PER_S = RunFsx(FSX_SMALLEST_GIB, 250).write_bytes_per_s


class RunSize(Protocol):
    """The parameters an estimate reads (``dtp.params.TrainParams`` has them)."""

    @property
    def num_nodes(self) -> int: ...

    @property
    def max_steps(self) -> int: ...

    @property
    def checkpoint_interval(self) -> int: ...


def checkpoint_bytes(recipe: Recipe) -> int:
    """Bytes one checkpoint of ``recipe``'s model takes: its parameters, weights and optimizer state."""
    per_parameter = CHECKPOINT_BYTES_PER_PARAMETER.get(recipe.framework, ADAMW_CHECKPOINT_BYTES_PER_PARAMETER)
    return MODEL_PARAMETERS[recipe.model] * per_parameter


def shared_fs_write_bytes_per_s(fsx: RunFsx | None) -> float:
    """Bytes per second the training job writes its checkpoints at: the baseline throughput of ``fsx``, the file
    system DTP makes for the run, else ``SHARED_FS_WRITE_BYTES_PER_S``.

    Conservative where not known: the file system's baseline, not its bursts. The nodes are taken to push that much:
    a file system sized to the run's checkpoints gives a few GB/s at most (4800 GiB at 250 MB/s per TiB: 1.2 GB/s),
    which one accelerator node's network carries; what the nodes' network carries is not modelled, and a run on few
    CPU nodes may write slower than this.
    """
    return SHARED_FS_WRITE_BYTES_PER_S if fsx is None else fsx.write_bytes_per_s


def checkpoint_write_seconds(recipe: Recipe, fsx: RunFsx | None = None) -> int:
    """About how long the training job takes to write one checkpoint of ``recipe``'s model to the shared file system
    (``shared_fs_write_bytes_per_s`` of ``fsx``, the file system DTP makes for the run): on the smallest FSx for
    Lustre a minute for a 1B model with DTP's trainer, 47 for a 70B one."""
    return math.ceil(checkpoint_bytes(recipe) / shared_fs_write_bytes_per_s(fsx))


def checkpoint_saves(params: RunSize) -> int:
    """Checkpoints the training job writes: one every ``checkpoint_interval`` steps, and one at the last step."""
    return math.ceil(params.max_steps / params.checkpoint_interval)


def checkpoints_on_disk(params: RunSize, recipe: Recipe) -> int:
    """The most checkpoints the shared file system holds at once: those the framework keeps and the one it writes."""
    kept = CHECKPOINTS_KEPT.get(recipe.framework)
    saves = checkpoint_saves(params)
    return saves if kept is None else min(saves, kept + 1)


def checkpoint_footprint_bytes(params: RunSize, recipe: Recipe) -> int:
    """The most bytes the run's checkpoints take on the shared file system at once."""
    return checkpoints_on_disk(params, recipe) * checkpoint_bytes(recipe)


def fsx_storage_gib_for(needed_bytes: float) -> int:
    """The smallest FSx for Lustre PERSISTENT_2 file system, in GiB, that holds ``needed_bytes``."""
    gib = needed_bytes / 2**30
    return FSX_SMALLEST_GIB if gib <= FSX_SMALLEST_GIB else math.ceil(gib / FSX_STEP_GIB) * FSX_STEP_GIB


def estimate_training_hours(params: RunSize, recipe: Recipe, fsx: RunFsx | None = None) -> float:
    """Hours the training job runs: its steps at the recipe's ``expected_step_seconds``, its checkpoints written to
    the shared file system (``shared_fs_write_bytes_per_s`` of ``fsx``, the file system DTP makes for the run), and
    its start (``JOB_START_MINUTES``, plus the framework's ``FRAMEWORK_START_MINUTES``)."""
    steps = params.max_steps * recipe.expected_step_seconds
    writes = checkpoint_saves(params) * checkpoint_bytes(recipe) / shared_fs_write_bytes_per_s(fsx)
    start_minutes = JOB_START_MINUTES + FRAMEWORK_START_MINUTES.get(recipe.framework, 0)
    return (steps + writes) / 3600 + start_minutes / 60


def run_usd_per_hour(num_nodes: int, price_per_hour: float, fsx: RunFsx | None = None) -> float:
    """What the run's resources cost an hour: ``num_nodes`` nodes at ``price_per_hour`` each, and ``fsx``, the file
    system DTP makes for the run (none for one that outlives runs, which the run does not pay for)."""
    return price_per_hour * num_nodes + (fsx.usd_per_hour if fsx else 0.0)


def setup_cost_usd(num_nodes: int, price_per_hour: float, fsx: RunFsx | None = None) -> float:
    """What the run's resources (``run_usd_per_hour``) cost besides its training job: ``SETUP_HOURS`` (cluster
    creation, staging, preflight, checkpoint save and teardown)."""
    return SETUP_HOURS * run_usd_per_hour(num_nodes, price_per_hour, fsx)


def estimate_cost_usd(params: RunSize, recipe: Recipe, price_per_hour: float, fsx: RunFsx | None = None) -> float:
    """What the run costs on ``params.num_nodes`` nodes at ``price_per_hour`` each, with ``fsx``, the file system
    DTP makes for it: its training job and the ``SETUP_HOURS`` besides it (what ``budget_usd`` is compared with)."""
    hourly = run_usd_per_hour(params.num_nodes, price_per_hour, fsx)
    training = estimate_training_hours(params, recipe, fsx) * hourly
    return round(training + setup_cost_usd(params.num_nodes, price_per_hour, fsx), 2)


def training_time_limit_minutes(
    budget_usd: float,
    num_nodes: int,
    price_per_hour: float,
    expiry_hours: float,
    pending_timeout_minutes: int,
    fsx: RunFsx | None = None,
) -> int:
    """Minutes the training job may run; its scheduler stops it there.

    The least of what ``budget_usd`` pays for on ``num_nodes`` nodes at ``price_per_hour`` each, with ``fsx`` (the
    file system DTP makes for the run), once their ``SETUP_HOURS`` are paid (no bound, for instances that cost
    nothing on a file system the run does not pay for) and what ``expiry_hours`` leaves once the run's cluster and
    results (``SETUP_HOURS``) and its longest wait in the queue are counted, so that the reaper does not delete a run
    that trains (where its cluster came up within those hours). At least a minute, Slurm's least
    (``validate_params`` refuses a budget below the estimate, setup included).
    """
    limits = [int((expiry_hours - SETUP_HOURS) * 60) - pending_timeout_minutes]
    if (hourly := run_usd_per_hour(num_nodes, price_per_hour, fsx)) > 0:
        training_usd = budget_usd - setup_cost_usd(num_nodes, price_per_hour, fsx)
        limits.append(int(training_usd / hourly * 60))
    return max(1, min(limits))
