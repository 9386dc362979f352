"""What a training run is estimated to take and cost, and the time limit its budget and expiry set."""

from __future__ import annotations

from typing import Protocol

# Hours a run takes besides its training job: its cluster coming up (HyperPod's may take 90 minutes), data staging,
# preflight, results and teardown. A shorter expiry would let the reaper delete the run while it still runs. Its
# nodes are paid for during these hours too: the cost estimate and the budget's time limit count them.
SETUP_HOURS = 2.0
# Minutes the training job runs besides its steps: the image onto the nodes, the process groups, the model built
# and sharded (a checkpoint loaded when resuming), and its last checkpoint written. A budget that paid for the steps
# alone would have the scheduler stop the job before its last steps.
JOB_START_MINUTES = 10


class RunSize(Protocol):
    """The parameters an estimate reads (``dtp.params.TrainParams`` has them)."""

    @property
    def num_nodes(self) -> int: ...

    @property
    def max_steps(self) -> int: ...


def estimate_training_hours(params: RunSize, step_seconds: float) -> float:
    """Hours the training job runs: its steps at the recipe's ``expected_step_seconds``, and its start."""
    return params.max_steps * step_seconds / 3600 + JOB_START_MINUTES / 60


def setup_cost_usd(num_nodes: int, price_per_hour: float) -> float:
    """What the run's nodes cost besides its training job: ``SETUP_HOURS`` (cluster creation, staging, preflight,
    checkpoint save and teardown) on ``num_nodes`` nodes at ``price_per_hour`` each."""
    return SETUP_HOURS * price_per_hour * num_nodes


def estimate_cost_usd(params: RunSize, step_seconds: float, price_per_hour: float) -> float:
    """What the run costs on ``params.num_nodes`` nodes at ``price_per_hour`` each: its training job and the
    ``SETUP_HOURS`` besides it (what ``budget_usd`` is compared with)."""
    training = estimate_training_hours(params, step_seconds) * price_per_hour * params.num_nodes
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
