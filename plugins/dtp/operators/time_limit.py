"""What is left of a job's time limit once the earlier jobs of its name are counted.

The operators that run a job again on a retry (``SlurmSubmitJobOperator``, ``BatchJobOperator``,
``EksPyTorchJobOperator``) hold their jobs to one time limit across the task's tries: a retried task's job gets what
is left of it, not the whole limit again.
"""

from __future__ import annotations

import logging

from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)


def time_left(
    limit: int,
    used: int,
    minimum: int,
    *,
    unit: str,
    used_by: str,
    over_time: type[AirflowFailException],
    limit_name: str = "time limit",
    minimum_name: str = "",
    refused: str = "not submitting another",
) -> int | None:
    """
    What a new job may run: ``limit`` less what the earlier jobs ``used``; None where there is no limit (0 or less).

    Less than ``minimum`` left raises ``over_time``, which fails the task without retries: a retry would have no
    more time. What is left is logged when the earlier jobs used any. ``limit``, ``used`` and ``minimum`` are in
    the same unit, whole numbers (round ``used`` up).

    :param limit: the time limit
    :param used: how long the earlier jobs ran
    :param minimum: the least time worth a new job
    :param unit: the unit, as the messages write it: "s", "min"
    :param used_by: what ran and how, leading the messages: "earlier train jobs ran", "PyTorchJob train was active"
    :param over_time: the exception raised when less than ``minimum`` is left
    :param limit_name: what ``limit`` is, after its value in the error: "time limit", "left of its deadline"
    :param minimum_name: what ``minimum`` is, before its value in the error: "Batch's smallest timeout" (default:
        the value alone)
    :param refused: how the error ends, saying what is not done: "not submitting another", "not creating another"
    """
    if limit <= 0:
        return None
    left = limit - used
    if left < minimum:
        least = f"{minimum_name} ({minimum} {unit})" if minimum_name else f"{minimum} {unit}"
        raise over_time(
            f"{used_by} {used} {unit} of the {limit} {unit} {limit_name}, leaving less than {least}; {refused}"
        )
    if used:
        log.info("%s %d %s: the next one may run %d %s", used_by[:1].upper() + used_by[1:], used, unit, left, unit)
    return left
