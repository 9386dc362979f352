"""What a training run is estimated to take and cost, and the time limit its budget and expiry set."""

from __future__ import annotations

import math
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
# Bytes per second the training job writes its checkpoints to the shared file system at: the baseline throughput of
# the FSx for Lustre ParallelCluster makes by default (PERSISTENT_2, 1200 GiB at 250 MB/s per TiB:
# ParallelClusterSettings), taken as every platform's. A larger or faster file system writes sooner.
SHARED_FS_WRITE_BYTES_PER_S = 1200 / 1024 * 250e6
# FSx for Lustre PERSISTENT_2 sizes: 1200 GiB, 2400 GiB, then multiples of 2400 GiB.
FSX_SMALLEST_GIB, FSX_STEP_GIB = 1200, 2400


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


def checkpoint_write_seconds(recipe: Recipe) -> int:
    """About how long the training job takes to write one checkpoint of ``recipe``'s model to the shared file system
    (``SHARED_FS_WRITE_BYTES_PER_S``): a minute for a 1B model with DTP's trainer, 47 for a 70B one."""
    return math.ceil(checkpoint_bytes(recipe) / SHARED_FS_WRITE_BYTES_PER_S)


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


def estimate_training_hours(params: RunSize, recipe: Recipe) -> float:
    """Hours the training job runs: its steps at the recipe's ``expected_step_seconds``, its checkpoints written to
    the shared file system (``SHARED_FS_WRITE_BYTES_PER_S``), and its start (``JOB_START_MINUTES``, plus the
    framework's ``FRAMEWORK_START_MINUTES``)."""
    steps = params.max_steps * recipe.expected_step_seconds
    writes = checkpoint_saves(params) * checkpoint_bytes(recipe) / SHARED_FS_WRITE_BYTES_PER_S
    start_minutes = JOB_START_MINUTES + FRAMEWORK_START_MINUTES.get(recipe.framework, 0)
    return (steps + writes) / 3600 + start_minutes / 60


def setup_cost_usd(num_nodes: int, price_per_hour: float) -> float:
    """What the run's nodes cost besides its training job: ``SETUP_HOURS`` (cluster creation, staging, preflight,
    checkpoint save and teardown) on ``num_nodes`` nodes at ``price_per_hour`` each."""
    return SETUP_HOURS * price_per_hour * num_nodes


def estimate_cost_usd(params: RunSize, recipe: Recipe, price_per_hour: float) -> float:
    """What the run costs on ``params.num_nodes`` nodes at ``price_per_hour`` each: its training job and the
    ``SETUP_HOURS`` besides it (what ``budget_usd`` is compared with)."""
    training = estimate_training_hours(params, recipe) * price_per_hour * params.num_nodes
    return round(training + setup_cost_usd(params.num_nodes, price_per_hour), 2)


def training_time_limit_minutes(
    budget_usd: float,
    num_nodes: int,
    price_per_hour: float,
    expiry_hours: float,
    pending_timeout_minutes: int,
) -> int:
    """Minutes the training job may run; its scheduler stops it there.

    The least of what ``budget_usd`` pays for on ``num_nodes`` nodes at ``price_per_hour`` each once the nodes'
    ``SETUP_HOURS`` are paid (no bound, for instances that cost nothing) and what ``expiry_hours`` leaves once the
    run's cluster and results (``SETUP_HOURS``) and its longest wait in the queue are counted, so that the reaper
    does not delete a run that trains (where its cluster came up within those hours). At least a minute, Slurm's
    least (``validate_params`` refuses a budget below the estimate, setup included).
    """
    limits = [int((expiry_hours - SETUP_HOURS) * 60) - pending_timeout_minutes]
    if price_per_hour > 0:
        training_usd = budget_usd - setup_cost_usd(num_nodes, price_per_hour)
        limits.append(int(training_usd / (price_per_hour * num_nodes) * 60))
    return max(1, min(limits))
